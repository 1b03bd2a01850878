"""`python -m sensorvla.train` / `torchrun -m sensorvla.train`: the seed's regression training script."""

from sensorvla.cli.train import train_entry

if __name__ == "__main__":
    train_entry()

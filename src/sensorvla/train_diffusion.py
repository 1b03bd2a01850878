"""`python -m sensorvla.train_diffusion` / `torchrun -m sensorvla.train_diffusion`: the seed's diffusion script."""

from sensorvla.cli.train import train_diffusion_entry

if __name__ == "__main__":
    train_diffusion_entry()

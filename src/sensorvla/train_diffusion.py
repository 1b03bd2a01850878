"""`python -m sensorvla.train_diffusion` / `torchrun -m sensorvla.train_diffusion`: the seed's diffusion script,
which is `sensorvla train` with the diffusion head by default."""

import sys

from sensorvla.cli.app import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], default_head="diffusion"))

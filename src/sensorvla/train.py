"""`python -m sensorvla.train` / `torchrun -m sensorvla.train`: the seed's regression training script, which is
`sensorvla train`."""

import sys

from sensorvla.cli.app import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

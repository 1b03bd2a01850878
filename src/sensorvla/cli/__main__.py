"""`python -m sensorvla.cli`: the `sensorvla` console script."""

import sys

from sensorvla.cli.app import main

sys.exit(main())

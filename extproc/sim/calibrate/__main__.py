"""``python -m extproc.sim.calibrate``: the same as ``extproc sim calibrate``."""

import sys

from extproc.sim.calibrate.cli import main

sys.exit(main())

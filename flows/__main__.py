"""python -m flows: the same command line as `thermocal`."""

import sys

from flows.cli import main

sys.exit(main())

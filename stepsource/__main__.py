"""``python -m stepsource``: the command line."""

import sys

from stepsource.cli import main

sys.exit(main())

"""`python -m hangar_cli ...`: what the `hangar` console script runs."""

import sys

from hangar_cli.cli import main

sys.exit(main())

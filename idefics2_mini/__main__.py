"""`python -m idefics2_mini ...`: see idefics2_mini/cli.py (and `--help`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

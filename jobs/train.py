"""Local training entry point (kept for scripts): the same as `python -m ctr.training.job`."""

import sys

from ctr.training.job import main

if __name__ == "__main__":
    sys.exit(main())

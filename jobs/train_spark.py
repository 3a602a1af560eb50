"""Spark/Databricks training entry point (kept for scripts): the same as `python -m ctr.training.spark_entry`."""

import sys

from ctr.training.spark_entry import main

if __name__ == "__main__":
    sys.exit(main())

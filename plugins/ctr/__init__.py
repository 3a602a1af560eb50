"""Daily-retrained Criteo click-through-rate model: the package behind the `ctr_retrain` DAG.

Only `ctr.airflow.tasks` (and what it alone imports) touches Airflow, so the scoring image
and the Spark job can use this package without Airflow installed.
"""

import os

# LightGBM's OpenMP threads spin at barriers by default; on a busy machine (CI, shared hosts)
# that made 2-thread training ~25x slower than 1 thread. Sleeping waits keep it proportional.
# Must be set before lightgbm (libgomp) is loaded; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

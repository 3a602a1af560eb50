"""Daily-retrained Criteo click-through-rate model: the package behind the `ctr_retrain` DAG.

Only `ctr.airflow_tasks` (and what it alone imports) touches Airflow, so the scoring image
and the Spark job can use this package without Airflow installed.
"""

__version__ = "0.1.0"

"""Daily-retrained Criteo click-through-rate model: the package behind the `ctr_retrain` DAG.

One folder per lifecycle stage (docs/architecture.md has the picture):
  data/        reading raw files, day checks, landing zone and staging, Azure storage, the generator
  features/    the raw-row -> model-input transform and its vocabularies
  training/    the local trainer and its job, chunked datasets, the Spark job, SynapseML, Databricks payloads
  validation/  metrics, holdout scoring, the promotion gate, the evaluation report
  model/       the bundle (format, metadata, loading), its MLflow pyfunc flavour, batch file scoring
  deployment/  the scoring image (local, ACR) and rollouts (local, AKS) behind one interface each
  serving/     the scoring service (`ctr serve`), its encoders and predictors
  airflow/     the only code that imports Airflow: tasks, configuration, hooks, links, notifier
and settings.py (typed settings, the env parser), schema.py, registry.py (MLflow), cli.py (`ctr`), demo.py.
Everything outside `ctr.airflow` runs without Airflow installed (the scoring image, the Spark job);
tests/unit/test_airflow_edge.py proves it.
"""

import os

# LightGBM's OpenMP threads spin at barriers by default; on a busy machine (CI, shared hosts)
# that made 2-thread training ~25x slower than 1 thread. Sleeping waits keep it proportional.
# Must be set before lightgbm (libgomp) is loaded; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["__version__"]

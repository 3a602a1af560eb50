"""ctr_batch_score: batch inference with each newly promoted champion. Wiring only; the work lives in `ctr.airflow.batch`.

Scheduled on the asset `ctr://models/<model>/champion`, which `promote` in ctr_retrain updates: each
promotion's event names the champion version (extra: version, AUC, logical date, image). The run scores
every request file in `requests` with that version through `ctr score` and writes the outputs next to
a `manifest.json` under `<output>/<version>/`. An event without one of those extras fails `champion`,
naming the key.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param, task
from ctr.airflow.assets import CHAMPION
from ctr.airflow.notify import on_task_failure

with DAG(
    dag_id="ctr_batch_score",
    description="Score a folder of request files with each newly promoted CTR champion (ctr score), with a manifest",
    schedule=[CHAMPION],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "ml-platform", "retries": 0, "on_failure_callback": [on_task_failure()]},
    tags=["ctr", "ml", "batch"],
    params={
        "requests": Param("", type="string", description="folder of request files; '' = $CTR_HOME/batch/requests"),
        "output": Param("", type="string", description="output root; '' = $CTR_HOME/batch/scores (then <version>/)"),
    },
    doc_md=__doc__,
) as dag:

    @task(inlets=[CHAMPION])
    def champion(**context):
        from ctr.airflow import batch

        return batch.champion(context)

    @task
    def score(champ, **context):
        from ctr.airflow import batch

        return batch.score(context, champ)

    score(champion())

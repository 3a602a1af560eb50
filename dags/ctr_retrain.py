"""ctr_retrain: the daily CTR retraining DAG. Wiring only; the work lives in `ctr.airflow.tasks`.

The run with logical date D (the scheduled run for the interval [D 02:00, D+1 02:00), which starts
at D+1 02:00 UTC) validates days D-train_days..D,
trains on the train_days days before D, evaluates candidate and champion on day D, and deploys
only a candidate that passes the gate. A rejected candidate ends the run successfully with the
deploy tasks skipped. check_data waits deferred for late days (ctr.airflow.waiting); a borderline
candidate waits in review for a person (ctr.airflow.review); promote's asset event schedules
ctr_batch_score (ctr.airflow.assets); a DeadlineAlert reports a run that neither promoted nor rejected in time.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, CronDataIntervalTimetable, Param, TaskGroup, task
from ctr.airflow.assets import CHAMPION, LANDING
from ctr.airflow.databricks import CtrDatabricksSubmitRunOperator
from ctr.airflow.links import mlflow_model_task, mlflow_run_task
from ctr.airflow.notify import deadline, on_task_failure
from ctr.airflow.review import CandidateReviewOperator
from ctr.airflow.waiting import CheckDataOperator
from ctr.settings import dag_settings

DAG_SETTINGS = dag_settings()  # CTR_IO_RETRIES, CTR_DATABRICKS_POLLING_SECONDS, CTR_DEADLINE_HOURS (parse time)

# I/O tasks retry with exponential backoff (a late export, a flaky registry); CTR_IO_RETRIES=0 for drills/tests.
IO_RETRIES = {"retries": DAG_SETTINGS.io_retries, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True,
              "max_retry_delay": timedelta(minutes=10)}

with DAG(
    dag_id="ctr_retrain",
    description="Daily Criteo CTR retraining: check data, train, gate on the champion, register, build, roll out",
    schedule=CronDataIntervalTimetable("0 2 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "ml-platform", "retries": 0, "on_failure_callback": [on_task_failure()]},
    # a run still running CTR_DEADLINE_HOURS after it was queued (a scheduled run: after its data interval ended)
    # has neither promoted nor rejected: the deadline_missed alert, with the run's link (ctr.airflow.notify)
    deadline=deadline(DAG_SETTINGS.deadline_hours),
    tags=["ctr", "ml"],
    params={
        "train_days": Param(7, type="integer", minimum=1, maximum=60, description="days before the holdout day to train on"),
        "compute": Param("local", enum=["local", "databricks"], description="where training runs"),
        "seed": Param(42, type="integer", description="training seed"),
        "sample_fraction": Param(1.0, type="number", exclusiveMinimum=0, maximum=1,
                                 description="train on this fraction of rows (below 1 only for drills)"),
        "lgb_params": Param({}, type="object", description=(
            "LightGBM parameter overrides, plus derived, target_smoothing, refit, min_count, max_vocab and "
            "rows_per_tree (default 2500000: above it each tree bags that many rows and the learning rate grows, "
            "at most 2x; 0 = off; a parameter given here is never scaled)")),
        "data_wait_timeout": Param(14_400, type="integer", minimum=0,
                                   description="seconds check_data waits (deferred) for late landing days; 0 = fail at once"),
        "completion_marker": Param("_SUCCESS", type="string",
                                   description="a day is complete with this file in it, 'parts:N' data files, or '' any data"),
        "max_bad_fraction": Param(0.001, type="number", minimum=0, maximum=1, description="max malformed-line fraction per day"),
        "min_auc": Param(0.70, type="number", description="gate: candidate AUC floor"),
        "max_auc_drop": Param(0.005, type="number", description="gate: lower 95% CI bound of AUC diff must be >= -this"),
        "max_logloss_rise": Param(0.005, type="number", description="gate: max logloss increase over the champion"),
        "max_ece": Param(0.05, type="number", description="gate: max expected calibration error"),
        "review_band": Param(2, type="number", minimum=1, description="borderline: lower CI bound >= -this x max_auc_drop "
                             "asks a person (review) instead of rejecting, as do gate warnings; 1 = never ask"),
        "review_timeout": Param(14_400, type="integer", minimum=0, description="seconds review waits; then Reject"),
        "approvers": Param([], type="array", items={"type": "string"}, description="user ids who may answer review; [] = any"),
        "max_feature_psi": Param(0.25, type="number", minimum=0, description="gate: max PSI of any feature, holdout vs training range"),
        "warn_feature_psi": Param(0.1, type="number", minimum=0, description="gate: PSI from which a feature is named as a warning"),
        "force_deploy": Param(False, type="boolean", description="deploy even if the gate fails (recorded in tags)"),
        "verify_rows": Param(100, type="integer", minimum=1, description="holdout rows compared live vs offline"),
        "fail_verify": Param(False, type="boolean", description="drill: make verify fail to exercise the rollback"),
        "image_builder": Param("local", enum=["local", "acr"], description="local build context [+ docker] or ACR Tasks"),
        "deploy_target": Param("local", enum=["local", "aks"], description="local scoring service hot swap or AKS rolling update"),
        "rollout_strategy": Param("rolling", enum=["rolling", "canary", "shadow"],
                                  description="rolling: swap all at once (default). canary: canary_percent of requests "
                                              "(by request id) go to the new model while it bakes. shadow: the new model "
                                              "scores every request beside the champion, only the champion answers. "
                                              "verify judges the bake against rollout_limits (docs/rollout.md)"),
        "canary_percent": Param(10, type="number", exclusiveMinimum=0, maximum=100,
                                description="canary: share of requests (percent, by request id) the new model answers"),
        "bake_seconds": Param(60, type="number", exclusiveMinimum=0, maximum=3600,
                              description="canary/shadow: watch the new model this long at most before judging"),
        "bake_requests": Param(1000, type="integer", minimum=1,
                               description="canary/shadow: or until the new model has seen this many requests"),
        "rollout_limits": Param({}, type="object",
                                description="canary/shadow limit overrides: max_error_rate_increase (0.01), "
                                            "max_p99_increase_ms (50), max_mean_shift (0.02), max_psi (0.1), "
                                            "max_candidate_p99_ms (50), max_candidate_errors (0)"),
        "rollout_drill": Param("none", enum=["none", "latency", "errors"],
                               description="drill: the new model only gets +250 ms (latency) or fails half its "
                                           "requests (errors), so the canary/shadow rollback is exercised"),
    },
    doc_md=__doc__,
) as dag:

    @task
    def train(checked, **context):
        from ctr.airflow import tasks

        return tasks.train_local(context)

    # waits deferred (no worker slot) up to data_wait_timeout for the days' completion markers, then validates and stages
    checked = CheckDataOperator(task_id="check_data", inlets=[LANDING], **IO_RETRIES).output

    @task
    def monitor(**context):  # yesterday's live traffic vs the serving model, before anything trains
        from ctr.airflow import tasks

        return tasks.monitor(context)

    monitored = monitor()

    # ---- compute = databricks: the compute choice, then ship code, submit the Spark job, fetch its bundle
    # (docs/databricks.md). One group, so the grid shows the pipeline's stages, not four skipped peers.
    with TaskGroup("databricks", tooltip="compute choice, and training on Databricks when compute=databricks"):

        @task.branch
        def choose_compute(checked, **context):
            from ctr.airflow import databricks

            return databricks.choose_compute(context)

        @task(**IO_RETRIES)
        def ship_to_databricks(**context):
            from ctr.airflow import databricks

            return databricks.ship(context)

        @task
        def databricks_request(shipped, **context):
            from ctr.airflow import databricks

            return databricks.request(context, shipped)

        @task(**IO_RETRIES)
        def fetch_databricks_bundle(payload, **context):
            from ctr.airflow import databricks

            return databricks.fetch(context, payload)

        branch = choose_compute(checked)
        shipped = ship_to_databricks()
        payload = databricks_request(shipped)
        submitted = CtrDatabricksSubmitRunOperator(
            task_id="train_databricks", json=payload,
            databricks_conn_id="{{ var.value.get('ctr_databricks_conn_id', 'databricks_default') }}",
            polling_period_seconds=DAG_SETTINGS.databricks_polling_seconds,
            retries=IO_RETRIES["retries"], retry_delay=timedelta(minutes=2))
        remote_bundle = fetch_databricks_bundle(payload)
        branch >> shipped
        submitted >> remote_bundle

    @task(trigger_rule="none_failed_min_one_success")
    def trained(local, remote):
        from ctr.airflow import databricks

        return databricks.join(local, remote)

    @mlflow_run_task  # extra link "MLflow run"
    def evaluate(trained, **context):
        from ctr.airflow import tasks

        return tasks.evaluate(context, trained)

    @task.short_circuit
    def gate(evaluated, **context):
        from ctr.airflow import tasks

        return tasks.gate(context, evaluated)

    @mlflow_model_task(**IO_RETRIES)  # extra links "MLflow run", "MLflow model version"
    def register(evaluated, **context):
        from ctr.airflow import tasks

        return tasks.register(context, evaluated)

    @task(**IO_RETRIES)
    def build_image(registered, **context):
        from ctr.airflow import tasks

        return tasks.build_image(context, registered)

    @task
    def rollout(image, **context):
        from ctr.airflow import tasks

        return tasks.rollout(context, image)

    @task
    def verify(rolled, **context):
        from ctr.airflow import tasks

        return tasks.verify(context, rolled)

    @task(outlets=[CHAMPION], **IO_RETRIES)  # its event schedules ctr_batch_score
    def promote(verified, **context):
        from ctr.airflow import tasks

        return tasks.promote(context, verified)

    # a borderline candidate waits here for Approve / Reject (Required Actions); others pass straight through
    review = CandidateReviewOperator(task_id="review")

    local_bundle = train(checked)
    branch >> local_bundle
    monitored >> branch  # the monitor runs before training, on either compute
    evaluated = evaluate(trained(local_bundle, remote_bundle))
    registered = register(evaluated)
    gate(evaluated) >> review >> registered
    promote(verify(rollout(build_image(registered))))

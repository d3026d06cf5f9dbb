"""Jobs, schedules and sensors: the pipeline running unattended.

- `landing_sensor` (every 5 s) asks for a `landing_job` run per contiguous range of landing
  days whose files changed since raw_metrics last loaded them: the days are loaded and
  normalized, then the change points, causes, trends and alert outbox that they can move are
  refreshed, in one run. Its run key is the range and its files' checksums, so a day is
  loaded once per version of its files.
- `refresh_after_ingest` (a run-status sensor) follows an ingest run launched some other way
  (`daily_ingest_job` from the UI, a backfill) with `alerting_job` — unless a refresh is
  already waiting to start, which will read the new data too.
- Schedules: the whole analysis daily, retention daily, model retraining weekly.
All of them run by default, so `dagster dev` just works.
"""

import json
from datetime import date, timedelta
from pathlib import Path

import dagster as dg

from perf_pipeline.defs.analysis import utc_now
from perf_pipeline.defs.partitions import daily_partitions
from perf_pipeline.defs.resources import MonitoringResource, WarehouseResource
from perf_pipeline.defs.runner import RANGE_END_TAG, RANGE_START_TAG, changed_landing, contiguous_ranges
from perf_pipeline.ingest.landing import checksum, remove_days_before
from perf_pipeline.storage.warehouse import WarehouseLockedError

_INGESTED = dg.AssetSelection.assets("raw_metrics", "normalized_timeseries")
_MODELS = dg.AssetSelection.assets("performance_models")

daily_ingest_job = dg.define_asset_job(
    "daily_ingest_job",
    selection=_INGESTED,
    description="Load and normalize landing days (one run may cover a range of days).",
)

analysis_job = dg.define_asset_job(
    "analysis_job",
    selection=_INGESTED.downstream() - _INGESTED,
    description="Refresh every analysis asset over the rolling window, models included.",
)

daily_refresh_job = dg.define_asset_job(
    "daily_refresh_job",
    selection=_INGESTED.downstream() - _INGESTED - _MODELS,
    description="Every analysis asset with the models trained last (retraining is weekly).",
)

model_training_job = dg.define_asset_job(
    "model_training_job",
    selection=dg.AssetSelection.assets("performance_models", "performance_forecasts",
                                       "performance_dashboard"),
    description="Retrain the forecasting models, forecast with them, and show the new "
                "forecasts on the dashboard.",
)

_ALERTING = dg.AssetSelection.assets("trend_stats", "change_points", "metric_correlations",
                                     "regression_causes", "regression_alerts", "performance_dashboard")

alerting_job = dg.define_asset_job(
    "alerting_job",
    selection=_ALERTING,
    description="What new data can raise an alert about: trends, change points, causes, outbox; "
                "then the dashboard, so it shows them.",
    # Its steps run one at a time anyway (the duckdb pool); in one process they skip a
    # process start each, which is most of the time between landing and the alert.
    executor_def=dg.in_process_executor,
)

landing_job = dg.define_asset_job(
    "landing_job",
    selection=_INGESTED | _ALERTING,
    description="What landing_sensor launches: load and normalize the landing days that "
                "changed, then refresh what they can raise an alert about, in one run.",
    # One run, not an ingest run followed by alerting_job: that saved a run launch and a
    # sensor's wait between the two (about 15 s of the time from landing to the alert).
    executor_def=dg.in_process_executor,
)


@dg.op(pool="duckdb", description="Delete metric rows, rollups and landing days past their retention.")
def apply_retention(context: dg.OpExecutionContext, warehouse: WarehouseResource,
                    monitoring: MonitoringResource) -> dict:
    settings = monitoring.settings()
    now = utc_now()
    raw_before = now - timedelta(days=settings.retention_period_days)
    rollups_before = now - timedelta(days=settings.rollup_retention_days)
    database = warehouse.database
    size_before = _size(database)
    with warehouse.open() as wh:
        deleted = wh.apply_retention(raw_before, rollups_before)
    days, landing_bytes = remove_days_before(warehouse.landing, raw_before.date())
    # Dagster keeps a retired day's materializations: its open-source event log storages
    # (SQLite, Postgres) cannot wipe single partitions (`wipe_asset_partitions` raises
    # NotImplementedError there). So each retired partition gets an observation saying so,
    # which the UI shows on the partition beside its old materialization.
    retired = [day.isoformat() for day in days if day >= _first_partition_day()]
    for asset_key in (dg.AssetKey("raw_metrics"), dg.AssetKey("normalized_timeseries")):
        for key in retired:
            context.log_event(dg.AssetObservation(
                asset_key=asset_key, partition=key,
                metadata={"retired": dg.MetadataValue.text(
                    f"rows and landing files deleted by retention (older than {raw_before.date()})")}))
    report = {"raw_before": raw_before.isoformat(), "rollups_before": rollups_before.isoformat(),
              **{f"rows_deleted_{table}": rows for table, rows in deleted.items()},
              "landing_days_removed": len(days), "landing_bytes_freed": landing_bytes,
              "partitions_marked_retired": len(retired),
              "database_bytes_before": size_before, "database_bytes_after": _size(database)}
    context.log.info(json.dumps(report))
    context.add_output_metadata({key: dg.MetadataValue.text(str(value)) for key, value in report.items()})
    return report


def _first_partition_day() -> date:
    return date.fromisoformat(daily_partitions.start.strftime("%Y-%m-%d"))


def _size(path: str) -> int:
    file = Path(path)
    return file.stat().st_size if file.exists() else 0


@dg.job(description="Apply retention_period_days and rollup_retention_days from perf_pipeline.yaml.")
def retention_job():
    apply_retention()


daily_analysis_schedule = dg.ScheduleDefinition(
    name="daily_analysis_schedule", job=daily_refresh_job, cron_schedule="0 3 * * *",
    execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.RUNNING,
    description="The whole analysis over the rolling window, every day at 03:00 UTC.")

retention_schedule = dg.ScheduleDefinition(
    name="retention_schedule", job=retention_job, cron_schedule="30 2 * * *",
    execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Retention every day at 02:30 UTC.")

weekly_model_schedule = dg.ScheduleDefinition(
    name="weekly_model_schedule", job=model_training_job, cron_schedule="0 4 * * 0",
    execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Retrain the forecasting models every Sunday at 04:00 UTC.")


def _digest(files: dict[str, str]) -> str:
    return checksum(json.dumps(sorted(files.items())).encode())[:16]


@dg.sensor(job=landing_job, minimum_interval_seconds=5,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="A run of landing_job (ingest, then the alerting refresh) for every "
                       "range of landing days whose files changed.")
def landing_sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource):
    try:
        changed = changed_landing(warehouse.landing, Path(warehouse.database))
    except WarehouseLockedError:
        return dg.SkipReason("the database is being written; checking again on the next tick")
    requested = json.loads(context.cursor) if context.cursor else {}
    valid_from = _first_partition_day()
    days = []
    for day, files in sorted(changed.items()):
        digest = _digest(files)
        if requested.get(day.isoformat()) == digest:
            continue  # already asked for this version of the day
        if day < valid_from:
            context.log.warning(f"landing day {day} is before the first partition; not loaded")
            continue
        requested[day.isoformat()] = digest
        days.append(day)
    context.update_cursor(json.dumps(requested, sort_keys=True))
    # A run per contiguous range, as `perf-pipeline run` does: raw_metrics loads a range in
    # one run (single-run backfill policy), so three weeks landing at once is one run, not 21.
    requests = []
    for first, last in contiguous_ranges(days):
        digest = _digest({d: requested[d] for d in requested if first.isoformat() <= d <= last.isoformat()})
        requests.append(dg.RunRequest(
            run_key=f"ingest:{first.isoformat()}..{last.isoformat()}:{digest}",
            tags={RANGE_START_TAG: first.isoformat(), RANGE_END_TAG: last.isoformat()}))
    return requests or dg.SkipReason("no new or changed landing files")


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, monitored_jobs=[daily_ingest_job],
                      request_job=alerting_job, default_status=dg.DefaultSensorStatus.RUNNING,
                      minimum_interval_seconds=5,
                      description="After each successful ingest run, refresh what can raise an alert.")
def refresh_after_ingest(context: dg.RunStatusSensorContext):
    waiting = context.instance.get_run_records(filters=dg.RunsFilter(
        job_name=alerting_job.name, statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED]),
        limit=1)
    if waiting:  # a refresh that has not started yet will read this run's data too
        return dg.SkipReason(f"a refresh is already waiting ({waiting[0].dagster_run.run_id})")
    return dg.RunRequest(run_key=f"refresh:{context.dagster_run.run_id}")

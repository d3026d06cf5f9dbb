"""Runs the asset graph from the command line through a real Dagster instance.

`perf-pipeline run` launches the same jobs the UI would, recorded in the instance that
`dagster dev` shows: one run per contiguous range of new or changed landing days (the
partitioned assets take a range in one run), then one run of the analysis.
"""

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import psutil
import yaml

from perf_pipeline.config import Paths
from perf_pipeline.ingest.landing import landing_state
from perf_pipeline.storage.warehouse import open_warehouse, writer_lock

# Models are retrained weekly (model_training_schedule); a run retrains older ones.
MODEL_MAX_AGE = timedelta(days=7)
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
# Which process of which machine runs a run the CLI launched: a run whose process is gone was
# killed, and nothing else would ever end it (no daemon watches runs executed in-process).
PID_TAG = "perf_pipeline/pid"
HOST_TAG = "perf_pipeline/host"
# Failures reach the user as one line from PipelineRunError; the run's own log keeps the rest.
_QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


@dataclass
class RunReport:
    days_loaded: list[date] = field(default_factory=list)
    days_skipped: list[tuple[date, str]] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)


class PipelineRunError(RuntimeError):
    pass


def instance_settings(paths: Paths) -> dict:
    """dagster.yaml for an instance kept under PERF_PIPELINE_HOME (the project's settings)."""
    storage = paths.dagster_home / "storage"
    return {
        "telemetry": {"enabled": False},
        "storage": {"sqlite": {"base_dir": str(storage)}},
        "local_artifact_storage": {"module": "dagster._core.storage.root",
                                   "class": "LocalArtifactStorage",
                                   "config": {"base_dir": str(paths.dagster_home)}},
        "concurrency": {"pools": {"default_limit": 1}},
    }


def open_instance(paths: Paths) -> dg.DagsterInstance:
    """The user's instance when DAGSTER_HOME is set, else one under PERF_PIPELINE_HOME/dagster."""
    if os.environ.get("DAGSTER_HOME"):
        return dg.DagsterInstance.get()
    paths.dagster_home.mkdir(parents=True, exist_ok=True)
    settings = paths.dagster_home / "dagster.yaml"
    settings.write_text(yaml.safe_dump(instance_settings(paths), sort_keys=False))
    return dg.DagsterInstance.from_config(str(paths.dagster_home))


def changed_landing(landing: Path, database: Path) -> dict[date, dict[str, str]]:
    """The landing days whose files differ from what raw_metrics last loaded, or that were
    loaded but not normalized since (a run killed between the two), with their files'
    checksums. Raises WarehouseLockedError while another process writes."""
    landed = landing_state(landing)
    if not database.exists():
        return landed
    with open_warehouse(database, read_only=True) as wh:
        tables = wh.table_names()
        if "ingested_files" not in tables:
            return landed
        loaded = wh.ingested_checksums()
        # a database from before normalized_days: its migration takes every loaded day as normalized
        normalized = wh.normalized_day_set() if "normalized_days" in tables else set(loaded)
    return {day: files for day, files in landed.items()
            if loaded.get(day) != files or day not in normalized}


def changed_days(paths: Paths) -> list[date]:
    """Landing days whose files differ from what raw_metrics last loaded."""
    return sorted(changed_landing(paths.landing, paths.database))


def contiguous_ranges(days: list[date]) -> list[tuple[date, date]]:
    ranges: list[tuple[date, date]] = []
    for day in sorted(days):
        if ranges and day == ranges[-1][1] + timedelta(days=1):
            ranges[-1] = (ranges[-1][0], day)
        else:
            ranges.append((day, day))
    return ranges


def _root_cause(error) -> str:
    """The innermost error's message: the user's problem, not Dagster's wrapping of it."""
    while error.cause is not None:
        error = error.cause
    return error.message.strip().splitlines()[-1]


def _process_tags() -> dict[str, str]:
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def _alive(pid: int, since: float) -> bool:
    """Whether process `pid` exists and is the one that was running at `since` (not a later
    process that got the same number)."""
    try:
        return psutil.Process(pid).create_time() <= since + 1
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def end_abandoned_runs(instance: dg.DagsterInstance) -> list[str]:
    """Runs the CLI started on this machine whose process has died (killed mid-run): marked
    failed and their pool slots freed. Otherwise such a run stays STARTED and keeps the
    `duckdb` pool's one slot, and every later run waits for it forever."""
    records = instance.get_run_records(filters=dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED],
        tags={HOST_TAG: socket.gethostname()}))
    ended = []
    for record in records:
        run = record.dagster_run
        pid = run.tags.get(PID_TAG, "")
        if not pid.isdigit() or _alive(int(pid), record.create_timestamp.timestamp()):
            continue
        instance.report_run_failed(run, f"its process ({pid}) is gone: killed before the run ended")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        ended.append(run.run_id)
    return ended


def _execute(job: dg.JobDefinition, instance: dg.DagsterInstance, *, run_config: dict,
             tags: dict[str, str] | None = None) -> str:
    result = job.execute_in_process(instance=instance, run_config=run_config,
                                    tags={**(tags or {}), **_process_tags()}, raise_on_error=False)
    if not result.success:
        failures = [_root_cause(event.event_specific_data.error)
                    for event in result.all_events
                    if event.is_step_failure and event.event_specific_data.error]
        raise PipelineRunError(f"run {result.run_id} of {job.name} failed: "
                               + ("; ".join(failures) or "see the run in dagster dev"))
    return result.run_id


def models_are_fresh(paths: Paths, *, now: datetime | None = None) -> bool:
    """Whether every metric's forecasting model was trained within MODEL_MAX_AGE."""
    if not paths.database.exists():
        return False
    with open_warehouse(paths.database, read_only=True) as wh:
        oldest = wh.oldest_current_model()
    now = now or datetime.now(timezone.utc).replace(tzinfo=None)
    return oldest is not None and now - oldest <= MODEL_MAX_AGE


def run_pipeline(paths: Paths, *, days: list[date] | None = None,
                 trend_config: dict | None = None, analyse: bool = True,
                 retrain: bool | None = None,
                 progress: Callable[[str], None] = print) -> RunReport:
    """Materialize new or changed landing days (or `days`) and, with `analyse`, everything
    downstream (without it, only raw_metrics and normalized_timeseries: what the CI gate reads).

    The forecasting models are retrained when `retrain` is true, or (None) when they are
    missing or older than MODEL_MAX_AGE, as the weekly schedule would; otherwise the
    analysis forecasts with the models already trained."""
    from perf_pipeline.definitions import build_defs

    paths.ensure()
    defs = build_defs(paths)
    report = RunReport()
    partitions = defs.resolve_job_def("daily_ingest_job").partitions_def
    if paths.database.exists():
        # fail at once while another process writes (the steps would wait for it, silently)
        with writer_lock(paths.database), open_warehouse(paths.database, read_only=True):
            pass
    with open_instance(paths) as instance:
        for run_id in end_abandoned_runs(instance):
            progress(f"run {run_id} was killed before it ended: marked failed, its pool slot freed")
        valid = set(partitions.get_partition_keys(dynamic_partitions_store=instance))
        for day in (changed_days(paths) if days is None else days):
            if day.isoformat() in valid:
                report.days_loaded.append(day)
            else:
                report.days_skipped.append(
                    (day, "outside the daily partitions (see PERF_PIPELINE_START_DATE)"))
        ingest_job = defs.resolve_job_def("daily_ingest_job")
        for first, last in contiguous_ranges(report.days_loaded):
            count = (last - first).days + 1
            progress(f"loading {first} … {last} ({count} day{'s' * (count > 1)})")
            report.run_ids.append(_execute(
                ingest_job, instance, run_config=_QUIET_LOGS,
                tags={RANGE_START_TAG: first.isoformat(), RANGE_END_TAG: last.isoformat()}))
        if not analyse:
            return report
        retrain = not models_are_fresh(paths) if retrain is None else retrain
        progress("analysing the window: every asset of the analysis group"
                 + ("" if retrain else " (forecasting models trained this week are kept)"))
        window = {"window_days": trend_config["window_days"]} if trend_config and "window_days" in trend_config else {}
        run_config = {**_QUIET_LOGS, "ops": {"trend_stats": {"config": trend_config or {}},
                                             "change_points": {"config": window},
                                             "seasonal_profiles": {"config": window}}}
        job = "analysis_job" if retrain else "daily_refresh_job"
        report.run_ids.append(_execute(defs.resolve_job_def(job), instance, run_config=run_config))
    return report


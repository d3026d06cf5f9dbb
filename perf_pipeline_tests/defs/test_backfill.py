"""A 90-day backfill of raw_metrics and normalized_timeseries with Dagster's multiprocess
executor: `dagster asset materialize --partition-range` as an owner types it, on a real
instance whose dagster.yaml limits the `duckdb` pool to one; the same range submitted as the
UI does, through the backfill daemon's loop; and days launched as separate runs at the same
time. DuckDB writers must stay serialized, every day's rows must be accounted for, and a
repeated backfill must change nothing.
"""

import logging
import os
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pytest
import yaml

import perf_pipeline
from perf_pipeline.config import Paths
from perf_pipeline.defs.resources import WRITER_LOCK_HELD, WRITER_LOCK_RELEASED
from perf_pipeline.defs.runner import RANGE_END_TAG, RANGE_START_TAG, instance_settings
from perf_pipeline.ingest.landing import ingest_files
from perf_pipeline.ingest.simulator import simulate_fleet
from perf_pipeline.storage.warehouse import open_warehouse
from perf_pipeline_tests.conftest import metric_row, write_jsonl
from perf_pipeline_tests.defs.test_postgres_instance import (  # noqa: F401 (a fixture)
    PASSWORD_ENV,
    postgres_instance_home,
    postgres_server,
)

END = datetime(2026, 11, 1, tzinfo=timezone.utc)
DAYS = 90
FIRST_DAY = END.date() - timedelta(days=DAYS)
LAST_DAY = END.date() - timedelta(days=1)
BACKFILLED = "raw_metrics,normalized_timeseries"
CONCURRENT_DAYS = (date(2026, 9, 1), date(2026, 9, 2))
# DuckDB's words for a file another process holds ("Could not set lock on file ...:
# Conflicting lock is held in ...").
LOCK_ERROR = re.compile(r"could not set lock|conflicting lock", re.IGNORECASE)
REPO_ROOT = Path(perf_pipeline.__file__).resolve().parents[1]


def _bad_rows() -> list[dict]:
    """Two rows every tenth day that validation must quarantine."""
    rows = []
    for offset in range(0, DAYS, 10):
        at = f"{(FIRST_DAY + timedelta(days=offset)).isoformat()}T12:00:00+00:00"
        rows.append(metric_row(at, value=-1.0, node_id="node-01"))
        rows.append(metric_row(at, "no_such_metric", 1.0, node_id="node-01"))
    return rows


@pytest.fixture
def landed_fleet(paths, tmp_path, monkeypatch) -> tuple[Paths, Counter]:
    """90 days of a small simulated fleet plus some bad rows in the landing archive, a
    DAGSTER_HOME with the project's instance settings, and the rows landed per day."""
    summary = simulate_fleet(tmp_path / "sim", days=DAYS, nodes=5, tests=5, seed=3, end=END,
                             runs_per_day=1)
    bad = write_jsonl(tmp_path / "bad.jsonl", _bad_rows())
    ingest_files([*sorted((tmp_path / "sim").rglob("*.jsonl")), bad], paths.landing,
                 today=END.date())
    landed = Counter({date.fromisoformat(folder.name): sum(
        len(path.read_text().splitlines()) for path in folder.glob("*.jsonl"))
        for folder in paths.landing.iterdir()})
    assert sum(landed.values()) == summary.rows + len(_bad_rows())
    (paths.dagster_home / "dagster.yaml").write_text(
        yaml.safe_dump(instance_settings(paths), sort_keys=False))
    monkeypatch.setenv("DAGSTER_HOME", str(paths.dagster_home))
    # Create the instance's storage once, as a deployment has it before any run: runs that
    # start at the same time on a new SQLite instance would race to create its tables.
    with dg.DagsterInstance.get():
        pass
    return paths, landed


def _materialize(*partition_args: str) -> subprocess.Popen:
    """`dagster asset materialize` of the two daily assets, as a user types it (its implicit
    asset job runs on the default executor: multiprocess)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "perf_pipeline.definitions",
         "--select", BACKFILLED, *partition_args],
        cwd=REPO_ROOT, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output


def _stored_counts(paths: Paths) -> dict[date, tuple[int, ...]]:
    """Per day: rows read, loaded, quarantined, normalized points, hourly rollups."""
    counts = {}
    with open_warehouse(paths.database, read_only=True) as wh:
        for offset in range(DAYS):
            day = FIRST_DAY + timedelta(days=offset)
            start = datetime(day.year, day.month, day.day)
            stored = wh.day_counts(day)
            normalized, rollups = wh.con.execute("""
                SELECT (SELECT count(*) FROM normalized_timeseries WHERE timestamp >= $1 AND timestamp < $2),
                       (SELECT count(*) FROM metric_rollups_hourly WHERE hour >= $1 AND hour < $2)
            """, [start, start + timedelta(days=1)]).fetchall()[0]
            assert wh.duplicate_series_points(day) == 0, day
            counts[day] = (stored["rows_read"], stored["rows_loaded"], stored["rows_quarantined"],
                           int(normalized), int(rollups))
    return counts


def _assert_clean_runs(instance: dg.DagsterInstance, runs: list[dg.DagsterRun]) -> None:
    """Every run succeeded on the multiprocess executor with no DuckDB lock error logged, and
    no two write sessions held the database at the same time, in one run or across runs."""
    windows = []
    for run in runs:
        assert run.status == dg.DagsterRunStatus.SUCCESS, run.run_id
        records = instance.all_logs(run.run_id)
        assert not [r.message for r in records if LOCK_ERROR.search(r.message or "")
                    or LOCK_ERROR.search(str(r.dagster_event.event_specific_data)
                                         if r.dagster_event else "")]
        events = [r for r in records if r.dagster_event]
        assert any(r.dagster_event.event_type == dg.DagsterEventType.STEP_WORKER_STARTED
                   for r in events), "steps ran in worker processes (multiprocess executor)"
        succeeded = {r.step_key for r in events
                     if r.dagster_event.event_type == dg.DagsterEventType.STEP_SUCCESS}
        assert succeeded == {"raw_metrics", "normalized_timeseries"}
        # The resource logs when it holds and releases the database's writer lock: those
        # lines bound each write session, in whichever process and run it ran.
        held = [r.timestamp for r in records if (r.user_message or "").startswith(WRITER_LOCK_HELD)]
        released = [r.timestamp for r in records
                    if (r.user_message or "").startswith(WRITER_LOCK_RELEASED)]
        assert len(held) == len(released) >= len(succeeded), run.run_id
        windows += zip(sorted(held), sorted(released))
    windows.sort()
    for (_, earlier_end), (later_start, _) in zip(windows, windows[1:]):
        assert later_start >= earlier_end, "two duckdb writers overlapped"


@pytest.mark.slow
def test_a_90_day_backfill_with_the_multiprocess_executor_loads_every_day_once(landed_fleet):
    paths, landed = landed_fleet

    _finish(_materialize("--partition-range", f"{FIRST_DAY}...{LAST_DAY}"))

    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert len(runs) == 1, "a single-run backfill policy makes the range one run"
        assert (runs[0].tags[RANGE_START_TAG], runs[0].tags[RANGE_END_TAG]) == (
            FIRST_DAY.isoformat(), LAST_DAY.isoformat())
        _assert_clean_runs(instance, runs)
        days = {(FIRST_DAY + timedelta(days=i)).isoformat() for i in range(DAYS)}
        for asset in ("raw_metrics", "normalized_timeseries"):
            assert instance.get_materialized_partitions(dg.AssetKey(asset)) == days
        assert instance.event_log_storage.get_concurrency_info("duckdb").slot_count == 1
    counts = _stored_counts(paths)
    assert set(counts) == set(landed) and len(counts) == DAYS
    bad_per_day = Counter(date.fromisoformat(r["timestamp"][:10]) for r in _bad_rows())
    for day, (read, loaded, quarantined, normalized, rollups) in counts.items():
        assert read == landed[day] == loaded + quarantined, day
        assert quarantined == bad_per_day[day], day
        # The simulator sends one value per metric, test, node and run: all of them survive.
        assert normalized == loaded and rollups > 0, day

    # The same backfill again: one more successful run, not one row more or less.
    _finish(_materialize("--partition-range", f"{FIRST_DAY}...{LAST_DAY}"))
    assert _stored_counts(paths) == counts
    with dg.DagsterInstance.get() as instance:
        assert [run.status for run in instance.get_runs()] == [dg.DagsterRunStatus.SUCCESS] * 2


@pytest.mark.slow
def test_days_launched_as_separate_runs_at_once_take_turns_on_the_duckdb_pool(
        landed_fleet, postgres_server, tmp_path, monkeypatch):
    paths, landed = landed_fleet
    # Runs at the same moment, on the Postgres instance storage a fleet would use. Dagster's
    # claim of a pool slot is not atomic there either (each statement commits on its own, so
    # SELECT ... FOR UPDATE holds nothing), and two runs that start together can both get the
    # `duckdb` pool's one slot; the database's writer lock still makes them take turns.
    dagster_home = postgres_instance_home(tmp_path / "dagster_pg", postgres_server)
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    monkeypatch.setenv(PASSWORD_ENV, postgres_server.password)
    with dg.DagsterInstance.get() as instance:
        instance.event_log_storage.initialize_concurrency_limit_to_default("duckdb")

    launched = [_materialize("--partition", day.isoformat()) for day in CONCURRENT_DAYS]
    for process in launched:
        _finish(process)

    counts = _stored_counts(paths)
    for day in CONCURRENT_DAYS:
        read, loaded, quarantined, normalized, _ = counts[day]
        assert read == landed[day] == loaded + quarantined and normalized == loaded, day
    assert all(counts[day][:2] == (0, 0) for day in counts if day not in CONCURRENT_DAYS)
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert sorted(run.tags["dagster/partition"] for run in runs) == [
            day.isoformat() for day in CONCURRENT_DAYS]
        _assert_clean_runs(instance, runs)


@pytest.mark.slow
# Dagster's own asset backfill code calls its deprecated AssetSelection.sources().
@pytest.mark.filterwarnings("ignore:Function `AssetSelection.sources` is deprecated")
def test_a_backfill_launched_as_the_ui_does_runs_through_the_backfill_daemon(landed_fleet):
    """The UI's *Materialize* over a range stores an asset backfill; the daemon's backfill
    loop turns it into runs, launched on a code server like any run from the UI. Run launch
    is immediate here (no run queue daemon in the test), otherwise the path is the UI's."""
    from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
    from dagster._core.utils import make_new_backfill_id
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import ModuleTarget
    from dagster._daemon.backfill import execute_backfill_iteration

    paths, landed = landed_fleet
    settings = {**instance_settings(paths), "run_coordinator": {
        "module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"}}
    (paths.dagster_home / "dagster.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    keys = [dg.AssetKey(name) for name in BACKFILLED.split(",")]
    days = [(FIRST_DAY + timedelta(days=i)).isoformat() for i in range(DAYS)]
    target = ModuleTarget(module_name="perf_pipeline.definitions", attribute=None,
                          working_directory=str(REPO_ROOT), location_name="perf_pipeline")
    with dg.DagsterInstance.get() as instance, \
            WorkspaceProcessContext(instance, target) as workspace:
        backfill = PartitionBackfill.from_asset_partitions(
            backfill_id=make_new_backfill_id(),
            asset_graph=workspace.create_request_context().asset_graph,
            partition_names=days, asset_selection=keys, backfill_timestamp=time.time(), tags={},
            dynamic_partitions_store=instance, all_partitions=False, title=None,
            description=None, run_config=None)
        instance.add_backfill(backfill)
        deadline = time.monotonic() + 600
        while instance.get_backfill(backfill.backfill_id).status == BulkActionStatus.REQUESTED:
            assert time.monotonic() < deadline, "the backfill did not finish in 10 minutes"
            list(execute_backfill_iteration(workspace, logging.getLogger("backfill")))
            time.sleep(1)
        assert instance.get_backfill(backfill.backfill_id).status == BulkActionStatus.COMPLETED_SUCCESS
        runs = instance.get_runs()
        assert len(runs) == 1, "single-run backfill policies make the range one run"
        assert runs[0].tags["dagster/backfill"] == backfill.backfill_id
        _assert_clean_runs(instance, runs)
        for key in keys:
            assert instance.get_materialized_partitions(key) == set(days)
    counts = _stored_counts(paths)
    for day, (read, loaded, quarantined, normalized, _) in counts.items():
        assert read == landed[day] == loaded + quarantined and normalized == loaded, day

import subprocess
import sys

import pytest

from perf_pipeline.storage.schema import LATEST_VERSION, current_version, migrate
from perf_pipeline.storage.warehouse import WarehouseLockedError, open_warehouse

ORIGINAL_COLUMNS = ["id", "timestamp", "metric_name", "metric_value", "test_name", "test_type",
                    "node_id", "node_type", "test_run_id", "ci_job_id", "context_data"]


def test_migrations_apply_once_and_keep_data(tmp_path):
    database = tmp_path / "perf.duckdb"
    with open_warehouse(database) as wh:
        wh.con.execute("INSERT INTO ingested_files VALUES ('2026-11-01', 'a.jsonl', 'x', 1, 1, 1, 0,"
                       " 'loaded', now()::TIMESTAMP)")
    with open_warehouse(database) as wh:  # second open: nothing re-applied, nothing lost
        assert current_version(wh.con) == LATEST_VERSION
        assert wh.con.execute("SELECT count(*) FROM schema_version").fetchall()[0][0] == LATEST_VERSION
        assert wh.table_counts(["ingested_files"]) == {"ingested_files": 1}
        assert migrate(wh.con) == LATEST_VERSION


def test_performance_metrics_keeps_the_original_columns(tmp_path):
    with open_warehouse(tmp_path / "perf.duckdb") as wh:
        columns = [r[0] for r in wh.con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = "
            "'performance_metrics' ORDER BY ordinal_position").fetchall()]
    assert columns[: len(ORIGINAL_COLUMNS)] == ORIGINAL_COLUMNS


def test_a_database_from_a_newer_version_is_refused(tmp_path):
    database = tmp_path / "perf.duckdb"
    with open_warehouse(database) as wh:
        wh.con.execute("INSERT INTO schema_version VALUES (?, 'future', now()::TIMESTAMP)",
                       [LATEST_VERSION + 1])
    with pytest.raises(RuntimeError, match="newer than this perf_pipeline"):
        with open_warehouse(database):
            pass


def test_catalog_tables_mirror_the_code(tmp_path):
    from perf_pipeline import catalog

    with open_warehouse(tmp_path / "perf.duckdb") as wh:
        counts = wh.con.execute("SELECT (SELECT count(*) FROM metric_catalog), "
                                "(SELECT count(*) FROM metric_aliases)").fetchall()[0]
    assert counts == (len(catalog.METRICS), len(catalog.alias_rows()))


def test_the_catalog_mirror_follows_the_code_when_it_changes(tmp_path, monkeypatch):
    """An open leaves a matching mirror alone and rewrites one that differs from the code:
    edited in the database, or changed in the code (a new release's thresholds)."""
    import dataclasses

    from perf_pipeline import catalog

    database = tmp_path / "perf.duckdb"
    with open_warehouse(database) as wh:
        wh.con.execute("UPDATE metric_catalog SET alert_threshold_percent = 99 "
                       "WHERE metric_name = 'build_time'")
        wh.con.execute("DELETE FROM metric_aliases WHERE alias = 'build_time'")
    with open_warehouse(database) as wh:
        threshold, = wh.con.execute("SELECT alert_threshold_percent FROM metric_catalog "
                                    "WHERE metric_name = 'build_time'").fetchall()[0]
        aliases = wh.con.execute("SELECT count(*) FROM metric_aliases").fetchall()[0][0]
    assert threshold == catalog.get_metric("build_time").alert_threshold_percent != 99
    assert aliases == len(catalog.alias_rows())

    changed = [dataclasses.replace(m, alert_threshold_percent=42.0) if m.name == "build_time" else m
               for m in catalog.METRICS]
    monkeypatch.setattr(catalog, "METRICS", changed)
    with open_warehouse(database) as wh:
        assert wh.con.execute("SELECT alert_threshold_percent FROM metric_catalog "
                              "WHERE metric_name = 'build_time'").fetchall() == [(42.0,)]


def _holding(script: str, *args: str) -> subprocess.Popen:
    """Another process running `script`, once it has said it holds the database."""
    holder = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    if holder.stdout.readline().strip() != "held":
        holder.kill()
        raise AssertionError("the other process never held the database")
    return holder


def test_a_writer_in_another_process_gives_a_clear_error(tmp_path):
    database = tmp_path / "perf.duckdb"
    with open_warehouse(database):
        pass
    holder = _holding("import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                      "print('held', flush=True); time.sleep(60)", str(database))
    try:
        with pytest.raises(WarehouseLockedError, match="in use by another process"):
            with open_warehouse(database):
                pass
    finally:
        holder.kill()
        holder.wait()
    with open_warehouse(database) as wh:  # free again once the other writer is gone
        assert wh.table_counts(["performance_metrics"]) == {"performance_metrics": 0}


HOLD_WRITER = """
import sys, time
from perf_pipeline.storage.warehouse import open_warehouse
with open_warehouse(sys.argv[1]) as wh:
    print('held', flush=True)
    time.sleep(float(sys.argv[2]))
    wh.con.execute("CREATE TABLE held_by_the_first_writer AS SELECT 1 AS x")
print('released', flush=True)
"""


def test_a_writer_that_finds_the_lock_taken_fails_at_once_or_waits_its_turn(tmp_path):
    """open_warehouse fails fast on another process's writer lock; the Dagster resource
    waits for it, then writes after the first writer is done (never beside it)."""
    from perf_pipeline.defs.resources import WarehouseResource

    database = tmp_path / "perf.duckdb"
    holder = _holding(HOLD_WRITER, str(database), "3")
    try:
        with pytest.raises(WarehouseLockedError, match="in use by another process"):
            with open_warehouse(database):
                pass
        resource = WarehouseResource(database=str(database), landing_dir=str(tmp_path))
        with resource.open() as wh:  # waits for the holder's lock rather than failing
            assert wh.con.execute("SELECT x FROM held_by_the_first_writer").fetchall() == [(1,)]
        assert holder.wait(timeout=30) == 0
        assert holder.stdout.read().strip() == "released"

        # A bounded wait ends with the same clear error.
        holder = _holding(HOLD_WRITER, str(database), "30")
        impatient = WarehouseResource(database=str(database), landing_dir=str(tmp_path),
                                      lock_timeout_seconds=0.5)
        with pytest.raises(WarehouseLockedError, match=r"waited \d+ s for its writer lock"):
            with impatient.open():
                pass
    finally:
        holder.kill()
        holder.wait()

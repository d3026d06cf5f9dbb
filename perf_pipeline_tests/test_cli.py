"""The command lines a user types, run as subprocesses against a fresh PERF_PIPELINE_HOME."""

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from perf_pipeline_tests.conftest import metric_row, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(args: list[str], home: Path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PERF_PIPELINE_HOME": str(home), **env}
    environment.pop("DAGSTER_HOME", None)
    return subprocess.run(args, cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=600)


def _counts(database: Path) -> tuple:
    with duckdb.connect(str(database), read_only=True) as con:
        return con.execute("SELECT (SELECT count(*) FROM performance_metrics), "
                           "(SELECT count(*) FROM quarantined_metrics)").fetchall()[0]


@pytest.mark.slow
def test_dagster_asset_materialize_cli_twice_leaves_identical_counts(tmp_path):
    home = tmp_path / "home"
    simulate = _run([str(BIN / "perf-pipeline"), "simulate", "--days", "2", "--nodes", "5",
                     "--tests", "5", "--end", "2026-11-02", "--out", str(tmp_path / "sim")], home)
    assert simulate.returncode == 0, simulate.stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [metric_row("2026-11-01T05:00:00Z", value=float("nan"))])
    ingest = _run([str(BIN / "perf-pipeline"), "ingest", str(tmp_path / "sim"), str(bad)], home)
    assert ingest.returncode == 0, ingest.stderr
    (day_file,) = (tmp_path / "sim" / "2026-11-01").glob("*.jsonl")
    simulated = len(day_file.read_text().splitlines())
    command = [str(BIN / "dagster"), "asset", "materialize", "-m", "perf_pipeline.definitions",
               "--select", "raw_metrics", "--partition", "2026-11-01"]
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    first = _run(command, home, DAGSTER_HOME=str(dagster_home))
    assert first.returncode == 0, first.stderr[-3000:]
    after_first = _counts(home / "perf.duckdb")
    second = _run(command, home, DAGSTER_HOME=str(dagster_home))
    assert second.returncode == 0, second.stderr[-3000:]
    assert _counts(home / "perf.duckdb") == after_first == (simulated, 1)


def test_errors_are_one_clear_line(tmp_path):
    missing = _run([str(BIN / "perf-pipeline"), "ingest", str(tmp_path / "nope.jsonl")], tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"perf-pipeline: error: {tmp_path / 'nope.jsonl'}: no such file or folder"]
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    unsupported = _run([str(BIN / "perf-pipeline"), "ingest", str(tmp_path / "x.parquet")], tmp_path)
    assert unsupported.returncode == 2 and "Traceback" not in unsupported.stderr
    assert "unsupported format .parquet" in unsupported.stderr


def test_alerts_are_listed_acknowledged_invalidated_and_muted_from_the_command_line(tmp_path):
    from perf_pipeline.config import load_monitoring
    from perf_pipeline_tests.test_alerts import _stored_outbox

    home = tmp_path / "home"
    home.mkdir()
    _stored_outbox(home)
    cli = str(BIN / "perf-pipeline")
    listed = _run([cli, "alerts", "list", "--json"], home)
    assert listed.returncode == 0, listed.stderr
    (alert,) = __import__("json").loads(listed.stdout)
    assert alert["status"] == "new" and alert["tests"] == ["tests/a.py::t"]
    acked = _run([cli, "alerts", "ack", alert["alert_id"], "--note", "on it"], home)
    assert acked.returncode == 0 and f"alert {alert['alert_id']}: acknowledged" in acked.stdout
    assert "acknowledged" in _run([cli, "alerts", "list", "--status", "acknowledged"], home).stdout
    missing = _run([cli, "alerts", "invalid", "nope"], home)
    assert missing.returncode == 2 and "no alert 'nope'" in missing.stderr
    muted = _run([cli, "alerts", "mute", "--test", "tests/flaky/*", "--until", "2026-12-31"], home)
    assert muted.returncode == 0, muted.stderr
    assert load_monitoring(home / "perf_pipeline.yaml").mutes[0].test == "tests/flaky/*"
    bad = _run([cli, "alerts", "mute", "--metric", "cpu_usgae", "--until", "2026-12-31"], home)
    assert bad.returncode == 2 and "unknown metric 'cpu_usgae'" in bad.stderr

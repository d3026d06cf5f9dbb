import json
from pathlib import Path

import pytest

from perf_pipeline.config import Paths, paths_from_env


@pytest.fixture
def paths(tmp_path, monkeypatch) -> Paths:
    """A fresh PERF_PIPELINE_HOME under tmp_path, set in the environment as users set it."""
    monkeypatch.setenv("PERF_PIPELINE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PERF_PIPELINE_DATABASE", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    return paths_from_env().ensure()


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows as JSON Lines; a str row is written verbatim (for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def metric_row(timestamp: str, metric_name: str = "test_execution_time", value=1.0, *,
               test_name: str | None = "tests/test_a.py::test_one", node_id: str = "node-01",
               run: str | None = "run-1", **extra) -> dict:
    row = {"timestamp": timestamp, "metric_name": metric_name, "metric_value": value,
           "test_name": test_name, "test_type": "unit", "node_id": node_id,
           "node_type": "linux-large", "test_run_id": run, "ci_job_id": "job-1",
           "context_data": {"commit": "c0ffee"}}
    row.update(extra)
    return row

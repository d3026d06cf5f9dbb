"""`perf-pipeline gate` end to end: simulated history in landing files, loaded by the real
pipeline into a DuckDB file, judged by the CLI with its exit codes and CI reports."""

import json
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from perf_pipeline.cli import main
from perf_pipeline_tests.conftest import write_jsonl

TESTS = [f"tests/test_api.py::test_{name}" for name in ("login", "search", "checkout", "upload")]
NODES = [f"ci-{i}" for i in range(5)]


def _run_rows(run_id: str, start: datetime, rng, *, slow: dict | None = None) -> list[dict]:
    """One CI run: every test on five nodes (its repeated measurements), 3% noise."""
    rows = []
    for index, test in enumerate(TESTS):
        level = (1.0 + index) * (slow or {}).get(test, 1.0)
        for offset, node in enumerate(NODES):
            rows.append({
                "timestamp": (start + timedelta(seconds=10 * offset + index)).isoformat(),
                "metric_name": "test_execution_time", "metric_value": level * float(np.exp(rng.normal(0, 0.03))),
                "test_name": test, "test_type": "integration", "node_id": node,
                "node_type": "linux-large", "test_run_id": run_id, "ci_job_id": f"job-{run_id}",
                "context_data": {"commit": f"c{run_id}"}})
    return rows


@pytest.fixture
def history(paths, tmp_path):
    """20 days of two clean runs a day, ingested and loaded."""
    rng = np.random.default_rng(21)
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    rows = []
    for day in range(20, 0, -1):
        for half in (0, 12):
            start = now - timedelta(days=day, hours=half)
            rows += _run_rows(f"base-{day}-{half}", start, rng)
    write_jsonl(tmp_path / "history" / "history.jsonl", rows)
    assert main(["ingest", str(tmp_path / "history")]) == 0
    return now, rng


def _candidate(tmp_path, name, now, rng, **kwargs):
    folder = tmp_path / name
    write_jsonl(folder / f"{name}.jsonl", _run_rows(name, now - timedelta(hours=1), rng, **kwargs))
    return folder


@pytest.mark.slow
def test_gate_fails_a_regressed_run_and_passes_a_clean_one(history, tmp_path, monkeypatch, capsys):
    now, rng = history
    summary = tmp_path / "step_summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    slow = _candidate(tmp_path, "slow-run", now, rng, slow={TESTS[2]: 1.10})
    junit = tmp_path / "gate.xml"

    status = main(["gate", "--run-id", "slow-run", "--ingest", str(slow), "--junit-xml", str(junit)])
    output = capsys.readouterr().out
    assert status == 1
    errors = [line for line in output.splitlines() if line.startswith("::error")]
    assert len(errors) == 1 and "test_checkout" in errors[0]
    assert "%0A" not in errors[0].split("::", 2)[1]  # properties stay on one line
    table = summary.read_text()
    assert "Performance gate: ❌" in table and "`tests/test_api.py::test_checkout`" in table
    suite = ElementTree.parse(junit).getroot()
    failures = suite.findall("testcase/failure")
    assert suite.get("failures") == "1" and len(failures) == 1
    assert suite.findall("testcase")[0].get("name") == TESTS[2]
    assert len(suite.findall("testcase")) == len(TESTS)

    clean = _candidate(tmp_path, "clean-run", now + timedelta(minutes=30), rng)
    assert main(["gate", "--run-id", "clean-run", "--ingest", str(clean)]) == 0
    assert "no significant regression in 4 comparisons" in capsys.readouterr().out

    # Limited to another metric the run did not measure: a data error, not a pass.
    assert main(["gate", "--run-id", "slow-run", "--metric", "build_time"]) == 2
    assert "no measurements of run slow-run" in capsys.readouterr().err
    # A threshold far above 10% makes the same slowdown "possible" at most: it passes.
    assert main(["gate", "--run-id", "slow-run", "--threshold-percent", "50"]) == 0
    # An unwritable report does not turn the verdict into another exit status.
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    assert main(["gate", "--run-id", "slow-run", "--junit-xml", str(blocked / "gate.xml")]) == 1
    assert "could not write a gate report" in capsys.readouterr().err


def test_gate_usage_and_data_errors_exit_2(paths, capsys):
    assert main(["gate", "--run-id", "nope"]) == 2  # no database yet
    assert main(["gate"]) == 2
    assert "exactly one of --run-id or --ci-job-id" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["gate", "--run-id", "a", "--ci-job-id", "b"])
    assert usage.value.code == 2
    assert main(["gate", "--run-id", "a", "--alpha", "2"]) == 2
    assert main(["gate", "--run-id", "a", "--min-baseline-runs", "1"]) == 2
    assert main(["gate", "--run-id", "a", "--threshold-percent", "nan"]) == 2
    assert "positive number" in capsys.readouterr().err


@pytest.mark.slow
def test_gate_by_ci_job_and_json_safe_reports(history, tmp_path, capsys):
    now, rng = history
    odd = _candidate(tmp_path, "odd-run", now, rng)
    rows = [json.loads(line) for line in (odd / "odd-run.jsonl").read_text().splitlines()]
    for row in rows:
        row["test_name"] = row["test_name"] + "[a|b,c:d%]"  # characters the reports must escape
    write_jsonl(odd / "odd-run.jsonl", rows)
    assert main(["gate", "--ci-job-id", "job-odd-run", "--ingest", str(odd),
                 "--junit-xml", str(tmp_path / "out.xml")]) == 0
    output = capsys.readouterr().out
    assert "nothing to compare yet" in output  # new test names: no baseline, no verdict
    suite = ElementTree.parse(tmp_path / "out.xml").getroot()
    assert suite.get("skipped") == str(len(TESTS))

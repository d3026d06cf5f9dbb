"""The metrics gateway, run as users run it (`perf-pipeline serve` in its own process) and
spoken to over real HTTP on loopback; what it accepts is then loaded by the real pipeline."""

import json
import os
import subprocess
import sys
import socket
import time
from datetime import datetime, timedelta, timezone

import pytest

from perf_pipeline.cli import main
from perf_pipeline.collect.push import PushError, push_bytes, push_rows
from perf_pipeline.defs.runner import run_pipeline
from perf_pipeline.storage.warehouse import open_warehouse
from perf_pipeline_tests.conftest import free_port, inner_pytest_env, metric_row, serving

TOKEN = "gateway-test-token-0123456789"


@pytest.fixture
def gateway(paths):
    with serving({**os.environ, "PERF_API_TOKEN": TOKEN}, secrets=(TOKEN,),
                 arguments=("--max-body-mb", "1")) as url:
        yield url


def _landing_files(paths):
    return sorted(p.relative_to(paths.landing).as_posix() for p in paths.landing.rglob("*")
                  if p.is_file())


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_gateway_lands_exactly_the_valid_rows_and_the_pipeline_loads_them(gateway, paths):
    now = datetime.now(timezone.utc).replace(microsecond=0)
    # noon yesterday and midnight today: each row in its day whenever the test runs (around
    # midnight, "five minutes ago" was yesterday), and none ahead of the clock
    today = now.replace(hour=0, minute=0, second=0)
    yesterday = today - timedelta(hours=12)
    valid = [metric_row(_iso(yesterday + timedelta(minutes=i)), value=1.0 + i / 10,
                        test_name=f"tests/test_gw.py::test_{i}") for i in range(6)]
    valid += [metric_row(_iso(today), "cpu_usage", 42.0, test_name=None)]

    result = push_rows(gateway, valid, token=TOKEN)
    assert (result.status, result.accepted, result.rejected) == (200, 7, [])
    files_after_first = _landing_files(paths)
    assert len(files_after_first) == 2  # yesterday's and today's rows, each in its day folder
    assert all(name.split("/")[1].startswith("gateway-") for name in files_after_first)

    # A client that never saw the answer sends the same batch again: it lands once.
    again = push_rows(gateway, valid, token=TOKEN)
    assert again.accepted == 7
    assert _landing_files(paths) == files_after_first

    # A mixed batch: the good row is stored, each bad row comes back with its line and reason.
    mixed = [
        json.dumps(metric_row(_iso(yesterday), value=9.5, test_name="tests/test_gw.py::test_mixed")),
        json.dumps(metric_row(_iso(yesterday), "no_such_metric", 1.0)),
        '{"timestamp": "' + _iso(yesterday) + '", "metric_name": "test_execution_time", '
        '"metric_value": NaN, "node_id": "n", "test_name": "t"}',
        json.dumps(metric_row(_iso(yesterday), node_id="")),
        "this is not json",
        json.dumps(metric_row(_iso(now + timedelta(days=3)))),
        json.dumps(metric_row("2001-01-01T00:00:00Z")),
    ]
    response = push_bytes(gateway, ("\n".join(mixed) + "\n").encode(),
                          content_type="application/x-ndjson", token=TOKEN)
    assert response.status == 200 and response.accepted == 1
    reasons = {item["line"]: item["reason"] for item in response.rejected}
    assert reasons[2].startswith("unknown metric")
    assert reasons[3] == "metric_value is not finite"
    assert reasons[4] == "missing node_id"
    assert reasons[5] == "line is not valid JSON"
    assert "ahead of the gateway's clock" in reasons[6]
    assert "before the first daily partition" in reasons[7]
    assert response.body["rejected_count"] == 6 and response.body["received"] == 7

    # Every row rejected: 422, nothing written.
    before = _landing_files(paths)
    bad = push_bytes(gateway, b'{"metric_name": "cpu_usage"}\n', content_type="application/x-ndjson",
                     token=TOKEN)
    assert bad.status == 422 and bad.accepted == 0
    assert bad.rejected[0]["reason"] == "missing metric_value"

    # No token, a wrong token: 401 and nothing written.
    for token in ("", "wrong-token-wrong-token"):
        with pytest.raises(PushError) as refused:
            push_rows(gateway, valid, token=token)
        assert refused.value.status == 401 and not refused.value.retryable
    assert _landing_files(paths) == before

    run_pipeline(paths)
    with open_warehouse(paths.database, read_only=True) as warehouse:
        stored = warehouse.con.execute(
            "SELECT metric_name, test_name, metric_value FROM performance_metrics "
            "ORDER BY metric_name, test_name").fetchall()
        quarantined = warehouse.con.execute("SELECT count(*) FROM quarantined_metrics").fetchall()[0][0]
    expected = sorted([(r["metric_name"], r["test_name"], r["metric_value"]) for r in valid]
                      + [("test_execution_time", "tests/test_gw.py::test_mixed", 9.5)],
                      key=lambda r: (r[0], r[1] or ""))
    assert stored == expected
    assert quarantined == 0


def test_gateway_refuses_wrong_requests_with_clear_statuses(gateway, paths):
    rows = [metric_row(_iso(datetime.now(timezone.utc)))]
    body = json.dumps(rows[0]).encode()
    with pytest.raises(PushError) as too_large:
        push_bytes(gateway, b" " * (1024 * 1024 + 1), content_type="application/x-ndjson", token=TOKEN)
    assert too_large.value.status == 413
    with pytest.raises(PushError) as unsupported:
        push_bytes(gateway, body, content_type="image/png", token=TOKEN)
    assert unsupported.value.status == 415
    with pytest.raises(PushError) as unknown_parameter:
        push_bytes(f"{gateway}/api/v1/metrics?drop_table=1", body,
                   content_type="application/x-ndjson", token=TOKEN)
    assert unknown_parameter.value.status == 400
    assert "drop_table" in str(unknown_parameter.value)
    assert _landing_files(paths) == []


def test_identical_batches_sent_at_once_land_as_one_file(gateway, paths):
    from concurrent.futures import ThreadPoolExecutor

    rows = [metric_row(_iso(datetime.now(timezone.utc) - timedelta(minutes=i)), value=float(i))
            for i in range(50)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: push_rows(gateway, rows, token=TOKEN), range(16)))
    assert {(r.status, r.accepted) for r in results} == {(200, 50)}
    files = _landing_files(paths)
    assert len(files) in (1, 2)  # one per UTC day the 50 minutes span
    assert not any("/." in name for name in files)


def test_a_batch_cut_off_mid_body_leaves_no_file(gateway, paths):
    row = (json.dumps(metric_row(_iso(datetime.now(timezone.utc)))) + "\n").encode()
    body = row * 200
    host, port = gateway.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"POST /api/v1/metrics HTTP/1.1\r\nHost: gateway\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/x-ndjson\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2])
        time.sleep(0.5)
    time.sleep(0.5)
    assert _landing_files(paths) == []  # no data file, and no temporary file left behind
    # The gateway is still serving.
    assert push_rows(gateway, [json.loads(row)], token=TOKEN).accepted == 1


@pytest.mark.parametrize("arguments, environment, message", [
    (["--host", "0.0.0.0", "--no-auth"], {}, "only allowed on a loopback address"),
    ([], {}, "set PERF_API_TOKEN"),
    ([], {"PERF_API_TOKEN": "short"}, "too short"),
])
def test_serve_refuses_unsafe_settings(paths, monkeypatch, capsys, arguments, environment, message):
    monkeypatch.delenv("PERF_API_TOKEN", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--port", str(free_port()), *arguments]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_the_pytest_plugin_pushes_through_the_gateway_into_duckdb(gateway, paths, tmp_path):
    """The whole collection path with real parts: a test suite run by pytest with the plugin
    pushing to the gateway, the gateway landing the rows, the pipeline loading them."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_sample.py").write_text(
        "import time\n\n"
        "def test_fast():\n    assert True\n\n"
        "def test_slow():\n    time.sleep(0.2)\n\n"
        "def test_broken():\n    assert 1 == 2\n")
    env = inner_pytest_env(PERF_API_TOKEN=TOKEN, PERF_TEST_RUN_ID="plugin-e2e",
                           PERF_NODE_ID="node-e2e")
    done = subprocess.run([sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider",
                           f"--perf-collect={gateway}"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout  # test_broken fails; collection changes nothing
    assert not (tmp_path / ".perf-collect-unsent").exists(), done.stdout

    run_pipeline(paths)
    with open_warehouse(paths.database, read_only=True) as warehouse:
        durations = dict(warehouse.con.execute(
            "SELECT test_name, metric_value FROM performance_metrics "
            "WHERE metric_name = 'test_execution_time' AND test_run_id = 'plugin-e2e'").fetchall())
        session = dict(warehouse.con.execute(
            "SELECT metric_name, metric_value FROM performance_metrics "
            "WHERE test_name IS NULL AND node_id = 'node-e2e'").fetchall())
        quarantined = warehouse.con.execute("SELECT count(*) FROM quarantined_metrics").fetchall()[0][0]
    assert set(durations) == {f"suite/test_sample.py::{name}" for name in ("test_fast", "test_slow", "test_broken")} \
        or set(durations) == {f"test_sample.py::{name}" for name in ("test_fast", "test_slow", "test_broken")}
    slow = next(value for name, value in durations.items() if name.endswith("test_slow"))
    assert slow >= 0.2
    assert session["test_count"] == 3
    assert session["test_pass_rate"] == pytest.approx(200 / 3)
    assert quarantined == 0


def test_gateway_takes_junit_xml_and_benchmark_json_with_query_defaults(gateway, paths):
    stamp = _iso(datetime.now(timezone.utc) - timedelta(hours=2))
    junit = (f'<testsuite name="pytest" timestamp="{stamp}" time="3.0">'
             '<testcase classname="tests.test_api" name="test_ok" file="tests/test_api.py" time="1.5"/>'
             '<testcase classname="tests.test_api" name="test_bad" file="tests/test_api.py" time="1.0">'
             '<failure message="boom"/></testcase></testsuite>').encode()
    result = push_bytes(f"{gateway}/api/v1/metrics?node_id=ci-7&test_run_id=junit-run&test_type=unit",
                        junit, content_type="application/xml", token=TOKEN)
    assert result.status == 200 and result.rejected == []
    landed = [json.loads(line) for path in paths.landing.rglob("gateway-*.jsonl")
              for line in path.read_text().splitlines()]
    durations = {r["test_name"]: r for r in landed if r["metric_name"] == "test_execution_time"}
    assert set(durations) == {"tests/test_api.py::test_ok", "tests/test_api.py::test_bad"}
    assert {(r["node_id"], r["test_run_id"], r["test_type"]) for r in landed} == {("ci-7", "junit-run", "unit")}
    assert durations["tests/test_api.py::test_bad"]["context_data"]["outcome"] == "failed"

    benchmark = json.dumps({
        "machine_info": {"node": "bench-1"}, "commit_info": {"id": "abc123", "branch": "main"},
        "datetime": stamp, "version": "5.1.0",
        "benchmarks": [{"group": None, "name": "test_sort", "fullname": "tests/test_perf.py::test_sort",
                        "params": None, "stats": {"min": 0.001, "max": 0.003, "mean": 0.002,
                                                  "stddev": 0.0003, "rounds": 100, "median": 0.0019,
                                                  "iqr": 0.0002}}]}).encode()
    result = push_bytes(gateway, benchmark, content_type="application/json", token=TOKEN)
    assert result.status == 200 and result.accepted == 1
    # A document that is not JSON at all is one rejected record with a reason, not a 500.
    broken = push_bytes(gateway, b"{not json", content_type="application/json", token=TOKEN)
    assert broken.status == 422 and "not valid JSON" in broken.rejected[0]["reason"]

"""The JSON API and the dashboard, run as users run them (`perf-pipeline serve` and
`perf-pipeline dashboard` in their own processes) over a DuckDB file the real pipeline built
from a small simulated fleet; the Python client asked locally and remotely must agree."""

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Any

import duckdb
import pytest

from perf_pipeline.client import (
    DistributedTestingCoordinator,
    PerformanceTrends,
    ServiceUnavailableError,
)
from perf_pipeline.config import paths_from_env
from perf_pipeline.defs.runner import run_pipeline
from perf_pipeline.ingest.landing import ingest_files
from perf_pipeline.ingest.simulator import simulate_fleet
from perf_pipeline_tests.conftest import free_port, start_gateway, stop_process_group, wait_until_serving

TOKEN = "api-test-token-0123456789abcdef"
END = datetime(2026, 11, 20, tzinfo=timezone.utc)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet_home(tmp_path_factory):
    """PERF_PIPELINE_HOME holding the pipeline's tables for a 5-node, 5-test, 21-day fleet."""
    root = tmp_path_factory.mktemp("api-fleet")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PERF_PIPELINE_HOME", str(root / "home"))
        patch.delenv("PERF_PIPELINE_DATABASE", raising=False)
        patch.delenv("DAGSTER_HOME", raising=False)
        paths = paths_from_env().ensure()
        simulate_fleet(root / "sim", days=21, nodes=5, tests=5, seed=1, end=END, runs_per_day=4)
        ingest_files(sorted((root / "sim").rglob("*.jsonl")), paths.landing, today=END.date())
        run_pipeline(paths, progress=lambda _: None)
    return paths


def _server_env(home) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PERF_PIPELINE_DATABASE", "DAGSTER_HOME")}
    return {**env, "PERF_PIPELINE_HOME": str(home), "PERF_API_TOKEN": TOKEN}


@pytest.fixture(scope="module")
def server(fleet_home):
    port = free_port()
    process = start_gateway(port, _server_env(fleet_home.home))
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, process)
    yield url
    stop_process_group(process)
    output = process.stdout.read().decode()
    assert TOKEN not in output, "the token must never be logged"
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def local(fleet_home):
    return PerformanceTrends(database=fleet_home.database)


@pytest.fixture(scope="module")
def remote(server):
    return PerformanceTrends(url=server, auth_token=TOKEN)


def _get(url: str, token: str | None = TOKEN, method: str = "GET", body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, Any, dict]:
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, json.loads(error.read())


TREND_QUESTIONS = [
    ("test_execution_time", 30, None),
    ("test_execution_time", 30, {"test_type": "unit"}),
    ("test_execution_time", 7, {"node_type": "macos"}),
    ("test_execution_time", 14, {"test_name": "tests/*"}),
    ("cpu_usage", 14, {"node_id": ["node-01", "node-02"]}),
    ("memory_usage", 30, {"node_id": "node-03"}),
    ("test_pass_rate", 30, None),
    ("test_execution_time", 30, {"test_type": "unit_test"}),  # the seed's type: no rows here
]


@pytest.mark.parametrize(("metric", "days", "test_filter"), TREND_QUESTIONS)
def test_trends_are_the_same_locally_and_remotely(local, remote, metric, days, test_filter):
    here = local.get_performance_trends(metric, days, test_filter)
    there = remote.get_performance_trends(metric, time_window_days=days, test_filter=test_filter)
    assert here == there
    assert here["metric"] == metric and here["window_days"] == days
    assert here["trend_direction"] in ("improving", "degrading", "stable")
    if here["n_days"] == 0:
        assert here["p_value"] is None and here["trend_direction"] == "stable"
        assert here["note"].startswith("no data")
    else:
        assert 0 <= here["p_value"] <= 1 and here["confidence"] == pytest.approx(1 - here["p_value"])
        assert here["n_series"] >= 1 and here["n_points"] >= here["n_days"]


def test_the_fleet_trend_is_direction_aware(local):
    durations = local.get_performance_trends("test_execution_time")
    # the simulator slows tests down over the window: a duration going up is degrading
    assert durations["is_significant"] and durations["trend_direction"] == "degrading"
    assert durations["change_rate_percent"] > 0
    throughput = local.get_performance_trends("tests_per_hour")
    assert throughput["change_rate_percent"] < 0  # fewer tests per hour is worse
    assert throughput["trend_direction"] in ("degrading", "stable")


def test_node_comparison_alerts_recommendations_and_change_points_agree(local, remote):
    for metric, test_filter in (("test_execution_time", None), ("overall", None),
                                ("test_execution_time", {"test_type": "unit"}),
                                ("test_execution_time", {"node_type": ["macos", "windows"]})):
        ranking = local.get_node_performance_comparison(metric, test_filter)
        assert ranking and ranking == remote.get_node_performance_comparison(metric, test_filter)
        assert all(isinstance(node, str) and 0 <= score <= 100 for node, score in ranking)
    alerts = local.get_alerts()
    assert alerts and alerts == remote.get_alerts()
    assert local.get_alerts("new", 2) == remote.get_alerts(status="new", limit=2)
    recommendations = local.get_recommendations(5)
    assert recommendations and recommendations == remote.get_recommendations(5)
    assert local.get_change_points(kind="regression") == remote.get_change_points(kind="regression")
    assert all(c["kind"] == "regression" for c in local.get_change_points(kind="regression"))


def test_a_wrong_or_missing_token_is_401_and_a_permission_error(server):
    for token in (None, "wrong-token-0123456789abcdef"):
        status, headers, body = _get(f"{server}/api/v1/trends?metric_name=cpu_usage", token=token)
        assert status == 401 and "token" in body["error"]
        with pytest.raises(PermissionError, match="wrong or missing token"):
            PerformanceTrends(url=server, auth_token=token or "").get_alerts()


@pytest.mark.parametrize(("query", "named"), [
    ("trends?metric_name=no_such_metric", "metric_name"),
    ("trends", "metric_name"),
    ("trends?metric_name=cpu_usage&time_window_days=abc", "time_window_days"),
    ("trends?metric_name=cpu_usage&time_window_days=0", "time_window_days"),
    ("trends?metric_name=cpu_usage&time_window_days=1e3", "time_window_days"),
    ("trends?metric_name=cpu_usage&commit=abc", "commit"),
    ("trends?metric_name=cpu_usage&metric_name=memory_usage", "metric_name"),
    ("trends?metric_name=cpu_usage%27%3B%20DROP%20TABLE%20trend_stats%3B--", "metric_name"),
    ("trends?metric_name=cpu_usage&node_id%3D1%20OR%201%3D1=x", "node_id=1 OR 1=1"),
    ("nodes/comparison?metric_name=overall&test_type=unit", "applies to one metric"),
    ("nodes/comparison?metric_name=cpu_usage&test_type=", "test_type"),
    ("alerts?status=bogus", "status"),
    ("alerts?limit=-1", "limit"),
    ("alerts?limit=99999", "limit"),
    ("recommendations?limit=ten", "limit"),
    ("change_points?kind=worse", "kind"),
    ("change_points?metric_name=nope", "metric_name"),
])
def test_bad_parameters_are_400_naming_the_parameter(server, query, named):
    status, _, body = _get(f"{server}/api/v1/{query}")
    assert status == 400, body
    assert named in body["error"]


def test_injection_looking_filter_values_are_plain_values_that_match_nothing(server, remote, local):
    value = "unit' OR '1'='1"
    status, _, body = _get(f"{server}/api/v1/trends?metric_name=test_execution_time"
                           f"&test_type={urllib.request.quote(value)}")
    assert status == 200 and body["n_points"] == 0 and body["note"].startswith("no data")
    assert remote.get_node_performance_comparison("test_execution_time", {"test_type": value}) == []
    assert local.get_alerts()  # nothing was dropped
    with pytest.raises(ValueError, match="cannot filter on 'commit'"):
        remote.get_performance_trends("cpu_usage", test_filter={"commit": "x"})


def test_a_database_held_by_a_writer_answers_503_with_retry_after(server, fleet_home):
    writer = duckdb.connect(str(fleet_home.database))
    try:
        status, headers, body = _get(f"{server}/api/v1/alerts")
        assert status == 503 and headers["Retry-After"] == "5"
        assert "being written" in body["error"]
        with pytest.raises(ServiceUnavailableError, match="retry") as caught:
            PerformanceTrends(url=server, auth_token=TOKEN).get_recommendations()
        assert caught.value.retry_after == 5 and caught.value.retryable
    finally:
        writer.close()
    assert _get(f"{server}/api/v1/alerts")[0] == 200


def test_monitoring_settings_are_written_remotely_as_locally(server, fleet_home, tmp_path, monkeypatch):
    (fleet_home.home / "perf_pipeline.yaml").unlink(missing_ok=True)
    remote = DistributedTestingCoordinator(coordinator_url=server, auth_token=TOKEN)
    settings = {"metrics_to_track": ["test_execution_time", "cpu_usage"],
                "retention_period_days": 60, "notification_channels": ["slack"],
                "regression_threshold_percent": 12.5}
    answered = remote.configure_performance_monitoring(**settings)
    written = (fleet_home.home / "perf_pipeline.yaml").read_text()
    assert "retention_period_days: 60" in written and "regression_threshold_percent: 12.5" in written

    monkeypatch.delenv("PERF_PIPELINE_HOME", raising=False)
    database = tmp_path / "copy" / "perf.duckdb"
    database.parent.mkdir()
    database.write_bytes(fleet_home.database.read_bytes())
    local = DistributedTestingCoordinator(database=database)
    assert local.configure_performance_monitoring(**settings) == answered
    assert (tmp_path / "copy" / "perf_pipeline.yaml").read_text() == written

    with pytest.raises(ValueError, match="retention_period_dayz"):
        remote.configure_performance_monitoring(retention_period_dayz=3)
    with pytest.raises(ValueError, match="collection_interval_seconds"):
        remote.configure_performance_monitoring(collection_interval_seconds=-1)
    status, _, body = _get(f"{server}/api/v1/monitoring", method="PUT", body=b"[1, 2]",
                           headers={"Content-Type": "application/json"})
    assert status == 400 and "JSON object" in body["error"]
    assert (fleet_home.home / "perf_pipeline.yaml").read_text() == written


SEED_EXAMPLE = '''
from perf_pipeline.client import DistributedTestingCoordinator
coordinator = DistributedTestingCoordinator(coordinator_url="http://coordinator-host:8080", auth_token="your_auth_token")
trends = coordinator.get_performance_trends(metric_name="test_execution_time", time_window_days=30, test_filter={"test_type": "unit_test"})
print(f"Performance trend: {trends['trend_direction']}")
print(f"Change rate: {trends['change_rate_percent']}% per week")
print(f"Statistical significance: {trends['p_value']}")
node_comparison = coordinator.get_node_performance_comparison(metric_name="test_execution_time", test_filter={"test_type": "unit_test"})
for i, (node, score) in enumerate(node_comparison, 1):
    print(f"{i}. {node}: {score}/100")
coordinator.configure_performance_monitoring(metrics_to_track=["test_execution_time", "memory_usage", "cpu_usage"], collection_interval_seconds=60, retention_period_days=90, enable_trend_analysis=True, enable_anomaly_detection=True, notification_channels=["email", "slack"], alert_on_regression=True, regression_threshold_percent=10)
'''


@pytest.mark.parametrize("test_type", ["unit_test", "unit"])
def test_the_seed_example_runs_against_the_server(server, tmp_path, test_type):
    script = tmp_path / "seed_example.py"
    script.write_text(SEED_EXAMPLE.replace("http://coordinator-host:8080", server)
                      .replace("your_auth_token", TOKEN).replace('"unit_test"', f'"{test_type}"'))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PERF_API_TOKEN": ""})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Performance trend: ") and lines[0].split(": ")[1] in (
        "improving", "degrading", "stable")
    assert lines[1].startswith("Change rate: ") and lines[1].endswith("% per week")
    assert lines[2].startswith("Statistical significance: ")
    if test_type == "unit_test":  # matches nothing in the simulator: a valid, empty answer
        assert lines == ["Performance trend: stable", "Change rate: None% per week",
                         "Statistical significance: None"]
    else:
        assert float(lines[2].split(": ")[1]) < 0.05
        ranked = lines[3:]
        assert len(ranked) == 5 and all(line.startswith(f"{i}. node-") and line.endswith("/100")
                                        for i, line in enumerate(ranked, 1))


# ------------------------------------------------------------------ the dashboard command

@pytest.fixture(scope="module")
def dashboard(fleet_home):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "perf_pipeline.cli", "dashboard", "--port", str(port)],
        env=_server_env(fleet_home.home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, process)
    yield url
    stop_process_group(process)
    assert TOKEN not in process.stdout.read().decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None


def _page(url: str, *, cookie: str | None = None, form: bytes | None = None):
    headers = {"Cookie": cookie} if cookie else {}
    request = urllib.request.Request(url, data=form, headers=headers)
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=30) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read().decode()


def test_the_dashboard_needs_a_login_and_says_when_there_is_no_file(dashboard, fleet_home):
    status, _, page = _page(f"{dashboard}/")
    assert status == 401 and 'action="/login"' in page and TOKEN not in page
    assert _page(f"{dashboard}/login", form=b"token=wrong")[0] == 401

    status, headers, _ = _page(f"{dashboard}/login", form=f"token={TOKEN}".encode())
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
    session = cookie.split(";")[0]

    report = fleet_home.reports / "performance_dashboard.html"
    report.unlink(missing_ok=True)
    status, _, page = _page(f"{dashboard}/", cookie=session)
    assert status == 404 and "perf-pipeline run" in page
    report.write_text("<html><body>fleet dashboard</body></html>")
    try:
        status, _, page = _page(f"{dashboard}/", cookie=session)
        assert status == 200 and "fleet dashboard" in page
    finally:
        report.unlink()
    # the session opens the page only, never the API; the token still does
    assert _get(f"{dashboard}/api/v1/alerts", token=None, headers={"Cookie": session})[0] == 401
    assert _get(f"{dashboard}/api/v1/alerts")[0] == 200


# ------------------------------------------------------------------ the last-resort handler

def _call(app, path: str) -> tuple[int, bytes]:
    """One GET through the ASGI app, without a server."""
    messages = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"host", b"test")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    try:
        asyncio.run(app(scope, receive, send))
    except RuntimeError:
        pass  # Starlette re-raises after answering, for the server to log
    start = next(m for m in messages if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


def test_an_unexpected_error_is_a_json_500_without_details(tmp_path, monkeypatch):
    from perf_pipeline.server.api import ReadApi
    from perf_pipeline.server.app import ServerSettings, create_app

    def explode(self, ask):
        raise RuntimeError("secret detail /etc/passwd")

    monkeypatch.setattr(ReadApi, "_query", explode)
    app = create_app(ServerSettings(landing=tmp_path / "landing", token=None,
                                    database=tmp_path / "perf.duckdb",
                                    monitoring_file=tmp_path / "perf_pipeline.yaml"))
    status, body = _call(app, "/api/v1/recommendations")
    assert status == 500
    assert json.loads(body) == {"error": "internal error; the server log has the details"}

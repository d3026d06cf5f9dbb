"""The JSON API and the dashboard, run as users run them (`perf-pipeline serve` and
`perf-pipeline dashboard` in their own processes) over a DuckDB file the real pipeline built
from a small simulated fleet; the Python client asked locally and remotely must agree."""

import asyncio
import json
import os
import socket
import time
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
from perf_pipeline_tests.conftest import materialized_fleet, serving

TOKEN = "api-test-token-0123456789abcdef"
ADMIN = "api-test-admin-token-fedcba9876543210"
END = datetime(2026, 11, 20, tzinfo=timezone.utc)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet_home(tmp_path_factory):
    """PERF_PIPELINE_HOME holding the pipeline's tables for a 5-node, 5-test, 21-day fleet."""
    return materialized_fleet(tmp_path_factory.mktemp("api-fleet"), end=END, days=21, nodes=5,
                              tests=5)


def _server_env(home, *, admin: str | None = TOKEN) -> dict:
    """The module's servers are single-token deployments, as the seed example assumes: the
    operator set PERF_ADMIN_TOKEN to the API token, so that token may also change settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PERF_PIPELINE_DATABASE", "DAGSTER_HOME", "PERF_ADMIN_TOKEN")}
    env = {**env, "PERF_PIPELINE_HOME": str(home), "PERF_API_TOKEN": TOKEN}
    return env if admin is None else {**env, "PERF_ADMIN_TOKEN": admin}


def _serving(env: dict, *arguments: str):
    """One more `perf-pipeline serve`, stopped after."""
    return serving(env, secrets=(TOKEN, ADMIN), arguments=arguments)


@pytest.fixture(scope="module")
def server(fleet_home):
    with serving(_server_env(fleet_home.home), secrets=(TOKEN, ADMIN)) as url:
        yield url


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
    ("cpu_usage", 14, {"node_id": ["node-01"]}),  # echoed as "node-01" here and there
]


@pytest.mark.parametrize(("metric", "days", "test_filter"), TREND_QUESTIONS)
def test_trends_are_the_same_locally_and_remotely(local, remote, metric, days, test_filter):
    here = local.get_performance_trends(metric, days, test_filter)
    there = remote.get_performance_trends(metric, time_window_days=days, test_filter=test_filter)
    assert here == there
    if test_filter == {"node_id": ["node-01"]}:
        assert here["filter"] == {"node_id": "node-01"}
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
    ("nodes/comparison?metric_name=cpu_usage&window_days=0", "window_days"),
    ("nodes/comparison?metric_name=cpu_usage&window_days=99999", "window_days"),
    ("trends?metric_name=cpu_usage&test_name=" + "x" * 1001, "test_name"),
    ("nodes/comparison?metric_name=cpu_usage&node_id=a&node_id=" + "y" * 1001, "node_id"),
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


def test_a_filtered_node_comparison_uses_the_clients_window_remotely_too(fleet_home, server):
    question = ("test_execution_time", {"test_type": "unit"})
    for days in (2, 21):
        here = PerformanceTrends(database=fleet_home.database, window_days=days)
        there = PerformanceTrends(url=server, auth_token=TOKEN, window_days=days)
        assert here.get_node_performance_comparison(*question) == \
            there.get_node_performance_comparison(*question)
    status, _, body = _get(f"{server}/api/v1/nodes/comparison?metric_name=test_execution_time"
                           "&test_type=unit&window_days=2")
    assert status == 200 and body["window_days"] == 2
    assert [tuple(pair) for pair in body["nodes"]] == PerformanceTrends(
        database=fleet_home.database, window_days=2).get_node_performance_comparison(*question)
    with pytest.raises(ValueError, match="window_days"):
        PerformanceTrends(url=server, window_days=0)


def test_long_filter_values_are_refused_here_and_there_naming_the_filter(local, remote):
    for client in (local, remote):
        with pytest.raises(ValueError, match="'test_name'.*longer than 1000"):
            client.get_performance_trends("cpu_usage", test_filter={"test_name": "t" * 1001})


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
    # "path" is not a setting (it once collided with the function's own argument: a 500)
    status, _, body = _get(f"{server}/api/v1/monitoring", method="PUT",
                           body=json.dumps({"path": "/tmp/elsewhere.yaml"}).encode(),
                           headers={"Content-Type": "application/json"})
    assert status == 400 and "path" in body["error"], body
    with pytest.raises(ValueError, match="path"):
        remote.configure_performance_monitoring(path="/tmp/elsewhere.yaml")
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
                            timeout=120, env={**os.environ, "PERF_API_TOKEN": "", "PERF_ADMIN_TOKEN": ""})
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
    # Its log must hold no traceback either, e.g. after a login form cut off mid-body.
    with serving(_server_env(fleet_home.home), secrets=(TOKEN,), command="dashboard") as url:
        yield url


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
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and TOKEN not in cookie
    assert "Max-Age=43200" in cookie
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

def _call(app, path: str, *, reraise: bool = False) -> tuple[int, bytes]:
    """One GET through the ASGI app, without a server (Host 127.0.0.1)."""
    messages = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    try:
        asyncio.run(app(scope, receive, send))
    except RuntimeError:
        if reraise:
            raise
        pass  # the error must not reach the server, which would log it a second time
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
    status, body = _call(app, "/api/v1/recommendations", reraise=True)
    assert status == 500
    assert json.loads(body) == {"error": "internal error; the server log has the details"}


# ------------------------------------------------------------------ older databases, admin token, hosts

@pytest.fixture(scope="module")
def old_home(tmp_path_factory):
    """A PERF_PIPELINE_HOME whose database lacks the tables the API reads (an older schema)."""
    root = tmp_path_factory.mktemp("old-schema")
    paths = paths_from_env({"PERF_PIPELINE_HOME": str(root / "home")}).ensure()
    with duckdb.connect(str(paths.database)) as connection:
        connection.execute("CREATE TABLE something_old (x INTEGER)")
    return paths


def test_an_older_schema_is_503_saying_to_run_the_pipeline_and_settings_need_an_admin_token(old_home):
    with _serving(_server_env(old_home.home, admin=None)) as url:
        for query in ("alerts", "recommendations", "change_points",
                      "trends?metric_name=cpu_usage", "nodes/comparison?metric_name=overall"):
            status, headers, body = _get(f"{url}/api/v1/{query}")
            assert status == 503 and headers["Retry-After"] == "5", (query, body)
            assert "older perf_pipeline or the pipeline has not run yet; run the pipeline" in body["error"]
        with pytest.raises(ServiceUnavailableError, match="older perf_pipeline"):
            PerformanceTrends(url=url, auth_token=TOKEN).get_alerts()
        # no PERF_ADMIN_TOKEN on the server: changing settings over HTTP is off
        status, _, body = _get(f"{url}/api/v1/monitoring", method="PUT",
                               body=b'{"retention_period_days": 30}')
        assert status == 403 and body == {
            "error": "changing settings over HTTP is off; set PERF_ADMIN_TOKEN on the server"}
        with pytest.raises(PermissionError, match="PERF_ADMIN_TOKEN"):
            PerformanceTrends(url=url, auth_token=TOKEN).configure_performance_monitoring(
                retention_period_days=30)
    assert not (old_home.home / "perf_pipeline.yaml").exists()


def test_settings_take_the_admin_token_only(old_home, monkeypatch):
    monkeypatch.delenv("PERF_ADMIN_TOKEN", raising=False)
    with _serving(_server_env(old_home.home, admin=ADMIN)) as url:
        client = PerformanceTrends(url=url, auth_token=TOKEN)
        with pytest.raises(PermissionError, match="admin token"):
            client.configure_performance_monitoring(retention_period_days=31)
        assert client.configure_performance_monitoring(
            admin_token=ADMIN, retention_period_days=31)["retention_period_days"] == 31
        monkeypatch.setenv("PERF_ADMIN_TOKEN", ADMIN)
        assert client.configure_performance_monitoring(
            retention_period_days=32)["retention_period_days"] == 32
        # the admin token opens the settings route only, not the rest of the API
        assert _get(f"{url}/api/v1/alerts", token=ADMIN)[0] == 401
        assert _get(f"{url}/api/v1/monitoring", token="wrong-token-0123456789", method="PUT",
                    body=b'{"retention_period_days": 33}')[0] == 401
    assert "retention_period_days: 32" in (old_home.home / "perf_pipeline.yaml").read_text()


def test_without_auth_only_loopback_host_names_are_answered(old_home):
    env = {k: v for k, v in _server_env(old_home.home, admin=None).items() if k != "PERF_API_TOKEN"}
    with _serving(env, "--no-auth") as url:
        port = url.rsplit(":", 1)[1]
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
            request = urllib.request.Request(f"{url}/healthz", headers={"Host": host})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 400
            refused.value.close()
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
            request = urllib.request.Request(f"{url}/healthz", headers={"Host": host})
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 200
        # under --no-auth on loopback, settings may be changed without any token
        status, _, body = _get(f"{url}/api/v1/monitoring", token=None, method="PUT",
                               body=b'{"retention_period_days": 40}')
        assert status == 200 and body["settings"]["retention_period_days"] == 40


def test_a_login_form_cut_off_mid_body_is_no_500(dashboard):
    port = int(dashboard.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Type: application/x-www-form-urlencoded\r\n"
                           b"Content-Length: 500\r\n\r\ntoken=abc")
        time.sleep(0.3)
    time.sleep(0.5)  # the server notices; its log is checked for a traceback at teardown
    assert _page(f"{dashboard}/login", form=b"token=wrong")[0] == 401


def test_the_session_cookie_is_signed_expires_and_logout_clears_it(dashboard):
    status, headers, _ = _page(f"{dashboard}/login", form=f"token={TOKEN}".encode())
    assert status == 303
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Content-Security-Policy"] == "frame-ancestors 'none'"
    session = headers["Set-Cookie"].split(";")[0]
    issued, signature = session.split("=", 1)[1].split(".")
    assert abs(int(issued) - time.time()) < 60 and len(signature) == 64
    status, headers, _ = _page(f"{dashboard}/", cookie=session)
    assert status in (200, 404) and headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    status, headers, _ = _page(f"{dashboard}/")
    assert status == 401 and headers["X-Frame-Options"] == "DENY"
    # another issue time under the same signature, or an old one, is no session
    name = session.split("=")[0]
    for forged in (f"{int(issued) + 1}.{signature}", f"{int(issued)}.{'0' * 64}", "1.2", "junk"):
        assert _page(f"{dashboard}/", cookie=f"{name}={forged}")[0] == 401
    status, headers, _ = _page(f"{dashboard}/logout", form=b"")
    assert status == 303 and headers["Location"] == "/"
    cleared = headers["Set-Cookie"]
    assert cleared.startswith(f"{name}=") and "Max-Age=0" in cleared


def test_a_session_lasts_twelve_hours(tmp_path):
    from perf_pipeline.server.app import DashboardPage

    now = [1_800_000_000.0]
    page = DashboardPage(tmp_path / "dashboard.html", TOKEN, clock=lambda: now[0])
    session = page.new_session()
    assert page.session_valid(session)
    now[0] += 12 * 3600 - 1
    assert page.session_valid(session)
    now[0] += 2
    assert not page.session_valid(session)
    other = DashboardPage(tmp_path / "dashboard.html", "another-token-0123456789", clock=lambda: now[0])
    assert not other.session_valid(page.new_session())


def test_a_value_error_inside_a_query_is_a_500_not_a_400(tmp_path, monkeypatch, caplog):
    from perf_pipeline.server.app import ServerSettings, create_app

    def broken(self, status=None, limit=100):
        raise ValueError("a bug deep in a query")

    monkeypatch.setattr(PerformanceTrends, "get_alerts", broken)
    database = tmp_path / "perf.duckdb"
    duckdb.connect(str(database)).close()
    app = create_app(ServerSettings(landing=tmp_path / "landing", token=None, database=database,
                                    monitoring_file=tmp_path / "perf_pipeline.yaml"))
    with caplog.at_level("ERROR"):
        status, body = _call(app, "/api/v1/alerts", reraise=True)
    assert status == 500 and "a bug" not in body.decode()
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1  # once, by us; nothing re-raised for the server to log again

"""Rate limits, size limits, the default bind address and constant-time token checks, on a
real `perf-pipeline dashboard` spoken to over loopback (clients on several 127.0.0.0/8
addresses, each its own bucket) and, for the comparisons, on the app in-process."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import psutil
import pytest

from perf_pipeline.config import paths_from_env
from perf_pipeline.server.app import (
    DEFAULT_AUTH_FAILURE_LIMIT,
    DEFAULT_REQUEST_LIMIT,
    ServerConfigError,
    ServerSettings,
    create_app,
    limits_from_env,
)
from perf_pipeline.server.ratelimit import RateLimit, TokenBuckets, client_key
from perf_pipeline.storage.warehouse import open_warehouse
from perf_pipeline_tests.conftest import live_server
from perf_pipeline_tests.server.live import request

TOKEN = "limits-api-token-0123456789abcdef"
ADMIN = "limits-admin-token-fedcba9876543210"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def _env(home, **limits: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PERF_PIPELINE_DATABASE", "DAGSTER_HOME") and not k.startswith("PERF_")}
    return {**env, "PERF_PIPELINE_HOME": str(home), "PERF_API_TOKEN": TOKEN,
            "PERF_ADMIN_TOKEN": ADMIN, **limits}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    paths = paths_from_env({"PERF_PIPELINE_HOME": str(tmp_path_factory.mktemp("limits") / "home")}).ensure()
    with open_warehouse(paths.database):
        pass
    return paths


@pytest.fixture(scope="module")
def strict(home):
    """5 requests/s (burst 10) and 6 failed authentications a minute (burst 3) per address."""
    with live_server(_env(home.home, PERF_RATE_LIMIT_PER_SECOND="5", PERF_RATE_LIMIT_BURST="10",
                          PERF_AUTH_FAILURES_PER_MINUTE="6", PERF_AUTH_FAILURES_BURST="3"),
                     secrets=(TOKEN, ADMIN), arguments=("--max-body-mb", "1"),
                     command="dashboard") as live:
        yield live


@pytest.fixture(scope="module")
def defaults(home):
    """The shipped defaults, started without --host."""
    with live_server(_env(home.home), secrets=(TOKEN, ADMIN), command="dashboard") as live:
        yield live


def _limited(answer) -> bool:
    if answer.status != 429:
        return False
    assert int(answer.headers["Retry-After"]) >= 1
    assert "retry in" in json.loads(answer.body)["error"]
    return True


# ------------------------------------------------------------------ the buckets themselves

def test_a_bucket_gives_its_burst_then_its_rate():
    now = [100.0]
    buckets = TokenBuckets(RateLimit(per_second=2.0, burst=4), clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(4)] == [0.0] * 4
    assert buckets.take("a") == pytest.approx(0.5)  # one token comes back every 0.5 s
    assert buckets.take("b") == 0.0  # another key, its own bucket
    now[0] += 0.5
    assert buckets.take("a") == 0.0 and buckets.take("a") > 0
    now[0] += 60
    assert [buckets.take("a") for _ in range(5)].count(0.0) == 4  # never more than the burst
    buckets.charge("a")
    buckets.charge("a")  # failures in flight at once leave a debt: a longer wait
    assert buckets.wait("a") == pytest.approx(1.5)
    buckets.refund("a")
    assert buckets.wait("a") == pytest.approx(1.0)


def test_the_buckets_forget_the_least_recently_seen_address_first():
    buckets = TokenBuckets(RateLimit(per_second=1.0, burst=1), clock=lambda: 0.0, max_keys=3)
    for key in ("a", "b", "c"):
        buckets.take(key)
    buckets.take("a")  # refused, and "a" is now the most recently seen
    buckets.take("d")
    assert buckets.wait("a") > 0 and buckets.wait("b") == 0.0  # "b" forgotten: a full bucket
    assert len(buckets._levels) == 3


def test_clients_are_keyed_by_address_and_an_ipv6_host_by_its_64():
    assert client_key({"client": ("127.0.0.1", 5000)}) == "127.0.0.1"
    assert client_key({"client": ("::ffff:10.1.2.3", 1)}) == "10.1.2.3"
    assert client_key({"client": ("2001:db8::1", 1)}) == client_key({"client": ("2001:db8::ffff", 2)})
    assert client_key({"client": ("2001:db8:0:1::1", 1)}) != client_key({"client": ("2001:db8::1", 1)})
    assert client_key({"client": None}) == "unknown"


def test_limits_come_from_the_environment_and_bad_values_are_refused():
    assert limits_from_env({}) == (DEFAULT_REQUEST_LIMIT, DEFAULT_AUTH_FAILURE_LIMIT)
    requests, failures = limits_from_env({"PERF_RATE_LIMIT_PER_SECOND": "0",
                                          "PERF_AUTH_FAILURES_PER_MINUTE": "30",
                                          "PERF_AUTH_FAILURES_BURST": "5"})
    assert not requests.enabled and failures == RateLimit(per_second=0.5, burst=5)
    for name, value, message in [("PERF_RATE_LIMIT_PER_SECOND", "fast", "must be a number"),
                                 ("PERF_RATE_LIMIT_PER_SECOND", "-1", "0 or more"),
                                 ("PERF_RATE_LIMIT_PER_SECOND", "nan", "0 or more"),
                                 ("PERF_RATE_LIMIT_BURST", "2.5", "whole number"),
                                 ("PERF_AUTH_FAILURES_BURST", "0", "1 or more")]:
        with pytest.raises(ServerConfigError, match=message):
            limits_from_env({name: value})


# ------------------------------------------------------------------ over real HTTP

def test_an_address_over_its_rate_gets_429_and_others_do_not(strict, fault_tally):
    started = time.monotonic()
    answers = [request(strict.port, "GET", "/healthz") for _ in range(30)]
    refilled = 5 * (time.monotonic() - started)
    limited = [a for a in answers if _limited(a)]
    # the burst of 10, less the one health check that saw the server up, then 5 a second
    assert answers[0].status == 200 and 30 - 9 - refilled - 1 <= len(limited) <= 21
    assert {a.status for a in answers} == {200, 429}
    # X-Forwarded-For picks no bucket: the TCP peer is the client
    spoofed = request(strict.port, "GET", "/healthz", headers={"X-Forwarded-For": "127.0.0.9"})
    assert _limited(spoofed)
    assert request(strict.port, "GET", "/healthz", source="127.0.0.2").status == 200
    time.sleep(int(spoofed.headers["Retry-After"]))
    assert request(strict.port, "GET", "/healthz").status == 200
    fault_tally.add("requests rate-limited", len(limited) + 1)


def test_the_python_client_reads_a_429_as_busy_with_its_retry_after(strict):
    from perf_pipeline.client import PerformanceTrends, ServiceUnavailableError

    client = PerformanceTrends(url=strict.url, auth_token=TOKEN)
    with pytest.raises(ServiceUnavailableError, match="retry in") as refused:
        for _ in range(40):  # the burst of 10, then 5 a second: refused well before 40
            client.get_performance_trends(metric_name="test_execution_time")
    assert refused.value.retry_after >= 1 and refused.value.retryable
    time.sleep(refused.value.retry_after)


def test_failed_tokens_lock_the_address_out_even_for_the_right_token(strict, fault_tally):
    guesser, neighbour = "127.0.0.3", "127.0.0.4"
    wrong = {"Authorization": "Bearer wrong-token-0123456789abcdef"}
    assert [request(strict.port, "GET", "/api/v1/alerts", headers=wrong, source=guesser).status
            for _ in range(3)] == [401] * 3
    locked = request(strict.port, "GET", "/api/v1/alerts", headers=BEARER, source=guesser)
    assert _limited(locked) and 5 <= int(locked.headers["Retry-After"]) <= 10
    assert "failed authentication" in json.loads(locked.body)["error"]
    # a request presenting no credentials is not refused, and other addresses are untouched
    assert request(strict.port, "GET", "/healthz", source=guesser).status == 200
    assert request(strict.port, "GET", "/api/v1/alerts", headers=BEARER, source=neighbour).status == 200
    # the right token spends nothing: many in a row stay 200
    assert {request(strict.port, "GET", "/api/v1/recommendations", headers=BEARER,
                    source="127.0.0.8").status for _ in range(6)} == {200}
    # a wrong admin token on the settings route is a failure too
    admin_guesser = "127.0.0.10"
    for _ in range(3):
        assert request(strict.port, "PUT", "/api/v1/monitoring", b'{"retention_period_days": 30}',
                       BEARER, source=admin_guesser).status == 403
    assert _limited(request(strict.port, "PUT", "/api/v1/monitoring", b'{"retention_period_days": 30}',
                            {"Authorization": f"Bearer {ADMIN}"}, source=admin_guesser))
    fault_tally.add("requests rate-limited", 2)


def test_login_guesses_are_slowed_even_when_sent_in_parallel(strict, fault_tally, home):
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    right = f"token={TOKEN}".encode()
    # one address logging in properly, again and again, is never held up
    assert {request(strict.port, "POST", "/login", right, form, source="127.0.0.6").status
            for _ in range(5)} == {303}
    guesser = "127.0.0.5"
    statuses = [request(strict.port, "POST", "/login", b"token=guess-%d" % i, form, source=guesser).status
                for i in range(3)]
    assert statuses == [401] * 3
    locked = request(strict.port, "POST", "/login", right, form, source=guesser)
    assert _limited(locked) and "Set-Cookie" not in locked.headers
    # 20 guesses at once: each takes its token before its form is read, so 3 are judged
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda i: request(strict.port, "POST", "/login", b"token=g%d" % i,
                                                  form, source="127.0.0.7"), range(20)))
    assert sorted(a.status for a in answers) == [401] * 3 + [429] * 17
    fault_tally.add("requests rate-limited", 18)


def test_the_defaults_let_a_fleet_of_100_push_together_yet_stop_a_flood(defaults, home, fault_tally):
    """100 nodes, each its own address, push at the same moment, twice; then 100 pushes
    back to back from one address (a fleet behind one NAT, all at once). None is limited.
    A client asking far faster than 20/s is."""
    stamp = (datetime.now(timezone.utc) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")

    def push(node: int, source: str):
        row = {"timestamp": stamp, "metric_name": "cpu_usage", "metric_value": 10.0 + node / 10,
               "node_id": f"node-{node:03d}"}
        return request(defaults.port, "POST", "/api/v1/metrics", json.dumps(row).encode(),
                       {**BEARER, "Content-Type": "application/x-ndjson"}, source=source)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        for _ in range(2):
            fleet = list(pool.map(lambda n: push(n, f"127.0.1.{n + 1}"), range(100)))
            assert {a.status for a in fleet} == {200}
    behind_nat = [push(n, "127.0.2.1") for n in range(100)]
    assert {a.status for a in behind_nat} == {200}
    pushes_per_second = 300 / (time.monotonic() - started)
    flood = [request(defaults.port, "GET", "/healthz", source="127.0.3.1") for _ in range(400)]
    limited = sum(_limited(a) for a in flood)
    assert limited > 0 and flood[0].status == 200
    print(f"gateway: {pushes_per_second:.0f} pushes/s of one row; flood of 400 /healthz: "
          f"{limited} answered 429")
    fault_tally.add("requests rate-limited", limited)


# ------------------------------------------------------------------ size limits, bind address

def test_an_oversized_login_form_or_settings_body_is_413_and_changes_nothing(strict, home):
    settings_file = home.home / "perf_pipeline.yaml"
    settings_file.unlink(missing_ok=True)
    for form in (b"token=" + b"A" * 10_000, f"token={TOKEN}&pad=".encode() + b"x" * 10_000):
        answer = request(strict.port, "POST", "/login", form,
                         {"Content-Type": "application/x-www-form-urlencoded"}, source="127.0.0.11")
        assert answer.status == 413 and "Set-Cookie" not in answer.headers
    assert request(strict.port, "GET", "/", source="127.0.0.11").status == 401
    settings = json.dumps({"retention_period_days": 45, "pad": "x" * 70_000}).encode()
    answer = request(strict.port, "PUT", "/api/v1/monitoring", settings,
                     {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
                     source="127.0.0.11")
    assert answer.status == 413 and "65536 bytes" in json.loads(answer.body)["error"]
    assert not settings_file.exists()
    # the same change, small enough, is taken: the 413 was the size, not the content
    answer = request(strict.port, "PUT", "/api/v1/monitoring", b'{"retention_period_days": 45}',
                     {"Authorization": f"Bearer {ADMIN}"}, source="127.0.0.11")
    assert answer.status == 200 and "retention_period_days: 45" in settings_file.read_text()


def test_a_client_sending_too_much_reads_its_413_not_a_broken_pipe(strict, home):
    """Clients send the whole body before reading the answer, and urllib's (push.py's) ask to
    close the connection after it; answering early and closing reset the connection under the
    sender, who saw "gateway unreachable: broken pipe" (and retried) instead of the 413."""
    close = {"Connection": "close"}
    def slowly(size: int, chunk: int = 65536):  # as over a slow link: answered long before the end
        for _ in range(size // chunk):
            time.sleep(0.005)
            yield b" " * chunk

    before = sorted(home.landing.rglob("*"))
    for size in (2 * 1024 * 1024, 4 * 1024 * 1024):
        answer = request(strict.port, "POST", "/api/v1/metrics", slowly(size),
                         {**BEARER, **close, "Content-Type": "application/x-ndjson",
                          "Content-Length": str(size)}, source="127.0.0.12")
        assert answer.status == 413 and "send smaller batches" in json.loads(answer.body)["error"]
        answer = request(strict.port, "POST", "/api/v1/metrics", b" " * size,
                         {**BEARER, **close, "Content-Type": "application/x-ndjson"},
                         source="127.0.0.12")
        assert answer.status == 413
    for path, limit in (("/login", 4096), ("/api/v1/monitoring", 64 * 1024)):
        answer = request(strict.port, "POST" if path == "/login" else "PUT", path,
                         slowly(3 * limit, limit), {
                             **close, "Content-Length": str(3 * limit),
                             **({"Authorization": f"Bearer {ADMIN}"} if path != "/login" else {})},
                         source="127.0.0.13")
        assert answer.status == 413
    assert sorted(home.landing.rglob("*")) == before


def test_the_server_binds_loopback_only_by_default(defaults):
    listening = [c for c in psutil.Process(defaults.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert [(c.laddr.ip, c.laddr.port) for c in listening] == [("127.0.0.1", defaults.port)]
    others = [a.address for addresses in psutil.net_if_addrs().values() for a in addresses
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for address in others:  # the same port on this host's other addresses: nobody listens
        with pytest.raises(OSError), socket.create_connection((address, defaults.port), timeout=2):
            pass


# ------------------------------------------------------------------ constant-time comparisons

def _call(app, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> int:
    messages = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        messages.append(message)

    raw = [(b"host", b"127.0.0.1")] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": raw, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    return next(m for m in messages if m["type"] == "http.response.start")["status"]


def test_every_token_is_compared_in_constant_time(tmp_path, monkeypatch):
    real = hmac.compare_digest
    compared: list[tuple[bytes, bytes]] = []

    def spy(a, b):
        compared.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    database = tmp_path / "perf.duckdb"
    with open_warehouse(database):
        pass
    app = create_app(ServerSettings(landing=tmp_path / "landing", token=TOKEN, admin_token=ADMIN,
                                    database=database, monitoring_file=tmp_path / "perf_pipeline.yaml",
                                    dashboard=tmp_path / "dashboard.html"))

    def seen(secret: str, sent: str) -> bool:
        return any(secret.encode() in pair[1] and pair[0] == sent.encode() for pair in compared)

    assert _call(app, "GET", "/api/v1/alerts", headers=BEARER) == 200
    assert seen(TOKEN, f"Bearer {TOKEN}")
    compared.clear()
    assert _call(app, "GET", "/api/v1/alerts", headers={"Authorization": "Bearer nope"}) == 401
    assert seen(TOKEN, "Bearer nope")
    compared.clear()
    assert _call(app, "POST", "/login", f"token={TOKEN}".encode(),
                 {"Content-Type": "application/x-www-form-urlencoded"}) == 303
    assert seen(TOKEN, TOKEN)
    compared.clear()
    assert _call(app, "POST", "/login", b"token=guess",
                 {"Content-Type": "application/x-www-form-urlencoded"}) == 401
    assert seen(TOKEN, "guess")
    compared.clear()
    assert _call(app, "PUT", "/api/v1/monitoring", b'{"retention_period_days": 30}',
                 {"Authorization": f"Bearer {ADMIN}"}) == 200
    assert seen(ADMIN, f"Bearer {ADMIN}")  # by the middleware and again by the route
    assert sum(ADMIN.encode() in pair[1] for pair in compared) == 2
    compared.clear()
    assert _call(app, "GET", "/", headers=BEARER) == 404  # no dashboard file yet; let in
    assert seen(TOKEN, f"Bearer {TOKEN}")

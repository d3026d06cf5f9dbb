"""The node agent against real HTTP servers on loopback: a gateway that is down and then up, one
that loses its answer, one that rejects; the spool's bound; the real gateway end to end."""

import json
import logging
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from perf_pipeline.catalog import BY_NAME
from perf_pipeline.cli import build_parser
from perf_pipeline.collect.agent import Agent, Backoff, Sampler, Spool, counter_rate
from perf_pipeline.collect.push import PushError, jsonl, push_bytes, push_rows
from perf_pipeline.ingest.formats import stage_bytes
from perf_pipeline.storage.warehouse import Warehouse, connect
from perf_pipeline_tests.conftest import free_port, start_gateway, stop_process_group

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "agent-test-token-0123456789"
NODE_METRICS = {"cpu_usage", "memory_usage", "memory_utilization", "swap_usage", "disk_io_read",
                "disk_io_write", "network_io_received", "network_io_sent", "load_average"}
RATES = {"disk_io_read", "disk_io_write", "network_io_received", "network_io_sent"}


class Gateway:
    """A stand-in gateway on a port of our choosing: keeps every body it gets and answers 200
    with every row accepted, except that it drops the connection without answering (after
    reading the body) for the first `drop_first` requests."""

    def __init__(self, port: int, *, drop_first: int = 0, delay: float = 0.0) -> None:
        self.bodies: list[bytes] = []
        self.authorizations: list[str | None] = []
        self.drop_first = drop_first
        self.delay = delay
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                gateway.bodies.append(body)
                gateway.authorizations.append(self.headers.get("Authorization"))
                if gateway.drop_first > 0:
                    gateway.drop_first -= 1
                    self.close_connection = True
                    return
                time.sleep(gateway.delay)
                reply = json.dumps({"accepted": body.count(b"\n"), "rejected": []}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def rows(self) -> list[dict]:
        return [json.loads(line) for body in self.bodies for line in body.splitlines()]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RawReply:
    """A server on loopback that reads each request and answers with the same raw bytes (a
    broken status line, a body cut short), then closes the connection."""

    def __init__(self, raw: bytes) -> None:
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests += 1
                self.wfile.write(raw)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class StubSampler:
    """Rows of a fixed shape, the monotonic time of each call, and a failure for the first
    `fail_first` calls."""

    node_id = "node-stub"

    def __init__(self, fail_first: int = 0, error: Exception | None = None) -> None:
        self.times: list[float] = []
        self.fail_first = fail_first
        self.error = error

    def sample(self) -> list[dict]:
        self.times.append(time.monotonic())
        if self.fail_first > 0:
            self.fail_first -= 1
            raise self.error
        return _rows(f"2026-11-02T10:00:{len(self.times):02d}.000Z")


@pytest.fixture
def agent_log(caplog):
    caplog.set_level(logging.INFO, logger="perf_pipeline.agent")
    return caplog


def _wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _assert_each_sample_once(rows: list[dict], samples: int) -> None:
    per_key = Counter((row["metric_name"], row["timestamp"]) for row in rows)
    assert max(per_key.values()) == 1, [key for key, n in per_key.items() if n > 1]
    timestamps = {row["timestamp"] for row in rows}
    assert len(timestamps) == samples
    names = {row["metric_name"] for row in rows}
    assert len(per_key) == samples * len(names)


def _rows(timestamp: str, n: int = 3) -> list[dict]:
    return [{"timestamp": timestamp, "metric_name": "cpu_usage", "metric_value": float(i),
             "node_id": "node-01", "unit": "percent", "context_data": {}} for i in range(n)]


def _agent(spool: Spool, port: int, **kwargs) -> Agent:
    return Agent(spool, f"http://127.0.0.1:{port}", token=TOKEN, timeout=5.0,
                 backoff=Backoff(base=0.02, cap=0.1), **kwargs)


# ------------------------------------------------------------------------------ sampling

def test_counter_rate_never_negative_when_counters_wrap_reset_or_vanish():
    assert counter_rate({"eth0": 1_000_000}, {"eth0": 3_000_000}, 2.0) == pytest.approx(1.0)
    assert counter_rate({"eth0": 2**64 - 10}, {"eth0": 5}, 1.0) == 0.0
    assert counter_rate({"eth0": 5_000_000, "eth1": 1_000_000},
                        {"eth0": 6_000_000, "eth2": 9_000_000_000}, 1.0) == pytest.approx(1.0)
    assert counter_rate({"eth0": 0}, {"eth0": 1}, 0.0) == 0.0


def test_sampler_rows_validate_against_the_catalog_and_the_loading_rules():
    sampler = Sampler("node-07", "linux-large")
    time.sleep(0.2)
    rows = sampler.sample()
    names = [row["metric_name"] for row in rows]
    assert len(names) == len(set(names))
    assert set(names) <= NODE_METRICS
    assert set(names) >= NODE_METRICS - {"disk_io_read", "disk_io_write"}  # a node may have no disks
    for row in rows:
        metric = BY_NAME[row["metric_name"]]
        assert row["unit"] == metric.unit
        assert metric.min_value is None or row["metric_value"] >= metric.min_value
        assert metric.max_value is None or row["metric_value"] <= metric.max_value
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", row["timestamp"])
        assert (row["node_id"], row["node_type"]) == ("node-07", "linux-large")
        assert 0.15 < row["context_data"]["interval_s"] < 5
    assert all(row["metric_value"] >= 0 for row in rows if row["metric_name"] in RATES)
    staged = stage_bytes(jsonl(rows), suffix=".jsonl", source_file="agent")
    warehouse = Warehouse.for_writing(connect())
    try:
        reasons = [reason for _, reason, _ in warehouse.check_records(staged)]
    finally:
        warehouse.con.close()
    assert reasons == [None] * len(rows)


def test_sampler_rates_stay_non_negative_when_the_node_counters_go_backwards(monkeypatch):
    readings = iter([(10**9, 10**9, 10**9), (10**3, 2 * 10**6 + 10**9, 10)])
    disk = SimpleNamespace(read_bytes=0, write_bytes=0)
    nic = SimpleNamespace(bytes_recv=0, bytes_sent=0)

    def advance():
        disk.read_bytes, disk.write_bytes, nic.bytes_recv = next(readings)
        nic.bytes_sent = nic.bytes_recv

    monkeypatch.setattr(psutil, "disk_io_counters", lambda: disk)
    monkeypatch.setattr(psutil, "net_io_counters", lambda pernic: {"eth0": nic, "lo": nic})
    clock = iter([100.0, 102.0])
    advance()
    sampler = Sampler("node-01", clock=lambda: next(clock))
    advance()
    rates = {row["metric_name"]: row["metric_value"] for row in sampler.sample()
             if row["metric_name"] in RATES}
    assert rates == {"disk_io_read": 0.0, "disk_io_write": pytest.approx(1.0),
                     "network_io_received": 0.0, "network_io_sent": 0.0}


# ------------------------------------------------------------------------------ sending

def test_gateway_down_then_up_delivers_every_sample_exactly_once(tmp_path, agent_log):
    port = free_port()
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    agent = _agent(spool, port, sampler=Sampler("node-01"), interval=0.15)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(pending=agent.run(count=8)))
    runner.start()
    _wait_for(lambda: len(spool.pending()) >= 3, what="three spooled samples while the gateway is down")
    gateway = Gateway(port)
    try:
        runner.join(timeout=30)
        assert not runner.is_alive()
    finally:
        gateway.close()
    assert outcome["pending"] == 0 and spool.pending() == [] and spool.rejected() == []
    _assert_each_sample_once(gateway.rows(), samples=8)
    assert set(gateway.authorizations) == {f"Bearer {TOKEN}"}
    assert "gateway unreachable" in agent_log.text and "next try in" in agent_log.text
    assert "agent stopped: 8 samples, 8 batches delivered, 0 rejected" in agent_log.text
    assert TOKEN not in agent_log.text


def test_a_lost_answer_leads_to_a_resend_of_identical_bytes(tmp_path, agent_log):
    port = free_port()
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    batch = spool.add(_rows("2026-11-02T10:00:00.000Z"))
    spooled = batch.read_bytes()
    gateway = Gateway(port, drop_first=1)
    try:
        agent = _agent(spool, port)
        assert agent.finish() == 1  # the gateway stored the body, the answer never came
        assert batch.read_bytes() == spooled
        assert agent.finish() == 0
    finally:
        gateway.close()
    assert gateway.bodies == [spooled, spooled]
    assert spool.pending() == []
    assert "gateway unreachable" in agent_log.text


@pytest.mark.parametrize("status, answer", [
    (422, {"accepted": 0, "rejected": [{"line": 1, "reason": "unknown metric: cpu_usagez"},
                                       {"line": 2, "reason": "unknown metric: cpu_usagez"}]}),
    (200, {"accepted": 1, "rejected": [{"line": 2, "reason": "metric_value is not finite"}]}),
])
def test_rejected_rows_move_the_batch_to_rejected_and_it_is_never_resent(
        tmp_path, receiver, agent_log, status, answer):
    receiver.reply(status, json.dumps(answer).encode(), Content_Type="application/json")
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    batch = spool.add(_rows("2026-11-02T10:00:00.000Z", n=2))
    spooled = batch.read_bytes()
    agent = _agent(spool, receiver.port)
    assert agent.finish() == 0
    (rejected,) = spool.rejected()
    assert rejected.name == batch.name and rejected.read_bytes() == spooled
    response = json.loads(rejected.with_name(rejected.name + ".response.json").read_text())
    assert response["status"] == status and response["rejected"] == answer["rejected"]
    assert answer["rejected"][0]["reason"] in agent_log.text
    assert agent.finish() == 0
    assert len(receiver.requests) == 1


def test_a_batch_too_large_for_the_gateway_is_set_aside_not_retried(tmp_path, receiver, agent_log):
    receiver.reply(413, b'{"error": "body is over the limit"}')
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    spool.add(_rows("2026-11-02T10:00:00.000Z"))
    assert _agent(spool, receiver.port).finish() == 0
    (rejected,) = spool.rejected()
    assert json.loads(rejected.with_name(rejected.name + ".response.json").read_text())["status"] == 413
    assert "body is over the limit" in agent_log.text


def test_backoff_grows_exponentially_with_jitter_up_to_its_cap():
    backoff = Backoff(base=1.0, cap=8.0, rng=random.Random(3))
    delays = [backoff.next_delay() for _ in range(8)]
    for delay, ceiling in zip(delays, [1, 2, 4, 8, 8, 8, 8, 8], strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)
    backoff.reset()
    assert backoff.next_delay() <= 1.0


@pytest.mark.parametrize("status", [429, 500, 503])
def test_retryable_answers_keep_the_batch_for_later(tmp_path, receiver, agent_log, status):
    receiver.reply(status, b'{"error": "busy"}')
    receiver.reply(200, b'{"accepted": 3, "rejected_count": 0, "rejected": []}')
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    batch = spool.add(_rows("2026-11-02T10:00:00.000Z"))
    agent = _agent(spool, receiver.port)
    assert agent.finish() == 1
    assert spool.pending() == [batch] and spool.rejected() == []
    assert agent.finish() == 0
    assert receiver.requests[0]["body"] == receiver.requests[1]["body"] == jsonl(
        _rows("2026-11-02T10:00:00.000Z"))


def test_a_refused_token_is_logged_loudly_and_every_batch_kept(tmp_path, receiver, agent_log):
    receiver.reply(401, b'{"error": "missing or wrong bearer token"}')
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    batches = [spool.add(_rows(f"2026-11-02T10:00:0{i}.000Z")) for i in range(3)]
    agent = _agent(spool, receiver.port)
    assert agent.finish() == 3
    assert spool.pending() == batches
    assert len(receiver.requests) == 1  # it stops at the first refusal
    assert receiver.requests[0]["headers"]["Authorization"] == f"Bearer {TOKEN}"
    (error,) = [r for r in agent_log.records if r.levelno == logging.ERROR]
    assert "PERF_API_TOKEN" in error.getMessage() and "3 batches kept" in error.getMessage()
    assert TOKEN not in agent_log.text


def test_a_full_spool_drops_the_oldest_batches_and_says_how_many(tmp_path, agent_log):
    one_batch = len(jsonl(_rows("2026-11-02T10:00:00.000Z")))
    spool = Spool(tmp_path / "spool", max_bytes=3 * one_batch + 10)
    batches = [spool.add(_rows(f"2026-11-02T10:00:0{i}.000Z")) for i in range(5)]
    assert spool.pending() == batches[2:]
    assert (spool.dropped_batches, spool.dropped_rows) == (2, 6)
    assert "spool full" in agent_log.text
    assert "dropped 1 oldest pending batches (3 rows lost)" in agent_log.text
    assert "2 batches (6 rows) dropped since start" in agent_log.text
    # A rejected batch goes before any pending one: it is evidence, not data.
    spool.reject(spool.pending()[0], {"status": 422})
    spool.add(_rows("2026-11-02T10:00:05.000Z"))
    spool.add(_rows("2026-11-02T10:00:06.000Z"))
    assert spool.rejected() == []
    assert [json.loads(p.read_bytes().splitlines()[0])["timestamp"][17:19] for p in spool.pending()] \
        == ["04", "05", "06"]


def test_the_token_is_never_a_command_line_flag():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["agent", "--push", "http://127.0.0.1:1", "--token", TOKEN])


# ---------------------------------------------------------------------- as users run it

def _environment(tmp_path: Path) -> dict:
    environment = {**os.environ, "PERF_PIPELINE_HOME": str(tmp_path / "home"), "PERF_API_TOKEN": TOKEN}
    environment.pop("DAGSTER_HOME", None)
    return environment


def test_cli_agent_down_then_up_then_sigterm_flushes_and_loses_nothing(tmp_path):
    port = free_port()
    spool = tmp_path / "home" / "agent-spool"  # the default spool under PERF_PIPELINE_HOME
    process = subprocess.Popen(
        [sys.executable, "-m", "perf_pipeline.cli", "agent", "--push", f"http://127.0.0.1:{port}",
         "--interval", "0.2", "--max-backoff", "0.3", "--node-id", "node-cli"],
        cwd=ROOT, env=_environment(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    gateway = None
    try:
        _wait_for(lambda: len(list(spool.glob("*.jsonl"))) >= 3, timeout=60,
                  what="three spooled samples while the gateway is down")
        gateway = Gateway(port)
        _wait_for(lambda: len(gateway.bodies) >= 6, what="deliveries once the gateway is up")
    finally:
        stop_process_group(process)
        if gateway is not None:
            gateway.close()
    _, log_text = process.communicate()
    assert process.returncode == 0, log_text
    samples = int(re.search(r"agent stopped: (\d+) samples", log_text).group(1))
    assert list(spool.glob("*.jsonl")) == []
    _assert_each_sample_once(gateway.rows(), samples=samples)
    assert {row["node_id"] for row in gateway.rows()} == {"node-cli"}
    assert "SIGTERM received" in log_text and "gateway unreachable" in log_text
    assert TOKEN not in log_text


def test_real_gateway_down_then_up_lands_every_sample_exactly_once(tmp_path, agent_log):
    port = free_port()
    home = tmp_path / "home"
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    agent = Agent(spool, f"http://127.0.0.1:{port}", sampler=Sampler("node-gw", "linux-small"),
                  interval=0.2, token=TOKEN, timeout=5.0, backoff=Backoff(base=0.05, cap=0.3))
    runner = threading.Thread(target=agent.run)
    runner.start()
    server = None
    try:
        _wait_for(lambda: len(spool.pending()) >= 3, what="three spooled samples while the gateway is down")
        resend = spool.pending()[0].read_bytes()
        server = start_gateway(port, _environment(tmp_path))
        _wait_for(lambda: agent.delivered >= 6 and not spool.pending(), timeout=90,
                  what="the real gateway to take the spool")
    finally:
        agent.stop()
        runner.join(timeout=30)
    assert not runner.is_alive()
    try:
        landing = home / "landing"
        files_before = sorted(landing.rglob("gateway-*.jsonl"))
        # A batch sent again (its answer lost) lands as the same file: nothing new appears.
        answer = push_bytes(f"http://127.0.0.1:{port}", resend, content_type="application/x-ndjson",
                            token=TOKEN)
        assert answer.status == 200 and answer.rejected == []
        assert sorted(landing.rglob("gateway-*.jsonl")) == files_before
    finally:
        stop_process_group(server)
    rows = [json.loads(line) for path in files_before for line in path.read_text().splitlines()]
    assert spool.pending() == [] and spool.rejected() == []
    _assert_each_sample_once(rows, samples=agent.samples)
    assert {(row["node_id"], row["node_type"]) for row in rows} == {("node-gw", "linux-small")}
    assert TOKEN not in agent_log.text



# --------------------------------------------------------- answers that are not the gateway's

@pytest.mark.parametrize("answer", [
    b"<html><body>Please log in to the guest network</body></html>",
    b"",
    b"[1, 2, 3]",
    b'{"status": "ok"}',
    b'{"accepted": "3", "rejected": []}',
    b'{"accepted": 3, "rejected": "none"}',
], ids=["portal-page", "empty", "json-list", "no-accepted", "accepted-not-int", "rejected-not-list"])
def test_a_200_that_is_not_the_gateways_answer_keeps_the_batch(tmp_path, receiver, agent_log, answer):
    receiver.reply(200, answer)
    with pytest.raises(PushError) as raised:
        push_rows(f"http://127.0.0.1:{receiver.port}", _rows("2026-11-02T10:00:00.000Z"), token=TOKEN)
    assert raised.value.retryable and "not a perf_pipeline gateway answer" in str(raised.value)
    receiver.reply(200, answer)
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    batch = spool.add(_rows("2026-11-02T10:00:00.000Z"))
    assert _agent(spool, receiver.port).finish() == 1
    assert spool.pending() == [batch] and spool.rejected() == []
    assert "not a perf_pipeline gateway answer" in agent_log.text


@pytest.mark.parametrize("answer", [
    {"accepted": 0, "rejected": []},
    {"accepted": 2, "rejected": []},
    {"accepted": 0, "rejected_count": 0, "rejected": []},
    {"accepted": 1, "rejected_count": 1, "rejected": [{"line": 3, "reason": "bad"}]},
], ids=["nothing", "too-few", "nothing-counted", "one-row-unaccounted"])
def test_an_answer_that_does_not_account_for_every_row_keeps_the_batch(
        tmp_path, receiver, agent_log, answer):
    receiver.reply(200, json.dumps(answer).encode())
    receiver.reply(200, b'{"accepted": 3, "rejected_count": 0, "rejected": []}')
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    batch = spool.add(_rows("2026-11-02T10:00:00.000Z"))
    agent = _agent(spool, receiver.port)
    assert agent.finish() == 1
    assert spool.pending() == [batch] and spool.rejected() == []
    assert "of the 3 in" in agent_log.text
    assert agent.finish() == 0 and spool.pending() == [] and spool.rejected() == []
    assert receiver.requests[0]["body"] == receiver.requests[1]["body"]


def test_more_rejected_rows_than_listed_still_sets_the_batch_aside(tmp_path, receiver, agent_log):
    receiver.reply(422, json.dumps({"accepted": 0, "rejected_count": 3, "rejected": [
        {"line": 1, "reason": "unknown metric: cpu_usagez"}]}).encode())
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    spool.add(_rows("2026-11-02T10:00:00.000Z"))
    assert _agent(spool, receiver.port).finish() == 0
    assert len(spool.rejected()) == 1
    assert "gateway refused 3 of 3 rows" in agent_log.text


# ---------------------------------------------------------------------------- redirects

@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_and_the_batch_is_kept(tmp_path, receiver, agent_log, status):
    elsewhere = Gateway(free_port())
    moved = f"http://someone:pa55word@127.0.0.1:{elsewhere.server.server_address[1]}/api/v1/metrics"
    try:
        receiver.reply(status, b"", Location=moved)
        with pytest.raises(PushError) as raised:
            push_rows(f"http://127.0.0.1:{receiver.port}", _rows("2026-11-02T10:00:00.000Z"),
                      token=TOKEN)
        receiver.reply(status, b"", Location=moved)
        spool = Spool(tmp_path / "spool", max_bytes=10**6)
        batch = spool.add(_rows("2026-11-02T10:00:00.000Z"))
        assert _agent(spool, receiver.port).finish() == 1
    finally:
        elsewhere.close()
    error = raised.value
    assert not error.retryable and error.status == status
    shown = f"http://127.0.0.1:{elsewhere.server.server_address[1]}/api/v1/metrics"
    assert f"gateway redirected to {shown}" in str(error) and "use the final URL" in str(error)
    assert elsewhere.bodies == [] and elsewhere.authorizations == []  # the token stayed home
    assert [r["headers"].get("Authorization") for r in receiver.requests] == [f"Bearer {TOKEN}"] * 2
    assert spool.pending() == [batch] and spool.rejected() == []
    assert "use the final URL" in agent_log.text and "pa55word" not in agent_log.text


# ------------------------------------------------------------ broken answers, broken transport

@pytest.mark.parametrize("raw", [
    b"HELLO WORLD\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"accepted\"",
    b"HTTP/1.1 200 OK\r\nContent-Length: 33\r\n\r\n{\"accepted\": null, \"rejected\": []}",
    b"HTTP/1.1 200 OK\r\nContent-Length: 34\r\n\r\n{\"accepted\": 3, \"rejected\": [null]}",
    b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"accepted\": 1e999}",
], ids=["bad-status-line", "incomplete-read", "accepted-null", "rejected-null", "accepted-inf"])
def test_every_transport_or_parse_failure_is_a_retryable_push_error(tmp_path, agent_log, raw):
    server = RawReply(raw)
    try:
        with pytest.raises(PushError) as raised:
            push_rows(f"http://127.0.0.1:{server.port}", _rows("2026-11-02T10:00:00.000Z"), token=TOKEN)
        spool = Spool(tmp_path / "spool", max_bytes=10**6)
        batch = spool.add(_rows("2026-11-02T10:00:00.000Z"))
        assert _agent(spool, server.port).finish() == 1
    finally:
        server.close()
    assert raised.value.retryable
    assert spool.pending() == [batch] and spool.rejected() == []
    assert server.requests == 2


# ------------------------------------------------------------------------- the run loop

def test_a_late_sample_starts_a_full_interval_never_a_back_to_back_one(tmp_path, agent_log):
    port = free_port()
    gateway = Gateway(port, delay=0.5)  # every send outlasts two intervals
    sampler = StubSampler()
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    agent = _agent(spool, port, sampler=sampler, interval=0.2)
    try:
        assert agent.run(count=4) == 0
    finally:
        gateway.close()
    gaps = [later - earlier for earlier, later in zip(sampler.times, sampler.times[1:])]
    assert len(sampler.times) == 4 and min(gaps) >= 0.2 * 0.95, gaps
    assert len(gateway.bodies) == 4 and spool.pending() == []


@pytest.mark.parametrize("failure", ["disk-full", "psutil"])
def test_a_failing_round_is_logged_and_the_agent_goes_on(tmp_path, agent_log, monkeypatch, failure):
    port = free_port()
    gateway = Gateway(port)
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    if failure == "disk-full":
        sampler = StubSampler()
        add, calls = spool.add, []

        def add_once_full(rows):
            calls.append(rows)
            if len(calls) == 1:
                raise OSError(28, "No space left on device")
            return add(rows)

        monkeypatch.setattr(spool, "add", add_once_full)
        reason = "No space left on device"
    else:
        sampler = StubSampler(fail_first=1, error=psutil.AccessDenied(pid=1, name="probe"))
        reason = "AccessDenied"
    agent = _agent(spool, port, sampler=sampler, interval=0.1)
    try:
        assert agent.run(count=3) == 0
    finally:
        gateway.close()
    assert agent.samples == 2 and len(gateway.bodies) == 2
    assert "sample lost" in agent_log.text and reason in agent_log.text
    assert "agent stopped: 2 samples, 2 batches delivered" in agent_log.text


def test_credentials_in_the_url_are_never_logged(tmp_path, receiver, agent_log):
    receiver.reply(200, b'{"accepted": 3, "rejected_count": 0, "rejected": []}')
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    spool.add(_rows("2026-11-02T10:00:00.000Z"))
    url = f"http://ci-user:Hunter2-pw@127.0.0.1:{receiver.port}"
    agent = Agent(spool, url, sampler=StubSampler(), interval=0.05, timeout=5.0,
                  backoff=Backoff(base=0.02, cap=0.1))
    assert agent.run(count=1) == 1  # the sample's batch meets the default "ok": not an answer
    assert "Hunter2-pw" not in agent_log.text and "ci-user" not in agent_log.text
    assert f"pushing to http://127.0.0.1:{receiver.port}/api/v1/metrics" in agent_log.text
    # The credentials leave the URL and travel as HTTP Basic (there is no token here).
    first = receiver.requests[0]
    assert first["headers"]["Authorization"] == "Basic Y2ktdXNlcjpIdW50ZXIyLXB3"
    assert first["path"] == "/api/v1/metrics"

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from perf_pipeline.config import Paths, paths_from_env

# What the fault-injection tests tried (inputs fuzzed, processes killed, outages, attacks),
# per test module, printed at the end of every run: the figures docs/reliability.md cites.
_FAULT_TALLY: dict[str, dict[str, int]] = {}


class FaultTally:
    """Counts what one fault-injection module tried: `tally.add("inputs fuzzed", 3)`."""

    def __init__(self, module: str):
        self.counts = _FAULT_TALLY.setdefault(module, {})

    def add(self, what: str, count: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + count

    def add_all(self, counts: dict[str, int]) -> None:
        for what, count in counts.items():
            self.add(what, count)


@pytest.fixture
def fault_tally(request) -> FaultTally:
    return FaultTally(request.module.__name__.rsplit(".", 1)[-1])


def pytest_sessionfinish(session) -> None:
    # an xdist worker hands its counts to the controller, which prints them all
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fault_tally"] = _FAULT_TALLY


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    for module, counts in getattr(node, "workeroutput", {}).get("fault_tally", {}).items():
        FaultTally(module).add_all(counts)


def pytest_terminal_summary(terminalreporter) -> None:
    tried = {module: counts for module, counts in _FAULT_TALLY.items() if counts}
    if not tried:
        return
    terminalreporter.section("fault injection: what the reliability tests tried")
    for module, counts in sorted(tried.items()):
        figures = ", ".join(f"{what} {count:,}" for what, count in sorted(counts.items()))
        terminalreporter.write_line(f"{module}: {figures}")


@pytest.fixture
def paths(tmp_path, monkeypatch) -> Paths:
    """A fresh PERF_PIPELINE_HOME under tmp_path, set in the environment as users set it."""
    monkeypatch.setenv("PERF_PIPELINE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PERF_PIPELINE_DATABASE", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    return paths_from_env().ensure()


def inner_pytest_env(**overrides: str) -> dict[str, str]:
    """The environment for a pytest that a test starts: without this project's settings
    (PERF_*), a CI's variables, or an xdist worker's (PYTEST_*), which would make the inner
    run measure, name or skip things as if it were part of this one; then `overrides`."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PERF_", "PYTEST_", "GITHUB_", "GITLAB", "JENKINS", "CI_"))}
    return {**env, **overrides}


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


# ------------------------------------------------- real servers on loopback

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

class Receiver:
    """An HTTP server that records each request and answers with the next queued reply."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.replies: list[tuple[int, dict, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, headers, reply = receiver.replies.pop(0) if receiver.replies else (200, {}, b"ok")
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def reply(self, status: int, body: bytes, **headers: str) -> None:
        self.replies.append((status, {k.replace("_", "-"): v for k, v in headers.items()}, body))


@pytest.fixture
def receiver():
    receiver = Receiver()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()

class Mailbox:
    """An aiosmtpd handler that keeps each message, or refuses recipients with `refuse`."""

    def __init__(self) -> None:
        self.envelopes = []
        self.refuse: str | None = None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.refuse:
            return self.refuse
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append(envelope)
        return "250 Message accepted"

@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made with the openssl CLI (an EC key: fast)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def smtp_server():
    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield mailbox, controller.port
    controller.stop()


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True and everything it spawned
    (`dagster dev` runs a webserver, a daemon and code servers)."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def start_gateway(port: int, env: dict, *, arguments: tuple[str, ...] = (),
                  command: str = "serve") -> subprocess.Popen:
    """`perf-pipeline serve` (or `dashboard`) in its own process group on 127.0.0.1:`port`
    (not waited for)."""
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "perf_pipeline.cli", command, "--port", str(port), *arguments],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_serving(url: str, process: subprocess.Popen, *, timeout: float = 60) -> None:
    """Block until the gateway at `url` answers /healthz; fail with its output if it died."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if json.loads(response.read()) == {"status": "ok"}:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                stop_process_group(process)
            pytest.fail(f"gateway did not start: {process.stdout.read().decode()}")
        time.sleep(0.2)


def materialized_fleet(root: Path, *, end, days: int, nodes: int, tests: int,
                       runs_per_day: int = 4, seed: int = 1) -> Paths:
    """A simulated fleet under `root`, ingested and run through the real pipeline with its
    own PERF_PIPELINE_HOME (for module-scoped fixtures, which cannot use monkeypatch)."""
    from perf_pipeline.defs.runner import run_pipeline
    from perf_pipeline.ingest.landing import ingest_files
    from perf_pipeline.ingest.simulator import simulate_fleet

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PERF_PIPELINE_HOME", str(root / "home"))
        patch.delenv("PERF_PIPELINE_DATABASE", raising=False)
        patch.delenv("DAGSTER_HOME", raising=False)
        paths = paths_from_env().ensure()
        simulate_fleet(root / "sim", days=days, nodes=nodes, tests=tests, seed=seed, end=end,
                       runs_per_day=runs_per_day)
        ingest_files(sorted((root / "sim").rglob("*.jsonl")), paths.landing, today=end.date())
        run_pipeline(paths, progress=lambda _: None)
    return paths


class LiveServer:
    def __init__(self, url: str, port: int, pid: int):
        self.url, self.port, self.pid = url, port, pid
        self.log: list[bytes] = []

    def __repr__(self) -> str:  # hypothesis prints the fixtures of a failing example
        return f"LiveServer({self.url})"


@contextlib.contextmanager
def live_server(env: dict, *, secrets: tuple[str, ...], arguments: tuple[str, ...] = (),
                command: str = "serve"):
    """`perf-pipeline serve` (or `dashboard`) on a free loopback port, yielding a LiveServer;
    afterwards its output must hold none of `secrets` (never logged) and no traceback. The
    output is read while the server runs: uvicorn logs every request, and a pipe nobody
    reads fills after 64 KiB (about 700 requests) and then blocks the server."""
    port = free_port()
    process = start_gateway(port, env, arguments=arguments, command=command)
    server = LiveServer(f"http://127.0.0.1:{port}", port, process.pid)
    reader = threading.Thread(target=lambda: server.log.extend(process.stdout), daemon=True)
    reader.start()
    try:
        wait_until_serving(server.url, process)
        yield server
    finally:
        stop_process_group(process)
        reader.join(timeout=10)
    output = b"".join(server.log).decode("utf-8", errors="replace")
    assert "Traceback" not in output, output[-5000:]
    for secret in secrets:
        assert secret not in output, "a secret must never be logged"


@contextlib.contextmanager
def serving(env: dict, *, secrets: tuple[str, ...], arguments: tuple[str, ...] = (),
            command: str = "serve"):
    """live_server, yielding its URL."""
    with live_server(env, secrets=secrets, arguments=arguments, command=command) as server:
        yield server.url

"""A sensor tick killed with SIGKILL in the middle of delivering alerts loses none of them:
the alerts it had sent are not sent again, the ones it had not reached go out on the next
tick, and the one in flight is sent again marked as a possible repeat (by email, under the
same Message-ID). Real processes, a real DuckDB file, a real webhook receiver and a real
SMTP server on loopback."""

import asyncio
import email
import email.policy
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pandas as pd
import pytest
from aiosmtpd.controller import Controller

from perf_pipeline.definitions import build_defs
from perf_pipeline.defs.alerts import regression_alert_sensor
from perf_pipeline.storage.warehouse import open_warehouse
from perf_pipeline_tests.conftest import free_port
from perf_pipeline_tests.test_alerts import EMPTY, T0, _change, _incident, _reconcile

ALERTS = 3
REPEAT = "possibly a repeat"
TICK = """
import dagster as dg
import pandas as pd
from perf_pipeline.config import paths_from_env
from perf_pipeline.definitions import build_defs
from perf_pipeline.defs.alerts import regression_alert_sensor

defs = build_defs(paths_from_env())
with dg.DagsterInstance.get() as instance:
    context = dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs)
    print(regression_alert_sensor.evaluate_tick(context).skip_message, flush=True)
"""


class Stall:
    """Holds the `index`-th delivery (0-based) until released: "after" it has arrived,
    "before" it has (then drops it, as if the tick died before the message left)."""

    def __init__(self, index: int | None = None, when: str = "after"):
        self.index, self.when = index, when
        self.seen = 0
        self.reached = threading.Event()
        self.released = threading.Event()

    def hold(self, moment: str) -> bool:
        """Called at `moment` of each delivery; True when this delivery is the stalled one."""
        if self.index is None or self.seen != self.index or moment != self.when:
            return False
        self.reached.set()
        self.released.wait(60)
        return True


class WebhookReceiver:
    def __init__(self):
        self.bodies: list[str] = []
        self.stall = Stall()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                if receiver.stall.hold("before"):
                    return  # dropped unread: this delivery never arrived
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                receiver.bodies.append(body)
                stalled = receiver.stall.hold("after")
                receiver.stall.seen += 1
                if stalled:
                    return  # the sender is dead by now
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class StallingMailbox:
    def __init__(self):
        self.messages: list[email.message.EmailMessage] = []
        self.stall = Stall()

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        if self.stall.index == self.stall.seen:
            self.stall.reached.set()
            while not self.stall.released.is_set():  # without blocking the server's loop
                await asyncio.sleep(0.05)
        self.stall.seen += 1
        return "250 Message accepted"


@pytest.fixture
def webhook():
    receiver = WebhookReceiver()
    yield receiver
    receiver.stall.released.set()
    receiver.server.shutdown()
    receiver.server.server_close()


@pytest.fixture
def mailbox():
    handler = StallingMailbox()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield handler, controller.port
    handler.stall.released.set()
    controller.stop()


@pytest.fixture
def dagster_home(tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def _outbox():
    """ALERTS new alerts, one per incident, in the order the outbox delivers them."""
    at = [T0 + pd.Timedelta(days=n) for n in range(ALERTS)]
    incidents = [_incident(f"i{n}", at=at[n]) for n in range(ALERTS)]
    changes = [_change(f"tests/t{n}.py::t", incident=f"i{n}", at=at[n]) for n in range(ALERTS)]
    outbox, _ = _reconcile(EMPTY, incidents, changes)
    assert len(outbox) == ALERTS
    return outbox.sort_values(["created_at", "alert_id"]).reset_index(drop=True)


def _fresh_outbox(paths, outbox) -> None:
    paths.database.unlink(missing_ok=True)
    with open_warehouse(paths.database) as wh:
        wh.replace_table("regression_alerts", outbox)


def _killed_tick(stall: Stall) -> None:
    """A tick in its own process, killed while `stall` holds its delivery."""
    tick = subprocess.Popen([sys.executable, "-c", TICK], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if not stall.reached.wait(120):
            tick.kill()
            raise AssertionError(f"the tick never reached the stalled delivery: {tick.communicate()}")
        tick.send_signal(signal.SIGKILL)
        assert tick.wait(30) == -signal.SIGKILL
    finally:
        tick.kill()
        stall.released.set()


def _tick(paths) -> str:
    defs = build_defs(paths)
    with dg.DagsterInstance.get() as instance:
        context = dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs)
        return regression_alert_sensor.evaluate_tick(context).skip_message


def _states(paths) -> list[tuple[str, str]]:
    with open_warehouse(paths.database, read_only=True) as wh:
        table = wh.table("alert_deliveries")
    return sorted(zip(table.alert_id, table.state))


@pytest.mark.parametrize("when", ["after", "before"])
def test_a_webhook_tick_killed_mid_delivery_loses_nothing_and_repeats_only_the_message_in_flight(
        paths, dagster_home, webhook, monkeypatch, fault_tally, when):
    monkeypatch.setenv("PERF_SLACK_WEBHOOK_URL", f"http://127.0.0.1:{webhook.port}/services/T/B/x")
    outbox = _outbox()
    ids = list(outbox.alert_id)
    for stalled in range(ALERTS):
        _fresh_outbox(paths, outbox)
        webhook.bodies.clear()
        webhook.stall = Stall(stalled, when)
        _killed_tick(webhook.stall)
        fault_tally.add("sensor ticks killed mid-delivery")
        arrived_before_kill = len(webhook.bodies)
        assert arrived_before_kill == stalled + (when == "after")

        webhook.stall = Stall()
        assert "'sent': " in _tick(paths)
        assert "'sent': 0" in _tick(paths)  # and nothing more on the tick after

        received = {alert: [b for b in webhook.bodies if alert in b] for alert in ids}
        for n, alert in enumerate(ids):
            expected = 2 if (n == stalled and when == "after") else 1
            assert len(received[alert]) == expected, (when, stalled, n)
            # only the delivery that was in flight when the tick died is marked a repeat
            assert [REPEAT in body for body in received[alert]] == (
                [False] * (expected - 1) + [n == stalled])
        assert _states(paths) == sorted((alert, "sent") for alert in ids)
        fault_tally.add("alerts checked", ALERTS)


def test_an_email_tick_killed_mid_delivery_resends_the_message_in_flight_under_its_message_id(
        paths, dagster_home, mailbox, monkeypatch, fault_tally):
    handler, port = mailbox
    for name, value in {"PERF_SMTP_HOST": "127.0.0.1", "PERF_SMTP_PORT": str(port),
                        "PERF_SMTP_SECURITY": "none", "PERF_ALERT_EMAIL_TO": "owners@example.test",
                        "PERF_ALERT_EMAIL_FROM": "Perf <perf@example.test>"}.items():
        monkeypatch.setenv(name, value)
    outbox = _outbox()
    stalled = 1
    _fresh_outbox(paths, outbox)
    handler.stall = Stall(stalled)
    _killed_tick(handler.stall)
    fault_tally.add("sensor ticks killed mid-delivery")
    handler.stall = Stall()
    assert "'sent': 2" in _tick(paths)  # the one in flight and the one never reached

    by_alert = {alert: [m for m in handler.messages if m["X-Perf-Alert-Id"] == alert]
                for alert in outbox.alert_id}
    assert [len(messages) for messages in by_alert.values()] == [1, 2, 1]
    repeated = by_alert[outbox.alert_id[stalled]]
    assert repeated[0]["Message-ID"] == repeated[1]["Message-ID"] == (
        f"<perf-alert-{outbox.alert_id[stalled]}@example.test>")
    assert REPEAT not in repeated[0].get_body(("plain",)).get_content()
    assert REPEAT in repeated[1].get_body(("plain",)).get_content()
    assert len({m["Message-ID"] for m in handler.messages}) == ALERTS
    assert _states(paths) == sorted((alert, "sent") for alert in outbox.alert_id)
    fault_tally.add("alerts checked", ALERTS)

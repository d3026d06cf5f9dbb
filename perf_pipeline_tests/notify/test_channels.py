"""The notification channels against real servers on 127.0.0.1: an HTTP receiver standing in
for Slack's webhook and Web API, and aiosmtpd for SMTP (plain, and STARTTLS with AUTH using a
self-signed certificate made by the openssl CLI). Every failure test also checks that the
secret (webhook URL, bot token, SMTP password) is absent from the error, the repr and the logs.
"""

from __future__ import annotations

import email
import email.policy
import json
import logging
import ssl
from datetime import datetime, timezone

import pytest
import slack_sdk
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from perf_pipeline.notify import DeliveryError
from perf_pipeline.notify.email import EmailChannel
from perf_pipeline.notify.messages import (
    alert_text,
    run_failure_email,
    run_failure_slack_payload,
    run_failure_text,
    slack_payload,
)
from perf_pipeline.notify.slack import SlackBotChannel, SlackWebhookChannel
from perf_pipeline_tests.conftest import Mailbox, Receiver, free_port

WEBHOOK_SECRET = "T0SECRET/B0SECRET/xyzzyWebhookSecret"
BOT_TOKEN = "xoxb-secret-token-4242"
SMTP_USER, SMTP_PASSWORD = "perf-bot", "s3cret-Passw0rd!"
SCRIPT_TEST = "tests/test_ui.py::test_<script>alert(1)</script>"


def make_alert(**changes) -> dict:
    alert = {
        "alert_id": "alert-1", "dedup_key": "code_change:test_execution_time:tests/test_a.py",
        "incident_id": "incident-1", "attribution": "code_change", "severity": "high",
        "title": "test_execution_time regressed 35% on tests/test_a.py::test_one",
        "metric_name": "test_execution_time", "unit": "s", "direction": "lower_is_better",
        "tests": ["tests/test_a.py::test_one"], "node_id": "node-07", "before": 1.2, "after": 1.62,
        "magnitude_percent": 35.0, "p_value": 0.0012, "first_test_run_id": "run-0042",
        "first_commit": "c0ffee1234567890abcdef", "started_at": datetime(2026, 3, 1, 12, 30, tzinfo=timezone.utc),
        "suspected_cause": "commit c0ffee1234 changed the fixture setup",
        "cause_evidence": "only tests importing conftest_heavy slowed down",
        "status": "new", "asset_url": "http://dagster.local/assets/regression_alerts?partition=2026-03-01",
    }
    alert.update(changes)
    return alert


FAILURE = {"run_id": "9f8e7d6c-5b4a-3210", "job_name": "daily_analysis_job",
           "error": "duckdb.IOException: could not set lock on file <perf.duckdb>",
           "run_url": "http://dagster.local/runs/9f8e7d6c-5b4a-3210"}

EVIDENCE = ["test_execution_time", "1.2 s → 1.62 s", "+35", "0.0012", "run-0042", "c0ffee1234",
            "changed the fixture setup", "conftest_heavy",
            "http://dagster.local/assets/regression_alerts?partition=2026-03-01"]


# ------------------------------------------------------------------ messages


def test_alert_text_carries_the_evidence():
    text = alert_text(make_alert())
    assert text.splitlines()[0] == "[perf regression] test_execution_time +35% on tests/test_a.py::test_one"
    for piece in EVIDENCE + ["node-07", "tests/test_a.py::test_one"]:
        assert piece in text


def test_outbox_rows_read_through_pandas_render():
    """DuckDB list columns arrive as numpy arrays and NULLs as NaN/NaT/None."""
    import numpy as np
    import pandas as pd

    alert = make_alert(tests=np.array([], dtype=object), node_id=None, suspected_cause=float("nan"),
                       cause_evidence=None, first_commit=None, started_at=pd.NaT, asset_url=None)
    text = alert_text(alert)
    assert "on the whole fleet" in text.splitlines()[0]
    assert "Suspected cause: unknown" in text and "Started: unknown" in text and ": nan" not in text.lower()
    assert json.dumps(slack_payload(alert))


def test_slack_payload_escapes_user_data_and_respects_limits():
    tests = [SCRIPT_TEST] + [f"tests/test_{i}.py::test_x" for i in range(24)]
    payload = slack_payload(make_alert(title="x" * 400, tests=tests, suspected_cause="a & b <@U123>" * 400))
    blocks = payload["blocks"]
    assert len(blocks) <= 50
    header = next(block for block in blocks if block["type"] == "header")
    assert len(header["text"]["text"]) <= 150
    texts = [block["text"]["text"] for block in blocks if block["type"] == "section" and "text" in block]
    assert all(len(text) <= 3000 for text in texts)
    rendered = json.dumps(payload)
    assert "<script>" not in rendered and "<@U123>" not in rendered
    assert "&lt;script&gt;" in rendered and "a &amp; b &lt;@U123&gt;" in rendered
    assert "and 15 more" in rendered and "tests/test_9.py" not in rendered


def test_run_failure_messages_name_the_run_job_error_and_link():
    text = run_failure_text(FAILURE)
    slack = json.dumps(run_failure_slack_payload(FAILURE))
    message = run_failure_email(FAILURE, sender="perf@example.com", recipients=["team@example.com"])
    html_part = message.get_body(("html",)).get_content()
    for rendered in (text, slack, message.get_body(("plain",)).get_content(), html_part):
        for piece in ("9f8e7d6c-5b4a-3210", "daily_analysis_job", "could not set lock on file",
                      "http://dagster.local/runs/9f8e7d6c-5b4a-3210"):
            assert piece in rendered
    assert "&lt;perf.duckdb&gt;" in html_part and "<perf.duckdb>" not in html_part
    assert "daily_analysis_job" in message["Subject"]


# ------------------------------------------------------------------ a local HTTP server


def assert_secret_hidden(secret: str, error: DeliveryError, channel, caplog) -> None:
    for shown in (str(error), repr(error), repr(channel), caplog.text):
        assert secret not in shown


# ------------------------------------------------------------------ Slack webhook


def webhook(receiver: Receiver, **kwargs) -> SlackWebhookChannel:
    return SlackWebhookChannel(f"http://127.0.0.1:{receiver.port}/services/{WEBHOOK_SECRET}", **kwargs)


def test_webhook_posts_blocks_with_the_evidence(receiver):
    channel = webhook(receiver)
    channel.deliver_alert(make_alert())
    (request,) = receiver.requests
    assert request["path"] == f"/services/{WEBHOOK_SECRET}"
    assert request["headers"]["Content-Type"].startswith("application/json")
    payload = json.loads(request["body"])
    assert payload["blocks"][0]["type"] == "header" and payload["text"]
    rendered = json.dumps(payload, ensure_ascii=False)
    for piece in EVIDENCE:
        assert piece in rendered.replace("&amp;", "&")
    assert channel.name == "slack_webhook" and WEBHOOK_SECRET not in repr(channel)


@pytest.mark.parametrize("status, body, headers, retryable, retry_after", [
    (500, b"internal error", {}, True, None),
    (429, b"rate limited", {"Retry_After": "7"}, True, 7),
    (404, b"no_service", {}, False, None),
    (200, b"invalid_blocks", {}, False, None),
])
def test_webhook_failures_say_whether_to_retry(receiver, caplog, status, body, headers, retryable, retry_after):
    caplog.set_level(logging.DEBUG)
    receiver.reply(status, body, **headers)
    channel = webhook(receiver)
    with pytest.raises(DeliveryError) as raised:
        channel.deliver_run_failure(FAILURE)
    assert raised.value.retryable is retryable
    assert raised.value.retry_after == retry_after
    assert raised.value.channel == "slack_webhook" and str(status) in str(raised.value)
    assert_secret_hidden(WEBHOOK_SECRET, raised.value, channel, caplog)


def test_webhook_unreachable_is_retryable(caplog):
    caplog.set_level(logging.DEBUG)
    channel = SlackWebhookChannel(f"http://127.0.0.1:{free_port()}/services/{WEBHOOK_SECRET}", timeout=2)
    with pytest.raises(DeliveryError) as raised:
        channel.deliver_alert(make_alert())
    assert raised.value.retryable is True
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert_secret_hidden(WEBHOOK_SECRET, raised.value, channel, caplog)


def test_webhook_url_is_checked_without_echoing_it():
    with pytest.raises(ValueError) as raised:
        SlackWebhookChannel(f"file:///{WEBHOOK_SECRET}")
    assert WEBHOOK_SECRET not in str(raised.value)


# ------------------------------------------------------------------ Slack bot


def bot(receiver: Receiver) -> SlackBotChannel:
    client = slack_sdk.WebClient(token=BOT_TOKEN, base_url=f"http://127.0.0.1:{receiver.port}/", timeout=5)
    return SlackBotChannel(client, "#perf-alerts")


def test_bot_posts_channel_text_blocks_and_token(receiver):
    receiver.reply(200, b'{"ok": true, "channel": "C123", "ts": "1700000000.000100"}',
                   Content_Type="application/json")
    channel = bot(receiver)
    channel.deliver_alert(make_alert())
    (request,) = receiver.requests
    assert request["path"] == "/chat.postMessage"
    assert request["headers"]["Authorization"] == f"Bearer {BOT_TOKEN}"
    body = json.loads(request["body"])
    assert body["channel"] == "#perf-alerts" and body["text"].startswith("[perf regression]")
    assert body["blocks"] == slack_payload(make_alert())["blocks"]
    assert channel.name == "slack_bot" and BOT_TOKEN not in repr(channel)


def test_bot_api_error_is_permanent_and_hides_the_token(receiver, caplog):
    caplog.set_level(logging.DEBUG)
    receiver.reply(200, b'{"ok": false, "error": "channel_not_found"}', Content_Type="application/json")
    channel = bot(receiver)
    with pytest.raises(DeliveryError) as raised:
        channel.deliver_run_failure(FAILURE)
    assert raised.value.retryable is False and "channel_not_found" in str(raised.value)
    assert_secret_hidden(BOT_TOKEN, raised.value, channel, caplog)


def test_bot_rate_limit_is_retryable_with_retry_after(receiver, caplog):
    caplog.set_level(logging.DEBUG)
    receiver.reply(429, b'{"ok": false, "error": "ratelimited"}', Content_Type="application/json",
                   Retry_After="3")
    channel = bot(receiver)
    with pytest.raises(DeliveryError) as raised:
        channel.deliver_alert(make_alert())
    assert raised.value.retryable is True and raised.value.retry_after == 3
    assert_secret_hidden(BOT_TOKEN, raised.value, channel, caplog)


def test_bot_unreachable_is_retryable(caplog):
    caplog.set_level(logging.DEBUG)
    client = slack_sdk.WebClient(token=BOT_TOKEN, base_url=f"http://127.0.0.1:{free_port()}/", timeout=2)
    channel = SlackBotChannel(client, "#perf-alerts")
    with pytest.raises(DeliveryError) as raised:
        channel.deliver_alert(make_alert())
    assert raised.value.retryable is True
    assert_secret_hidden(BOT_TOKEN, raised.value, channel, caplog)


# ------------------------------------------------------------------ email


def authenticate(server, session, envelope, mechanism, auth_data) -> AuthResult:
    accepted = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        SMTP_USER.encode(), SMTP_PASSWORD.encode())
    return AuthResult(success=accepted, handled=False)  # handled=False: the server sends the 535


@pytest.fixture
def tls_smtp_server(certificate):
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port(), tls_context=server_context,
                            require_starttls=True, authenticator=authenticate, auth_require_tls=True)
    controller.start()
    yield mailbox, controller.port, ssl.create_default_context(cafile=str(cert))
    controller.stop()


def parsed(envelope) -> email.message.EmailMessage:
    return email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)


def test_email_arrives_as_text_and_escaped_html(smtp_server):
    mailbox, port = smtp_server
    channel = EmailChannel("127.0.0.1", port, sender="perf@example.com",
                           recipients=["dev@example.com", "qa@example.com"], timeout=5)
    channel.deliver_alert(make_alert(tests=[SCRIPT_TEST, "tests/test_a.py::test_one"]))
    (envelope,) = mailbox.envelopes
    assert envelope.mail_from == "perf@example.com"
    assert envelope.rcpt_tos == ["dev@example.com", "qa@example.com"]
    message = parsed(envelope)
    assert message.get_content_type() == "multipart/alternative"
    assert message["Subject"] == "[perf regression] test_execution_time +35% on " + SCRIPT_TEST + " (+1 tests)"
    plain = message.get_body(("plain",)).get_content()
    html_part = message.get_body(("html",)).get_content()
    for piece in EVIDENCE:
        assert piece in plain
        assert piece.replace("&", "&amp;") in html_part
    assert SCRIPT_TEST in plain
    assert "<script>" not in html_part and "&lt;script&gt;alert(1)&lt;/script&gt;" in html_part


def test_email_over_starttls_with_login(tls_smtp_server, caplog):
    caplog.set_level(logging.DEBUG)
    mailbox, port, client_context = tls_smtp_server
    channel = EmailChannel("127.0.0.1", port, security="starttls", user=SMTP_USER, password=SMTP_PASSWORD,
                           sender="perf@example.com", recipients=["dev@example.com"], timeout=5,
                           ssl_context=client_context)
    channel.deliver_run_failure(FAILURE)
    (envelope,) = mailbox.envelopes
    assert "daily_analysis_job" in parsed(envelope)["Subject"]
    assert SMTP_PASSWORD not in repr(channel) and SMTP_PASSWORD not in caplog.text


def test_email_over_implicit_tls_with_login(certificate, caplog):
    caplog.set_level(logging.DEBUG)
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    mailbox = Mailbox()
    # aiosmtpd counts only STARTTLS as TLS for auth_require_tls; this connection is TLS from
    # its first byte, so AUTH is offered without that check.
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port(), ssl_context=server_context,
                            authenticator=authenticate, auth_require_tls=False)
    controller.start()
    try:
        channel = EmailChannel("127.0.0.1", controller.port, security="ssl", user=SMTP_USER,
                               password=SMTP_PASSWORD, sender="perf@example.com",
                               recipients=["dev@example.com"], timeout=5,
                               ssl_context=ssl.create_default_context(cafile=str(cert)))
        channel.deliver_run_failure(FAILURE)
    finally:
        controller.stop()
    (envelope,) = mailbox.envelopes
    assert "daily_analysis_job" in parsed(envelope)["Subject"]
    assert SMTP_PASSWORD not in caplog.text


def test_email_wrong_password_is_permanent_and_hidden(tls_smtp_server, caplog):
    caplog.set_level(logging.DEBUG)
    mailbox, port, client_context = tls_smtp_server
    wrong = "wrong-" + SMTP_PASSWORD
    channel = EmailChannel("127.0.0.1", port, security="starttls", user=SMTP_USER, password=wrong,
                           sender="perf@example.com", recipients=["dev@example.com"], timeout=5,
                           ssl_context=client_context)
    with pytest.raises(DeliveryError) as raised:
        channel.deliver_alert(make_alert())
    assert raised.value.retryable is False and "535" in str(raised.value)
    assert mailbox.envelopes == []
    assert_secret_hidden(wrong, raised.value, channel, caplog)


def test_email_untrusted_certificate_is_refused(tls_smtp_server):
    _, port, _ = tls_smtp_server
    channel = EmailChannel("127.0.0.1", port, security="starttls", sender="perf@example.com",
                           recipients=["dev@example.com"], timeout=5)
    with pytest.raises(DeliveryError) as raised:
        channel.deliver_alert(make_alert())
    assert raised.value.retryable is False and "certificate" in str(raised.value)


@pytest.mark.parametrize("reply, retryable", [("451 4.3.0 try again later", True),
                                              ("550 5.1.1 no such user", False)])
def test_email_refused_recipients(smtp_server, reply, retryable):
    mailbox, port = smtp_server
    mailbox.refuse = reply
    channel = EmailChannel("127.0.0.1", port, sender="perf@example.com", recipients=["gone@example.com"])
    with pytest.raises(DeliveryError) as raised:
        channel.deliver_alert(make_alert())
    assert raised.value.retryable is retryable and "gone@example.com" in str(raised.value)


def test_email_unreachable_server_is_retryable():
    channel = EmailChannel("127.0.0.1", free_port(), sender="perf@example.com", recipients=["dev@example.com"],
                           timeout=2)
    with pytest.raises(DeliveryError) as raised:
        channel.deliver_alert(make_alert())
    assert raised.value.retryable is True


def test_email_settings_are_checked():
    with pytest.raises(ValueError, match="security"):
        EmailChannel("127.0.0.1", 25, security="tls", sender="a@b.c", recipients=["d@e.f"])
    with pytest.raises(ValueError, match="unencrypted"):
        EmailChannel("127.0.0.1", 25, user="u", password=SMTP_PASSWORD, sender="a@b.c", recipients=["d@e.f"])
    channel = EmailChannel("127.0.0.1", 465, security="ssl", user="u", password=SMTP_PASSWORD,
                           sender="a@b.c", recipients=["d@e.f"])
    assert SMTP_PASSWORD not in repr(channel) and channel.name == "email"

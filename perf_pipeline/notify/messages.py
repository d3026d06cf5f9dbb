"""Render an alert (a row of the alert outbox) or a failed run as plain text, Slack Block Kit
and email.

All three formats are built from the same list of facts, so a piece of evidence added once
shows in every channel. User data (test names, causes, errors) is escaped for the format it
lands in — Slack mrkdwn and HTML both give `<`, `>` and `&` a meaning — and clipped to
Slack's limits, because Slack rejects a whole message with one oversized block.
"""

from __future__ import annotations

import html
import math
import re
from datetime import datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

MAX_LISTED_TESTS = 10
SLACK_HEADER_LIMIT = 150
SLACK_SECTION_LIMIT = 3000
SLACK_FIELD_LIMIT = 2000
SLACK_FIELDS_PER_SECTION = 10
SLACK_BLOCK_LIMIT = 50
SUBJECT_LIMIT = 200
ERROR_TEXT_LIMIT = 20_000  # a failed run's error can be a whole traceback; mail stays readable

# ------------------------------------------------------------------ reading the row


def _present(value) -> bool:
    """False for None, NaN/NaT and blank strings: outbox rows read through pandas carry
    missing values as NaN or NaT rather than None."""
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    if isinstance(value, str):
        return bool(value.strip())
    try:
        return not bool(value != value)  # NaT and other "not equal to itself" missing values
    except (TypeError, ValueError):
        return True


def _text(value, missing: str = "unknown") -> str:
    return str(value) if _present(value) else missing


def _tests(alert: dict) -> list[str]:
    """The alert's tests as a list: DuckDB list columns come back from pandas as arrays, whose
    truth value is an error, so `alert.get("tests") or []` is not safe."""
    tests = alert.get("tests")
    if tests is None or isinstance(tests, float):
        return []
    return [str(test) for test in tests]


def _number(value: float) -> str:
    return f"{float(value):.4g}"


def _quantity(value: float, unit) -> str:
    return f"{_number(value)} {unit}" if _present(unit) else _number(value)


def _percent(value: float) -> str:
    """"+35%" or "+3.5%": whole percents above 10, one decimal below, for a subject line."""
    value = float(value)
    text = f"{value:+.0f}" if abs(value) >= 10 else f"{value:+.1f}"
    return text + "%"


def _p_value(value: float) -> str:
    return f"{float(value):.2g}"


def _short_sha(commit) -> str:
    return str(commit)[:10] if _present(commit) else "unknown"


def _timestamp(value) -> str:
    if not _present(value):
        return "unknown"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="minutes")
    return str(value)


def _where(alert: dict) -> str:
    """The test(s) and node a regression was seen on, in a few words."""
    tests = _tests(alert)
    node = alert.get("node_id")
    if tests:
        place = tests[0] if len(tests) == 1 else f"{tests[0]} and {len(tests) - 1} more tests"
        return f"{place} on node {node}" if _present(node) else place
    return f"node {node}" if _present(node) else "the whole fleet"


def _subject_target(alert: dict) -> str:
    tests = _tests(alert)
    if tests:
        return tests[0] if len(tests) == 1 else f"{tests[0]} (+{len(tests) - 1} tests)"
    node = alert.get("node_id")
    return f"node {node}" if _present(node) else "the whole fleet"


def _change(alert: dict) -> str:
    direction = str(alert.get("direction", "")).replace("_", " ")
    change = (f"{_quantity(alert['before'], alert.get('unit'))} → "
              f"{_quantity(alert['after'], alert.get('unit'))}")
    return f"{change} ({direction})" if direction else change


def _alert_facts(alert: dict) -> list[tuple[str, str]]:
    """The evidence every format shows, as (label, plain text) pairs."""
    return [
        ("Metric", _text(alert.get("metric_name"))),
        ("Where", _where(alert)),
        ("Before → after", _change(alert)),
        ("Change", f"{float(alert['magnitude_percent']):+.1f}%"),
        ("p-value", _p_value(alert["p_value"])),
        ("Severity", _text(alert.get("severity"))),
        ("Attribution", _text(alert.get("attribution")).replace("_", " ")),
        ("First bad run", _text(alert.get("first_test_run_id"))),
        ("First commit", _short_sha(alert.get("first_commit"))),
        ("Started", _timestamp(alert.get("started_at"))),
        ("Status", _text(alert.get("status"))),
        ("Alert", _text(alert.get("alert_id"))),
    ] + ([("Delivery", f"possibly a repeat: sending this alert at "
                       f"{_timestamp(alert['interrupted_at'])} was interrupted")]
         if _present(alert.get("interrupted_at")) else [])


def _cause(alert: dict) -> tuple[str | None, str | None]:
    cause, evidence = alert.get("suspected_cause"), alert.get("cause_evidence")
    return (str(cause) if _present(cause) else None, str(evidence) if _present(evidence) else None)


def _link(value) -> str | None:
    return str(value) if _present(value) else None


def _one_line(text: str, limit: int) -> str:
    """Headers and subjects are one line: a newline in user data must not start a new header."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


def alert_subject(alert: dict) -> str:
    """"[perf regression] <metric> +35% on <test or node>"."""
    return _one_line(f"[perf regression] {_text(alert.get('metric_name'))} "
                     f"{_percent(alert['magnitude_percent'])} on {_subject_target(alert)}",
                     SUBJECT_LIMIT)


def run_failure_subject(failure: dict) -> str:
    return _one_line(f"[perf pipeline] run failed: {_text(failure.get('job_name'))} "
                     f"({_text(failure.get('run_id'))[:8]})", SUBJECT_LIMIT)


def _run_facts(failure: dict) -> list[tuple[str, str]]:
    return [("Job", _text(failure.get("job_name"))), ("Run", _text(failure.get("run_id")))]


def _error(failure: dict) -> str:
    error = _text(failure.get("error"), "no error message")
    return error if len(error) <= ERROR_TEXT_LIMIT else error[:ERROR_TEXT_LIMIT] + "\n… (truncated)"


# ------------------------------------------------------------------ plain text


def alert_text(alert: dict) -> str:
    """Subject line, then the evidence, one fact a line: for logs, and the email's text part."""
    lines = [alert_subject(alert), ""]
    if _present(alert.get("title")):
        lines.append(str(alert["title"]))
    lines += [f"{label}: {value}" for label, value in _alert_facts(alert)]
    tests = _tests(alert)
    if len(tests) > 1:
        lines += ["", f"Tests ({len(tests)}):"] + [f"  - {test}" for test in tests]
    cause, evidence = _cause(alert)
    lines += ["", f"Suspected cause: {cause or 'unknown'}"]
    if evidence:
        lines.append(f"Evidence: {evidence}")
    link = _link(alert.get("asset_url"))
    if link:
        lines += ["", f"Details: {link}"]
    return "\n".join(lines) + "\n"


def run_failure_text(failure: dict) -> str:
    lines = [run_failure_subject(failure), ""]
    lines += [f"{label}: {value}" for label, value in _run_facts(failure)]
    lines += ["", "Error:", _error(failure)]
    link = _link(failure.get("run_url"))
    if link:
        lines += ["", f"Run: {link}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ Slack Block Kit


def slack_escape(text: str) -> str:
    """Slack's three control characters in mrkdwn; nothing else is to be escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _clip_escaped(text: str, limit: int) -> str:
    """Escape, then fit within `limit` without cutting an `&amp;` in half."""
    escaped = slack_escape(text)
    if len(escaped) <= limit:
        return escaped
    keep = limit - 1
    while len(slack_escape(text[:keep])) > limit - 1:
        keep -= len(slack_escape(text[:keep])) - (limit - 1)
    return slack_escape(text[:keep]) + "…"


def _slack_code(text: str) -> str:
    """Inline code, so that `_` and `*` in test names do not turn into italics or bold."""
    return "`" + text.replace("`", "'") + "`"


def _slack_link(url: str, label: str) -> str:
    # `|` and `>` would end the link early; they are legal in URLs only percent-encoded anyway
    safe_url = url.replace("|", "%7C").replace(">", "%3E").replace("<", "%3C").replace("&", "&amp;")
    return f"<{safe_url}|{slack_escape(label)}>"


def _header(text: str) -> dict:
    # plain_text is shown as is: no escaping, only the length limit
    return {"type": "header",
            "text": {"type": "plain_text", "text": _one_line(text, SLACK_HEADER_LIMIT), "emoji": True}}


def _section(mrkdwn: str) -> dict:
    return {"type": "section", "text": {"type": "mrkdwn", "text": _clip(mrkdwn, SLACK_SECTION_LIMIT)}}


def _field_sections(facts: list[tuple[str, str]]) -> list[dict]:
    fields = [{"type": "mrkdwn", "text": f"*{slack_escape(label)}*\n"
                                          f"{_clip_escaped(value, SLACK_FIELD_LIMIT - len(label) - 3)}"}
              for label, value in facts]
    return [{"type": "section", "fields": fields[start:start + SLACK_FIELDS_PER_SECTION]}
            for start in range(0, len(fields), SLACK_FIELDS_PER_SECTION)]


def _tests_section(tests: list[str]) -> dict:
    shown = [f"• {_slack_code(_clip_escaped(test, 250))}" for test in tests[:MAX_LISTED_TESTS]]
    if len(tests) > MAX_LISTED_TESTS:
        shown.append(f"and {len(tests) - MAX_LISTED_TESTS} more")
    return _section(f"*Tests ({len(tests)})*\n" + "\n".join(shown))


def _context(parts: list[str]) -> dict:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": _clip(part, SLACK_FIELD_LIMIT)}
                                            for part in parts[:10]]}


def _payload(fallback: str, blocks: list[dict]) -> dict:
    return {"text": _clip_escaped(fallback, SLACK_SECTION_LIMIT), "blocks": blocks[:SLACK_BLOCK_LIMIT]}


def slack_payload(alert: dict) -> dict:
    """A Block Kit message: header, the change in one line, the facts as fields, the tests,
    the suspected cause, and a link to the asset. `text` is the fallback notifications show."""
    facts = _alert_facts(alert)
    metric = _text(alert.get("metric_name"))
    summary = (f"*{slack_escape(metric)}* {slack_escape(_change(alert))}, "
               f"*{float(alert['magnitude_percent']):+.1f}%* (p={_p_value(alert['p_value'])}) "
               f"on {slack_escape(_where(alert))}")
    blocks = [_header(_text(alert.get("title"), alert_subject(alert))), _section(summary)]
    blocks += _field_sections([fact for fact in facts if fact[0] not in ("Metric", "Where")])
    tests = _tests(alert)
    if len(tests) > 1:
        blocks.append(_tests_section(tests))
    cause, evidence = _cause(alert)
    cause_text = f"*Suspected cause:* {slack_escape(cause or 'unknown')}"
    if evidence:
        cause_text += f"\n*Evidence:* {slack_escape(evidence)}"
    blocks.append(_section(cause_text))
    context = [f"dedup key {slack_escape(_text(alert.get('dedup_key')))}"]
    link = _link(alert.get("asset_url"))
    if link:
        context.insert(0, _slack_link(link, "Open in Dagster"))
    blocks.append(_context(context))
    return _payload(alert_subject(alert), blocks)


def run_failure_slack_payload(failure: dict) -> dict:
    error = _error(failure).replace("```", "'''")
    blocks = [_header(f"Run failed: {_text(failure.get('job_name'))}"),
              *_field_sections(_run_facts(failure)),
              _section("*Error*\n```" + _clip_escaped(error, SLACK_SECTION_LIMIT - 20) + "```")]
    link = _link(failure.get("run_url"))
    if link:
        blocks.append(_context([_slack_link(link, "Open the run in Dagster")]))
    return _payload(run_failure_subject(failure), blocks)


# ------------------------------------------------------------------ email


def _html_facts(facts: list[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th align=\"left\">{html.escape(label)}</th><td>{html.escape(value)}</td></tr>"
                   for label, value in facts)
    return f"<table cellpadding=\"4\">{rows}</table>"


def _html_link(url: str, label: str) -> str:
    """A link only for http(s): a `javascript:` URL in a row must not become clickable."""
    if url.lower().startswith(("http://", "https://")):
        return f"<p><a href=\"{html.escape(url, quote=True)}\">{html.escape(label)}</a></p>"
    return f"<p>{html.escape(label)}: {html.escape(url)}</p>"


def _html_document(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"</head><body>{body}</body></html>")


def _message_id_domain(sender: str) -> str:
    """The sender address's domain ("Perf <perf@example.com>" → example.com)."""
    domain = re.sub(r"[^A-Za-z0-9.-]", "", sender.rpartition("@")[2])
    return domain or "perf-pipeline"


def _email(subject: str, text: str, html_body: str, *, sender: str, recipients: list[str]) -> EmailMessage:
    """multipart/alternative: mail clients show the HTML part, and fall back to the text."""
    if not recipients:
        raise ValueError("an email needs at least one recipient")
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Date"] = formatdate(localtime=True)
    # an explicit domain: make_msgid's default asks DNS for this host's name, which can hang
    message["Message-ID"] = make_msgid(domain=_message_id_domain(sender))
    message.set_content(text)
    message.add_alternative(_html_document(subject, html_body), subtype="html")
    return message


def email_message(alert: dict, *, sender: str, recipients: list[str]) -> EmailMessage:
    """The alert as an email; the alert and dedup ids travel as headers, for mail filters."""
    facts = _alert_facts(alert)
    parts = [f"<h2>{html.escape(_text(alert.get('title'), alert_subject(alert)))}</h2>", _html_facts(facts)]
    tests = _tests(alert)
    if len(tests) > 1:
        items = "".join(f"<li><code>{html.escape(test)}</code></li>" for test in tests)
        parts.append(f"<h3>Tests ({len(tests)})</h3><ul>{items}</ul>")
    cause, evidence = _cause(alert)
    parts.append(f"<p><b>Suspected cause:</b> {html.escape(cause or 'unknown')}</p>")
    if evidence:
        parts.append(f"<p><b>Evidence:</b> {html.escape(evidence)}</p>")
    link = _link(alert.get("asset_url"))
    if link:
        parts.append(_html_link(link, "Open in Dagster"))
    message = _email(alert_subject(alert), alert_text(alert), "".join(parts),
                     sender=sender, recipients=recipients)
    alert_id = _one_line(_text(alert.get("alert_id")), SUBJECT_LIMIT)
    message["X-Perf-Alert-Id"] = alert_id
    if re.fullmatch(r"[0-9a-f]{6,64}", alert_id):
        # One Message-ID per alert, so that a copy sent again after an interrupted delivery
        # is recognised as the same message by the mail systems that drop duplicates.
        message.replace_header("Message-ID", f"<perf-alert-{alert_id}@{_message_id_domain(sender)}>")
    message["X-Perf-Dedup-Key"] = _one_line(_text(alert.get("dedup_key")), SUBJECT_LIMIT)
    return message


def run_failure_email(failure: dict, *, sender: str, recipients: list[str]) -> EmailMessage:
    parts = [f"<h2>Run failed: {html.escape(_text(failure.get('job_name')))}</h2>",
             _html_facts(_run_facts(failure)), f"<pre>{html.escape(_error(failure))}</pre>"]
    link = _link(failure.get("run_url"))
    if link:
        parts.append(_html_link(link, "Open the run in Dagster"))
    return _email(run_failure_subject(failure), run_failure_text(failure), "".join(parts),
                  sender=sender, recipients=recipients)

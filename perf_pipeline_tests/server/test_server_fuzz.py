"""Fuzzing a real `perf-pipeline dashboard` (gateway, JSON API, settings, login) on 127.0.0.1:
random and malformed bodies for every format, mismatched Content-Types, hostile query
strings and headers, path-like values everywhere. Whatever arrives, the answer is one of the
documented statuses (never a 5xx, never a dropped connection); the gateway accounts for
every row it was sent; and the only files that appear under PERF_PIPELINE_HOME are the
`landing/<day>/gateway-<checksum>.jsonl` files the answers name (and perf_pipeline.yaml,
written by an accepted settings change): no name is taken from the request.

One server serves the whole module; its rate limits are off here (test_rate_limits.py
tests them), so that every request reaches the routes."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from perf_pipeline.config import paths_from_env
from perf_pipeline.server.gateway import CONTENT_TYPES, DEFAULT_FIELDS
from perf_pipeline.storage.warehouse import FILTER_COLUMNS, open_warehouse
from perf_pipeline_tests.conftest import live_server
from perf_pipeline_tests.server.live import request

TOKEN = "fuzz-api-token-0123456789abcdef"
ADMIN = "fuzz-admin-token-fedcba9876543210"
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LANDED_NAME = re.compile(r"^landing/\d{4}-\d{2}-\d{2}/gateway-[0-9a-f]{16}\.jsonl$")
# Statuses the server documents; 404/405 are Starlette's for an unknown route or method.
GATEWAY_STATUSES = {200, 400, 401, 413, 415, 422}
READ_STATUSES = {200, 400, 401}

NASTY = st.sampled_from([
    "' OR 1=1 --", "'; DROP TABLE raw_metrics; --", "\" OR \"\"=\"", "%00", "\x00", "a\x00b",
    "../../etc/passwd", "..\\..\\windows\\win.ini", "/etc/passwd", "node/../../x", "....//x",
    "%2e%2e%2f%2e%2e%2fx", "CON", "nul.jsonl", "x" * 5000, "\u202egnp.exe", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✓",
    "", " ", "\ufeff", "\r\n", "${jndi:ldap://127.0.0.1/x}", "<script>alert(1)</script>",
    "{{7*7}}", "*", "tests/*", "NaN", "-1", "1e999", "0", "99999999999999999999"])
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
METRICS = st.sampled_from(["test_execution_time", "cpu_usage", "memory_usage", "test_pass_rate",
                           "no_such_metric", ""])


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# Relative to the moment the example runs: mostly recent (accepted), some out of range.
TIMESTAMP = st.one_of(
    st.integers(-3 * 24 * 60, 30).map(lambda minutes: _iso(datetime.now(timezone.utc)
                                                           + timedelta(minutes=minutes))),
    st.sampled_from(["1970-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z",
                     "2100-01-01T00:00:00Z", "2026-02-30T00:00:00Z", "not a time", "", "-1",
                     "1e308", "1793534400"]),
    NASTY)
NUMBER = st.one_of(st.floats(), st.floats(-1e6, 1e6, allow_nan=False),
                   st.integers(-(10**30), 10**30), st.sampled_from([-1.5, 0, 1e308, -1e308]))
VALUE = st.one_of(st.none(), st.booleans(), NUMBER, TEXT, NASTY,
                  st.lists(st.integers(), max_size=2), st.dictionaries(TEXT, TEXT, max_size=2))
ROW = st.fixed_dictionaries(
    {"timestamp": TIMESTAMP, "metric_name": st.one_of(METRICS, NASTY),
     "metric_value": st.one_of(NUMBER, VALUE),
     "node_id": st.one_of(st.just("node-01"), NASTY, TEXT)},
    optional={"test_name": st.one_of(st.just("tests/test_a.py::test_one"), NASTY, VALUE),
              "test_type": st.one_of(st.just("unit"), NASTY), "node_type": NASTY,
              "test_run_id": st.one_of(NASTY, TEXT), "ci_job_id": NASTY, "unit": NASTY,
              "context_data": VALUE, "huge": st.just("h" * 200_000)})
# A row the gateway accepts, hostile only where any text is allowed (names, ids, context).
GOOD_ROW = st.fixed_dictionaries(
    {"timestamp": st.integers(-2 * 24 * 60, 0).map(
        lambda minutes: _iso(datetime.now(timezone.utc) + timedelta(minutes=minutes))),
     "metric_name": st.sampled_from(["test_execution_time", "cpu_usage", "memory_usage"]),
     "metric_value": st.floats(0, 1e6, allow_nan=False),
     "node_id": st.one_of(st.just("node-01"), NASTY.filter(lambda t: t.strip() and len(t) < 1000))},
    optional={"test_name": NASTY.filter(lambda t: t.strip() and len(t) < 1000), "test_run_id": NASTY,
              "context_data": st.dictionaries(TEXT, st.one_of(TEXT, NASTY), max_size=2)})
ROW = st.one_of(GOOD_ROW, GOOD_ROW, ROW)
LINE = st.one_of(ROW.map(json.dumps), ROW.map(lambda row: json.dumps(row, ensure_ascii=False)),
                 ROW.map(lambda row: json.dumps(row)[: len(json.dumps(row)) // 2]),  # truncated
                 TEXT, st.sampled_from(["", " ", "{", "[1, 2]", "null", "42", "{}", "\x00"]))


@st.composite
def jsonl_body(draw) -> bytes:
    lines = draw(st.lists(LINE, min_size=1, max_size=12))
    if draw(st.booleans()):
        lines += lines[: draw(st.integers(1, 3))]  # duplicates
    ending = draw(st.sampled_from(["\n", "\r\n"]))
    data = ("\ufeff" * draw(st.booleans()) + ending.join(lines) + ending).encode("utf-8")
    if draw(st.integers(0, 9)) == 0:
        data += b'{"node_id": "\xff\xfe"}\n'
    return data


@st.composite
def json_body(draw) -> bytes:
    kind = draw(st.sampled_from(["array", "row", "metrics", "benchmark", "broken", "scalar", "deep"]))
    rows = draw(st.lists(ROW, max_size=8))
    if kind == "array":
        return json.dumps(rows).encode()
    if kind == "row":
        return json.dumps(rows[0] if rows else {}).encode()
    if kind == "metrics":
        return json.dumps({"metrics": draw(st.one_of(st.just(rows), VALUE))}).encode()
    if kind == "benchmark":
        return json.dumps({
            "machine_info": {"node": draw(st.one_of(NASTY, TEXT))},
            "commit_info": {"id": draw(NASTY), "branch": draw(NASTY)},
            "datetime": draw(TIMESTAMP),
            "benchmarks": draw(st.one_of(VALUE, st.lists(st.fixed_dictionaries(
                {"name": st.one_of(NASTY, TEXT), "fullname": st.one_of(NASTY, TEXT),
                 "stats": st.one_of(VALUE, st.dictionaries(
                     st.sampled_from(["mean", "stddev", "min", "max", "rounds"]), NUMBER))}),
                max_size=3)))}).encode()
    if kind == "broken":
        text = json.dumps(rows)
        return text[: draw(st.integers(0, len(text)))].encode()
    if kind == "deep":
        depth = draw(st.integers(500, 50_000))
        return b"[" * depth + b"]" * draw(st.integers(0, depth))
    return json.dumps(draw(VALUE)).encode()


@st.composite
def csv_body(draw) -> bytes:
    rows = draw(st.lists(ROW, min_size=1, max_size=8))
    header = sorted({key for row in rows for key in row})
    if draw(st.booleans()):
        header.append(draw(NASTY))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for row in rows:
        writer.writerow([json.dumps(row[key]) if isinstance(row.get(key), (dict, list))
                         else row.get(key, "") for key in header])
    text = out.getvalue()
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(['"', ",,,,\n", "\x00", "\n\n"]))
    return text.encode("utf-8")


@st.composite
def xml_body(draw) -> bytes:
    def attribute(value) -> str:
        return (str(value).replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
                .replace("\x00", ""))

    cases = "".join(
        f'<testcase classname="{attribute(draw(st.one_of(NASTY, TEXT)))}" '
        f'name="{attribute(draw(st.one_of(NASTY, TEXT)))}" '
        f'time="{attribute(draw(st.one_of(NUMBER, NASTY)))}"/>'
        for _ in range(draw(st.integers(0, 5))))
    suite = (f'<testsuite name="s" hostname="{attribute(draw(NASTY))}" '
             f'timestamp="{attribute(draw(TIMESTAMP))}">{cases}</testsuite>')
    hostile = [
        '<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">'
        '<!ENTITY c "&b;&b;&b;&b;&b;&b;">]><testsuite name="&c;"/>',
        '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
        '<testsuite name="&e;"><testcase name="t" time="1"/></testsuite>',
        "<testsuites>" + "<testsuite>" * 300]
    choice = draw(st.sampled_from(["suite", "suites", "truncated", "hostile"]))
    if choice == "suites":
        return f"<testsuites>{suite}{suite}</testsuites>".encode("utf-8", errors="replace")
    if choice == "truncated":
        return suite[: draw(st.integers(0, len(suite)))].encode("utf-8", errors="replace")
    if choice == "hostile":
        return draw(st.sampled_from(hostile)).encode()
    return suite.encode("utf-8", errors="replace")


OWN_TYPES = {".jsonl": "application/x-ndjson", ".json": "application/json", ".csv": "text/csv",
             ".xml": "application/xml", "garbage": "application/x-ndjson"}
BODIES = {".jsonl": jsonl_body(), ".json": json_body(), ".csv": csv_body(), ".xml": xml_body(),
          "garbage": st.binary(max_size=2000)}
JUNK_TYPES = st.sampled_from(["image/png", "", "application/json; charset=latin-1",
                              "text/csv;;;", "application/x-www-form-urlencoded",
                              "multipart/form-data; boundary=x", "*/*", "APPLICATION/JSON",
                              "text/csv; charset=\xe9", "application/x-ndjson\x7f"])
GATEWAY_NAMES = st.sampled_from([*DEFAULT_FIELDS, "commit", "branch", "format", "drop_table",
                                 "node_id[]", "", "../x", "%00"])


def _query(pairs: list[tuple[str, str]], raw_suffix: str = "") -> str:
    encoded = urlencode(pairs, quote_via=quote, safe="")
    query = "&".join(part for part in (encoded, raw_suffix.lstrip("&")) if part)
    return f"?{query}" if query else ""


RAW_SUFFIXES = st.sampled_from(["", "&%00", "&a=%ZZ", "&=", "&&", "&%", "&node_id",
                                "&limit=1&limit=2", "&metric_name=cpu_usage%00", "&;",
                                "&test_name=..%2F..%2Fetc%2Fpasswd", "&node_id=%ff%fe",
                                "&%ff=1", "&metric_name=%C0%AE%C0%AE%2F"])


# ------------------------------------------------------------------ the server and its home

class Ledger:
    """What the module's requests may leave under PERF_PIPELINE_HOME."""

    def __init__(self, home: Path):
        self.home = home
        self.baseline = self.files()
        self.landed: set[str] = set()
        self.settings_written = False

    def files(self) -> dict[str, tuple[int, int]]:
        return {p.relative_to(self.home).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in self.home.rglob("*") if p.is_file()}

    def check(self) -> None:
        """Exactly the baseline files (untouched), the landing files answers named, and the
        settings file once a settings change was accepted; nothing beside the home."""
        now = self.files()
        for name, stamp in self.baseline.items():
            assert now.pop(name, None) == stamp, f"{name} changed"
        expected = set(self.landed) | ({"perf_pipeline.yaml"} if self.settings_written else set())
        assert set(now) == expected, set(now) ^ expected
        assert sorted(p.name for p in self.home.parent.iterdir()) == [self.home.name]

    def __repr__(self) -> str:  # hypothesis prints the fixtures of a failing example
        return f"Ledger({len(self.landed)} landed files)"

    def landing_files(self) -> set[str]:
        return {name for name in self.files() if name.startswith("landing/")}


@pytest.fixture(scope="module")
def ledger(tmp_path_factory) -> Ledger:
    root = tmp_path_factory.mktemp("fuzz") / "root"
    paths = paths_from_env({"PERF_PIPELINE_HOME": str(root / "home")}).ensure()
    with open_warehouse(paths.database):
        pass  # the schema, no rows: every read route answers 200 from an empty fleet
    return Ledger(paths.home)


@pytest.fixture(scope="module")
def server(ledger):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PERF_PIPELINE_DATABASE", "DAGSTER_HOME") and not k.startswith("PERF_")}
    env.update(PERF_PIPELINE_HOME=str(ledger.home), PERF_API_TOKEN=TOKEN, PERF_ADMIN_TOKEN=ADMIN,
               PERF_RATE_LIMIT_PER_SECOND="0", PERF_AUTH_FAILURES_PER_MINUTE="0")
    with live_server(env, secrets=(TOKEN, ADMIN), arguments=("--max-body-mb", "1"),
                     command="dashboard") as live:
        yield live
    ledger.check()


# One request in ten with no or a wrong Authorization header.
AUTH = st.integers(0, 9).flatmap(lambda i: st.sampled_from(
    [None, "Bearer wrong-token-0123456789", "Basic x", f"bearer {TOKEN}", f"Bearer {TOKEN} ",
     "Bearer \xff\xfe", f"Bearer {TOKEN}\xa0"])
    if i == 7 else st.just(f"Bearer {TOKEN}"))
PAIRS = st.one_of(st.just([]), st.lists(st.tuples(st.sampled_from([*DEFAULT_FIELDS, "commit", "branch"]),
                                                  st.one_of(NASTY, TEXT)), max_size=3),
                  st.lists(st.tuples(GATEWAY_NAMES, st.one_of(NASTY, TEXT)), max_size=4))
RAW_SUFFIX = st.one_of(st.just(""), st.just(""), RAW_SUFFIXES)


def _error_of(answer) -> str:
    """A refusal's message: the server's JSON error, or the plain 400 uvicorn itself sends
    for a request HTTP does not allow (a control character in a header), before any route."""
    if answer.headers.get("Content-Type") != "application/json":
        assert answer.status == 400 and answer.body == b"Invalid HTTP request received.", answer.body[:300]
        return answer.body.decode()
    reply = answer.json()
    assert set(reply) == {"error"} and reply["error"]
    return reply["error"]


def _sent_lines(body: bytes) -> dict[int, str]:
    """JSON Lines as the gateway must count them: each non-blank line, by its number."""
    lines = {}
    for number, raw in enumerate(body.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if raw.strip():
            text = raw.decode("utf-8", errors="replace")
            lines[number] = text.lstrip("\ufeff") if number == 1 else text
    return lines


def _landed_lines(ledger: Ledger, files: list[str]) -> list[str]:
    return [line for name in files
            for line in (ledger.home / "landing" / name).read_text("utf-8").split("\n")[:-1]]


# ------------------------------------------------------------------ the gateway

@FUZZ
@given(data=st.data(), fmt=st.sampled_from(sorted(BODIES)), pairs=PAIRS, raw_suffix=RAW_SUFFIX,
       authorization=AUTH)
def test_the_gateway_answers_any_request_and_accounts_for_every_row(
        server, ledger, fault_tally, data, fmt, pairs, raw_suffix, authorization):
    body = data.draw(BODIES[fmt], label="body")
    content_type = data.draw(st.one_of(st.just(OWN_TYPES[fmt]), st.just(OWN_TYPES[fmt]),
                                       st.sampled_from(sorted(CONTENT_TYPES)), JUNK_TYPES, st.none()),
                             label="content_type")
    headers = {"Content-Type": content_type} if content_type is not None else {}
    if authorization is not None:
        headers["Authorization"] = authorization
    before = ledger.landing_files()
    answer = request(server.port, "POST", "/api/v1/metrics" + _query(pairs, raw_suffix), body,
                     headers)
    fault_tally.add("requests fuzzed")
    event(f"{fmt} answered {answer.status}")  # --hypothesis-show-statistics shows the mix

    assert answer.status in GATEWAY_STATUSES, (answer.status, answer.body[:300])
    if answer.status not in (200, 422):
        _error_of(answer)
        assert ledger.landing_files() == before
        ledger.check()
        return
    reply = answer.json()
    assert reply["received"] == reply["accepted"] + reply["rejected_count"]
    assert len(reply["rejected"]) == reply["rejected_count"]  # at most 1,000 listed; fewer sent
    assert all(item["reason"] for item in reply["rejected"])
    assert len({item["line"] for item in reply["rejected"]}) == reply["rejected_count"] or fmt != ".jsonl"
    assert (answer.status == 422) == (reply["received"] > 0 and reply["accepted"] == 0)
    assert all(LANDED_NAME.match(f"landing/{name}") for name in reply["files"])
    assert [name.split("/")[0] for name in reply["files"]] == reply["days"]
    landed = _landed_lines(ledger, reply["files"])
    assert len(landed) == reply["accepted"]
    ledger.landed.update(f"landing/{name}" for name in reply["files"])
    is_jsonl = (content_type is not None and CONTENT_TYPES.get(content_type) == ".jsonl"
                or content_type is None)
    if is_jsonl and not pairs and not raw_suffix:
        # countable: every non-blank line is received; the accepted ones land as sent
        sent = _sent_lines(body)
        assert reply["received"] == len(sent)
        rejected = {item["line"] for item in reply["rejected"]}
        assert Counter(landed) == Counter(text for number, text in sent.items()
                                          if number not in rejected)
    ledger.check()


# ------------------------------------------------------------------ the read API

READ_ROUTES = {
    "trends": {"metric_name", "time_window_days", *FILTER_COLUMNS},
    "nodes/comparison": {"metric_name", "window_days", *FILTER_COLUMNS},
    "alerts": {"status", "limit"},
    "recommendations": {"limit"},
    "change_points": {"metric_name", "test_name", "node_id", "kind", "limit"},
}
GOOD_VALUES = st.sampled_from(["cpu_usage", "test_execution_time", "overall", "stability", "30",
                               "1", "3650", "new", "regression", "unit", "node-01", "tests/*"])


@FUZZ
@given(data=st.data(), route=st.sampled_from(sorted(READ_ROUTES)), raw_suffix=RAW_SUFFIX,
       authorization=AUTH)
def test_every_read_route_answers_any_query_with_a_documented_status(
        server, ledger, fault_tally, data, route, raw_suffix, authorization):
    known = st.sampled_from(sorted(READ_ROUTES[route]))
    pairs = data.draw(st.one_of(
        st.lists(st.tuples(known, st.one_of(GOOD_VALUES, NASTY)), max_size=3),
        st.lists(st.tuples(st.one_of(known, NASTY, TEXT), st.one_of(GOOD_VALUES, NASTY, TEXT)),
                 max_size=5)))
    if route in ("trends", "nodes/comparison") and data.draw(st.booleans()):
        pairs.insert(0, ("metric_name", data.draw(st.sampled_from(["cpu_usage", "overall"]))))
    headers = {"Authorization": authorization} if authorization else {}
    answer = request(server.port, "GET", f"/api/v1/{route}" + _query(pairs, raw_suffix),
                     headers=headers)
    fault_tally.add("requests fuzzed")
    event(f"{route} answered {answer.status}")
    assert answer.status in READ_STATUSES, (answer.status, answer.body[:300])
    assert answer.headers["Content-Type"] == "application/json"
    reply = answer.json()
    if answer.status != 200:
        assert set(reply) == {"error"}
    ledger.check()


SETTING_NAMES = st.sampled_from(["metrics_to_track", "collection_interval_seconds",
                                 "retention_period_days", "rollup_retention_days",
                                 "enable_trend_analysis", "notification_channels",
                                 "regression_threshold_percent", "metric_thresholds", "mutes",
                                 "path", "__class__", "../../x"])


@settings(FUZZ, max_examples=100)
@given(settings_body=st.one_of(
           st.dictionaries(st.one_of(SETTING_NAMES, NASTY), st.one_of(VALUE, st.lists(NASTY, max_size=2)),
                           max_size=3).map(lambda d: json.dumps(d).encode()),
           st.binary(max_size=300), st.sampled_from([b"", b"[]", b"{}", b"null", b"{" * 5000])),
       authorization=st.sampled_from([f"Bearer {ADMIN}"] * 4 + [f"Bearer {TOKEN}", None]),
       query=st.sampled_from(["", "?path=../../x", "?retention_period_days=1"]))
def test_settings_changes_answer_any_body_with_a_documented_status(
        server, ledger, fault_tally, settings_body, authorization, query):
    headers = {"Content-Type": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    answer = request(server.port, "PUT", f"/api/v1/monitoring{query}", settings_body, headers)
    fault_tally.add("requests fuzzed")
    assert answer.status in (200, 400, 401, 403, 413), (answer.status, answer.body[:300])
    if answer.status == 200:
        assert authorization == f"Bearer {ADMIN}" and not query
        ledger.settings_written = True
    ledger.check()


@settings(FUZZ, max_examples=100)
@given(form=st.one_of(st.binary(max_size=600),
                      st.one_of(NASTY, TEXT).map(lambda t: urlencode({"token": t}).encode()),
                      st.sampled_from([b"token=", b"token", b"=&=&", b"token=%ff%fe",
                                       b"token=a&token=b", b"token=" + b"A" * 4000])),
       content_type=st.one_of(st.just("application/x-www-form-urlencoded"), JUNK_TYPES),
       cookie=st.one_of(st.none(), NASTY.map(lambda v: f"perf_pipeline_session={quote(v)}")))
def test_the_login_and_the_page_answer_any_form_or_cookie(server, ledger, fault_tally, form,
                                                          content_type, cookie):
    answer = request(server.port, "POST", "/login", form, {"Content-Type": content_type})
    assert answer.status in (400, 401, 413), (answer.status, answer.body[:300])
    if answer.status == 400:
        assert answer.body == b"Invalid HTTP request received."  # uvicorn's, before any route
    assert "Set-Cookie" not in answer.headers
    page = request(server.port, "GET", "/", headers={"Cookie": cookie} if cookie else {})
    assert page.status == 401 and "Set-Cookie" not in page.headers
    out = request(server.port, "POST", "/logout", b"", {"Cookie": cookie} if cookie else {})
    assert out.status == 303
    fault_tally.add("requests fuzzed", 3)
    ledger.check()


# ------------------------------------------------------------------ path traversal

TRAVERSALS = ["../../x", "../../../../../../tmp/escaped", "..\\..\\x", "/etc/passwd", "....//x",
              "%2e%2e%2fx", "..%2f..%2fx", "x/../../y", "\x00../x", "~/x", "landing/../../x",
              "C:\\x", "//127.0.0.1/share/x", "file:///tmp/escaped"]


def test_no_part_of_a_request_reaches_a_file_name(server, ledger, fault_tally):
    recent = _iso(datetime.now(timezone.utc) - timedelta(minutes=10))
    attempts = 0
    for value in TRAVERSALS:
        row = {"timestamp": recent, "metric_name": "cpu_usage", "metric_value": 12.0,
               "node_id": value, "node_type": value, "test_run_id": value, "ci_job_id": value,
               "test_name": value, "test_type": value, "context_data": {"file": value}}
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson",
                   "Content-Disposition": f'attachment; filename="{quote(value)}"',
                   "X-Filename": quote(value), "X-Forwarded-For": quote(value),
                   "X-Original-URL": quote(value)}
        query = _query([(name, value) for name in DEFAULT_FIELDS if name != "timestamp"]
                       + [("commit", value), ("branch", value)])
        for target in ("/api/v1/metrics", f"/api/v1/metrics{query}"):
            answer = request(server.port, "POST", target, json.dumps(row).encode() + b"\n", headers)
            assert answer.status == 200 and answer.json()["accepted"] == 1, answer.body[:300]
            ledger.landed.update(f"landing/{name}" for name in answer.json()["files"])
            attempts += 1
        answer = request(server.port, "POST", f"/api/v1/metrics?format={quote(value, safe='')}",
                         json.dumps(row).encode(), headers)
        assert answer.status == 400
        attempts += 1
        ledger.check()
    for target in ("/api/v1/../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
                   "/api/v1/metrics/../../../x", "/..%2f..%2fetc%2fpasswd", "/static/../../x",
                   "//etc/passwd", "/api/v1/trends/..%2f..%2f"):
        for method in ("GET", "POST", "PUT"):
            answer = request(server.port, method, target, b"{}",
                             {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
            assert answer.status in (400, 401, 404, 405), (target, method, answer.status)
            attempts += 1
    fault_tally.add("traversal attempts", attempts)
    fault_tally.add("requests fuzzed", attempts)
    ledger.check()
    assert all(LANDED_NAME.match(name) for name in ledger.landing_files())
    escaped = ledger.home.parent.parent
    assert not any(p.name in ("x", "escaped", "passwd", "y") for p in escaped.rglob("*"))
    assert not Path("/tmp/escaped").exists()

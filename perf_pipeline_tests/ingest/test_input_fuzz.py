"""Property tests of every input format, end to end: an input file is ingested into a landing
archive (`ingest_files`) and its days loaded into a real DuckDB file (`load_landing_days`).

Whatever the file holds (metric rows good and bad, odd Unicode, huge fields, NaN and
infinities, timestamps from year 1 to 9999 and beyond, truncation, garbage bytes, bytes that
are not UTF-8, wrong nesting), nothing raises, and every record ingest reads is loaded or
quarantined with a non-empty reason: per day, the records ingest filed there are the rows that
day read, and rows read = rows loaded + rows quarantined. Where the file is left whole, exactly
its good rows load (duplicates included: a row sent twice loads twice).
"""

import csv
import io
import json
import math
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from xml.etree import ElementTree

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from perf_pipeline.ingest.landing import (
    FUTURE_TOLERANCE,
    IngestReport,
    ingest_files,
    landed_days,
    load_landing_days,
)
from perf_pipeline.storage.warehouse import Warehouse, connect
from perf_pipeline_tests.conftest import FaultTally

TODAY = date(2026, 11, 28)
EARLIEST = date(2024, 1, 1)
LATEST = TODAY + FUTURE_TOLERANCE
HUGE = 100_000  # characters in a huge field
# Each example ingests and loads real files (a tenth to a fifth of a second): 75 per test
# keep the module near a minute. No shrinking: it reruns a failing example hundreds of times
# and gave up after five minutes here; the examples are small enough to read as drawn.
FUZZ = settings(max_examples=75, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))

_TRIED: Counter = Counter()

# ------------------------------------------------------------------ what a row may hold

ODD = ["\u0301", "e\u0301", "\u202e", "\u200f", "\u05d0\u05d1", "\x00", "\U0001f600",
       "\U0001f469\u200d\U0001f469\u200d\U0001f467", "\ufeff", "\u2028", "\r", "\n", "\t", "\\",
       '"', "'", ",", ";", "<", "&", "]]>", "\x85", "\uffff"]
TEXT = st.lists(st.one_of(st.characters(codec="utf-8", exclude_categories=("Cs",)),
                          st.sampled_from(ODD)), max_size=12).map("".join)
# A name validation accepts: starts with a letter (so it is never blank), at most 1000 characters.
NAME = TEXT.map(lambda text: "n" + text)
XML_NAME = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Cn")),
                   max_size=12).map(lambda text: "n" + text)

FIRST = datetime.combine(EARLIEST, time(), timezone.utc)
LAST = datetime.combine(LATEST, time(23, 59, 59), timezone.utc)
INSTANT = st.datetimes(min_value=FIRST.replace(tzinfo=None), max_value=LAST.replace(tzinfo=None),
                       timezones=st.just(timezone.utc))
OFFSET = st.builds(lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-14 * 60, 14 * 60))


def _stamps(at: datetime, offset: timezone) -> st.SearchStrategy:
    """The ways a sender writes one instant: ISO 8601 (Z, an offset, none: UTC), epoch s, ms."""
    seconds = int(at.timestamp())
    return st.sampled_from([at.isoformat().replace("+00:00", "Z"), at.astimezone(offset).isoformat(),
                            at.replace(tzinfo=None).isoformat(), seconds, str(seconds),
                            seconds * 1000])


GOOD_STAMP = st.tuples(INSTANT, OFFSET).flatmap(lambda pair: _stamps(*pair))


@dataclass(frozen=True)
class Kind:
    metric: str
    unit: str | None
    value: st.SearchStrategy
    per_test: bool


KINDS = [
    Kind("test_execution_time", "s", st.floats(0, 1e6), True),
    Kind("test_duration_ms", None, st.integers(0, 10**9), True),
    Kind("cpu_usage", "%", st.floats(0, 100), False),
    Kind("memory_usage", "bytes", st.one_of(st.floats(0, 1e15), st.just(1e308)), False),
]


@st.composite
def good_rows(draw) -> dict:
    kind = draw(st.sampled_from(KINDS))
    row = {"timestamp": draw(GOOD_STAMP), "metric_name": kind.metric,
           "metric_value": draw(st.one_of(kind.value, st.just(-0.0))), "node_id": draw(NAME)}
    if kind.unit is not None and draw(st.booleans()):
        row["unit"] = kind.unit
    if kind.per_test or draw(st.booleans()):
        row["test_name"] = draw(NAME)
    for field in ("test_type", "node_type", "test_run_id", "ci_job_id"):
        if draw(st.booleans()):
            row[field] = draw(TEXT)
    if draw(st.booleans()):
        row["context_data"] = draw(st.dictionaries(TEXT, st.one_of(TEXT, st.integers(), st.none()),
                                                   max_size=3))
    return row


@dataclass(frozen=True)
class Fault:
    """A change that makes a good row bad; `as_text`: still bad where every value is text (CSV)."""
    name: str
    change: dict
    as_text: bool = True

    def __repr__(self) -> str:  # a failing example names the fault, not its 100 kB value
        return f"Fault({self.name!r})"


TIME_FAULTS = {
    "year 1": "0001-01-01T00:00:00Z", "1970": "1970-01-01T00:00:00Z", "epoch 0": 0,
    "epoch 12345": "12345", "year 9999": "9999-12-31T23:59:59Z", "year 200000": "200000-01-01T00:00:00Z",
    "before Christ": "-0044-03-15T12:00:00Z", "two days ahead": f"{TODAY + timedelta(days=2)}T00:00:00Z",
    "day before the first partition": f"{EARLIEST - timedelta(days=1)}T23:59:59Z",
    "month 13": "2026-13-45T99:00:00Z", "words": "yesterday", "empty": "", "NaN text": "NaN",
    "infinity": "infinity", "epoch 1e300": "1e300", "negative epoch": "-5", "a list": [2026, 11, 1],
    "an object": {"at": "2026-11-01"}, "true": True, "missing": None,
}
FAULTS = [
    *(Fault(f"timestamp {name}", {"timestamp": value}) for name, value in TIME_FAULTS.items()),
    Fault("NaN", {"metric_value": math.nan}), Fault("inf", {"metric_value": math.inf}),
    Fault("-inf", {"metric_value": -math.inf}), Fault("text value", {"metric_value": "fast"}),
    Fault("list value", {"metric_value": [1, 2]}), Fault("object value", {"metric_value": {"v": 1}}),
    Fault("bool value", {"metric_value": True}, as_text=False),
    Fault("no value", {"metric_value": None}),
    Fault("huge value", {"metric_value": "9" * HUGE}),
    Fault("negative duration", {"metric_name": "test_execution_time", "metric_value": -1.5,
                                "unit": "s", "test_name": "t"}),
    Fault("cpu 1e308", {"metric_name": "cpu_usage", "metric_value": 1e308, "unit": "%"}),
    Fault("unknown metric", {"metric_name": "flux_capacitance"}),
    Fault("no metric", {"metric_name": None}), Fault("blank metric", {"metric_name": " "}),
    Fault("numeric metric", {"metric_name": 5}),
    Fault("huge metric name", {"metric_name": "test_execution_time" + "x" * HUGE}),
    Fault("no node", {"node_id": None}), Fault("numeric node", {"node_id": 12}, as_text=False),
    Fault("huge node", {"node_id": "n" + "\u05d0" * HUGE}),
    Fault("huge test name", {"test_name": "t" + "\U0001f600" * HUGE}),
    Fault("no test name", {"metric_name": "test_execution_time", "unit": "s", "test_name": None}),
    Fault("text context", {"context_data": "commit=abc"}),
    Fault("list context", {"context_data": [1, 2]}),
    Fault("wrong unit", {"unit": "parsecs"}),
    Fault("sender's own _rejected", {"_rejected": "sent as rejected"}),
]


def _apply(row: dict, fault: Fault) -> dict:
    bad = {**row, **fault.change}
    return {key: value for key, value in bad.items() if value is not None}


def rows_of(*, as_text: bool) -> st.SearchStrategy:
    """(rows, whether each is good), some rows sent twice."""
    faults = [fault for fault in FAULTS if fault.as_text or not as_text]
    bad = st.tuples(good_rows(), st.sampled_from(faults)).map(lambda pair: _apply(*pair))
    labelled = st.lists(st.one_of(good_rows().map(lambda row: (row, True)),
                                  bad.map(lambda row: (row, False))), min_size=1, max_size=8)

    def with_duplicates(rows, picks):
        rows = rows + [rows[pick % len(rows)] for pick in picks]
        return [row for row, _ in rows], [good for _, good in rows]

    return st.builds(with_duplicates, labelled, st.lists(st.integers(0, 100), max_size=2))


# ------------------------------------------------------------------ damage to a whole file

@st.composite
def damaged(draw, data: bytes) -> tuple[bytes, bool]:
    """The file as written, or damaged: (bytes, whether it is still whole)."""
    damage = draw(st.sampled_from(["none", "none", "truncate", "garbage", "latin-1", "prefix"]))
    if damage == "none" or not data:
        return data, True
    cut = draw(st.integers(0, len(data)))
    if damage == "truncate":
        return data[:cut], False
    if damage == "garbage":
        return data[:cut] + draw(st.binary(min_size=1, max_size=16)) + data[cut:], False
    if damage == "latin-1":
        return data.decode("utf-8").encode("latin-1", errors="replace"), False
    return draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\x00", b"\n\r\n"])) + data, False


# Fields ingest options fill where a record lacks them; none decides whether a row is good.
DEFAULTS = st.sampled_from([None, {"ci_job_id": "job-9", "context_data": {"commit": "c0ffee"}},
                            {"test_run_id": "run-7", "node_type": "\u202elarge"}])
FILE_NAMES = st.sampled_from(["metrics", "_hidden", ".dotted", "__init__", "..", "_", "-",
                              "ünïcödé name", "a" * 200, "x[1]*?{a,b}"])


# ------------------------------------------------------------------ the path under test

@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    """One real DuckDB file for the module: each example replaces the days it loads."""
    con = connect(str(tmp_path_factory.mktemp("fuzz-warehouse") / "perf.duckdb"))
    yield Warehouse.for_writing(con)
    con.close()


@pytest.fixture(scope="module", autouse=True)
def tally(request):
    yield
    fault_tally = FaultTally(request.module.__name__.rsplit(".", 1)[-1])
    for what, count in sorted(_TRIED.items()):
        fault_tally.add(what, count)


_BAD_REASONS_SQL = """
SELECT count(*) FROM quarantined_metrics
WHERE partition_day IN (SELECT unnest(CAST(? AS DATE[]))) AND (reason IS NULL OR trim(reason) = '')
"""
_LOADED_SQL = """
SELECT min(timestamp), max(timestamp), count(*) FILTER (NOT isfinite(metric_value))
FROM performance_metrics WHERE CAST(timestamp AS DATE) IN (SELECT unnest(CAST(? AS DATE[])))
"""


def ingest_and_load(warehouse: Warehouse, files: list[tuple[str, bytes]], fmt: str, *,
                    defaults: dict | None = None) -> tuple[IngestReport, int]:
    """Ingest files (name, content) into a fresh landing archive, load every day they landed,
    check that every record read is accounted for: (the ingest report, rows loaded)."""
    with tempfile.TemporaryDirectory() as folder:
        sources = []
        for name, content in files:
            sources.append(Path(folder) / name)
            sources[-1].write_bytes(content)
        landing = Path(folder) / "landing"
        report = ingest_files(sources, landing, today=TODAY, earliest_day=EARLIEST,
                              defaults=defaults)
        days = landed_days(landing)
        # Every day a record was filed under is one the landing scan sees and the daily
        # partitions hold (records dated outside them go to the ingest day).
        assert set(days) == set(report.records_by_day)
        assert all(EARLIEST <= day <= LATEST for day in days)
        assert sum(report.records_by_day.values()) == report.records_read
        assert report.records_already_landed == 0
        counts = load_landing_days(warehouse, landing, days)

    for day in days:
        assert counts[day].rows_read == report.records_by_day[day], day
        assert counts[day].rows_read == counts[day].rows_loaded + counts[day].rows_quarantined
        assert warehouse.day_counts(day) == {"rows_read": counts[day].rows_read,
                                             "rows_loaded": counts[day].rows_loaded,
                                             "rows_quarantined": counts[day].rows_quarantined}
    assert warehouse.con.execute(_BAD_REASONS_SQL, [days]).fetchall()[0][0] == 0
    first, last, not_finite = warehouse.con.execute(_LOADED_SQL, [days]).fetchall()[0]
    assert not_finite == 0
    if first is not None:
        assert EARLIEST <= first.date() and last.date() <= LATEST
    loaded = sum(counts[day].rows_loaded for day in days)
    _TRIED["inputs fuzzed"] += len(files)
    _TRIED[f"inputs fuzzed: {fmt}"] += len(files)
    _TRIED["rows checked"] += report.records_read
    _TRIED["rows loaded"] += loaded
    _TRIED["rows quarantined"] += report.records_read - loaded
    return report, loaded


# ------------------------------------------------------------------ one test per format

@FUZZ
@given(rows=rows_of(as_text=False), ascii_only=st.booleans(), name=FILE_NAMES, defaults=DEFAULTS,
       copies=st.sampled_from([1, 1, 2]), data=st.data())
def test_json_lines(warehouse, rows, ascii_only, name, defaults, copies, data):
    rows, good = rows[0], sum(rows[1])
    lines = [json.dumps(row, ensure_ascii=ascii_only) for row in rows]
    extra = data.draw(st.lists(st.one_of(
        TEXT, st.sampled_from(["{", "[1, 2]", "null", "{}", '"s"', "\ufeff", "\ufeff \t", " ",
                               '{"metric_name": 1e999999}', '{"a": ' * 2000 + "1" + "}" * 2000,
                               "9" * 5000, '{"_rejected": ""}', '{"_rejected": 0}',
                               '{"timestamp": "2026-11-01T10:00:00Z", "metric_name": "cpu_usage", '
                               '"metric_value": 5, "node_id": "\\ud800"}'])), max_size=3))
    body = "\n".join([*extra, *lines]) + data.draw(st.sampled_from(["\n", "\r\n", ""]))
    content, whole = data.draw(damaged(body.encode("utf-8")))
    # The same rows under another name land again, and load again.
    files = [(name + ".jsonl", content), ("copy" + name + ".jsonl", content)][:copies]
    report, loaded = ingest_and_load(warehouse, files, "JSON Lines", defaults=defaults)
    # A record is a line with more than white space (a blank line is no record).
    assert report.records_read == copies * sum(1 for line in content.split(b"\n") if line.strip())
    if whole:
        assert loaded == copies * good


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


CSV_COLUMNS = ["timestamp", "metric_name", "metric_value", "unit", "test_name", "test_type",
               "node_id", "node_type", "test_run_id", "ci_job_id", "context_data", "_rejected"]


@FUZZ
@given(rows=rows_of(as_text=True), name=FILE_NAMES, defaults=DEFAULTS, data=st.data())
def test_csv(warehouse, rows, name, defaults, data):
    rows, good = rows[0], sum(rows[1])
    columns = data.draw(st.permutations(CSV_COLUMNS))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(column)) for column in columns])
    surplus = data.draw(st.sampled_from(["", "", "a,b\n", "x" * 200_000 + "\n", '"unclosed\n']))
    content, whole = data.draw(damaged((text.getvalue() + surplus).encode("utf-8")))
    report, loaded = ingest_and_load(warehouse, [(name + ".csv", content)], "CSV", defaults=defaults)
    if whole:
        # A short row is a record lacking fields; a field past the csv module's limit or a
        # quote never closed stops the reader, and the rest of the file is one rejected record.
        assert report.records_read == len(rows) + (surplus != "")
        assert loaded == good


@FUZZ
@given(rows=rows_of(as_text=False), shape=st.sampled_from(["rows", "one row", "metrics"]),
       name=FILE_NAMES, defaults=DEFAULTS, data=st.data())
def test_json_documents(warehouse, rows, shape, name, defaults, data):
    rows, goods = rows
    if shape == "one row":
        rows, goods = rows[:1], goods[:1]
    good = sum(goods)
    document = {"rows": rows, "one row": rows[0], "metrics": {"metrics": rows}}[shape]
    content, whole = data.draw(damaged(json.dumps(document).encode("utf-8")))
    report, loaded = ingest_and_load(warehouse, [(name + ".json", content)], "JSON document",
                                     defaults=defaults)
    if whole:
        assert report.records_read == len(rows)
        assert loaded == good


@FUZZ
@given(document=st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(), st.integers(), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["metrics", "benchmarks", "stats",
                                                             "timestamp", "metric_name", "x"]),
                                            inner, max_size=3)), max_leaves=12),
       name=FILE_NAMES)
def test_json_documents_of_any_shape(warehouse, document, name):
    """Wrong nesting and wrong types: whatever JSON it is, every record is accounted for."""
    report, loaded = ingest_and_load(warehouse, [(name + ".json", json.dumps(document).encode())],
                                     "JSON document")
    assert loaded == 0  # nothing here can be a metric row with a known metric


def _dated_in_range(stamp) -> bool:
    """Whether a timestamp drawn here is ISO 8601 text on a day the daily partitions hold."""
    return (isinstance(stamp, str) and stamp[:4].isdigit()
            and EARLIEST.isoformat() <= stamp[:10] <= LATEST.isoformat())


@st.composite
def benchmark_reports(draw) -> tuple[dict, int]:
    """pytest-benchmark output: (document, how many of its benchmarks are good rows)."""
    stamp = draw(st.one_of(INSTANT.map(lambda at: at.isoformat()),
                           st.sampled_from([value for value in TIME_FAULTS.values() if value is not None])))
    stamp_ok = _dated_in_range(stamp)
    node = draw(st.one_of(NAME, st.sampled_from(["", None, "n" * HUGE])))
    node_ok = isinstance(node, str) and node != "" and len(node) <= 1000
    benchmarks, good = [], 0
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.one_of(NAME, st.sampled_from(["", "t" * HUGE])))
        median = draw(st.one_of(st.floats(0, 1e3), st.sampled_from([math.nan, math.inf, -1.0, "x",
                                                                    None, 1e308, -0.0])))
        shape = draw(st.sampled_from(["ok", "ok", "ok", "no stats", "stats not object", "not object"]))
        if shape == "not object":
            benchmarks.append(draw(st.one_of(TEXT, st.integers(), st.lists(st.integers(), max_size=2))))
            continue
        benchmark = {"name": name, "fullname": name, "group": draw(st.one_of(st.none(), TEXT)),
                     "params": draw(st.one_of(st.none(), st.dictionaries(TEXT, TEXT, max_size=2)))}
        if shape == "ok":
            benchmark["stats"] = {"median": median, "mean": median, "rounds": 5}
        elif shape == "stats not object":
            benchmark["stats"] = [median]
        benchmarks.append(benchmark)
        good += (shape == "ok" and stamp_ok and node_ok and 0 < len(name) <= 1000
                 and isinstance(median, float) and math.isfinite(median) and median >= 0)
    document = {"machine_info": {"node": node}, "datetime": stamp, "benchmarks": benchmarks,
                "commit_info": draw(st.sampled_from([{"id": "c0ffee", "branch": "main", "dirty": True},
                                                     {"id": "unversioned"}, [], None]))}
    return document, good


@FUZZ
@given(report=benchmark_reports(), name=FILE_NAMES, data=st.data())
def test_pytest_benchmark_json(warehouse, report, name, data):
    document, good = report
    content, whole = data.draw(damaged(json.dumps(document).encode("utf-8")))
    ingested, loaded = ingest_and_load(warehouse, [(name + ".json", content)], "pytest-benchmark")
    if whole:
        assert ingested.records_read == len(document["benchmarks"])
        assert loaded == good


@st.composite
def junit_reports(draw) -> tuple[bytes, int, int]:
    """A JUnit XML report: (bytes, records it yields, how many of them are good rows)."""
    root = ElementTree.Element("testsuites")
    records = good = 0
    for _ in range(draw(st.integers(1, 3))):
        stamp = draw(st.one_of(INSTANT.map(lambda at: at.replace(tzinfo=None).isoformat()),
                               st.sampled_from(["0001-01-01T00:00:00", "1970-01-01T00:00:00",
                                                "9999-12-31T23:59:59", "not a time"])))
        stamp_ok = _dated_in_range(stamp)
        host = draw(st.one_of(XML_NAME, st.just("")))
        suite = ElementTree.SubElement(root, "testsuite", name=draw(XML_NAME), timestamp=stamp,
                                       hostname=host)
        ok = stamp_ok and host != ""
        executed = passed = 0
        seconds = 0.0
        cases = draw(st.lists(st.tuples(
            XML_NAME, st.sampled_from(["passed", "failure", "error", "skipped"]),
            st.one_of(st.floats(0, 1e3).map(repr), st.sampled_from(["-1.5", "abc", "nan", "inf",
                                                                   "1e308", "", None]))), max_size=5))
        for name, outcome, time_text in cases:
            case = ElementTree.SubElement(suite, "testcase", classname="pkg.mod", name=name)
            if time_text is not None:
                case.set("time", time_text)
            if outcome != "passed":
                ElementTree.SubElement(case, outcome)
            if outcome == "skipped":
                continue
            executed += 1
            passed += outcome == "passed"
            records += 1
            try:
                value = float(time_text) if time_text not in ("nan", "inf") else None
            except (TypeError, ValueError):
                value = None
            if value is not None:
                seconds += value
                good += ok and value >= 0
        if cases:
            records += 1 + (executed > 0)
            good += ok * (1 + (executed > 0))
            if executed and seconds:
                records += 1
                good += ok and math.isfinite(executed / seconds * 3600) and seconds > 0
    return ElementTree.tostring(root, encoding="utf-8"), records, good


@FUZZ
@given(report=junit_reports(), name=FILE_NAMES, data=st.data())
def test_junit_xml(warehouse, report, name, data):
    document, records, good = report
    content, whole = data.draw(damaged(document))
    ingested, loaded = ingest_and_load(warehouse, [(name + ".xml", content)], "JUnit XML")
    if whole:
        assert ingested.records_read == records
        assert loaded == good


UNREADABLE_XML = [b"", b"<", b"<testsuite>", b"<html><body/></html>", b"\xff\xfe<x/>",
                  b'<?xml version="1.0"?><!DOCTYPE t [<!ENTITY a "b">]><testsuite/>',
                  b"<testsuites>" + b"<testsuite>" * 3000 + b"</testsuite>" * 3000 + b"</testsuites>",
                  b'<testsuite timestamp="2026-11-01T00:00:00" hostname="h"><testcase name="'
                  + "\u202e".encode() * HUGE + b'" time="1"/></testsuite>']


@FUZZ
@given(content=st.one_of(st.sampled_from(UNREADABLE_XML), st.binary(max_size=64),
                         TEXT.map(lambda text: f"<testsuite>{text}</testsuite>".encode())),
       name=FILE_NAMES)
def test_unreadable_xml(warehouse, content, name):
    ingest_and_load(warehouse, [(name + ".xml", content)], "JUnit XML")


# ------------------------------------------------------------------ duplicates and names

def test_a_file_ingested_twice_lands_once_and_the_same_rows_under_another_name_land_again(
        tmp_path, warehouse):
    rows = [{"timestamp": "2026-11-01T10:00:00Z", "metric_name": "cpu_usage", "metric_value": 5,
             "node_id": "node-01"}] * 2
    body = "".join(json.dumps(row) + "\n" for row in rows).encode()
    first_file, second_file = tmp_path / "in.jsonl", tmp_path / "copy.jsonl"
    first_file.write_bytes(body)
    second_file.write_bytes(body)
    landing = tmp_path / "landing"
    day = date(2026, 11, 1)

    first = ingest_files([first_file], landing, today=TODAY)
    again = ingest_files([first_file], landing, today=TODAY)
    assert len(first.files_written) == 1 and again.files_written == []
    assert again.records_read == again.records_already_landed == 2  # read, not landed again
    assert load_landing_days(warehouse, landing, [day])[day].rows_loaded == 2  # both duplicates

    copy = ingest_files([second_file], landing, today=TODAY)
    assert len(copy.files_written) == 1 and copy.records_already_landed == 0
    counts = load_landing_days(warehouse, landing, [day])[day]
    assert (counts.rows_read, counts.rows_loaded, counts.files) == (4, 4, 2)
    assert warehouse.day_counts(day)["rows_loaded"] == 4


@pytest.mark.parametrize("name", ["_x.jsonl", ".y.jsonl", "__.jsonl", "._z.jsonl"])
def test_a_file_whose_name_starts_with_a_dot_or_underscore_still_loads(tmp_path, warehouse, name):
    source = tmp_path / name
    source.write_text(json.dumps({"timestamp": "2026-11-02T10:00:00Z", "metric_name": "cpu_usage",
                                  "metric_value": 5, "node_id": "node-01"}) + "\n")
    report = ingest_files([source], tmp_path / "landing", today=TODAY)
    landed, = report.files_written
    assert not landed.name.startswith((".", "_"))
    day = date(2026, 11, 2)
    assert landed_days(tmp_path / "landing") == [day]
    assert load_landing_days(warehouse, tmp_path / "landing", [day])[day].rows_loaded == 1

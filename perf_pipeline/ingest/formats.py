"""Input formats: each turns a file's bytes into staged records, one per record read.

A staged record is (source_line, raw_line, pre_reason): `raw_line` is the record as one JSON
object text (a metric row), `pre_reason` says why the format layer could not read it (kept,
so the record is quarantined with that reason rather than dropped). Validation of the fields
happens later, in DuckDB, the same way for every format. A new format registers a parser in
PARSERS by file suffix.

What one record is, by format (`source_line` numbers them, unique and ascending per file):

* `.jsonl`, `.ndjson`: a non-blank line.
* `.csv`: a data row below the header; `source_line` is the row's first line.
* `.json`, a JSON document: an element of an array of metric rows, the one metric-row object,
  an element of `{"metrics": [...]}`, or one benchmark of pytest-benchmark output (an object
  with `benchmarks`: its median time as `test_execution_time`). `source_line` is the record's
  position in the document, from 1.
* `.xml`, JUnit XML (pytest `--junitxml`, Maven surefire, Jenkins): a metric row the file
  yields, numbered in document order. For each `<testsuite>` holding `<testcase>` elements:
  one `test_execution_time` record per executed testcase (passed, failed or error; a skipped
  testcase is not a measurement and has none), or a rejected record when its `time` cannot
  be read; then the suite's `test_count` (every testcase, skipped ones included),
  `test_pass_rate` (passed / executed, %) and `tests_per_hour` (executed / suite time)
  records, the last two only when a testcase was executed and, for the rate, a suite time
  is known (the suite's `time`, else the sum of its testcases' times). A suite of 4
  testcases, one skipped, gives 3 + 3 = 6 records. Nested suites each count their own
  testcases. A document that cannot be read at all (malformed, with a DTD, or not JUnit) is
  one rejected record. Documents are parsed with defusedxml and any DTD is refused, so an
  entity is never expanded and nothing outside the document is ever read.

`defaults` (see DEFAULT_FIELDS) fill the fields a record lacks, in every format: a record's
own value wins, and `context_data` keys such as commit and branch are merged in where absent.
JUnit and pytest-benchmark documents take the timestamp and node from the suite's
`timestamp` and `hostname` (the benchmark's `datetime` and `machine_info.node`), and
when neither the document nor `defaults` names a run, its `test_run_id` is derived from the
document's node and time, so the rows of one report form one run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from defusedxml import DefusedXmlException, DTDForbidden
from defusedxml.ElementTree import fromstring as parse_xml_safely

from perf_pipeline.storage.warehouse import RAW_KEY, REJECTED_KEY, STAGING_COLUMNS

StagedRecord = tuple[int, str, str | None]  # (line number, JSON text, reason it is unreadable)
Parser = Callable[[bytes, Mapping | None], Iterator[StagedRecord]]

# Row fields a caller may supply for records that lack them (context_data: a dict merged in).
DEFAULT_FIELDS = ("timestamp", "node_id", "node_type", "test_type", "test_run_id", "ci_job_id",
                  "context_data")
# A document rejected as a whole keeps this much of its text in quarantine, not all of it.
MAX_DOCUMENT_ECHO = 10_000
# A decimal number of seconds; Python's float() would also take "nan", "inf" and "1_0".
_SECONDS = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$")


UTF8_BOM = "\ufeff".encode()  # a byte order mark, as UTF-8


class UnsupportedFormatError(ValueError):
    pass


def _decode_lines(data: bytes) -> Iterator[tuple[int, str | None, bytes]]:
    """(line number, text or None if not UTF-8, raw bytes) of each non-blank line."""
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            yield number, raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            yield number, None, raw


def json_text(value) -> str:
    """JSON text of a record, readable (non-ASCII kept) where it can be stored as UTF-8; a
    lone surrogate from a \\ud800 escape cannot, so such records are written ASCII-escaped
    (validation then judges them like any other)."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True)
    return text


def rejected_record(reason: str, raw: str, timestamp: str | None = None) -> str:
    """A record the format layer could not read, kept whole with the reason (and its
    timestamp where known, so it is quarantined under its own day)."""
    record = {REJECTED_KEY: reason, RAW_KEY: raw}
    if timestamp is not None:
        record["timestamp"] = timestamp
    return json_text(record)


def _fill(row: dict, defaults: Mapping) -> dict:
    """Fill the fields `row` lacks (absent or null) from `defaults`; merge context keys."""
    for key, value in defaults.items():
        if key == "context_data":
            context = row.get("context_data")
            if context is None:
                row["context_data"] = dict(value)
            elif isinstance(context, dict):
                for name, item in value.items():
                    if context.get(name) is None:
                        context[name] = item
            # any other context_data is left as sent: validation quarantines it
        elif row.get(key) is None:
            row[key] = value
    return row


def _default_timestamp(defaults: Mapping | None) -> str | None:
    return defaults.get("timestamp") if defaults else None


def _rejected_document(reason: str, data: bytes, defaults: Mapping | None) -> StagedRecord:
    text = data[:MAX_DOCUMENT_ECHO].decode("utf-8", errors="backslashreplace")
    if len(data) > MAX_DOCUMENT_ECHO:
        text += f"… ({len(data):,} bytes in all)"
    return 1, rejected_record(reason, text, _default_timestamp(defaults)), reason


def parse_jsonl(data: bytes, defaults: Mapping | None = None) -> Iterator[StagedRecord]:
    for number, text, raw in _decode_lines(data):
        if text is None:
            reason = "line is not valid UTF-8"
            yield (number, rejected_record(reason, raw.decode("utf-8", errors="backslashreplace"),
                                           _default_timestamp(defaults)), reason)
            continue
        if number == 1:
            text = text.lstrip("\ufeff")
        if defaults is None:  # the bulk path: lines pass through unparsed
            yield number, text, None
            continue
        try:
            row = json.loads(text)
        except (ValueError, RecursionError):
            row = None  # left as sent: validation quarantines it
        yield number, (json_text(_fill(row, defaults))
                       if isinstance(row, dict) else text), None


def json_lines(data: bytes) -> tuple[np.ndarray, pa.Array] | None:
    """The records of JSON Lines `data` as parse_jsonl stages them without defaults: their
    line numbers (from 1, blank lines skipped but counted) and texts (trailing carriage
    returns dropped, byte order marks before the first line removed), split with NumPy over
    the bytes into one Arrow string array, with no Python object per line. None if `data`
    is not UTF-8: parse_jsonl then judges it line by line."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    buf = np.frombuffer(data, dtype=np.uint8)
    # line i is data[offsets[i]:offsets[i + 1]] with its newline; the last one may be empty
    offsets = np.concatenate(([0], np.flatnonzero(buf == 10) + 1, [len(data)])).astype(np.int64)
    starts, ends = offsets[:-1], offsets[1:]
    first_byte = np.zeros(len(starts), dtype=np.uint8)
    filled = ends > starts
    first_byte[filled] = buf[starts[filled]]
    keep = np.ones(len(starts), dtype=bool)
    for line in np.flatnonzero(first_byte != ord("{")):  # few lines: only these can be blank
        keep[line] = bool(data[starts[line]:ends[line]].strip())
    while keep[0] and data.startswith(UTF8_BOM, offsets[0]):
        offsets[0] += len(UTF8_BOM)
    lines = pa.LargeStringArray.from_buffers(len(starts), pa.py_buffer(offsets), pa.py_buffer(data))
    # a line holds no newline, so this drops its newline and the carriage returns before it;
    # bytewise (ASCII) trimming, ten times as fast as DuckDB's rtrim, keeps UTF-8 whole
    lines = pc.ascii_rtrim(lines, characters="\r\n")
    return np.arange(1, len(starts) + 1, dtype=np.int64)[keep], lines.filter(pa.array(keep))


def parse_csv(data: bytes, defaults: Mapping | None = None) -> Iterator[StagedRecord]:
    """CSV with a header row; empty cells are missing values; context_data may hold JSON."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("utf-8-sig", errors="backslashreplace")
        reason = "file is not valid UTF-8"
        yield 1, rejected_record(reason, text, _default_timestamp(defaults)), reason
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = 2
    try:
        for row in reader:
            number, start = start, reader.line_num + 1
            extra = row.pop(None, None)
            record = {key.strip(): (value if value not in ("", None) else None)
                      for key, value in row.items() if key is not None}
            context = record.get("context_data")
            if isinstance(context, str) and context.lstrip().startswith("{"):
                try:
                    record["context_data"] = json.loads(context)
                except (ValueError, RecursionError):
                    pass  # left as text: validation quarantines it as "not a JSON object"
            if defaults is not None:
                _fill(record, defaults)
            if extra:
                reason = "CSV row has more fields than the header"
                record["_extra_fields"] = extra
                raw = json_text(record)
                yield number, rejected_record(reason, raw, record.get("timestamp")), reason
            else:
                yield number, json_text(record), None
    except csv.Error as error:
        # The reader cannot go on: the rest of the file, from the row it failed on, is one
        # rejected record that keeps (the start of) that text.
        reason = f"CSV is malformed: {error}"
        rest = "".join(io.StringIO(text, newline="").readlines()[start - 1:])
        if len(rest) > MAX_DOCUMENT_ECHO:
            rest = f"{rest[:MAX_DOCUMENT_ECHO]}… ({len(rest):,} characters in all)"
        yield start, rejected_record(reason, rest, _default_timestamp(defaults)), reason


def _without_nulls(mapping: dict) -> dict:
    return {key: value for key, value in mapping.items() if value is not None}


def _derived_run_id(kind: str, node: str | None, timestamp: str | None) -> str | None:
    """A run id for a report that names none: the same document always gets the same one."""
    return f"{kind}:{node or 'unknown-node'}:{timestamp}" if timestamp else None


def _metric_row(defaults: Mapping | None, derived_run_id: str | None, **fields) -> dict:
    row = _without_nulls(fields)
    if defaults is not None:
        _fill(row, defaults)
    if row.get("test_run_id") is None and derived_run_id is not None:
        row["test_run_id"] = derived_run_id
    return row


# ------------------------------------------------------------------ JSON documents

def parse_json_document(data: bytes, defaults: Mapping | None = None) -> Iterator[StagedRecord]:
    """A JSON document: rows, one row, {"metrics": rows}, or pytest-benchmark output."""
    if not data.strip():
        return
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        yield _rejected_document("file is not valid UTF-8", data, defaults)
        return
    except ValueError as error:  # JSONDecodeError, and numbers past int()'s digit limit
        yield _rejected_document(f"file is not valid JSON: {str(error)[:200]}", data, defaults)
        return
    except RecursionError:
        yield _rejected_document("JSON document is nested too deeply", data, defaults)
        return
    if isinstance(document, dict) and "benchmarks" in document:
        yield from _benchmark_records(document, data, defaults)
        return
    if isinstance(document, dict) and "metrics" in document:
        rows = document["metrics"]
        if not isinstance(rows, list):
            yield _rejected_document('"metrics" is not an array of metric rows', data, defaults)
            return
    elif isinstance(document, list):
        rows = document
    elif isinstance(document, dict):
        rows = [document]
    else:
        yield _rejected_document("JSON document is not an array of metric rows, a metric row, "
                                 '{"metrics": [...]} or pytest-benchmark output', data, defaults)
        return
    for number, row in enumerate(rows, start=1):
        if isinstance(row, dict) and defaults is not None:
            _fill(row, defaults)
        yield number, json_text(row), None  # a non-object: validation says so


_BENCHMARK_STATS = ("mean", "stddev", "min", "max", "iqr", "rounds", "iterations")
# What pytest-benchmark writes when it found no version control: not a commit or branch.
_BENCHMARK_NO_COMMIT = {"unversioned", ""}
_BENCHMARK_NO_BRANCH = {"(unknown)", ""}


def _benchmark_records(document: dict, data: bytes,
                       defaults: Mapping | None) -> Iterator[StagedRecord]:
    benchmarks = document["benchmarks"]
    if not isinstance(benchmarks, list):
        yield _rejected_document('"benchmarks" is not an array', data, defaults)
        return
    machine = document.get("machine_info") if isinstance(document.get("machine_info"), dict) else {}
    commit_info = document.get("commit_info") if isinstance(document.get("commit_info"), dict) else {}
    timestamp = document.get("datetime")
    node = machine.get("node") or None
    context = {"source": "pytest-benchmark"}
    commit, branch = commit_info.get("id"), commit_info.get("branch")
    if isinstance(commit, str) and commit not in _BENCHMARK_NO_COMMIT:
        context["commit"] = commit
    if isinstance(branch, str) and branch not in _BENCHMARK_NO_BRANCH:
        context["branch"] = branch
    if commit_info.get("dirty"):
        context["dirty"] = True
    fallback = defaults or {}
    run_id = _derived_run_id("pytest-benchmark", node or fallback.get("node_id"),
                             timestamp if isinstance(timestamp, str) else fallback.get("timestamp"))
    for number, benchmark in enumerate(benchmarks, start=1):
        stats = benchmark.get("stats") if isinstance(benchmark, dict) else None
        if not isinstance(stats, dict):
            reason = ("benchmark is not a JSON object" if not isinstance(benchmark, dict)
                      else "benchmark has no stats object")
            raw = json_text(benchmark)[:MAX_DOCUMENT_ECHO]
            yield number, rejected_record(reason, raw, timestamp or _default_timestamp(defaults)), reason
            continue
        row = _metric_row(
            defaults, run_id, timestamp=timestamp, metric_name="test_execution_time",
            metric_value=stats.get("median"), unit="s",
            test_name=benchmark.get("fullname") or benchmark.get("name"), node_id=node,
            context_data={**context, **_without_nulls(
                {**{name: stats.get(name) for name in _BENCHMARK_STATS},
                 "group": benchmark.get("group"), "params": benchmark.get("params")})})
        yield number, json_text(row), None


# ------------------------------------------------------------------ JUnit XML

def _tag(element: Element) -> str:
    """The element's name without a namespace (comments and PIs have no str tag)."""
    return element.tag.rsplit("}", 1)[-1] if isinstance(element.tag, str) else ""


def _seconds(text: str | None) -> float | None:
    if text is None or not _SECONDS.match(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _outcome(testcase: Element) -> str:
    children = {_tag(child) for child in testcase}
    if "error" in children:
        return "error"
    if "failure" in children:
        return "failed"
    if "skipped" in children:
        return "skipped"
    return "passed"  # flakyFailure / rerunFailure: passed on a rerun


def _junit_test_name(testcase: Element, pytest_style: bool) -> str | None:
    """The test's name as a pytest node id where the file allows (`file::Class::name`),
    else `classname.name`."""
    classname = testcase.get("classname") or testcase.get("class") or ""
    name = testcase.get("name") or ""
    file = testcase.get("file") or ""
    if file.endswith(".py"):
        module = file[:-3].replace("/", ".").replace("\\", ".")
        if classname == module:
            return f"{file}::{name}"
        if classname.startswith(module + "."):
            return "::".join([file, *classname[len(module) + 1:].split("."), name])
    elif pytest_style and classname:
        # pytest writes the node id with "/" and "::" as "."; its test classes are
        # capitalized (python_classes = Test*), its modules and folders normally are not.
        parts = classname.split(".")
        cut = len(parts)
        while cut > 1 and parts[cut - 1][:1].isupper():
            cut -= 1
        return "::".join(["/".join(parts[:cut]) + ".py", *parts[cut:], name])
    if classname and name:
        return f"{classname}.{name}"
    return name or classname or None


def parse_junit_xml(data: bytes, defaults: Mapping | None = None) -> Iterator[StagedRecord]:
    """JUnit XML reports; what a record is: see the module docstring."""
    if not data.strip():
        return
    try:
        root = parse_xml_safely(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DTDForbidden:
        yield _rejected_document("XML with a document type declaration (DTD) is refused: entities "
                                 "are never expanded and external ones never fetched", data, defaults)
        return
    except DefusedXmlException as error:
        yield _rejected_document(f"XML is refused: {type(error).__name__}", data, defaults)
        return
    except (ParseError, LookupError, ValueError) as error:
        yield _rejected_document(f"XML is malformed: {error}", data, defaults)
        return
    if _tag(root) not in ("testsuites", "testsuite"):
        yield _rejected_document(f"XML root <{_tag(root)[:60]}> is not JUnit <testsuites> or "
                                 "<testsuite>", data, defaults)
        return

    # Suites in document order, each with the timestamp and host it has or inherits.
    suites: list[tuple[Element, str | None, str | None, str | None]] = []
    stack: list[tuple[Element, tuple[str, ...], str | None, str | None]] = [(root, (), None, None)]
    while stack:
        element, path, timestamp, hostname = stack.pop()
        timestamp = element.get("timestamp") or timestamp
        hostname = element.get("hostname") or hostname
        if _tag(element) == "testsuite":
            path = (*path, element.get("name") or "")
            suites.append((element, "/".join(p for p in path if p) or None, timestamp, hostname))
        stack.extend((child, path, timestamp, hostname) for child in reversed(element)
                     if _tag(child) == "testsuite")

    fallback = defaults or {}
    pytest_style = root.get("name") in ("pytest", "pytest tests") or any(
        element.get("name") == "pytest" for element, *_ in suites)
    first_time = next((t for _, _, t, _ in suites if t), None) or fallback.get("timestamp")
    first_host = next((h for _, _, _, h in suites if h), None) or fallback.get("node_id")
    run_id = _derived_run_id("junit", first_host, first_time)
    number = 0
    for suite, suite_name, timestamp, hostname in suites:
        testcases = [child for child in suite if _tag(child) == "testcase"]
        if not testcases:
            continue
        common = {"timestamp": timestamp, "node_id": hostname}
        outcomes = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        case_seconds = 0.0
        for testcase in testcases:
            outcome = _outcome(testcase)
            outcomes[outcome] += 1
            if outcome == "skipped":
                continue
            number += 1
            time_text = testcase.get("time")
            seconds = _seconds(time_text)
            row = _metric_row(
                defaults, run_id, **common, metric_name="test_execution_time",
                metric_value=seconds if seconds is not None else time_text, unit="s",
                test_name=_junit_test_name(testcase, pytest_style),
                context_data=_without_nulls({"outcome": outcome,
                                             "classname": testcase.get("classname"),
                                             "suite": suite_name, "source": "junit"}))
            if seconds is None:
                reason = ("testcase has no time attribute" if time_text is None else
                          f"testcase time {time_text[:40]!r} is not a number of seconds")
                yield (number, rejected_record(reason, json_text(row),
                                               row.get("timestamp")), reason)
                continue
            case_seconds += seconds
            yield number, json_text(row), None

        executed = outcomes["passed"] + outcomes["failed"] + outcomes["error"]
        suite_seconds = _seconds(suite.get("time")) or case_seconds or None
        summary = {"suite": suite_name, "source": "junit", **outcomes,
                   "suite_time_s": suite_seconds}
        values = [("test_count", len(testcases), "count")]
        if executed:
            values.append(("test_pass_rate", 100.0 * outcomes["passed"] / executed, "percent"))
            if suite_seconds:
                values.append(("tests_per_hour", executed / suite_seconds * 3600.0, "tests/h"))
        for metric, value, unit in values:
            number += 1
            row = _metric_row(defaults, run_id, **common, metric_name=metric, metric_value=value,
                              unit=unit, context_data=_without_nulls(summary))
            yield number, json_text(row), None


PARSERS: dict[str, Parser] = {
    ".jsonl": parse_jsonl,
    ".ndjson": parse_jsonl,
    ".csv": parse_csv,
    ".json": parse_json_document,
    ".xml": parse_junit_xml,
}


def is_supported(path: Path) -> bool:
    return path.suffix.lower() in PARSERS


def _checked_defaults(defaults: Mapping | None) -> dict | None:
    """The defaults worth applying (empty values dropped), or None; ValueError for a field
    that is not a default."""
    if not defaults:
        return None
    unknown = sorted(set(defaults) - set(DEFAULT_FIELDS))
    if unknown:
        raise ValueError(f"not a default field: {', '.join(unknown)}; use {', '.join(DEFAULT_FIELDS)}")
    checked = {key: value for key, value in defaults.items() if value not in (None, "")}
    if "context_data" in checked:
        if not isinstance(checked["context_data"], Mapping):
            raise ValueError("default context_data must be a mapping")
        checked["context_data"] = _without_nulls(dict(checked["context_data"])) or None
        if checked["context_data"] is None:
            del checked["context_data"]
    return checked or None


def stage_bytes(data: bytes, *, suffix: str, source_file: str,
                defaults: Mapping | None = None) -> pd.DataFrame:
    """Stage a file's records; `defaults` fill the row fields a record lacks (DEFAULT_FIELDS)."""
    try:
        parser = PARSERS[suffix.lower()]
    except KeyError:
        raise UnsupportedFormatError(
            f"{source_file}: unsupported format {suffix or '(no suffix)'}; "
            f"supported: {', '.join(sorted(PARSERS))}") from None
    checked = _checked_defaults(defaults)
    rows = [(source_file, number, line, reason) for number, line, reason in parser(data, checked)]
    return pd.DataFrame(rows, columns=STAGING_COLUMNS).astype(
        {"source_file": object, "source_line": "int64", "raw_line": object, "pre_reason": object})

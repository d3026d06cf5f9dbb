"""JUnit XML, pytest-benchmark and JSON documents, on reports made by the real tools."""

import json
import socket
import subprocess
import sys
import textwrap
import time
from datetime import date, datetime, timezone
from pathlib import Path

import duckdb
import pytest

from perf_pipeline.ingest.formats import MAX_DOCUMENT_ECHO, PARSERS, stage_bytes
from perf_pipeline.ingest.landing import ingest_files
from perf_pipeline_tests.conftest import inner_pytest_env, metric_row

TINY_SUITE = '''
import pytest

def test_passes():
    pass

def test_fails():
    assert 1 == 2

@pytest.mark.skip(reason="not today")
def test_skipped():
    pass

@pytest.fixture
def broken():
    raise RuntimeError("setup broke")

def test_errors(broken):
    pass

class TestGroup:
    def test_method(self):
        pass
'''

BENCHMARK_SUITE = '''
def test_sum_of_range(benchmark):
    benchmark.pedantic(sum, args=(range(1000),), rounds=5, iterations=2)
'''

SUREFIRE = b'''<?xml version="1.0" encoding="UTF-8"?>
<testsuite xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" name="com.example.CartTest"
    time="2.5" tests="5" errors="1" skipped="1" failures="1" timestamp="2026-11-01T10:00:00"
    hostname="build-07">
  <properties><property name="java.version" value="21"/></properties>
  <testcase name="addsItem" classname="com.example.CartTest" time="0.5"/>
  <testcase name="removesItem" classname="com.example.CartTest" time="0.25">
    <failure message="expected 1 but was 2" type="org.opentest4j.AssertionFailedError">trace</failure>
  </testcase>
  <testcase name="checksOut" classname="com.example.CartTest" time="1.0">
    <error message="boom" type="java.lang.IllegalStateException">trace</error>
  </testcase>
  <testcase name="appliesCoupon" classname="com.example.CartTest" time="0">
    <skipped message="disabled"/>
  </testcase>
  <testcase name="isFlaky" classname="com.example.CartTest" time="0.75">
    <flakyFailure message="first try failed" type="java.lang.AssertionError"/>
  </testcase>
</testsuite>
'''

JENKINS_NESTED = b'''<?xml version="1.0" encoding="UTF-8"?>
<testsuites name="nightly" timestamp="2026-11-02T03:00:00Z" hostname="agent-3">
  <testsuite name="backend" time="10">
    <testcase classname="api.Users" name="lists" time="4"/>
    <testsuite name="db" time="6" hostname="db-runner" timestamp="2026-11-02T03:00:04Z">
      <testcase classname="db.Migrations" name="apply" time="5"/>
      <testcase classname="db.Migrations" name="rollback" time="n/a"/>
    </testsuite>
  </testsuite>
</testsuites>
'''

BILLION_LAUGHS = b'''<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<testsuite name="lolz" timestamp="2026-11-01T10:00:00Z" hostname="node-01">
  <testcase classname="x" name="&lol9;" time="1"/>
</testsuite>
'''

DTD_REFUSED = "XML with a document type declaration (DTD) is refused"


def _run_pytest(folder: Path, source: str, *arguments: str) -> None:
    """Run the real pytest on a one-file suite in `folder`, isolated from this project."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / "test_tiny.py").write_text(textwrap.dedent(source))
    subprocess.run([sys.executable, "-m", "pytest", "test_tiny.py", "-q", "-p", "no:cacheprovider",
                    "-p", "no:perf_pipeline", *arguments],
                   cwd=folder, env=inner_pytest_env(), capture_output=True, text=True, timeout=120,
                   check=False)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    """A JUnit report and a pytest-benchmark report, each written by a real pytest run."""
    root = tmp_path_factory.mktemp("reports")
    _run_pytest(root / "junit", TINY_SUITE, "--junitxml=report.xml")
    _run_pytest(root / "bench", BENCHMARK_SUITE, "--benchmark-json=benchmark.json")
    found = {"junit": root / "junit" / "report.xml", "benchmark": root / "bench" / "benchmark.json"}
    assert all(path.is_file() for path in found.values()), found
    return found


def _records(data: bytes, suffix: str, defaults: dict | None = None) -> list[tuple[dict, str | None]]:
    staged = stage_bytes(data, suffix=suffix, source_file=f"report{suffix}", defaults=defaults)
    assert list(staged["source_line"]) == sorted(set(staged["source_line"]))
    return [(json.loads(raw), reason if isinstance(reason, str) else None)
            for raw, reason in zip(staged["raw_line"], staged["pre_reason"])]


def _rows(data: bytes, suffix: str, defaults: dict | None = None) -> list[dict]:
    records = _records(data, suffix, defaults)
    assert [reason for _, reason in records] == [None] * len(records)
    return [row for row, _ in records]


def _summary(rows: list[dict]) -> dict[str, float]:
    return {row["metric_name"]: row["metric_value"] for row in rows
            if row["metric_name"] != "test_execution_time"}


# ------------------------------------------------------------------ JUnit XML

def test_a_real_pytest_junit_report_gives_a_duration_per_executed_test_and_a_suite_summary(reports):
    document = reports["junit"].read_bytes()
    rows = _rows(document, ".xml")

    durations = {row["test_name"]: row for row in rows if row["metric_name"] == "test_execution_time"}
    assert {name: row["context_data"]["outcome"] for name, row in durations.items()} == {
        "test_tiny.py::test_passes": "passed", "test_tiny.py::test_fails": "failed",
        "test_tiny.py::test_errors": "error", "test_tiny.py::TestGroup::test_method": "passed"}
    assert durations["test_tiny.py::TestGroup::test_method"]["context_data"]["classname"] == "test_tiny.TestGroup"
    suite_seconds = float(document.split(b' time="')[1].split(b'"')[0])
    # 5 collected (the skip included), 4 executed, 2 of them passed
    assert _summary(rows) == pytest.approx({"test_count": 5, "test_pass_rate": 50.0,
                                            "tests_per_hour": 4 / suite_seconds * 3600})
    assert {row["node_id"] for row in rows} == {socket.gethostname()}
    stamp = datetime.fromisoformat(rows[0]["timestamp"])
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 600
    assert len({row["timestamp"] for row in rows}) == len({row["test_run_id"] for row in rows}) == 1
    assert rows[0]["test_run_id"] == _rows(document, ".xml")[0]["test_run_id"]  # deterministic


def test_a_maven_surefire_report_with_its_outcomes_and_times():
    rows = _rows(SUREFIRE, ".xml")
    durations = {row["test_name"]: (row["metric_value"], row["context_data"]["outcome"])
                 for row in rows if row["metric_name"] == "test_execution_time"}
    assert durations == {"com.example.CartTest.addsItem": (0.5, "passed"),
                         "com.example.CartTest.removesItem": (0.25, "failed"),
                         "com.example.CartTest.checksOut": (1.0, "error"),
                         "com.example.CartTest.isFlaky": (0.75, "passed")}
    assert _summary(rows) == pytest.approx({"test_count": 5, "test_pass_rate": 50.0,
                                            "tests_per_hour": 4 / 2.5 * 3600})
    assert {(row["timestamp"], row["node_id"], row["context_data"]["suite"]) for row in rows} == {
        ("2026-11-01T10:00:00", "build-07", "com.example.CartTest")}
    assert {row["unit"] for row in rows} == {"s", "count", "percent", "tests/h"}


def test_nested_suites_inherit_host_and_time_and_an_unreadable_time_is_rejected_with_a_reason():
    records = _records(JENKINS_NESTED, ".xml")
    rejected = [(row, reason) for row, reason in records if reason]
    assert [reason for _, reason in rejected] == ["testcase time 'n/a' is not a number of seconds"]
    assert rejected[0][0]["timestamp"] == "2026-11-02T03:00:04Z"  # quarantined under its own day
    assert "db.Migrations.rollback" in rejected[0][0]["_raw"]

    rows = [row for row, reason in records if reason is None]
    by_suite: dict[str, list[dict]] = {}
    for row in rows:
        by_suite.setdefault(row["context_data"]["suite"], []).append(row)
    assert set(by_suite) == {"backend", "backend/db"}
    backend, db = by_suite["backend"], by_suite["backend/db"]
    assert {(r["node_id"], r["timestamp"]) for r in backend} == {("agent-3", "2026-11-02T03:00:00Z")}
    assert {(r["node_id"], r["timestamp"]) for r in db} == {("db-runner", "2026-11-02T03:00:04Z")}
    assert [r["test_name"] for r in backend if r["metric_name"] == "test_execution_time"] == ["api.Users.lists"]
    # each suite counts its own testcases; the unreadable one was executed and passed
    assert _summary(backend) == pytest.approx({"test_count": 1, "test_pass_rate": 100.0,
                                               "tests_per_hour": 1 / 10 * 3600})
    assert _summary(db) == pytest.approx({"test_count": 2, "test_pass_rate": 100.0,
                                          "tests_per_hour": 2 / 6 * 3600})
    assert len(records) == 1 + 3 + 2 + 3  # what the module docstring promises


def test_an_external_entity_is_never_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    document = (f'<?xml version="1.0"?>\n<!DOCTYPE testsuite [<!ENTITY xxe SYSTEM "{secret.as_uri()}">]>\n'
                '<testsuite name="s" timestamp="2026-11-01T10:00:00Z" hostname="n">'
                '<testcase classname="c" name="&xxe;" time="1"/></testsuite>').encode()
    records = _records(document, ".xml")
    assert len(records) == 1 and records[0][1].startswith(DTD_REFUSED)
    assert "TOP-SECRET" not in json.dumps(records)

    path = tmp_path / "xxe.xml"
    path.write_bytes(document)
    landing = tmp_path / "landing"
    report = ingest_files([path], landing, today=date(2026, 11, 28))
    assert report.records_read == report.unreadable_records == 1
    assert not any(b"TOP-SECRET" in f.read_bytes() for f in landing.rglob("*") if f.is_file())


def test_a_billion_laughs_is_one_rejected_record_never_expanded():
    started = time.perf_counter()
    records = _records(BILLION_LAUGHS, ".xml", defaults={"timestamp": "2026-11-01T12:00:00Z"})
    assert time.perf_counter() - started < 1.0
    assert len(records) == 1
    record, reason = records[0]
    assert reason.startswith(DTD_REFUSED)
    assert "lollollol" not in record["_raw"] and len(record["_raw"]) == len(BILLION_LAUGHS.decode())
    assert record["timestamp"] == "2026-11-01T12:00:00Z"


@pytest.mark.parametrize(("document", "reason"), [
    (b'<testsuite name="s"><testcase name="t" time="1">', "XML is malformed: no element found"),
    (b"<testsuite>\xff\xfe</testsuite>", "XML is malformed: not well-formed (invalid token)"),
    (b'<?xml version="1.0" encoding="klingon"?><testsuite/>', "XML is malformed: unknown encoding"),
    (b"<html><body/></html>", "XML root <html> is not JUnit <testsuites> or <testsuite>"),
])
def test_unreadable_xml_is_one_rejected_record_with_a_reason(document, reason):
    ((record, got),) = _records(document, ".xml")
    assert got.startswith(reason) and record["_rejected"] == got


# ------------------------------------------------------------------ JSON documents

def test_a_real_pytest_benchmark_report_gives_the_median_per_benchmark(reports):
    document = json.loads(reports["benchmark"].read_bytes())
    (benchmark,) = document["benchmarks"]
    (row,) = _rows(reports["benchmark"].read_bytes(), ".json")
    stats = benchmark["stats"]
    assert row["metric_name"] == "test_execution_time" and row["unit"] == "s"
    assert row["metric_value"] == stats["median"]
    assert row["test_name"] == benchmark["fullname"] == "test_tiny.py::test_sum_of_range"
    assert row["timestamp"] == document["datetime"]
    assert row["node_id"] == document["machine_info"]["node"]
    assert {name: row["context_data"][name] for name in ("mean", "stddev", "min", "max", "iqr", "rounds")} == {
        name: stats[name] for name in ("mean", "stddev", "min", "max", "iqr", "rounds")}
    assert row["context_data"]["rounds"] == 5
    assert "data" not in row["context_data"]  # every sample would bloat each row
    assert row["test_run_id"] == _rows(reports["benchmark"].read_bytes(), ".json")[0]["test_run_id"]
    assert row["test_run_id"].endswith(document["datetime"])


def test_benchmark_commit_group_and_params_are_kept_and_a_given_run_id_wins():
    document = {
        "machine_info": {"node": "perf-box"}, "datetime": "2026-11-01T10:00:00+00:00",
        "commit_info": {"id": "abc123", "branch": "main", "dirty": False},
        "benchmarks": [
            {"name": "test_parse[big]", "fullname": "tests/test_p.py::test_parse[big]",
             "group": "parse", "params": {"size": "big"}, "stats": {"median": 0.002, "rounds": 9}},
            {"name": "no stats"},
            "not a benchmark",
        ]}
    records = _records(json.dumps(document).encode(), ".json",
                       defaults={"test_run_id": "ci-77", "context_data": {"commit": "other", "ci": "x"}})
    (row, _), (_, no_stats), (_, not_object) = records
    assert row["context_data"] == {"source": "pytest-benchmark", "commit": "abc123", "branch": "main",
                                   "rounds": 9, "group": "parse", "params": {"size": "big"}, "ci": "x"}
    assert row["test_run_id"] == "ci-77"
    assert (no_stats, not_object) == ("benchmark has no stats object", "benchmark is not a JSON object")


@pytest.mark.parametrize("shape", ["array", "object", "metrics"])
def test_json_documents_of_metric_rows(shape):
    rows = [metric_row("2026-11-01T10:00:00Z", value=1.5), metric_row("2026-11-01T11:00:00Z", value=2.5)]
    document = {"array": rows, "object": rows[0], "metrics": {"metrics": rows}}[shape]
    expected = rows if shape != "object" else rows[:1]
    assert _rows(json.dumps(document).encode(), ".json") == expected


@pytest.mark.parametrize(("document", "reason"), [
    (b'[{"metric_name": ', "file is not valid JSON: Expecting value"),
    (b'"just text"', "JSON document is not an array of metric rows"),
    (b'{"metrics": {"a": 1}}', '"metrics" is not an array of metric rows'),
    (b'{"benchmarks": 3}', '"benchmarks" is not an array'),
    (b"\xff\xfe[]", "file is not valid UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON document is nested too deeply"),
])
def test_unreadable_json_documents_are_one_rejected_record(document, reason):
    ((record, got),) = _records(document, ".json")
    assert got.startswith(reason) and record["_rejected"] == got
    assert len(record["_raw"]) < 11_000  # a huge document is not copied whole into quarantine


# ------------------------------------------------------------------ defaults

def test_defaults_fill_what_each_format_lacks_and_a_records_own_values_win():
    defaults = {"node_id": "default-node", "timestamp": "2026-11-01T09:00:00Z", "test_type": "unit",
                "context_data": {"commit": "c0ffee", "branch": "main"}}
    bare = {"metric_name": "cpu_usage", "metric_value": 5}
    own = {**bare, "node_id": "own-node", "context_data": {"commit": "own"}}
    jsonl = (json.dumps(bare) + "\n" + json.dumps(own) + "\n").encode()
    csv = b"metric_name,metric_value,node_id\ncpu_usage,5,\ncpu_usage,5,own-node\n"
    junit = b'<testsuite name="s"><testcase classname="c" name="t" time="1"/></testsuite>'
    for data, suffix in ((jsonl, ".jsonl"), (csv, ".csv"), (json.dumps([bare, own]).encode(), ".json")):
        first, second = _rows(data, suffix, defaults)
        assert (first["node_id"], first["timestamp"], first["test_type"]) == (
            "default-node", "2026-11-01T09:00:00Z", "unit"), suffix
        assert first["context_data"] == {"commit": "c0ffee", "branch": "main"}, suffix
        assert second["node_id"] == "own-node", suffix
    assert _rows(jsonl, ".jsonl", defaults)[1]["context_data"] == {"commit": "own", "branch": "main"}

    rows = _rows(junit, ".xml", defaults)
    assert {(r["node_id"], r["timestamp"], r["context_data"]["commit"]) for r in rows} == {
        ("default-node", "2026-11-01T09:00:00Z", "c0ffee")}
    assert {r["test_run_id"] for r in rows} == {"junit:default-node:2026-11-01T09:00:00Z"}


def test_without_defaults_json_lines_pass_through_byte_for_byte():
    line = '{"metric_name":"cpu_usage",  "metric_value": 1e0, "node_id": "n"}'
    staged = stage_bytes((line + "\n").encode(), suffix=".jsonl", source_file="x.jsonl")
    assert list(staged["raw_line"]) == [line]
    with pytest.raises(ValueError, match="not a default field: metric_name"):
        stage_bytes(b"", suffix=".jsonl", source_file="x.jsonl", defaults={"metric_name": "x"})


# ------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_cli_ingest_then_the_pipeline_stores_every_row_and_quarantines_the_rest(
        paths, reports, tmp_path, capsys):
    from perf_pipeline.cli import main
    from perf_pipeline.defs.runner import run_pipeline

    surefire = tmp_path / "TEST-com.example.CartTest.xml"
    surefire.write_bytes(SUREFIRE.replace(b'time="0.25"', b'time="quarter"'))
    xxe = tmp_path / "evil.xml"
    xxe.write_bytes(b'<!DOCTYPE t [<!ENTITY x SYSTEM "file:///etc/passwd">]><testsuite>&x;</testsuite>')
    assert main(["ingest", str(reports["junit"]), str(reports["benchmark"]), str(surefire), str(xxe),
                 "--test-type", "unit", "--commit", "c0ffee", "--test-run-id", "ci-42",
                 "--node-id", "fallback-node"]) == 0
    printed = capsys.readouterr().out
    records_read = int(printed.split("ingested ")[1].split(" records")[0])
    run_pipeline(paths, progress=lambda _: None)

    with duckdb.connect(str(paths.database), read_only=True) as con:
        stored = con.execute(
            "SELECT metric_name, test_name, node_id, test_run_id, test_type, "
            "json_extract_string(context_data, '$.commit') FROM performance_metrics").fetchall()
        quarantined = con.execute(
            "SELECT reason, source_file FROM quarantined_metrics ORDER BY reason").fetchall()
    host = socket.gethostname()
    benchmark_node = json.loads(reports["benchmark"].read_bytes())["machine_info"]["node"]
    expected = sorted([
        *[("test_execution_time", f"test_tiny.py::{name}", host, "ci-42", "unit", "c0ffee")
          for name in ("test_passes", "test_fails", "test_errors", "TestGroup::test_method")],
        *[(metric, None, host, "ci-42", "unit", "c0ffee")
          for metric in ("test_count", "test_pass_rate", "tests_per_hour")],
        ("test_execution_time", "test_tiny.py::test_sum_of_range", benchmark_node, "ci-42", "unit", "c0ffee"),
        *[("test_execution_time", f"com.example.CartTest.{name}", "build-07", "ci-42", "unit", "c0ffee")
          for name in ("addsItem", "checksOut", "isFlaky")],
        *[(metric, None, "build-07", "ci-42", "unit", "c0ffee")
          for metric in ("test_count", "test_pass_rate", "tests_per_hour")],
    ], key=repr)
    assert sorted(stored, key=repr) == expected
    assert [reason for reason, _ in quarantined] == [
        DTD_REFUSED + ": entities are never expanded and external ones never fetched",
        "testcase time 'quarter' is not a number of seconds"]
    assert records_read == len(stored) + len(quarantined) == 16


def test_cli_options_and_the_ci_environment_become_defaults(paths, tmp_path, monkeypatch, capsys):
    from perf_pipeline.cli import main

    for name in ("PERF_TEST_RUN_ID", "PERF_CI_JOB_ID", "PERF_COMMIT", "PERF_NODE_ID", "PERF_NODE_TYPE",
                 "GITHUB_HEAD_REF"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"GITHUB_ACTIONS": "true", "GITHUB_RUN_ID": "99", "GITHUB_RUN_ATTEMPT": "2",
                        "GITHUB_JOB": "tests", "GITHUB_SHA": "abc123", "GITHUB_REF_NAME": "main",
                        "RUNNER_NAME": "runner-1"}.items():
        monkeypatch.setenv(name, value)
    report = tmp_path / "report.xml"
    report.write_bytes(b'<testsuite name="s"><testcase classname="c" name="t" time="1"/></testsuite>')
    assert main(["ingest", str(report), "--from-ci-env", "--node-id", "explicit-node",
                 "--timestamp", "2026-11-01T10:00:00"]) == 0
    (landed,) = paths.landing.glob("2026-11-01/*.jsonl")
    rows = [json.loads(line) for line in landed.read_text().splitlines()]
    assert {(r["node_id"], r["test_run_id"], r["ci_job_id"], r["timestamp"], r["context_data"]["commit"],
             r["context_data"]["branch"]) for r in rows} == {
        ("explicit-node", "github-99-2-tests", "99/tests", "2026-11-01T10:00:00+00:00", "abc123", "main")}

    assert main(["ingest", str(report), "--timestamp", "yesterday"]) == 2
    assert "--timestamp must be an ISO time" in capsys.readouterr().err


def test_every_format_is_listed_for_folder_scans(tmp_path):
    from perf_pipeline.cli import UsageError, _input_files

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match=r"no metric files \(\.csv, \.json, \.jsonl, \.ndjson, \.xml\)"):
        _input_files([str(tmp_path)])
    (tmp_path / "report.xml").write_bytes(SUREFIRE)
    assert _input_files([str(tmp_path)]) == [tmp_path / "report.xml"]
    assert set(PARSERS) == {".csv", ".json", ".jsonl", ".ndjson", ".xml"}


def test_a_csv_the_reader_cannot_finish_keeps_the_rest_in_its_rejected_record():
    rest = (f'2026-11-01T11:00:00Z,cpu_usage,{"9" * 200_000},node-01\n'
            "2026-11-01T12:00:00Z,cpu_usage,6,node-01\n")
    document = ("timestamp,metric_name,metric_value,node_id\n"
                "2026-11-01T10:00:00Z,cpu_usage,5,node-01\n" + rest).encode()
    staged = stage_bytes(document, suffix=".csv", source_file="big.csv")
    assert list(staged["source_line"]) == [2, 3]
    reason = staged["pre_reason"][1]
    assert reason.startswith("CSV is malformed: field larger than field limit")
    raw = json.loads(staged["raw_line"][1])["_raw"]
    assert raw == f"{rest[:MAX_DOCUMENT_ECHO]}… ({len(rest):,} characters in all)"

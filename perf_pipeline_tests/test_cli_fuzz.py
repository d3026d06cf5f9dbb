"""`perf-pipeline` fuzzed in-process against a real warehouse: random and malformed command
lines (unknown options, missing values, odd Unicode, NUL bytes, huge strings, NaN and huge
numbers, far dates, missing paths, SQL injection in every filter) never raise, exit 0, 1 or
2 with one error line and no traceback, and change nothing in DuckDB but what a valid alert
id asks for."""

import contextlib
import io
import warnings
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perf_pipeline.cli import main
from perf_pipeline.config import load_monitoring
from perf_pipeline.storage.warehouse import FILTER_COLUMNS
from perf_pipeline_tests.conftest import materialized_fleet

END = datetime(2026, 11, 20, tzinfo=timezone.utc)
INJECTIONS = ("' OR 1=1 --", "x'); DROP TABLE performance_metrics; --", "%", "_", "\\",
              "'; UPDATE regression_alerts SET status = 'resolved'; --", '" OR ""="', "*",
              "1 OR 1=1", "$run_id", "?", "'||(SELECT count(*) FROM regression_alerts)||'")
ODD_TEXT = ("", " ", "\x00", "a\x00b", "line\nbreak", "\r\n", "\x1b[31mred", "\u202egnp.txt",
            "\ufeff", "\udcff", "a\udc80b", "🦆" * 3, "é" * 50_000, "x" * 100_000)
NUMBERS = ("-1", "0", "1", "nan", "NaN", "inf", "-inf", "1e308", "-1e-320", "99999999999999999999",
           "-99999999999999999999", "0x10", "1_000", "½", "٣", "")
DATES = ("0001-01-01", "9999-12-31", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00",
         "1970-01-01T00:00:00Z", "2026-02-30", "10000-01-01", "yesterday", "2026-12-31")
# Tables the CLI must never change (fuzzed ingests only write landing files).
WATCHED = ("performance_metrics", "quarantined_metrics", "normalized_timeseries", "ingested_files",
           "alert_deliveries", "node_performance_scores", "node_health_risk", "trend_stats")
# What must never start inside the fuzz loop: servers, agents, pipeline runs, simulations.
LONG_RUNNING = {"run", "demo", "serve", "dashboard", "agent", "simulate"}
STATUS_OF_ACTION = {"ack": "acknowledged", "resolve": "resolved", "invalid": "invalid"}


class Fleet:
    """The warehouse under test, the values it holds, and the alert statuses expected."""

    def __init__(self, home: Path, scratch: Path) -> None:
        self.home = home
        self.database = home / "perf.duckdb"
        self.scratch = scratch
        with duckdb.connect(str(self.database), read_only=True) as con:
            def column(sql: str) -> list[str]:
                return [row[0] for row in con.execute(sql).fetchall()]

            self.run_ids = column("SELECT DISTINCT test_run_id FROM normalized_timeseries "
                                  "WHERE test_run_id IS NOT NULL ORDER BY 1 DESC LIMIT 3")
            self.job_ids = column("SELECT DISTINCT ci_job_id FROM normalized_timeseries "
                                  "WHERE ci_job_id IS NOT NULL ORDER BY 1 DESC LIMIT 2")
            self.node_types = column("SELECT DISTINCT node_type FROM performance_metrics ORDER BY 1")
            self.metrics = column("SELECT DISTINCT metric_name FROM performance_metrics ORDER BY 1")
            self.test_types = column("SELECT DISTINCT test_type FROM performance_metrics "
                                     "WHERE test_type IS NOT NULL ORDER BY 1")
            self.statuses = dict(con.execute("SELECT alert_id, status FROM regression_alerts").fetchall())
        self.alert_ids = sorted(self.statuses)
        self.tiny = scratch / "tiny.jsonl"
        self.tiny.write_text('{"metric_name": "cpu_usage", "metric_value": 1.0}\n')
        self.initial = self.fingerprint(full=True)

    def fingerprint(self, *, full: bool = False) -> dict:
        """Row counts of the watched tables (with a hash of every row when `full`), and each
        alert with a hash of what no status change may touch."""
        with duckdb.connect(str(self.database), read_only=True) as con:
            summary = "SELECT count(*), sum(hash(t)::HUGEINT) FROM t" if full else "SELECT count(*) FROM t"
            tables = {name: con.table(name).query("t", summary).fetchall()[0] for name in WATCHED}
            # everything but the columns a status change by hand may touch
            alerts = con.execute("""
                SELECT alert_id, hash(COLUMNS(* EXCLUDE (status, status_note, updated_at, resolved_at)))
                FROM regression_alerts ORDER BY alert_id""").fetchall()
            statuses = dict(con.execute("SELECT alert_id, status FROM regression_alerts").fetchall())
        return {"tables": tables, "alerts": alerts, "statuses": statuses}

    def check_unchanged(self, *, full: bool = False) -> None:
        now = self.fingerprint(full=full)
        initial = self.initial["tables"]
        assert now["tables"] == (initial if full else {name: row[:1] for name, row in initial.items()})
        assert now["alerts"] == self.initial["alerts"]
        assert now["statuses"] == self.statuses


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_fuzz")
    paths = materialized_fleet(root, end=END, days=6, nodes=5, tests=5, runs_per_day=3)
    (root / "scratch").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PERF_PIPELINE_HOME", str(paths.home))
        for name in ("PERF_PIPELINE_DATABASE", "DAGSTER_HOME", "PERF_API_TOKEN", "PERF_ADMIN_TOKEN"):
            patch.delenv(name, raising=False)
        # A command that got past validation into a server or an agent loop would hang the
        # suite: fail it at once instead.
        patch.setattr("perf_pipeline.server.app.serve", _must_not_start)
        patch.setattr("perf_pipeline.collect.agent.Agent", _must_not_start)
        yield Fleet(paths.home, root / "scratch")


def _must_not_start(*args, **kwargs):
    raise AssertionError("a fuzzed command line started a long-running process")


def invoke(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) as the console script runs it: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            status = main(argv)
        except SystemExit as exit_:  # argparse's answer to a malformed command line
            asked_for_help = exit_.code == 0 and {"-h", "--help"} & set(argv)
            assert exit_.code == 2 or asked_for_help, (argv, exit_.code, err.getvalue())
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


def check_answer(argv: list[str], status: int, out: str, err: str) -> None:
    assert status in (0, 1, 2), (argv, status, err)
    assert "Traceback" not in err and "Traceback" not in out, (argv, err)
    if status == 0:
        assert "error:" not in err, (argv, err)
        return
    if status == 1 and argv[:1] == ["gate"] and not err and "significant regression(s) in" in out:
        return  # the gate's verdict, not an error: a job of the fleet's injected step regressed
    lines = err.splitlines()
    errors = [line for line in lines if ": error: " in line]
    # one error line, last; argparse puts its usage (option names, never values) before it
    assert len(errors) == 1 and lines[-1] == errors[0], (argv, err)
    assert errors[0].startswith("perf-pipeline"), (argv, err)
    assert all(line.startswith(("usage:", " ")) for line in lines[:-1]), (argv, err)


def run_checked(fleet: Fleet, argv: list[str]) -> tuple[int, str, str]:
    status, out, err = invoke(argv)
    check_answer(argv, status, out, err)
    if (status == 0 and len(argv) > 2 and argv[0] == "alerts" and argv[1] in STATUS_OF_ACTION
            and argv[2] in fleet.statuses):
        fleet.statuses[argv[2]] = STATUS_OF_ACTION[argv[1]]
    return status, out, err


# ---------------------------------------------------------------- the command-line grammar

ANY_TEXT = st.one_of(st.sampled_from(INJECTIONS), st.sampled_from(ODD_TEXT),
                     st.text(max_size=30), st.sampled_from(NUMBERS), st.sampled_from(DATES))


@st.composite
def values(draw, *, valid: list[str] | tuple[str, ...] = ()) -> str:
    choices = [ANY_TEXT] + ([st.sampled_from(list(valid))] if valid else [])
    return draw(st.one_of(*choices))


@st.composite
def options(draw, spec: dict) -> list[str]:
    """Some of `spec`'s options (name → strategy of values, or None for a flag), in any
    order, sometimes repeated, an unknown one, or one left without its value."""
    chosen = draw(st.lists(st.sampled_from(sorted(spec)), max_size=5))
    argv: list[str] = []
    for name in chosen:
        argv.append(name)
        if spec[name] is not None:
            argv.append(draw(spec[name]))
    if draw(st.integers(0, 9)) == 0:
        argv.append(draw(st.sampled_from(["--bogus", "--bogus=1", "-", "--", "-x", "--run-id="])))
    if chosen and spec[chosen[-1]] is not None and draw(st.integers(0, 9)) == 0:
        argv.pop()  # a missing value
    return argv


def command_lines(fleet: Fleet) -> st.SearchStrategy[list[str]]:
    number = st.one_of(st.sampled_from(NUMBERS), st.integers(-10**6, 10**6).map(str))
    path = st.sampled_from([str(fleet.scratch / "missing.jsonl"), str(fleet.scratch / "missing"),
                            "", "\x00", "nul\x00.jsonl", str(fleet.scratch / "x" / ".." / "tiny.jsonl")])
    ingest = st.tuples(
        st.lists(st.one_of(path, st.just(str(fleet.tiny))), min_size=0, max_size=2),
        options({**{name: values() for name in (
            "--node-id", "--node-type", "--test-type", "--test-run-id", "--ci-job-id", "--commit",
            "--branch")}, "--timestamp": st.one_of(st.sampled_from(DATES), values()),
            "--from-ci-env": None}),
    ).map(lambda parts: ["ingest", *parts[0], *parts[1]])
    gate = options({
        "--run-id": values(valid=fleet.run_ids), "--ci-job-id": values(valid=fleet.job_ids),
        "--node-type": values(valid=fleet.node_types), "--metric": values(valid=fleet.metrics),
        "--baseline-days": number, "--baseline-runs": number, "--min-baseline-runs": number,
        "--threshold-percent": number, "--alpha": number,
        "--junit-xml": st.sampled_from([str(fleet.scratch / "gate.xml"),
                                        str(fleet.scratch / "missing" / "gate.xml"), ""]),
        # only paths that do not exist: an existing one would run the pipeline
        "--ingest": st.sampled_from([str(fleet.scratch / "missing"), "", "\x00"]),
    }).map(lambda argv: ["gate", *argv])
    select = options({"--test-type": values(valid=fleet.test_types), "-k": number,
                             "--max-risk": number, "--json": None}).map(lambda a: ["select-nodes", *a])
    listing = options({"--status": values(valid=("new", "acknowledged", "invalid", "resolved")),
                              "--limit": number, "--json": None}).map(lambda a: ["alerts", "list", *a])
    change = st.tuples(st.sampled_from(sorted(STATUS_OF_ACTION)), values(valid=fleet.alert_ids),
                       options({"--note": values()})
                       ).map(lambda p: ["alerts", p[0], p[1], *p[2]])
    mute = options({"--test": values(), "--node": values(), "--metric": values(valid=fleet.metrics),
                           "--until": st.one_of(st.sampled_from(DATES), values()),
                           "--reason": values()}).map(lambda a: ["alerts", "mute", *a])
    noise = st.lists(st.one_of(ANY_TEXT, st.sampled_from(["alerts", "gate", "--help", "-h", "list"])),
                     max_size=4).filter(lambda argv: not (LONG_RUNNING | {"--help", "-h"}) & set(argv))
    return st.one_of(ingest, gate, select, listing, change, mute, noise)


# ------------------------------------------------------------------------------------ tests

def test_malformed_command_lines_get_an_answer_and_change_nothing(fleet, fault_tally):
    """The command lines mix in the fleet's own values (run ids, alert ids), so the strategy
    is built once the module's warehouse exists, inside the test."""
    strategy = command_lines(fleet)
    tried = []

    @settings(max_examples=120, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(argv=strategy)
    def fuzz(argv: list[str]) -> None:
        tried.append(argv)
        run_checked(fleet, argv)
        fleet.check_unchanged()

    fuzz()
    fault_tally.add("cli invocations fuzzed", len(tried))
    fault_tally.add("injection attempts", sum(any(v in INJECTIONS for v in argv) for argv in tried))
    assert len(tried) >= 80


VALUE, RUN = object(), object()  # where the injected text and a real run id go
FILTERS = (
    ["gate", "--run-id", VALUE], ["gate", "--ci-job-id", VALUE],
    ["gate", "--run-id", RUN, "--node-type", VALUE], ["gate", "--run-id", RUN, "--metric", VALUE],
    ["select-nodes", "--test-type", VALUE], ["alerts", "list", "--status", VALUE],
    ["alerts", "ack", VALUE], ["alerts", "resolve", VALUE, "--note", VALUE], ["alerts", "invalid", VALUE],
    ["alerts", "mute", "--test", VALUE, "--until", "2026-12-31"],
    ["alerts", "mute", "--node", VALUE, "--until", "2026-12-31"],
    ["alerts", "mute", "--metric", VALUE, "--until", "2026-12-31"],
    ["alerts", "mute", "--test", "x", "--until", VALUE],
)


def test_sql_injection_in_every_filter_matches_nothing_and_changes_nothing(fleet, fault_tally):
    run = fleet.run_ids[0]
    mutes_before = len(load_monitoring(fleet.home / "perf_pipeline.yaml").mutes)
    muted = 0
    for value in INJECTIONS:
        for template in FILTERS:
            argv = [value if part is VALUE else run if part is RUN else part for part in template]
            status, out, err = run_checked(fleet, argv)
            fault_tally.add("injection attempts")
            if argv[:2] == ["alerts", "mute"]:
                muted += status == 0
                continue
            # matching nothing: no alert by that id, no such run, node type, metric or test type
            assert status == 2, (argv, status, out, err)
    fleet.check_unchanged(full=True)
    # a mute stores the text as given: a pattern for fnmatch, never SQL
    mutes = load_monitoring(fleet.home / "perf_pipeline.yaml").mutes
    assert muted == 2 * len(INJECTIONS) and len(mutes) == mutes_before + muted
    assert {m.test for m in mutes} >= set(INJECTIONS) and {m.node for m in mutes} >= set(INJECTIONS)


def test_a_valid_alert_id_changes_that_alert_only(fleet):
    alert_id = fleet.alert_ids[0]
    status, out, _ = run_checked(fleet, ["alerts", "ack", alert_id, "--note", INJECTIONS[1]])
    assert status == 0 and out.strip() == f"alert {alert_id}: acknowledged"
    assert fleet.statuses[alert_id] == "acknowledged"
    fleet.check_unchanged()
    with duckdb.connect(str(fleet.database), read_only=True) as con:
        (note,) = con.execute("SELECT status_note FROM regression_alerts WHERE alert_id = ?",
                              [alert_id]).fetchall()[0]
    assert note == INJECTIONS[1]


@pytest.mark.parametrize("argv, message", [
    (["alerts", "list", "--limit", "-1"], "--limit must be from 1"),
    (["alerts", "list", "--limit", "99999999999999999999"], "--limit must be from 1"),
    (["alerts", "ack", "\udcff"], "not valid UTF-8"),
    (["gate", "--run-id", "\udcff"], "not valid UTF-8"),
    (["gate", "--run-id", "a\nb"], r"no measurements of run a\nb"),
    (["gate", "--run-id", "x", "--baseline-days", "99999999999999999"], "--baseline-days must be at most"),
    (["select-nodes", "--max-risk", "nan"], "--max-risk must be a number from 0 to 100"),
    (["alerts", "mute", "--test", "x", "--until", "0001-01-01T00:00:00+14:00"], "until is out of range"),
    (["ingest", "a\x1b[2Jb"], r"a\x1b[2Jb: no such file or folder"),
    (["ingest", ""], "an empty path names no file or folder"),
    (["gate", "--run-id", "x", "--ingest", ""], "an empty path names no file or folder"),
    (["bogus\nline"], r"invalid choice: 'bogus\nline'"),
    (["alerts", "list", "--x\ny"], r"unrecognized arguments: --x\ny"),
])
def test_what_the_fuzzing_found_is_answered_in_one_line(fleet, argv, message):
    status, _, err = run_checked(fleet, argv)
    assert status == 2 and message in err.splitlines()[-1], err


def test_a_mute_with_an_offset_is_stored_in_utc(fleet):
    status, out, _ = run_checked(fleet, ["alerts", "mute", "--node", "node-tz", "--until",
                                         "2027-01-01T10:00:00+05:00"])
    assert status == 0 and "muted until 2027-01-01 05:00" in out
    (mute,) = [m for m in load_monitoring(fleet.home / "perf_pipeline.yaml").mutes if m.node == "node-tz"]
    assert not mute.active(datetime(2027, 1, 1, 6)) and mute.active(datetime(2027, 1, 1, 4))


def test_a_mute_written_with_an_offset_in_the_yaml_ends_at_that_instant():
    from perf_pipeline.config import Mute

    mute = Mute(node="n", until="2027-01-01T10:00:00+05:00")
    assert not mute.active(datetime(2027, 1, 1, 6)) and mute.active(datetime(2027, 1, 1, 4))


@pytest.mark.parametrize("argv", [
    ["serve", "--port", "-1", "--no-auth"], ["serve", "--port", "99999", "--no-auth"],
    ["serve", "--port", "0", "--no-auth"], ["dashboard", "--max-body-mb", "nan", "--no-auth"],
    ["dashboard", "--max-body-mb", "inf", "--no-auth"], ["serve", "--max-body-mb", "-1", "--no-auth"],
    ["serve", "--host", "0.0.0.0", "--no-auth"], ["serve"], ["serve", "--port"],
    ["run", "--day", "2026-13-01"], ["run", "--day", "99999-01-01"], ["run", "--day", "\x00"],
    ["run", "--window-days", "x"], ["demo", "--days", "0"], ["demo", "--nodes", "nan"],
    ["simulate", "--out", "", "--days", "-5"], ["simulate", "--days", "1"],
    ["simulate", "--out", "/nonexistent", "--end", "9999-99-99"],
    ["agent"], ["agent", "--push", "http://127.0.0.1:9", "--count", "0"],
    ["agent", "--push", "http://127.0.0.1:9", "--spool-max-mb", "inf"],
    ["agent", "--push", "http://127.0.0.1:9", "--spool-max-mb", "nan"],
])
def test_long_running_commands_refuse_bad_arguments_at_once(fleet, fault_tally, argv):
    status, _, err = run_checked(fleet, argv)
    assert status == 2, err
    fault_tally.add("cli invocations fuzzed")


def test_a_database_that_is_not_duckdb_is_one_line_and_exit_1(tmp_path, monkeypatch):
    monkeypatch.setenv("PERF_PIPELINE_HOME", str(tmp_path))
    monkeypatch.delenv("PERF_PIPELINE_DATABASE", raising=False)
    (tmp_path / "perf.duckdb").write_text("not a database")
    for argv in (["alerts", "list"], ["alerts", "ack", "x"], ["select-nodes"]):
        status, _, err = invoke(argv)
        check_answer(argv, status, "", err)
        assert status == 1 and "not a valid DuckDB database file" in err


HOSTILE = set(INJECTIONS) | set(ODD_TEXT)
FILTER_KEYS = st.one_of(st.sampled_from(FILTER_COLUMNS), st.sampled_from(INJECTIONS),
                       st.sampled_from(("test_name; DROP TABLE x", "node_id OR 1=1", "1", "")))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(test_filter=st.dictionaries(FILTER_KEYS, st.one_of(
    ANY_TEXT, st.lists(st.sampled_from(INJECTIONS), min_size=1, max_size=3)), max_size=3))
def test_the_python_clients_test_filter_keys_and_values_never_reach_sql(fleet, fault_tally, test_filter):
    """`test_filter` of get_performance_trends and get_node_performance_comparison (the
    seed's public API, local mode): an unknown key or a value that is no text is a
    ValueError naming it; anything else is bound as a value and matches nothing hostile."""
    from perf_pipeline.client import PerformanceTrends

    client = PerformanceTrends(database=fleet.database)
    known_keys = all(key in FILTER_COLUMNS for key in test_filter)
    sent = [v for value in test_filter.values() for v in ([value] if isinstance(value, str) else value)]
    hostile = bool(test_filter) and all(v in HOSTILE and "*" not in v for v in sent)
    for ask in (lambda: client.get_performance_trends("test_execution_time", 7, test_filter),
                lambda: client.get_node_performance_comparison("cpu_usage", test_filter)):
        try:
            answer = ask()
        except ValueError as error:  # the client's own validation, never DuckDB's
            assert not isinstance(error, duckdb.Error)
            assert str(error).startswith(("cannot filter on", "filter ")), error
            continue
        assert known_keys, f"an unknown filter key was accepted: {test_filter}"
        if hostile:  # bound as plain values: no test, node or type has these names
            assert (answer["n_points"] if isinstance(answer, dict) else len(answer)) == 0
    fault_tally.add("test_filter injection attempts")


def test_nothing_the_fuzzing_ran_changed_the_warehouse(fleet):
    fleet.check_unchanged(full=True)

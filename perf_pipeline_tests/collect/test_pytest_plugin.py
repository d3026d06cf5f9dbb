"""The pytest plugin, run as users run it: `python -m pytest --perf-collect=...` in a subprocess
on a small sample suite, with the rows it wrote loaded by the real pipeline or received over
real HTTP on loopback."""

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from perf_pipeline.cli import main
from perf_pipeline.collect.pytest_plugin import PUSH_BATCH_ROWS, write_new
from perf_pipeline.defs.runner import run_pipeline
from perf_pipeline_tests.conftest import free_port, inner_pytest_env
from perf_pipeline_tests.collect.test_agent import RawReply

SAMPLE_SUITE = {
    "pytest.ini": "[pytest]\nmarkers =\n    smoke: quick checks\n",
    "test_sample.py": '''
import time

import pytest


def test_passes():
    assert 1 + 1 == 2


def test_fails():
    assert 1 + 1 == 3


@pytest.mark.skip(reason="not today")
def test_skipped():
    pass


@pytest.mark.xfail(reason="known bug")
def test_xfails():
    raise RuntimeError("known bug")


@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")


def test_fixture_error(broken):
    pass


def test_allocates_50_mb():
    block = bytearray(50 * 1024 * 1024)
    block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
    assert block[4096] == ord("x")


def test_burns_cpu():
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
''',
    "integration/test_service.py": '''
import pytest


@pytest.mark.smoke
def test_marked_smoke():
    pass


def test_in_integration_folder():
    pass
''',
}
OUTCOMES = {
    "test_sample.py::test_passes": "passed",
    "test_sample.py::test_fails": "failed",
    "test_sample.py::test_skipped": "skipped",
    "test_sample.py::test_xfails": "xfailed",
    "test_sample.py::test_fixture_error": "error",
    "test_sample.py::test_allocates_50_mb": "passed",
    "test_sample.py::test_burns_cpu": "passed",
    "integration/test_service.py::test_marked_smoke": "passed",
    "integration/test_service.py::test_in_integration_folder": "passed",
}
GITHUB = {"GITHUB_ACTIONS": "true", "GITHUB_RUN_ID": "4242", "GITHUB_RUN_ATTEMPT": "2",
          "GITHUB_JOB": "tests", "GITHUB_SHA": "0123456789abcdef0123456789abcdef01234567",
          "GITHUB_REF_NAME": "main", "RUNNER_NAME": "runner-7"}
RUN_ID = "github-4242-2-tests"


def write_suite(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def passing_suite(folder: Path) -> Path:
    return write_suite(folder, {"pytest.ini": "[pytest]\n",
                                "test_ok.py": "def test_ok():\n    assert True\n"})


def run_suite(suite: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m pytest` on `suite`, in a CI environment that is GitHub's plus `env`."""
    environment = inner_pytest_env(**GITHUB, **env)
    return subprocess.run([sys.executable, "-m", "pytest", str(suite), *args,
                           "-p", "no:cacheprovider"],
                          cwd=suite, env=environment, capture_output=True, text=True, timeout=300)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_test(rows: list[dict]) -> dict[tuple[str, str], float]:
    return {(row["test_name"], row["metric_name"]): row["metric_value"]
            for row in rows if row.get("test_name")}


def session_values(rows: list[dict]) -> dict[str, float]:
    return {row["metric_name"]: row["metric_value"] for row in rows if not row.get("test_name")}


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The sample suite run once with --perf-collect=<folder>: the run and its one file."""
    suite = write_suite(tmp_path_factory.mktemp("suite"), SAMPLE_SUITE)
    out = tmp_path_factory.mktemp("collected")
    done = run_suite(suite, f"--perf-collect={out}")
    files = list(out.iterdir())
    assert [f.name for f in files] == [f"pytest-{RUN_ID}.jsonl"], (done.stdout, done.stderr)
    return done, files[0]


def test_every_executed_test_gets_its_timings_cpu_and_memory(collected):
    done, path = collected
    assert done.returncode == 1  # one test fails: the plugin leaves the exit status alone
    rows = read_rows(path)
    assert f"perf-collect: {len(rows)} rows written to {path}" in done.stdout
    values = by_test(rows)
    tests = {row["test_name"] for row in rows if row.get("test_name")}
    assert tests == set(OUTCOMES) - {"test_sample.py::test_skipped"}
    for test in tests:
        assert {metric for name, metric in values if name == test} >= {
            "test_setup_time", "test_teardown_time", "test_cpu_time", "test_peak_memory"}
        has_call = test != "test_sample.py::test_fixture_error"  # its setup failed
        assert ((test, "test_execution_time") in values) is has_call
    assert values["test_sample.py::test_burns_cpu", "test_cpu_time"] >= 0.2
    assert values["test_sample.py::test_burns_cpu", "test_execution_time"] >= 0.2
    assert values["test_sample.py::test_passes", "test_cpu_time"] < 0.2
    peaks = {test: values[test, "test_peak_memory"] for test in tests}
    allocating = peaks.pop("test_sample.py::test_allocates_50_mb")
    assert allocating > max(peaks.values()) + 40  # 50 MiB is 52 MB
    for row in rows:
        assert row["timestamp"].endswith("Z")
        assert row["test_run_id"] == RUN_ID and row["ci_job_id"] == "4242/tests"
        assert row["node_id"] == "runner-7"
        assert row["context_data"]["commit"] == GITHUB["GITHUB_SHA"]
        assert row["context_data"]["branch"] == "main"
        assert row["context_data"]["ci_provider"] == "github"


def test_rows_carry_outcome_file_markers_and_test_type(collected):
    rows = read_rows(collected[1])
    per_test = {row["test_name"]: row for row in rows if row.get("test_name")}
    for test, row in per_test.items():
        assert row["context_data"]["outcome"] == OUTCOMES[test]
        assert row["context_data"]["file"] == test.split("::")[0]
    assert per_test["test_sample.py::test_xfails"]["context_data"]["markers"] == ["xfail"]
    types = {test: row["test_type"] for test, row in per_test.items()}
    assert types.pop("integration/test_service.py::test_marked_smoke") == "smoke"  # marker first
    assert types.pop("integration/test_service.py::test_in_integration_folder") == "integration"
    assert set(types.values()) == {"unit"}
    # a test's rows are stamped with its start: within one file, in definition order
    starts = [per_test[test]["timestamp"] for test in OUTCOMES
              if test in per_test and test.startswith("test_sample.py")]
    assert sorted(starts) == starts and len(set(starts)) == len(starts)


def test_session_rows_count_the_run(collected):
    rows = read_rows(collected[1])
    session = session_values(rows)
    assert set(session) == {"test_count", "tests_per_hour", "test_pass_rate",
                            "test_failure_rate", "parallel_tests"}
    assert session["test_count"] == 9 and session["parallel_tests"] == 1
    assert session["test_failure_rate"] == pytest.approx(100 * 2 / 8)  # failed + error of 8 run
    assert session["test_pass_rate"] == pytest.approx(100 * 6 / 8)
    (context,) = {json.dumps(row["context_data"], sort_keys=True)
                  for row in rows if not row.get("test_name")}
    context = json.loads(context)
    assert context["outcomes"] == {"passed": 5, "failed": 1, "skipped": 1, "xfailed": 1, "error": 1}
    assert session["tests_per_hour"] == pytest.approx(8 / context["wall_time_s"] * 3600, rel=0.01)
    assert context["exit_status"] == 1


@pytest.mark.slow
def test_collected_rows_load_through_the_pipeline_without_quarantine(collected, paths):
    rows = read_rows(collected[1])
    assert main(["ingest", str(collected[1].parent)]) == 0
    run_pipeline(paths, progress=lambda _: None)
    with duckdb.connect(str(paths.database), read_only=True) as con:
        stored = con.execute("SELECT count(*), count(DISTINCT test_name) FROM performance_metrics "
                             "WHERE test_run_id = ?", [RUN_ID]).fetchone()
        quarantined = con.execute("SELECT count(*) FROM quarantined_metrics").fetchone()[0]
    assert stored == (len(rows), 8) and quarantined == 0


def test_xdist_workers_measure_and_the_controller_writes(tmp_path):
    suite = write_suite(tmp_path / "suite", SAMPLE_SUITE)
    done = run_suite(suite, "-n", "2", f"--perf-collect={tmp_path / 'out'}",
                     f"--junitxml={tmp_path / 'junit.xml'}")
    assert done.returncode == 1, done.stdout[-3000:]
    (path,) = (tmp_path / "out").iterdir()
    rows = read_rows(path)
    values = by_test(rows)
    assert values["test_sample.py::test_burns_cpu", "test_cpu_time"] >= 0.2
    peaks = {test: value for (test, metric), value in values.items() if metric == "test_peak_memory"}
    allocating = peaks.pop("test_sample.py::test_allocates_50_mb")
    assert len(peaks) == 7 and allocating > max(peaks.values()) + 40
    assert session_values(rows)["parallel_tests"] == 2
    assert session_values(rows)["test_count"] == 9
    assert "perf_pipeline" not in (tmp_path / "junit.xml").read_text()  # not a user property


def test_a_run_started_from_an_xdist_worker_is_a_run_of_its_own(tmp_path):
    """A test of an xdist run that starts pytest passes on the worker's environment: the
    inner run is not a worker, measures and writes its rows."""
    suite = passing_suite(tmp_path / "suite")
    done = run_suite(suite, f"--perf-collect={tmp_path / 'out'}", PYTEST_XDIST_WORKER="gw1",
                     PYTEST_XDIST_WORKER_COUNT="2", PYTEST_XDIST_TESTRUNUID="outer")
    assert done.returncode == 0 and "perf-collect: 10 rows written" in done.stdout, done.stdout[-3000:]
    (path,) = (tmp_path / "out").iterdir()
    assert session_values(read_rows(path))["test_count"] == 1


def test_url_mode_pushes_rows_with_the_bearer_token(tmp_path, receiver):
    receiver.reply(200, json.dumps({"accepted": 10, "rejected": []}).encode())
    suite = passing_suite(tmp_path / "suite")
    url = f"http://127.0.0.1:{receiver.port}"
    done = run_suite(suite, f"--perf-collect={url}", "--perf-test-type=e2e",
                     "--perf-node-type=linux-large", PERF_API_TOKEN="s3cret")
    assert done.returncode == 0, done.stdout[-3000:]
    (request,) = receiver.requests
    assert request["path"] == "/api/v1/metrics"
    assert request["headers"]["Authorization"] == "Bearer s3cret"
    assert request["headers"]["Content-Type"] == "application/x-ndjson"
    rows = [json.loads(line) for line in request["body"].decode().splitlines()]
    assert len(rows) == 10 and f"perf-collect: 10 rows pushed to {url}" in done.stdout
    test_rows = [row for row in rows if row.get("test_name")]
    assert {row["test_type"] for row in test_rows} == {"e2e"}
    assert {row["node_type"] for row in rows} == {"linux-large"}
    assert not (suite / ".perf-collect-unsent").exists()


def test_rows_the_gateway_rejects_go_to_the_fallback_folder(tmp_path, receiver):
    receiver.reply(200, json.dumps({"accepted": 9, "rejected": [
        {"line": 2, "reason": "timestamp is more than 1 day ahead"}]}).encode())
    suite = passing_suite(tmp_path / "suite")
    done = run_suite(suite, f"--perf-collect=http://127.0.0.1:{receiver.port}/")
    assert done.returncode == 0
    sent = [json.loads(line) for line in receiver.requests[0]["body"].decode().splitlines()]
    (kept,) = (suite / ".perf-collect-unsent").iterdir()
    assert read_rows(kept) == [sent[1]]
    assert "rejected 1 (first: timestamp is more than 1 day ahead)" in done.stdout
    assert f"1 unsent rows written to {kept}" in done.stdout


@pytest.mark.parametrize("failing", [True, False], ids=["failing-suite", "passing-suite"])
def test_a_gateway_that_is_down_changes_nothing_and_the_rows_are_kept(tmp_path, failing):
    suite = (write_suite(tmp_path / "suite", SAMPLE_SUITE) if failing
             else passing_suite(tmp_path / "suite"))
    fallback = tmp_path / "unsent"
    done = run_suite(suite, f"--perf-collect=http://127.0.0.1:{free_port()}",
                     f"--perf-collect-fallback={fallback}")
    assert done.returncode == (1 if failing else 0), done.stdout[-3000:]
    assert "INTERNALERROR" not in done.stdout + done.stderr
    (kept,) = fallback.iterdir()
    rows = read_rows(kept)
    assert session_values(rows)["test_count"] == (9 if failing else 1)
    assert "gateway unreachable" in done.stdout and f"written to {kept}" in done.stdout


@pytest.mark.parametrize("target", ["unwritable", "ftp://example.invalid/metrics", "http://"])
def test_a_target_that_cannot_take_the_rows_is_a_warning_not_a_failure(tmp_path, target):
    suite = passing_suite(tmp_path / "suite")
    (tmp_path / "a-file").write_text("")
    if target == "unwritable":
        target = str(tmp_path / "a-file" / "metrics")  # a folder under a file
    done = run_suite(suite, f"--perf-collect={target}",
                     f"--perf-collect-fallback={tmp_path / 'a-file' / 'unsent'}")
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 passed" in done.stdout
    assert "perf-collect: warning:" in done.stdout and "rows lost" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_inert_unless_asked_and_the_environment_can_ask(tmp_path):
    suite = passing_suite(tmp_path / "suite")
    quiet = run_suite(suite)
    assert quiet.returncode == 0
    assert "perf-collect" not in quiet.stdout + quiet.stderr
    assert not [p for p in suite.rglob("*") if p.suffix == ".jsonl" or "perf-collect" in p.name]
    asked = run_suite(suite, PERF_COLLECT=str(tmp_path / "out"))
    assert asked.returncode == 0 and "perf-collect: 10 rows written" in asked.stdout
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"pytest-{RUN_ID}.jsonl"]
    listed = run_suite(suite, "--collect-only", f"--perf-collect={tmp_path / 'listed'}")
    assert listed.returncode == 0 and "perf-collect: no test ran, no rows written" in listed.stdout
    assert not (tmp_path / "listed").exists()


def test_a_broken_answer_and_credentials_in_the_url_leave_rows_in_the_fallback_unlogged(tmp_path):
    server = RawReply(b"HELLO WORLD\r\n\r\n")  # http.client: BadStatusLine
    suite = passing_suite(tmp_path / "suite")
    fallback = tmp_path / "unsent"
    try:
        done = run_suite(suite, f"--perf-collect=http://ci-user:Hunter2-pw@127.0.0.1:{server.port}",
                         f"--perf-collect-fallback={fallback}")
    finally:
        server.close()
    assert done.returncode == 0, done.stdout[-3000:]
    assert server.requests == 1
    (kept,) = fallback.iterdir()
    assert len(read_rows(kept)) == 10
    assert f"push to http://127.0.0.1:{server.port} failed" in done.stdout
    assert "Hunter2-pw" not in done.stdout + done.stderr and "ci-user" not in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_rejected_rows_the_gateway_does_not_list_keep_the_whole_batch(tmp_path, receiver):
    assert PUSH_BATCH_ROWS <= 1000  # the gateway lists at most 1000 rejected rows
    receiver.reply(200, json.dumps({"accepted": 7, "rejected_count": 3, "rejected": [
        {"line": 2, "reason": "timestamp is more than 1 day ahead"}]}).encode())
    suite = passing_suite(tmp_path / "suite")
    done = run_suite(suite, f"--perf-collect=http://127.0.0.1:{receiver.port}")
    assert done.returncode == 0
    sent = [json.loads(line) for line in receiver.requests[0]["body"].decode().splitlines()]
    (kept,) = (suite / ".perf-collect-unsent").iterdir()
    assert read_rows(kept) == sent
    assert "accepted 7 rows and rejected 3" in done.stdout
    assert "2 rejected rows were not listed" in done.stdout


def test_writers_racing_for_one_name_each_get_their_own_file(tmp_path):
    import threading

    bodies = [f"run {i}\n".encode() for i in range(8)]
    paths = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def write(index):
        start.wait()
        paths[index] = write_new(tmp_path / "out", "pytest-run-1", bodies[index])

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(paths)) == len(bodies)
    assert {path.name for path in paths} == {"pytest-run-1.jsonl"} | {
        f"pytest-run-1-{n}.jsonl" for n in range(2, len(bodies) + 1)}
    assert [path.read_bytes() for path in paths] == bodies
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)

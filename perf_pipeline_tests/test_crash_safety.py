"""Crash safety: real processes killed with SIGKILL at seeded moments (an ingest mid-write,
`perf-pipeline run` mid-load, the gateway mid-write), and writers that find the database
taken; each followed by checks on the real landing archive and the real DuckDB file.

Kill moments are drawn from a seeded generator, relative to what the victim is doing (its
start, the writer lock it takes, the first temporary file it writes), so each run aims at
the same phases even though the machine's speed varies."""

import collections
import hashlib
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from filelock import FileLock, Timeout

from perf_pipeline.config import paths_from_env
from perf_pipeline.ingest.formats import stage_bytes
from perf_pipeline.ingest.landing import (
    day_files,
    ingest_files,
    landed_days,
    landing_state,
    load_landing_days,
    remove_days_before,
)
from perf_pipeline.ingest.simulator import simulate_fleet
from perf_pipeline.storage.warehouse import open_warehouse
from perf_pipeline_tests.conftest import (
    free_port,
    metric_row,
    start_gateway,
    stop_process_group,
    wait_until_serving,
    write_jsonl,
)

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).parent / "perf-pipeline")
SEED = 20261129
END = datetime(2026, 11, 2, tzinfo=timezone.utc)
RAW_COLUMNS = ["timestamp", "metric_name", "metric_value", "test_name", "test_type", "node_id",
               "node_type", "test_run_id", "ci_job_id", "context_data", "unit", "source_file",
               "source_line"]
LOCKED = "is in use by another process"
NEW_RUN_DAY = date(2026, 11, 1)

# A second process that holds the warehouse open for writing (writer lock and DuckDB file)
# until its stdin closes, as a long `perf-pipeline alerts ack` or a notebook would.
HOLD_WAREHOUSE = """
import sys
from perf_pipeline.storage.warehouse import open_warehouse
with open_warehouse(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""
# A plain DuckDB client (the duckdb shell, a notebook) holding the file without the lock file.
HOLD_DUCKDB = """
import sys, duckdb
con = duckdb.connect(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
con.close()
"""


def _environment() -> dict:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    environment.pop("DAGSTER_HOME", None)
    return environment


def _start(*arguments: str) -> subprocess.Popen:
    return subprocess.Popen([CLI, *arguments], env=_environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _sigkill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def _temporaries(landing: Path) -> list[Path]:
    return sorted(landing.rglob(".*.tmp"))


class _Lines:
    """Collects a child's output lines on a thread; `wait_for` blocks until one starts so."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self.ended = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait_for(self, prefix: str, timeout: float = 180) -> bool:
        """Whether a line starting with `prefix` came before the output ended or `timeout`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(line.startswith(prefix) for line in self.lines):
                if self.ended or time.monotonic() > deadline:
                    return False
                self._changed.wait(timeout=0.5)
            return True

    def text(self) -> str:
        self._thread.join(timeout=30)
        return "\n".join(self.lines)


# ---------------------------------------------------------------- 1. ingest killed mid-write

def test_an_ingest_killed_mid_write_leaves_only_whole_files_and_a_rerun_completes_the_archive(
        paths, tmp_path, fault_tally):
    inputs = tmp_path / "inputs"
    for seed in range(2):
        simulate_fleet(inputs / f"fleet{seed}", days=5, nodes=6, tests=6, seed=seed, end=END,
                       runs_per_day=6)
    records = sum(len(p.read_bytes().splitlines()) for p in inputs.rglob("*.jsonl"))

    reference_home = tmp_path / "reference"
    started = time.monotonic()
    reference = subprocess.run([CLI, "ingest", str(inputs)], capture_output=True, text=True,
                               env={**_environment(), "PERF_PIPELINE_HOME": str(reference_home)},
                               timeout=300)
    ingest_seconds = time.monotonic() - started
    assert reference.returncode == 0, reference.stderr
    expected = landing_state(reference_home / "landing")
    reference_files = [p for day in landed_days(reference_home / "landing")
                       for p in day_files(reference_home / "landing", day)]
    staged = [stage_bytes(p.read_bytes(), suffix=p.suffix, source_file=p.name)
              for p in reference_files]
    assert sum(len(s) for s in staged) == records
    assert all(s["pre_reason"].isna().all() for s in staged)

    rng = random.Random(SEED)
    kills, mid_write = 0, 0
    # Moments: a delay into the run (imports, parsing or writing), or the instant the first
    # temporary file appears (inside write_atomic, between open and rename).
    for attempt in range(4):
        at_first_temporary = attempt % 2 == 1
        deadline = time.monotonic() + rng.uniform(0.3, 1.0) * ingest_seconds
        left_before = set(_temporaries(paths.landing))
        process = _start("ingest", str(inputs))
        while process.poll() is None:
            if (at_first_temporary and set(_temporaries(paths.landing)) - left_before) or (
                    not at_first_temporary and time.monotonic() >= deadline):
                _sigkill(process)
                kills += 1
                mid_write += bool(set(_temporaries(paths.landing)) - left_before)
                break
            time.sleep(0.002)
        # What a landing scan sees is a subset of the complete archive, byte for byte: a
        # file that is visible is whole (its name is its content's checksum).
        for day, files in landing_state(paths.landing).items():
            for name, digest in files.items():
                assert expected.get(day, {}).get(name) == digest, f"{name} is not a whole file"
    assert kills >= 3, "the ingest finished before most kills; give it more input"

    leftovers = _temporaries(paths.landing)
    rerun = subprocess.run([CLI, "ingest", str(inputs)], capture_output=True, text=True,
                           env=_environment(), timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert landing_state(paths.landing) == expected
    # Temporary files a kill left stay ignored by every scan; only retention removes them,
    # with their day folder.
    assert _temporaries(paths.landing) == leftovers
    removed, _ = remove_days_before(paths.landing, date(2100, 1, 1))
    assert len(removed) == len(expected) and not _temporaries(paths.landing)

    fault_tally.add("processes killed", kills)
    fault_tally.add("kills mid-write (a temporary file left behind)", mid_write)
    fault_tally.add("rows checked", records)


# ---------------------------------------------------------------- 2. load killed mid-load

def _fleet_landing(paths, tmp_path) -> list[date]:
    """A simulated fleet plus records loading quarantines, ingested into the landing archive."""
    simulate_fleet(tmp_path / "sim", days=5, nodes=10, tests=12, seed=SEED % 97, end=END,
                   runs_per_day=8)
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        metric_row("2026-10-29T05:00:00Z", value=float("nan")),
        metric_row("2026-10-30T06:00:00Z", metric_name="no_such_metric"),
        metric_row("2026-10-31T07:00:00Z", node_id=""),
        '{"timestamp": "2026-11-01T08:00:00Z", "metric_name": ',
    ])
    ingest_files([*sorted((tmp_path / "sim").rglob("*.jsonl")), bad], paths.landing,
                 today=END.date())
    return landed_days(paths.landing)


def _snapshot(database: Path, days: list[date]) -> dict:
    """Everything a load writes, comparable between two DuckDB files."""
    unloaded = {"days": {day: {"rows_read": 0, "rows_loaded": 0, "rows_quarantined": 0}
                         for day in days}, "raw": None}
    if not database.exists():  # killed before DuckDB created the file
        return unloaded
    with open_warehouse(database, read_only=True) as wh:
        if "ingested_files" not in wh.table_names():
            return unloaded
        con = wh.con
        return {
            "days": {day: wh.day_counts(day) for day in days},
            "raw": con.execute("SELECT timestamp, metric_name, metric_value, test_name, "
                               "test_type, node_id, node_type, test_run_id, ci_job_id, "
                               "CAST(context_data AS VARCHAR), unit, source_file, source_line "
                               "FROM performance_metrics ORDER BY source_file, source_line"
                               ).df().set_axis(RAW_COLUMNS, axis=1),
            "quarantine": con.execute("SELECT partition_day, source_file, source_line, reason "
                                      "FROM quarantined_metrics ORDER BY ALL").fetchall(),
            "files": con.execute("SELECT partition_day, path, checksum, rows_read "
                                 "FROM ingested_files ORDER BY ALL").fetchall(),
            "normalized": dict(con.execute(
                "SELECT CAST(timestamp AS DATE), count(*) FROM normalized_timeseries "
                "GROUP BY 1 ORDER BY 1").fetchall()),
            "duplicates": wh.duplicate_series_points(days),
        }


def _reference_load(paths, tmp_path, days: list[date]) -> tuple[dict, float]:
    database = tmp_path / "reference.duckdb"
    with open_warehouse(database) as wh:
        started = time.monotonic()
        load_landing_days(wh, paths.landing, days)
        seconds = time.monotonic() - started
        wh.replace_normalized_days(days)
    return _snapshot(database, days), seconds


def _is_held(lock_file: Path) -> bool:
    """Whether some process holds `lock_file` (a filelock, i.e. flock), read from /proc/locks.
    Not by trying to take it: a probe that held it for an instant made the very run it waited
    for fail, when the run's own fail-fast check came at that instant."""
    try:
        status = lock_file.stat()
    except FileNotFoundError:
        return False
    where = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    with open("/proc/locks") as locks:  # "1: FLOCK  ADVISORY  WRITE <pid> <dev:inode> 0 EOF"
        return any(fields[1] == "FLOCK" and where in fields
                   for fields in (line.split() for line in locks))


def _wait_for_writer(process: subprocess.Popen, lock_file: Path, timeout: float = 180) -> None:
    """Block until `process` takes the database's writer lock (its first write starts)."""
    deadline = time.monotonic() + timeout
    while not _is_held(lock_file):
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before it wrote:\n"
                                 f"{process.stdout.read()}")
        assert time.monotonic() < deadline, "the run never took the writer lock"
        time.sleep(0.005)


def _assert_days_whole(snapshot: dict, reference: dict) -> None:
    """A kill leaves each day as the reference load stored it, or as if never loaded."""
    for day, counts in snapshot["days"].items():
        assert counts in (reference["days"][day],
                          {"rows_read": 0, "rows_loaded": 0, "rows_quarantined": 0}), day


def _finish_loading() -> None:
    """`perf-pipeline run` until its loads are done; it is killed as the analysis starts
    (the analysis is not what this module checks, and it takes most of a run's time)."""
    process = _start("run")
    lines = _Lines(process)
    assert lines.wait_for("analysing"), lines.text()
    _sigkill(process)


def test_a_run_killed_mid_load_keeps_whole_days_and_a_rerun_stores_exactly_the_reference(
        paths, tmp_path, fault_tally):
    from perf_pipeline.defs.runner import changed_days

    days = _fleet_landing(paths, tmp_path)
    reference, load_seconds = _reference_load(paths, tmp_path, days)
    assert reference["quarantine"] and reference["duplicates"] == 0
    lock_file = Path(f"{paths.database}.writer.lock")

    rng = random.Random(SEED)
    wal_left, uncommitted = 0, 0
    # Moments: a seeded delay after raw_metrics takes the writer lock, up to 1.5 times what
    # the load takes in-process: before its first write, while it stages and validates, in
    # its transaction, or just after the commit.
    for _ in range(3):
        process = _start("run")
        _wait_for_writer(process, lock_file)
        time.sleep(rng.uniform(0.0, 1.5 * load_seconds))
        _sigkill(process)
        wal_left += Path(f"{paths.database}.wal").exists()
        killed = _snapshot(paths.database, days)  # opens the file: its WAL is replayed
        _assert_days_whole(killed, reference)
        uncommitted += killed["days"] != reference["days"]

    _finish_loading()
    stored = _snapshot(paths.database, days)
    assert stored["days"] == reference["days"]
    for counts in stored["days"].values():
        assert counts["rows_read"] == counts["rows_loaded"] + counts["rows_quarantined"]
    pd.testing.assert_frame_equal(stored["raw"], reference["raw"])
    assert stored["quarantine"] == reference["quarantine"]
    assert stored["files"] == reference["files"]
    assert stored["duplicates"] == 0
    assert changed_days(paths_from_env()) == []  # nothing is left for another run to load

    fault_tally.add("processes killed", 4)
    fault_tally.add("kills before the load committed", uncommitted)
    fault_tally.add("kills that left a DuckDB WAL", wal_left)
    fault_tally.add("rows checked", len(stored["raw"]) + len(stored["quarantine"]))


def test_a_run_after_a_killed_run_is_not_held_up_by_the_killed_runs_pool_slot(
        paths, tmp_path, fault_tally):
    _fleet_landing(paths, tmp_path)
    lock_file = Path(f"{paths.database}.writer.lock")
    process = _start("run")
    _wait_for_writer(process, lock_file)  # raw_metrics holds the pool slot and the writer lock
    _sigkill(process)
    fault_tally.add("processes killed", 1)

    rerun = _start("run")
    lines = _Lines(rerun)
    try:
        assert lines.wait_for("loading"), lines.text()
        # A healthy run loads these days in a few seconds after saying so.
        assert lines.wait_for("analysing", timeout=15), "the run waits for the killed run's slot"
    finally:
        _sigkill(rerun)


def test_a_run_killed_between_raw_metrics_and_normalized_timeseries_is_finished_by_the_next(
        paths, tmp_path, fault_tally):
    days = _fleet_landing(paths, tmp_path)
    reference, _ = _reference_load(paths, tmp_path, days)
    lock_file = Path(f"{paths.database}.writer.lock")

    process = _start("run")
    _wait_for_writer(process, lock_file)
    lock = FileLock(lock_file)
    # Taking the lock as soon as raw_metrics lets go holds normalized_timeseries back: the
    # kill lands after the raw rows committed and before their series are built.
    while True:
        try:
            lock.acquire(timeout=0)
            break
        except Timeout:
            time.sleep(0.001)
    try:
        _sigkill(process)
    finally:
        lock.release()
    fault_tally.add("processes killed", 2)
    killed = _snapshot(paths.database, days)
    assert killed["days"] == reference["days"] and killed["normalized"] == {}

    _finish_loading()
    assert _snapshot(paths.database, days)["normalized"] == reference["normalized"]


# ---------------------------------------------------------------- 3. gateway killed mid-write

BATCH_ROWS = 20_000


def _batches(count: int) -> list[bytes]:
    """JSON Lines batches of distinct valid rows over yesterday and today (UTC)."""
    start = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=30)
    batches = []
    for number in range(count):
        rows = [metric_row((start + timedelta(seconds=5 * i)).isoformat(), value=float(i),
                           run=f"batch{number}-run{i}",
                           test_name=f"tests/test_crash.py::test_{i % 50}")
                for i in range(BATCH_ROWS)]
        batches.append("".join(json.dumps(row) + "\n" for row in rows).encode())
    return batches


def _post(url: str, body: bytes, answers: list) -> None:
    request = urllib.request.Request(f"{url}/api/v1/metrics", data=body, method="POST",
                                     headers={"Content-Type": "application/x-ndjson"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            answers.append((response.status, json.loads(response.read())))
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError) as error:
        answers.append((None, repr(error)))


def _serve(paths) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = start_gateway(port, _environment(), arguments=("--no-auth", "--max-body-mb", "32"))
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, process)
    return process, url


def _landing_lines(landing: Path) -> collections.Counter:
    """Every line a landing scan reads, after checking each file is whole and well named."""
    lines = collections.Counter()
    for day in landed_days(landing):
        for path in day_files(landing, day):
            content = path.read_bytes()
            assert path.name == f"gateway-{hashlib.sha256(content).hexdigest()[:16]}.jsonl"
            assert content.endswith(b"\n")
            for line in content.splitlines():
                json.loads(line)
                lines[line] += 1
    return lines


def test_a_gateway_killed_mid_write_never_exposes_a_partial_file_and_retries_store_once(
        paths, tmp_path, fault_tally):
    batches = _batches(4)
    sent = collections.Counter(line for batch in batches for line in batch.splitlines())
    rng = random.Random(SEED)

    gateway, url = _serve(paths)
    try:
        answers: list = []
        started = time.monotonic()
        _post(url, batches[0], answers)
        store_seconds = time.monotonic() - started
        assert answers[0][0] == 200 and answers[0][1]["accepted"] == BATCH_ROWS

        kills, mid_write = 0, 0
        for number, batch in enumerate(batches[1:], start=1):
            # Moments: the instant the gateway's first temporary file appears, or a seeded
            # delay into the request (reading the body, validating, writing).
            at_first_temporary = number % 2 == 1
            deadline = time.monotonic() + rng.uniform(0.2, 1.0) * store_seconds
            answers = []
            left_before = set(_temporaries(paths.landing))
            client = threading.Thread(target=_post, args=(url, batch, answers))
            client.start()
            while client.is_alive():
                if (at_first_temporary and set(_temporaries(paths.landing)) - left_before) or (
                        not at_first_temporary and time.monotonic() >= deadline):
                    _sigkill(gateway)
                    kills += 1
                    mid_write += bool(set(_temporaries(paths.landing)) - left_before)
                    break
                time.sleep(0.001)
            client.join(timeout=120)
            # Every file a scan sees is whole, and holds only rows that were sent.
            assert not _landing_lines(paths.landing) - sent
            if gateway.poll() is not None:
                gateway, url = _serve(paths)
            # The client did not get an answer (or did, too late to matter): it sends again.
            answers = []
            _post(url, batch, answers)
            (status, answer), = answers
            assert status == 200 and answer["accepted"] == BATCH_ROWS, answer
    finally:
        stop_process_group(gateway)
    assert kills >= 2, "the gateway answered before most kills"

    assert _landing_lines(paths.landing) == sent  # each batch stored exactly once
    leftovers = _temporaries(paths.landing)
    with open_warehouse(tmp_path / "gateway.duckdb") as wh:
        loads = load_landing_days(wh, paths.landing, landed_days(paths.landing))
    assert sum(c.rows_read for c in loads.values()) == sum(sent.values())
    assert sum(c.rows_loaded for c in loads.values()) == sum(sent.values())
    assert _temporaries(paths.landing) == leftovers  # never read, never cleaned up

    fault_tally.add("processes killed", kills)
    fault_tally.add("kills mid-write (a temporary file left behind)", mid_write)
    fault_tally.add("rows checked", sum(sent.values()))


# ---------------------------------------------------------------- 4. the database is taken

def _hold(script: str, database: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", script, str(database)], env=_environment(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _release(holder: subprocess.Popen) -> None:
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0


def _assert_refused(process: subprocess.Popen, status: int, database: Path) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == status, output
    assert f"perf-pipeline: error: the database {database} {LOCKED}" in output, output
    assert "Traceback" not in output, output


def _new_run(tmp_path: Path, landing: Path) -> Path:
    """A copy of one simulated run of NEW_RUN_DAY under a new run id: the gate has a baseline."""
    (source,) = [p for p in day_files(landing, NEW_RUN_DAY) if p.name.startswith("fleet")]
    rows = [json.loads(line) for line in source.read_bytes().splitlines()]
    first_run = next(row["test_run_id"] for row in rows if row["test_run_id"])
    return write_jsonl(tmp_path / "new_run.jsonl", [
        {**row, "test_run_id": "run-new"} for row in rows if row["test_run_id"] == first_run])


def test_a_cli_writer_that_finds_the_database_taken_fails_clearly_and_a_retry_succeeds(
        paths, tmp_path, fault_tally):
    from perf_pipeline.defs.runner import open_instance

    days = _fleet_landing(paths, tmp_path)
    with open_warehouse(paths.database) as wh:
        load_landing_days(wh, paths.landing, days)
    # An instance as the first run leaves it: two commands that both create its SQLite
    # tables at once can fail on "table already exists", a race this test is not about.
    open_instance(paths).dispose()
    before = _snapshot(paths.database, days)
    new_run = _new_run(tmp_path, paths.landing)
    new_rows = len(new_run.read_bytes().splitlines())
    conflicts = 0

    # A perf_pipeline writer (writer lock and DuckDB file) and a plain DuckDB client (the file
    # only): `run` and the CI gate's ingest-and-load are refused at once, naming the cause.
    holder = _hold(HOLD_WAREHOUSE, paths.database)
    try:
        run = _start("run")
        gate = _start("gate", "--ingest", str(new_run), "--run-id", "run-new")
        _assert_refused(run, 1, paths.database)
        _assert_refused(gate, 2, paths.database)
        conflicts += 2
    finally:
        _release(holder)
    holder = _hold(HOLD_DUCKDB, paths.database)
    try:
        _assert_refused(_start("run"), 1, paths.database)
        conflicts += 1
    finally:
        _release(holder)
    after = _snapshot(paths.database, days)
    assert after["days"] == before["days"]
    pd.testing.assert_frame_equal(after["raw"], before["raw"])
    assert after["quarantine"] == before["quarantine"] and after["files"] == before["files"]

    retry = _start("gate", "--ingest", str(new_run), "--run-id", "run-new")
    output, _ = retry.communicate(timeout=300)
    assert retry.returncode == 0 and "Traceback" not in output, output  # judged: no regression
    loaded = _snapshot(paths.database, days)
    for day in days:
        added = new_rows if day == NEW_RUN_DAY else 0
        assert loaded["days"][day] == {
            "rows_read": before["days"][day]["rows_read"] + added,
            "rows_loaded": before["days"][day]["rows_loaded"] + added,
            "rows_quarantined": before["days"][day]["rows_quarantined"]}, day

    fault_tally.add("lock conflicts", conflicts)
    fault_tally.add("rows checked", len(after["raw"]) + new_rows)


def test_a_run_of_given_days_that_finds_the_database_taken_fails_clearly(
        paths, tmp_path, fault_tally):
    from perf_pipeline.defs.runner import open_instance

    _fleet_landing(paths, tmp_path)
    with open_warehouse(paths.database):
        pass
    open_instance(paths).dispose()
    holder = _hold(HOLD_WAREHOUSE, paths.database)
    try:
        run = _start("run", "--day", NEW_RUN_DAY.isoformat())
        fault_tally.add("lock conflicts", 1)
        try:
            # Plain `run` is refused in about the time it takes to start (10 s here).
            output, _ = run.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            _sigkill(run)
            pytest.fail("`run --day` is still waiting for the writer lock, saying nothing")
        assert run.returncode == 1 and LOCKED in output, output
    finally:
        _release(holder)

"""A pytest plugin that records how each test performed: `pytest --perf-collect=DIR_OR_URL`.

Registered through the `pytest11` entry point, so it loads in every pytest run of an
environment where perf_pipeline is installed; it does nothing unless `--perf-collect` or the
`PERF_COLLECT` environment variable names a target. At import it uses only the standard
library and pytest (the rest of perf_pipeline.collect is imported once collection is asked for).

Per test (test_name = the pytest node id, timestamp = the test's start time):
  test_setup_time, test_execution_time, test_teardown_time  duration of each phase that ran (s)
  test_cpu_time     CPU seconds (user + sys) the process spent from setup to teardown
  test_peak_memory  peak resident memory (MB) of the process from setup to teardown; on Linux
                    the high-water mark is reset before each test (/proc/self/clear_refs),
                    elsewhere, or where the reset is refused, it is the process's peak so far
                    (context_data.memory_high_water says "test" or "process")
A skipped test (skip marks, pytest.skip(), xfail with run=False) gets no rows: its timings
would measure the skip, not the test, and break the test's series. It is counted in the
session's test_count and outcomes. Failed, errored, xfailed and xpassed tests get rows, with
the outcome in context_data so the analysis can tell them apart.

Per session (timestamp = session start, no test_name):
  test_count         tests that reported an outcome, skipped ones included
  tests_per_hour     tests executed (not skipped) / session wall time × 3600
  test_pass_rate     executed tests that neither failed nor errored, % of executed (xfailed
                     and non-strict xpassed count as passing, as pytest's exit status does)
  test_failure_rate  failed or errored, % of executed (the catalog's node_failure_rate)
  parallel_tests     pytest-xdist workers, 1 without xdist
The rate rows are left out when no test executed; a session where no test reported an
outcome (--collect-only, a collection error) writes nothing.

test_type: `--perf-test-type`, else the first marker named unit, integration, e2e,
performance, smoke or functional, else the first folder of the test's path with one of
those names, else "unit".

With pytest-xdist the workers measure CPU and memory and attach them to the teardown
report's user_properties (which xdist carries to the controller); the controller collects
every report and writes. Without xdist the one process does both. The entry is removed from
user_properties before other plugins (junitxml) see it.

Nothing the plugin does changes the test run's exit status: an unwritable folder, a gateway
that is down or refuses rows, or a bug in here becomes a warning in the terminal summary.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

COLLECT_ENV = "PERF_COLLECT"
TEST_TYPES = ("unit", "integration", "e2e", "performance", "smoke", "functional")
DEFAULT_TEST_TYPE = "unit"
DEFAULT_FALLBACK = ".perf-collect-unsent"
MEASUREMENT_PROPERTY = "perf_pipeline"
# Markers that configure a test rather than describe it.
_CONFIGURING_MARKERS = frozenset({"parametrize", "usefixtures", "filterwarnings"})
# Rows per gateway request: a large suite stays well under a gateway's body limit, and the
# gateway lists every rejected row of a batch this size (it lists at most 1000).
PUSH_BATCH_ROWS = 1000
PUSH_TIMEOUT_S = 10.0
_PHASE_METRICS = {"setup": "test_setup_time", "call": "test_execution_time",
                  "teardown": "test_teardown_time"}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("perf-collect", "performance metrics for perf_pipeline")
    group.addoption("--perf-collect", dest="perf_collect", default=None, metavar="DIR_OR_URL",
                    help="record each test's timings, CPU time and peak memory: a folder gets a "
                         f"JSON Lines file, an http(s) URL gets a push to the gateway "
                         f"(default: ${COLLECT_ENV}, else off)")
    group.addoption("--perf-collect-fallback", dest="perf_collect_fallback", default=None,
                    metavar="DIR", help="where rows go when the push fails "
                                        f"(default: {DEFAULT_FALLBACK}/ in the rootdir)")
    group.addoption("--perf-test-type", dest="perf_test_type", default=None,
                    help="test_type of every test (default: from markers or path, else unit)")
    group.addoption("--perf-node-type", dest="perf_node_type", default=None,
                    help="node_type of the rows (default: $PERF_NODE_TYPE)")


def collect_target(config: pytest.Config) -> str | None:
    target = config.getoption("perf_collect") or os.environ.get(COLLECT_ENV, "")
    return target.strip() or None


def is_xdist_worker(config: pytest.Config) -> bool:
    # xdist sets workerinput before configuring a worker. Not PYTEST_XDIST_WORKER: a pytest
    # that a test of an xdist run starts inherits it, and is a whole run of its own.
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    target = collect_target(config)
    if target is None:
        return
    try:
        config.pluginmanager.register(Meter(), "perf_pipeline_meter")
        if not is_xdist_worker(config):
            config.pluginmanager.register(Collector(config, target), "perf_pipeline_collector")
    except Exception as error:
        config.pluginmanager.register(
            NotCollecting(f"not collecting: {type(error).__name__}: {error}"), "perf_pipeline_warning")


def write_new(folder: Path, stem: str, data: bytes) -> Path:
    """Write `data` to a file of `folder` that did not exist before: `stem`.jsonl, else
    `stem`-2.jsonl, -3 … The file appears whole (a temporary file, fsynced, hard-linked to a
    name that must not exist, so two processes never take the same one) and the folder is
    fsynced. Where the file system has no hard links, the name is created exclusively."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{stem}.{os.getpid()}.{time.time_ns()}.tmp"
    try:
        with open(temporary, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        number, linked = 1, True
        while True:
            path = folder / (f"{stem}.jsonl" if number == 1 else f"{stem}-{number}.jsonl")
            try:
                if linked:
                    os.link(temporary, path)
                else:
                    with open(path, "xb") as handle:
                        try:
                            handle.write(data)
                            handle.flush()
                            os.fsync(handle.fileno())
                        except BaseException:
                            path.unlink(missing_ok=True)
                            raise
                break
            except FileExistsError:
                number += 1
            except OSError:
                if not linked:
                    raise
                linked = False  # no hard links here: create the name exclusively instead
    finally:
        temporary.unlink(missing_ok=True)
    try:
        directory = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its renames and links are durable enough
        return path
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


class NotCollecting:
    """Says in the terminal summary why the plugin could not start."""

    def __init__(self, message: str) -> None:
        self.message = message

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.write_line(f"perf-collect: warning: {self.message}", yellow=True)


# ------------------------------------------------------------ measuring, where tests run

class PeakMemory:
    """The process's peak resident memory since `reset()`, in MB (10^6 bytes, the catalog's
    unit). Linux can reset the high-water mark; elsewhere the peak is the process's so far."""

    def __init__(self) -> None:
        self.resettable = sys.platform.startswith("linux")

    def reset(self) -> None:
        if self.resettable:
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
            except OSError:
                self.resettable = False

    def peak_mb(self) -> float | None:
        if self.resettable:
            try:
                with open("/proc/self/status") as handle:
                    for line in handle:
                        if line.startswith("VmHWM:"):
                            return int(line.split()[1]) * 1024 / 1e6
            except (OSError, ValueError, IndexError):
                pass
        try:
            import resource
        except ImportError:  # Windows
            return None
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # bytes on macOS, KiB on Linux and the BSDs
        return maxrss / 1e6 if sys.platform == "darwin" else maxrss * 1024 / 1e6

    @property
    def high_water(self) -> str:
        return "test" if self.resettable else "process"


def markers_of(item: pytest.Item) -> list[str]:
    return sorted({mark.name for mark in item.iter_markers()} - _CONFIGURING_MARKERS)


class Meter:
    """Measures CPU time and peak memory from a test's setup to its teardown in the process
    that runs it, and attaches them (and the markers) to the teardown report."""

    def __init__(self) -> None:
        self.memory = PeakMemory()
        self.cpu_start: float | None = None

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None):
        try:
            self.memory.reset()
            self.cpu_start = time.process_time()
        except Exception:
            self.cpu_start = None
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = yield
        if call.when == "teardown":
            try:
                measured: dict[str, Any] = {"markers": markers_of(item)}
                if self.cpu_start is not None:
                    measured["cpu_time"] = max(time.process_time() - self.cpu_start, 0.0)
                peak = self.memory.peak_mb()
                if peak is not None:
                    measured["peak_memory"] = peak
                    measured["memory_high_water"] = self.memory.high_water
            except Exception as error:
                measured = {"error": f"{type(error).__name__}: {error}"}
            report.user_properties.append((MEASUREMENT_PROPERTY, measured))
        return report


# ------------------------------------------------------------ collecting, in the controller

def iso_utc(epoch_seconds: float) -> str:
    return (datetime.fromtimestamp(epoch_seconds, timezone.utc)
            .isoformat(timespec="microseconds").replace("+00:00", "Z"))


def classify_test_type(nodeid: str, markers: list[str], configured: str | None) -> str:
    if configured:
        return configured
    for marker in markers:
        if marker in TEST_TYPES:
            return marker
    for folder in nodeid.split("::")[0].split("/")[:-1]:
        if folder in TEST_TYPES:
            return folder
    return DEFAULT_TEST_TYPE


@dataclass
class TestRecord:
    __test__ = False  # not a test class, whatever pytest's naming rules say

    nodeid: str
    start: float | None = None
    durations: dict[str, float] = field(default_factory=dict)
    phases: dict[str, tuple[str, bool]] = field(default_factory=dict)  # when -> (outcome, wasxfail)
    measured: dict[str, Any] = field(default_factory=dict)

    @property
    def outcome(self) -> str:
        setup, call, teardown = (self.phases.get(when) for when in ("setup", "call", "teardown"))
        if setup and setup[0] == "failed":
            return "error"
        if setup and setup[0] == "skipped":
            return "xfailed" if setup[1] else "skipped"
        if any(outcome == "failed" for when, (outcome, _) in self.phases.items()
               if when not in ("setup", "call", "teardown")):
            return "failed"  # xdist reports a crashed worker's test with when="???"
        if call:
            outcome, wasxfail = call
            if outcome == "skipped":
                return "xfailed" if wasxfail else "skipped"
            if outcome == "failed":
                return "failed"
        if teardown and teardown[0] == "failed":
            return "error"
        return "xpassed" if call and call[1] else "passed"

    @property
    def executed(self) -> bool:
        """Whether the test itself ran (a skip, or an xfail with run=False, did not)."""
        setup, call = self.phases.get("setup"), self.phases.get("call")
        if setup and setup[0] == "skipped":
            return False
        return not (call and call[0] == "skipped" and not call[1])


def _is_measurement(prop: Any) -> bool:
    return (isinstance(prop, (tuple, list)) and len(prop) == 2
            and prop[0] == MEASUREMENT_PROPERTY and isinstance(prop[1], dict))


class Collector:
    """Collects every test report, then writes or pushes the rows at the end of the session."""

    def __init__(self, config: pytest.Config, target: str) -> None:
        # Imported here, not at module level: a run without --perf-collect loads none of it.
        from perf_pipeline.collect import push, run_metadata

        self.push, self.run_metadata = push, run_metadata
        self.config, self.target = config, target
        self.metadata = None
        self.session_start = time.time()
        self.tests: dict[str, TestRecord] = {}
        self.workers: set[str] = set()
        self.lines: list[str] = []
        self.problems: list[str] = []

    def _problem(self, where: str, error: BaseException) -> None:
        if len(self.problems) < 5:
            self.problems.append(f"{where}: {type(error).__name__}: {error}")

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.session_start = time.time()
        try:
            self.metadata = self.run_metadata.detect(cwd=str(self.config.rootpath))
        except Exception as error:
            self._problem("run metadata", error)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodeready(self, node) -> None:
        try:
            self.workers.add(str(node.gateway.id))
        except Exception as error:
            self._problem("xdist worker", error)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        try:
            self._record(report)
        except Exception as error:
            self._problem(f"report of {getattr(report, 'nodeid', '?')}", error)

    def _record(self, report: pytest.TestReport) -> None:
        test = self.tests.setdefault(report.nodeid, TestRecord(report.nodeid))
        if test.start is None:
            test.start = getattr(report, "start", None) or time.time() - report.duration
        if report.when in _PHASE_METRICS:
            test.durations[report.when] = float(report.duration)
        test.phases[report.when] = (report.outcome, hasattr(report, "wasxfail"))
        node = getattr(report, "node", None)  # set by xdist on the controller
        if node is not None and getattr(node, "gateway", None) is not None:
            self.workers.add(str(node.gateway.id))
        ours = [prop[1] for prop in report.user_properties if _is_measurement(prop)]
        if ours:
            report.user_properties[:] = [prop for prop in report.user_properties
                                         if not _is_measurement(prop)]
            test.measured.update(ours[-1])
            if "error" in ours[-1]:
                self._problem(f"measuring {report.nodeid}", RuntimeError(ours[-1]["error"]))

    # ---------------------------------------------------------------- rows

    def _base(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Row fields and context_data every row shares."""
        metadata = self.metadata
        if metadata is None:  # detection failed: still name the run and the node
            import socket
            import uuid

            fields = {"test_run_id": f"local-{uuid.uuid4().hex[:12]}",
                      "node_id": socket.gethostname() or "unknown-node"}
            context: dict[str, Any] = {}
        else:
            fields, context = metadata.fields(), metadata.context()
        node_type = self.config.getoption("perf_node_type")
        if node_type:
            fields["node_type"] = node_type
        return fields, context

    def test_rows(self, fields: dict[str, Any], context: dict[str, Any]) -> list[dict[str, Any]]:
        configured_type = self.config.getoption("perf_test_type")
        rows = []
        for test in self.tests.values():
            if not test.executed:
                continue
            markers = list(test.measured.get("markers", []))
            common = {"timestamp": iso_utc(test.start or self.session_start),
                      "test_name": test.nodeid,
                      "test_type": classify_test_type(test.nodeid, markers, configured_type),
                      **fields}
            test_context = {**context, "outcome": test.outcome,
                            "file": test.nodeid.split("::")[0], "markers": markers}
            values = [(metric, "s", test.durations[when], test_context)
                      for when, metric in _PHASE_METRICS.items() if when in test.durations]
            if "cpu_time" in test.measured:
                values.append(("test_cpu_time", "s", test.measured["cpu_time"], test_context))
            if "peak_memory" in test.measured:
                values.append(("test_peak_memory", "MB", test.measured["peak_memory"],
                               {**test_context,
                                "memory_high_water": test.measured.get("memory_high_water")}))
            rows.extend({**common, "metric_name": metric, "metric_value": round(value, 6),
                         "unit": unit, "context_data": row_context}
                        for metric, unit, value, row_context in values)
        return rows

    def session_rows(self, fields: dict[str, Any], context: dict[str, Any], *,
                     exitstatus: int, finished: float) -> list[dict[str, Any]]:
        outcomes: dict[str, int] = {}
        for test in self.tests.values():
            outcomes[test.outcome] = outcomes.get(test.outcome, 0) + 1
        executed = sum(test.executed for test in self.tests.values())
        failing = sum(test.executed and test.outcome in ("failed", "error")
                      for test in self.tests.values())
        wall = finished - self.session_start
        values: list[tuple[str, str, float]] = [
            ("test_count", "count", float(len(self.tests))),
            ("parallel_tests", "count", float(len(self.workers) or 1)),
        ]
        if executed:
            values.append(("test_pass_rate", "percent", 100.0 * (executed - failing) / executed))
            values.append(("test_failure_rate", "percent", 100.0 * failing / executed))
            if wall > 0:
                values.append(("tests_per_hour", "tests/h", executed / wall * 3600.0))
        session_context = {**context, "outcomes": outcomes, "executed": executed,
                           "wall_time_s": round(wall, 3), "exit_status": int(exitstatus)}
        timestamp = iso_utc(self.session_start)
        return [{"timestamp": timestamp, "metric_name": metric, "metric_value": round(value, 6),
                 "unit": unit, **fields, "context_data": session_context}
                for metric, unit, value in values]

    # ---------------------------------------------------------------- delivery

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if not self.tests:  # --collect-only, or collection failed: no measurement to report
            self.lines.append("perf-collect: no test ran, no rows written")
            return
        try:
            fields, context = self._base()
            rows = self.test_rows(fields, context) + self.session_rows(
                fields, context, exitstatus=exitstatus, finished=time.time())
            if self.push.is_url(self.target):
                self._push(rows, fields["test_run_id"])
            elif "://" in self.target:
                self._keep_unsent(rows, fields["test_run_id"],
                                  f"--perf-collect={self.push.redact_url(self.target)} is not a folder "
                                  "or an http(s) URL")
            else:
                folder = self._folder(self.target)
                try:
                    path = self._write(folder, fields["test_run_id"], rows)
                except OSError as error:
                    self.problems.append(f"{len(rows)} rows lost: cannot write to {folder}: {error}")
                else:
                    self.lines.append(f"perf-collect: {len(rows)} rows written to {path}")
        except Exception as error:
            self._problem("writing rows", error)

    def _folder(self, value: str) -> Path:
        return Path(self.config.invocation_params.dir, os.path.expanduser(value))

    def _write(self, folder: Path, test_run_id: str, rows: list[dict[str, Any]]) -> Path:
        stem = "pytest-" + re.sub(r"[^A-Za-z0-9._-]", "_", test_run_id)
        # A second pytest run in the same CI job (or one beside it) keeps the first's rows.
        return write_new(folder, stem, self.push.jsonl(rows))

    def _push(self, rows: list[dict[str, Any]], test_run_id: str) -> None:
        shown = self.push.redact_url(self.target)
        accepted = rejected_count = unlisted = 0
        rejected: list[Any] = []
        unsent: list[dict[str, Any]] = []
        failure = None
        for offset in range(0, len(rows), PUSH_BATCH_ROWS):
            batch = rows[offset:offset + PUSH_BATCH_ROWS]
            if failure is not None:
                unsent.extend(batch)
                continue
            try:
                result = self.push.push_rows(self.target, batch, timeout=PUSH_TIMEOUT_S)
                answered = result.accepted + result.rejected_count
            except Exception as error:  # whatever it is, the rows go to the fallback folder
                failure = (str(error) if isinstance(error, self.push.PushError)
                           else f"{type(error).__name__}: {error}")
                unsent.extend(batch)
                continue
            if answered != len(batch):
                failure = (f"the gateway answered for {answered} of the {len(batch)} rows sent "
                           f"({result.accepted} accepted, {result.rejected_count} rejected)")
                unsent.extend(batch)
                continue
            accepted += result.accepted
            rejected_count += result.rejected_count
            rejected.extend(result.rejected)
            if result.rejected_count > len(result.rejected):
                # Not every rejected row is listed: keeping the whole batch is the only way
                # to keep each of them (its accepted rows come along).
                unlisted += result.rejected_count - len(result.rejected)
                unsent.extend(batch)
                continue
            for entry in result.rejected:
                line = entry.get("line") if isinstance(entry, dict) else None
                if isinstance(line, int) and 1 <= line <= len(batch):  # JSON Lines line number
                    unsent.append(batch[line - 1])
        if failure is None and not rejected_count:
            self.lines.append(f"perf-collect: {len(rows)} rows pushed to {shown}")
            return
        if failure is None:
            first = rejected[0] if rejected else "?"
            reason = first.get("reason", "?") if isinstance(first, dict) else first
            why = (f"the gateway at {shown} accepted {accepted} rows and rejected "
                   f"{rejected_count} (first: {reason})")
            if unlisted:
                why += (f"; {unlisted} rejected rows were not listed, so their whole batches "
                        f"are kept")
        else:
            why = f"push to {shown} failed: {failure}"
        self._keep_unsent(unsent, test_run_id, why)

    def _keep_unsent(self, rows: list[dict[str, Any]], test_run_id: str, why: str) -> None:
        configured = self.config.getoption("perf_collect_fallback")
        folder = (self._folder(configured) if configured
                  else Path(self.config.rootpath, DEFAULT_FALLBACK))
        if not rows:
            self.problems.append(why)
            return
        try:
            path = self._write(folder, test_run_id, rows)
        except Exception as error:
            self.problems.append(f"{why}; {len(rows)} rows lost: cannot write {folder}: {error}")
        else:
            self.problems.append(f"{why}; {len(rows)} unsent rows written to {path}")

    def pytest_terminal_summary(self, terminalreporter) -> None:
        for line in self.lines:
            terminalreporter.write_line(line)
        for problem in self.problems:
            terminalreporter.write_line(f"perf-collect: warning: {problem}", yellow=True)

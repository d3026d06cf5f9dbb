"""The metric catalog: every metric the fleet reports, with its unit, direction and limits.

The catalog is the one place that says what a metric means. Validation accepts a row only for
a metric (or alias) listed here, normalization converts every accepted unit to the canonical
one, and the analysis reads `direction` to decide whether a change is a regression: a test's
duration going up and a pass rate going down are both "degrading".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Direction(str, Enum):
    LOWER_IS_BETTER = "lower_is_better"
    HIGHER_IS_BETTER = "higher_is_better"


class Scope(str, Enum):
    """What one measurement of the metric describes, which decides the series it belongs to."""

    TEST = "test"  # one test case in one run (test_name set)
    NODE = "node"  # a sample of one node's state (test_name empty)
    RUN = "run"  # one CI run or build as a whole


IMPORTANCE_LEVELS = ("critical", "high", "medium", "low")

# Accepted unit spellings per canonical unit: value_in_canonical = value * factor.
_TIME_S = {"s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
           "ms": 1e-3, "millisecond": 1e-3, "milliseconds": 1e-3,
           "us": 1e-6, "microseconds": 1e-6, "ns": 1e-9,
           "min": 60.0, "minute": 60.0, "minutes": 60.0, "h": 3600.0, "hours": 3600.0}
_TIME_MS = {unit: factor * 1e3 for unit, factor in _TIME_S.items()}
_SIZE_MB = {"mb": 1.0, "megabytes": 1.0, "b": 1e-6, "byte": 1e-6, "bytes": 1e-6,
            "kb": 1e-3, "kilobytes": 1e-3, "gb": 1e3, "gigabytes": 1e3,
            "kib": 1024 / 1e6, "mib": 1024**2 / 1e6, "gib": 1024**3 / 1e6}
_RATE_MB_S = {"mb/s": 1.0, "mbps": 1.0 / 8, "b/s": 1e-6, "bytes/s": 1e-6, "kb/s": 1e-3,
              "gb/s": 1e3, "mib/s": 1024**2 / 1e6}
_PERCENT = {"percent": 1.0, "%": 1.0, "pct": 1.0, "fraction": 100.0, "ratio": 100.0}
_COUNT = {"count": 1.0, "": 1.0}
_PER_HOUR = {"tests/h": 1.0, "per_hour": 1.0, "/h": 1.0, "tests/min": 60.0, "per_minute": 60.0}

_UNIT_TABLES: dict[str, dict[str, float]] = {
    "s": _TIME_S, "ms": _TIME_MS, "MB": _SIZE_MB, "MB/s": _RATE_MB_S,
    "percent": _PERCENT, "count": _COUNT, "tests/h": _PER_HOUR,
}


@dataclass(frozen=True)
class Metric:
    name: str
    category: str
    unit: str
    direction: Direction
    importance: str
    alert_threshold_percent: float
    scope: Scope
    description: str
    min_value: float | None = 0.0
    max_value: float | None = None
    # alias name -> unit that alias is reported in (None: the row's own unit field, or canonical)
    aliases: dict[str, str | None] = field(default_factory=dict)

    @property
    def lower_is_better(self) -> bool:
        return self.direction is Direction.LOWER_IS_BETTER

    @property
    def degrading_sign(self) -> int:
        """+1 if an increase is a regression for this metric, -1 if a decrease is."""
        return 1 if self.lower_is_better else -1

    @property
    def unit_factors(self) -> dict[str, float]:
        """Accepted unit spellings (lower case) and the factor converting each to `unit`."""
        factors = {u.lower(): f for u, f in _UNIT_TABLES[self.unit].items()}
        factors[self.unit.lower()] = 1.0
        return factors


def _m(name, category, unit, direction, importance, threshold, scope, description, *,
       min_value=0.0, max_value=None, aliases=None) -> Metric:
    return Metric(name=name, category=category, unit=unit, direction=Direction(direction),
                  importance=importance, alert_threshold_percent=float(threshold),
                  scope=Scope(scope), description=description, min_value=min_value,
                  max_value=max_value, aliases=aliases or {})


LOWER, HIGHER = "lower_is_better", "higher_is_better"

METRICS: tuple[Metric, ...] = (
    # test execution
    _m("test_execution_time", "test_execution", "s", LOWER, "critical", 10, "test",
       "Wall time of the test's call phase.",
       aliases={"test_duration": None, "duration": None, "test_execution_time_ms": "ms",
                "test_duration_ms": "ms"}),
    _m("test_setup_time", "test_execution", "s", LOWER, "medium", 20, "test",
       "Wall time of the test's setup phase (fixtures).", aliases={"setup_time": None}),
    _m("test_teardown_time", "test_execution", "s", LOWER, "low", 25, "test",
       "Wall time of the test's teardown phase.", aliases={"teardown_time": None}),
    _m("test_cpu_time", "test_execution", "s", LOWER, "medium", 15, "test",
       "CPU time the test process spent on the test."),
    _m("test_peak_memory", "test_execution", "MB", LOWER, "medium", 15, "test",
       "Peak resident memory of the test process.", aliases={"peak_memory": None}),
    _m("test_retry_count", "test_execution", "count", LOWER, "medium", 50, "test",
       "Retries needed before the test's final outcome."),
    # resource utilization
    _m("cpu_usage", "resource_utilization", "percent", LOWER, "high", 15, "node",
       "CPU utilization of the node.", max_value=100.0,
       aliases={"cpu_percent": None, "cpu_utilization": None}),
    _m("memory_usage", "resource_utilization", "MB", LOWER, "high", 15, "node",
       "Resident memory in use on the node.",
       aliases={"memory_usage_mb": "MB", "memory_usage_bytes": "bytes", "mem_used": None}),
    _m("memory_utilization", "resource_utilization", "percent", LOWER, "medium", 15, "node",
       "Share of the node's memory in use.", max_value=100.0, aliases={"memory_percent": None}),
    _m("swap_usage", "resource_utilization", "MB", LOWER, "low", 25, "node",
       "Swap in use on the node."),
    _m("disk_io_read", "resource_utilization", "MB/s", LOWER, "medium", 25, "node",
       "Disk read throughput."),
    _m("disk_io_write", "resource_utilization", "MB/s", LOWER, "medium", 25, "node",
       "Disk write throughput."),
    _m("network_io_received", "resource_utilization", "MB/s", LOWER, "low", 25, "node",
       "Network bytes received per second.", aliases={"network_io_in": None}),
    _m("network_io_sent", "resource_utilization", "MB/s", LOWER, "low", 25, "node",
       "Network bytes sent per second.", aliases={"network_io_out": None}),
    _m("load_average", "resource_utilization", "count", LOWER, "medium", 20, "node",
       "One-minute load average per core.", aliases={"load_avg": None}),
    # node health
    _m("node_responsiveness", "node_health", "ms", LOWER, "high", 20, "node",
       "Heartbeat round-trip latency of the node's agent.",
       aliases={"heartbeat_latency": None, "node_response_time": None}),
    _m("node_error_rate", "node_health", "percent", LOWER, "high", 20, "node",
       "Infrastructure errors (not test failures) per 100 jobs on the node.", max_value=100.0),
    _m("node_failure_rate", "node_health", "percent", LOWER, "critical", 20, "node",
       "Share of tests that failed on the node.", max_value=100.0,
       aliases={"test_failure_rate": None}),
    _m("node_availability", "node_health", "percent", HIGHER, "high", 5, "node",
       "Share of time the node accepted work.", max_value=100.0),
    # throughput
    _m("tests_per_hour", "throughput", "tests/h", HIGHER, "high", 10, "run",
       "Tests completed per hour.", aliases={"test_throughput": None}),
    _m("parallel_tests", "throughput", "count", HIGHER, "medium", 15, "run",
       "Tests running in parallel (workers).", aliases={"parallel_workers": None}),
    _m("test_pass_rate", "throughput", "percent", HIGHER, "critical", 5, "run",
       "Share of tests that passed in the run.", max_value=100.0, aliases={"pass_rate": None}),
    # queue
    _m("queue_depth", "queue", "count", LOWER, "medium", 25, "run",
       "Jobs waiting when the run was scheduled."),
    _m("queue_wait_time", "queue", "s", LOWER, "high", 20, "run",
       "Time the run waited in the queue before starting.", aliases={"wait_time": None}),
    _m("scheduling_efficiency", "queue", "percent", HIGHER, "medium", 10, "run",
       "Busy node time over available node time.", max_value=100.0),
    # build
    _m("build_time", "build", "s", LOWER, "high", 10, "run",
       "Wall time of the build step.", aliases={"build_duration": None}),
    _m("build_success_rate", "build", "percent", HIGHER, "critical", 5, "run",
       "Share of successful builds.", max_value=100.0),
    _m("artifact_size", "build", "MB", LOWER, "low", 10, "run",
       "Size of the build's artifacts.", aliases={"artifact_size_bytes": "bytes"}),
    # coverage
    _m("code_coverage", "coverage", "percent", HIGHER, "high", 2, "run",
       "Line coverage of the test suite.", max_value=100.0,
       aliases={"coverage_percent": None, "coverage": None}),
    _m("test_count", "coverage", "count", HIGHER, "medium", 5, "run",
       "Number of tests collected."),
    _m("cyclomatic_complexity", "coverage", "count", LOWER, "low", 10, "run",
       "Mean cyclomatic complexity of the code under test."),
    # environment
    _m("os_overhead", "environment", "percent", LOWER, "low", 25, "node",
       "CPU share spent in the operating system rather than in tests.", max_value=100.0),
    _m("hardware_overhead", "environment", "percent", LOWER, "low", 25, "node",
       "Time lost to hardware effects (throttling, interrupts).", max_value=100.0),
    _m("virtualization_overhead", "environment", "percent", LOWER, "low", 25, "node",
       "CPU steal time from the hypervisor.", max_value=100.0, aliases={"cpu_steal": None}),
    _m("container_startup_time", "environment", "s", LOWER, "medium", 20, "run",
       "Time to start the test container or VM."),
)

CATEGORIES = ("test_execution", "resource_utilization", "node_health", "throughput", "queue",
              "build", "coverage", "environment")

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}


def get_metric(name: str) -> Metric:
    """The catalog entry for a canonical metric name; KeyError names the unknown metric."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known metrics: {', '.join(sorted(BY_NAME))}") from None


def alias_rows() -> list[tuple[str, str, str | None]]:
    """(name as sent, canonical metric, unit implied by that name) for every accepted name."""
    rows = []
    for metric in METRICS:
        rows.append((metric.name, metric.name, None))
        rows.extend((alias, metric.name, unit) for alias, unit in metric.aliases.items())
    return rows


def unit_rows() -> list[tuple[str, str, float]]:
    """(canonical metric, accepted unit in lower case, factor to the canonical unit)."""
    return [(m.name, unit, factor) for m in METRICS for unit, factor in m.unit_factors.items()]


def _check_catalog() -> None:
    names = [name for name, _, _ in alias_rows()]
    duplicates = {n for n in names if names.count(n) > 1}
    assert not duplicates, f"metric names or aliases used twice: {duplicates}"
    for metric in METRICS:
        assert metric.category in CATEGORIES, metric
        assert metric.importance in IMPORTANCE_LEVELS, metric
        for unit in metric.aliases.values():
            assert unit is None or unit.lower() in metric.unit_factors, (metric.name, unit)


_check_catalog()

"""Point anomalies and node-health outliers on data with known truth."""

import numpy as np
import pandas as pd
import pytest

from perf_pipeline.analysis.anomalies import (
    detect_point_anomalies,
    fleet_anomalies,
    node_day_features,
    node_health_outliers,
)


def _noise(family: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if family == "gaussian":
        return 50 + 5 * rng.normal(size=n)
    if family == "lognormal":  # durations: multiplicative, long right tail
        return 2.0 * rng.lognormal(0, 0.3, n)
    if family == "half_normal":  # an error rate near zero: long right tail, additive
        return 0.5 + np.abs(rng.normal(0, 0.1, n))
    if family == "ar1":
        e = np.zeros(n)
        for i in range(1, n):
            e[i] = 0.7 * e[i - 1] + rng.normal(0, np.sqrt(1 - 0.49))
        return 40 + 4 * e
    if family == "daily_cycle":  # hourly load, busy afternoons
        hours = np.arange(n) % 24
        return 40 + 20 * np.clip(np.sin(np.pi * (hours - 7) / 14), 0, None) + 3 * rng.normal(size=n)
    raise ValueError(family)


@pytest.mark.parametrize("family", ["gaussian", "lognormal", "half_normal", "ar1", "daily_cycle"])
def test_stationary_noise_of_every_shape_raises_nothing(family):
    rng = np.random.default_rng(5)
    period = 24 if family == "daily_cycle" else None
    found = [detect_point_anomalies(_noise(family, 720, rng), log_scale=None, period=period)
             for _ in range(20)]
    assert sum(len(f) for f in found) == 0  # 14,400 points


def test_spikes_dips_and_a_burst_are_found_where_they_are():
    rng = np.random.default_rng(6)
    values = _noise("gaussian", 500, rng)
    values[100] *= 3  # spike
    values[250] /= 3  # dip
    values[400:402] *= 2.5  # a burst of two
    found = detect_point_anomalies(values, log_scale=None, timestamps=list(range(500)))
    assert [(a.start_index, a.end_index, a.kind) for a in found] == [
        (100, 100, "spike"), (250, 250, "dip"), (400, 401, "burst")]
    spike = found[0]
    assert spike.value == pytest.approx(values[100])
    assert spike.expected == pytest.approx(50, abs=4)
    assert spike.score >= 6 and "above the rolling median" in spike.reason
    assert spike.start_timestamp == 100


def test_a_level_shift_is_not_an_anomaly_and_a_spike_on_the_daily_peak_is():
    rng = np.random.default_rng(7)
    values = _noise("daily_cycle", 24 * 21, rng)
    values[300:] += 30  # a lasting change: change-point detection's business
    peak = 24 * 10 + 14  # mid-afternoon, at the top of the cycle
    values[peak] += 25
    found = detect_point_anomalies(values, period=24)
    assert [a.start_index for a in found] == [peak]


def test_missing_values_keep_their_positions_and_constant_series_raise_nothing():
    values = np.full(200, 10.0)
    values[50] = np.nan
    values[120] = 10.5  # 5% off a flat level: below the 1%-of-level MAD floor's 6 σ (~9%)
    assert detect_point_anomalies(values) == []
    values[150] = 20.0
    (spike,) = detect_point_anomalies(values)
    assert spike.start_index == 150


def _series_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["timestamp"] = pd.to_datetime(frame["timestamp"])
    return frame


def _test_runs(rng: np.random.Generator, *, tests: int, nodes: int, sigma, factor=lambda node, run: 1.0):
    """400 runs two hours apart, each running every test once on a random node: test t
    takes 2(t + 1) s times log-normal noise of `sigma(node)` times `factor(node, run)`."""
    start = pd.Timestamp("2026-01-01")
    rows = []
    for run in range(400):
        for test in range(tests):
            node = f"node-{rng.integers(1, nodes + 1)}"
            value = 2.0 * (test + 1) * np.exp(rng.normal(0, sigma(node))) * factor(node, run)
            rows.append({"timestamp": start + pd.Timedelta(hours=2 * run, seconds=test),
                         "metric_name": "test_execution_time", "test_name": f"t{test}",
                         "node_id": None, "run_node_id": node, "test_run_id": f"run-{run}",
                         "metric_scope": "test", "scope": "test", "value": value, "level": value})
    return _series_frame(rows)


def test_a_noisy_nodes_scatter_is_not_a_test_anomaly_but_a_spike_on_a_quiet_node_is():
    """Per-test series span nodes: a node whose runs scatter 4x as far sets its own scale."""
    frame = _test_runs(np.random.default_rng(8), tests=3, nodes=8,
                       sigma=lambda node: 0.32 if node == "node-1" else 0.08)
    quiet = frame.index[(frame.run_node_id != "node-1") & (frame.test_name == "t1")][200]
    frame.loc[quiet, ["value", "level"]] *= 4
    found, skipped = fleet_anomalies(frame)
    assert skipped == 0
    assert list(found["test_run_id"]) == [frame.loc[quiet, "test_run_id"]]
    assert found["node_id"].iloc[0] == frame.loc[quiet, "run_node_id"]
    assert found["value"].iloc[0] == pytest.approx(frame.loc[quiet, "value"])


def test_a_node_that_stays_slow_is_not_a_stream_of_test_spikes_but_a_spike_on_it_still_is():
    """A node whose runs turn twice as slow for the last quarter of the window (a failing
    disk) is a lasting change, which change points report as a node problem; in each
    test's series its runs, spread among other nodes' runs, would otherwise each look like
    a spike. A single run four times as slow on that node, after it slowed, still is one."""
    frame = _test_runs(np.random.default_rng(9), tests=5, nodes=6, sigma=lambda node: 0.05,
                       factor=lambda node, run: 2.0 if node == "node-3" and run >= 300 else 1.0)
    on_slow_node = frame.index[(frame.run_node_id == "node-3") & (frame.test_name == "t2")
                               & (frame.test_run_id.str[4:].astype(int) >= 340)][0]
    frame.loc[on_slow_node, ["value", "level"]] *= 4
    found, _ = fleet_anomalies(frame)
    assert list(found["test_run_id"]) == [frame.loc[on_slow_node, "test_run_id"]]
    assert found["node_id"].iloc[0] == "node-3" and found["kind"].iloc[0] == "spike"
    # expected in the metric's units: the test's level on that node at the time, twice its usual
    assert found["expected"].iloc[0] == pytest.approx(2 * 6.0, rel=0.1)



def test_a_window_of_node_and_run_series_only_is_scored_too():
    """No per-test series at all (a fleet that sends node samples and CI metrics only)."""
    rng = np.random.default_rng(4)
    start = pd.Timestamp("2026-01-01")
    values = 50 + rng.normal(0, 2, 300)
    values[150] = 90
    frame = _series_frame(
        [{"timestamp": start + pd.Timedelta(hours=i), "metric_name": "cpu_usage", "test_name": None,
          "node_id": "node-1", "run_node_id": "node-1", "test_run_id": None, "metric_scope": "node",
          "scope": "node", "value": v, "level": v} for i, v in enumerate(values)]
        + [{"timestamp": start + pd.Timedelta(hours=i), "metric_name": "build_time", "test_name": None,
            "node_id": None, "run_node_id": "ci", "test_run_id": f"run-{i}", "metric_scope": "run",
            "scope": "overall", "value": v, "level": v} for i, v in enumerate(300 + rng.normal(0, 5, 300))])
    found, skipped = fleet_anomalies(frame)
    assert skipped == 0
    assert list(zip(found["metric_name"], found["timestamp"])) == [("cpu_usage", start + pd.Timedelta(hours=150))]

def test_series_stuck_on_one_value_are_skipped_not_scored():
    start = pd.Timestamp("2026-01-01")
    retries = np.zeros(300)
    retries[[40, 41, 200]] = 1  # rare retries: the MAD is zero, any retry would be "infinite σ"
    frame = _series_frame([{"timestamp": start + pd.Timedelta(hours=i), "metric_name": "test_retry_count",
                            "test_name": "t", "node_id": None, "run_node_id": "node-1",
                            "test_run_id": f"run-{i}", "metric_scope": "test", "scope": "test",
                            "value": v, "level": v} for i, v in enumerate(retries)])
    found, skipped = fleet_anomalies(frame)
    assert found.empty and skipped == 1


def _node_days(rng: np.random.Generator, *, sick: str | None = None) -> pd.DataFrame:
    rows = []
    for day in pd.date_range("2026-01-01", periods=20, freq="D"):
        for n in range(12):
            node = f"node-{n:02d}"
            for hour in range(0, 24, 3):
                at = day + pd.Timedelta(hours=hour)
                errors = 0.5 + abs(rng.normal(0, 0.1))
                if node == sick and day >= pd.Timestamp("2026-01-15"):
                    errors *= 4
                for metric, value in (("cpu_usage", 40 + 4 * rng.normal()),
                                      ("memory_utilization", 35 + 2 * rng.normal()),
                                      ("node_error_rate", errors)):
                    rows.append({"timestamp": at, "scope": "node", "metric_scope": "node",
                                 "metric_name": metric, "node_id": node, "level": value})
    return pd.DataFrame(rows)


def test_a_node_whose_error_rate_quadruples_is_the_outlier_and_the_reason_says_why():
    rng = np.random.default_rng(9)
    features = node_day_features(_node_days(rng, sick="node-03"))
    result = node_health_outliers(features, features=["cpu_usage", "memory_utilization", "node_error_rate"])
    outliers = result[result.is_outlier]
    assert set(outliers.node_id) == {"node-03"}
    assert set(outliers.day) == set(pd.date_range("2026-01-15", periods=6, freq="D"))
    assert all(reason.startswith("node_error_rate +") for reason in outliers.reason)


def test_a_healthy_fleet_has_no_outlier_node():
    rng = np.random.default_rng(10)
    features = node_day_features(_node_days(rng))
    result = node_health_outliers(features, features=["cpu_usage", "memory_utilization", "node_error_rate"])
    assert not result.is_outlier.any()
    assert result.outlier_score.notna().all()

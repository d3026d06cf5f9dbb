"""Node scores, limit-crossing risk and node selection on fleets with known differences."""

from datetime import datetime

import numpy as np
import pandas as pd
import pytest

from perf_pipeline.analysis import nodes

AS_OF = datetime(2026, 11, 20)


def _test_points(rng, *, speed: dict[str, float], noise: dict[str, float] | None = None,
                 runs_on: dict[str, list[str]] | None = None, tests: int = 30,
                 runs: int = 200) -> pd.DataFrame:
    """Per-test durations: test t on node n takes base[t] × speed[n] × log-normal noise.
    `runs_on` limits a node to some tests (the test mix); every other node runs any test."""
    noise = noise or {}
    names = [f"t{i:02d}" for i in range(tests)]
    types = ["e2e" if i < tests // 3 else "unit" for i in range(tests)]
    base = np.where(np.array(types) == "e2e", 20.0, 0.5) * rng.lognormal(0, 0.5, tests)
    rows = []
    node_ids = list(speed)
    for run in range(runs):
        for t, name in enumerate(names):
            eligible = [n for n in node_ids if runs_on is None or n not in runs_on or name in runs_on[n]]
            node = eligible[rng.integers(len(eligible))]
            value = base[t] * speed[node] * np.exp(rng.normal(0, 0.08 * noise.get(node, 1.0)))
            rows.append((AS_OF - pd.Timedelta(hours=200 - run), "test_execution_time", name,
                         types[t], node, "linux-large" if node.endswith("9") else "linux-small",
                         value, "test"))
    return pd.DataFrame(rows, columns=["timestamp", "metric_name", "test_name", "test_type",
                                       "node_id", "node_type", "value", "metric_scope"])


def _scores(points: pd.DataFrame, metric: str) -> pd.Series:
    table = nodes.node_scores(points)
    return table[table["metric_name"] == metric].set_index("node_id")["score"]


def test_a_slower_node_ranks_last_on_the_same_tests_whatever_its_test_mix():
    rng = np.random.default_rng(1)
    speed = {f"n{i}": 1.0 for i in range(8)}
    speed["n1"] = 1.3
    e2e_tests = [f"t{i:02d}" for i in range(10)]
    # n0 runs only the slow e2e tests at normal speed; a mean duration would rank it last
    points = _test_points(rng, speed=speed, runs_on={"n0": e2e_tests})
    assert points.groupby("node_id")["value"].mean().idxmax() == "n0"
    scores = _scores(points, "test_execution_time")
    assert scores.idxmin() == "n1" and scores["n1"] < 5
    assert 20 < scores["n0"] < 80
    table = nodes.node_scores(points)
    evidence = table[(table["metric_name"] == "test_execution_time") & (table["node_id"] == "n1")]
    assert evidence["effect"].iloc[0] == pytest.approx(1.3, rel=0.03)
    assert "30% higher than the fleet on the same" in evidence["evidence"].iloc[0]


def test_the_noisy_node_is_least_stable_and_equal_nodes_score_near_the_middle():
    rng = np.random.default_rng(2)
    speed = {f"n{i}": 1.0 for i in range(8)}
    points = _test_points(rng, speed=speed, noise={"n5": 3.5})
    stability = _scores(points, nodes.STABILITY)
    assert stability.idxmin() == "n5" and stability["n5"] < 5
    speed_scores = _scores(points, "test_execution_time")
    # identical nodes: no one is pushed to either end by noise alone
    assert speed_scores.between(25, 75).all(), speed_scores


def test_node_metrics_are_scored_against_the_fleet_in_their_direction():
    rng = np.random.default_rng(3)
    hours = pd.date_range("2026-11-01", periods=240, freq="h")
    rows = []
    for i in range(6):
        level = {"node_availability": 99.5 - (5 if i == 2 else 0), "cpu_usage": 40 + (20 if i == 4 else 0)}
        for metric, value in level.items():
            rows.append(pd.DataFrame({"timestamp": hours, "metric_name": metric, "test_name": None,
                                      "test_type": None, "node_id": f"n{i}", "node_type": "x",
                                      "value": value + rng.normal(0, 0.3, len(hours)),
                                      "metric_scope": "node"}))
    points = pd.concat(rows, ignore_index=True)
    assert _scores(points, "node_availability").idxmin() == "n2"  # higher is better
    assert _scores(points, "cpu_usage").idxmin() == "n4"  # lower is better
    overall = _scores(points, nodes.OVERALL)
    assert set(overall.nsmallest(2).index) == {"n2", "n4"}


def test_a_test_type_clearly_slower_on_one_node_type_is_reported():
    rng = np.random.default_rng(4)
    speed = {f"n{i}": 1.0 for i in range(10)}
    points = _test_points(rng, speed=speed)
    quiet = nodes.node_type_penalties(points)
    assert quiet.empty, quiet
    slow_e2e = (points["node_type"] == "linux-large") & (points["test_type"] == "e2e")
    points.loc[slow_e2e, "value"] *= 1.5
    found = nodes.node_type_penalties(points)
    assert list(zip(found["test_type"], found["node_type"], found["best_node_type"])) == [
        ("e2e", "linux-large", "linux-small")]
    assert found["slowdown_percent"].iloc[0] == pytest.approx(50, abs=8)


def _trend(node, metric, slope, *, direction="degrading", low=None, high=None):
    return {"node_id": node, "metric_name": metric, "theil_sen_slope_per_day": slope,
            "theil_sen_low": slope * 0.8 if low is None else low,
            "theil_sen_high": slope * 1.2 if high is None else high,
            "trend_direction": direction, "p_value_adjusted": 1e-6}


def test_risk_extrapolates_degrading_trends_to_the_limits():
    trends = pd.DataFrame([
        _trend("a", "memory_utilization", 2.0),                  # 70 → 90 in 10 days
        _trend("b", "memory_utilization", 0.01, direction="stable"),
        _trend("c", "node_availability", -0.5),                    # higher is better: 98 → 95 in 6 days
        _trend("d", "node_failure_rate", 0.1),                     # already past 5
    ])
    levels = pd.DataFrame({"node_id": ["a", "b", "c", "d"],
                           "metric_name": ["memory_utilization", "memory_utilization",
                                           "node_availability", "node_failure_rate"],
                           "current_value": [70.0, 85.0, 98.0, 7.0]})
    risk = nodes.health_risk(trends, levels, as_of=AS_OF).set_index("node_id")
    assert risk.loc["a", "days_to_limit"] == pytest.approx(10)
    assert risk.loc["a", "predicted_crossing"] == AS_OF + pd.Timedelta(days=10)
    assert risk.loc["a", "earliest_crossing"] == AS_OF + pd.Timedelta(days=20 / 2.4)
    assert risk.loc["a", "risk_score"] == pytest.approx(100 * np.exp(-10 / 30))
    assert risk.loc["b", "risk_score"] == 0 and pd.isna(risk.loc["b", "predicted_crossing"])
    assert risk.loc["c", "days_to_limit"] == pytest.approx(6)
    assert risk.loc["d", "risk_score"] == 100 and "past its limit" in risk.loc["d", "evidence"]
    assert list(nodes.health_risk(trends, levels, as_of=AS_OF)["node_id"])[:2] == ["d", "c"]


def test_select_nodes_puts_fast_healthy_nodes_first_and_risky_ones_last():
    speed = pd.DataFrame({"node_id": ["a", "b", "c", "d", "a", "b", "c", "d"],
                          "test_type": ["e2e"] * 4 + ["unit"] * 4,
                          "score": [90, 70, 50, 95, 10, 60, 80, 95]})
    stability = pd.DataFrame({"node_id": ["a", "b", "c", "d"], "score": [50, 50, 50, 50]})
    risk = pd.DataFrame({"node_id": ["d"], "node_risk_score": [80.0]})
    chosen = nodes.select_nodes(speed, stability, risk, test_type="e2e", k=4)
    assert list(chosen["node_id"]) == ["a", "b", "c", "d"]
    assert not chosen["healthy"].iloc[-1] and "at risk" in chosen["reason"].iloc[-1]
    assert list(nodes.select_nodes(speed, stability, risk, test_type="unit", k=2)["node_id"]) == ["c", "b"]
    with pytest.raises(ValueError, match="no node has run tests of type 'perf'"):
        nodes.select_nodes(speed, stability, risk, test_type="perf")
    with pytest.raises(ValueError, match="k must be"):
        nodes.select_nodes(speed, stability, risk, k=0)


def test_select_nodes_on_a_database_without_scores_says_why(tmp_path):
    from perf_pipeline.client import PerformanceTrends
    from perf_pipeline.storage.warehouse import open_warehouse

    with open_warehouse(tmp_path / "perf.duckdb"):
        pass  # the schema, no rows
    with pytest.raises(LookupError, match="has not run, or its window held no node or per-test metric"):
        PerformanceTrends(database=tmp_path / "perf.duckdb").select_nodes()

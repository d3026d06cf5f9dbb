"""Each recommendation rule fires on its condition, cites its numbers, and stays quiet otherwise."""

import json

import pandas as pd
import pytest

from perf_pipeline.analysis.recommendations import COLUMNS, recommend

T0 = pd.Timestamp("2026-11-10 12:00")


def _trend(scope, metric, node=None, *, direction="degrading", change=30.0, slope=1.0):
    return {"scope": scope, "metric_name": metric, "test_name": None, "node_id": node,
            "trend_direction": direction, "change_over_window_percent": change,
            "change_rate_percent": change / 4, "theil_sen_slope_per_day": slope,
            "p_value_adjusted": 1e-5}


def _change(scope, metric, *, test=None, node=None, kind="regression", magnitude=30.0,
            at=T0, incident="i1"):
    return {"scope": scope, "metric_name": metric, "test_name": test, "node_id": node,
            "timestamp": at, "first_test_run_id": "run-7", "kind": kind, "before": 1.0,
            "after": 1 + magnitude / 100, "magnitude_percent": magnitude, "p_value": 1e-9,
            "incident_id": incident}


def _inputs(**overrides):
    empty = {
        "trends": pd.DataFrame(columns=list(_trend("node", "x"))),
        "risk": pd.DataFrame(columns=["node_id", "metric_name", "current_value", "limit_value",
                                      "slope_per_day", "days_to_limit", "risk_score",
                                      "node_risk_score", "evidence"]),
        "levels": pd.DataFrame(columns=["node_id", "metric_name", "current_value"]),
        "incidents": pd.DataFrame(columns=["incident_id", "attribution", "kind", "timestamp",
                                           "first_test_run_id", "first_commit", "node_id"]),
        "changes": pd.DataFrame(columns=list(_change("test", "x"))),
        "causes": pd.DataFrame(columns=["incident_id", "rank", "cause_type", "cause", "score", "evidence"]),
        "penalties": pd.DataFrame(columns=["test_type", "node_type", "best_node_type",
                                           "slowdown_percent", "p_value", "n_points"]),
        "fleet": {"cpu_usage": 70.0, "queue_wait_time": 20.0, "parallel_tests": 4.0},
    }
    return {**empty, **overrides}


def _only(table: pd.DataFrame, kind: str) -> tuple[pd.Series, dict]:
    rows = table[table["kind"] == kind]
    assert len(rows) == 1, table[["kind", "subject"]]
    return rows.iloc[0], json.loads(rows.iloc[0]["evidence_json"])


def test_quiet_data_recommends_nothing():
    table = recommend(**_inputs())
    assert table.empty and list(table.columns) == COLUMNS


def test_the_seed_rules_fire_on_memory_durations_and_failure_rate():
    trends = pd.DataFrame([_trend("node", "memory_utilization", "n3", slope=1.5),
                           _trend("node", "memory_utilization", "n4", slope=0.2),
                           _trend("overall", "test_execution_time", change=18.0)])
    levels = pd.DataFrame({"node_id": ["n3", "n4", "n1", "n2", "n5"],
                           "metric_name": ["memory_utilization", "memory_utilization",
                                           "node_failure_rate", "node_failure_rate", "node_failure_rate"],
                           "current_value": [84.0, 40.0, 8.0, 2.0, 2.2]})
    table = recommend(**_inputs(trends=trends, levels=levels))
    memory, numbers = _only(table, "raise_memory_limit")
    assert memory["subject"] == "n3" and numbers["memory_utilization"] == 84.0
    assert numbers["slope_per_day"] == 1.5 and memory["severity"] == "high"
    durations, numbers = _only(table, "adjust_parallelism")
    assert numbers["change_over_window_percent"] == 18.0 and durations["expected_gain_percent"] == 18.0
    failing, numbers = _only(table, "investigate_node")
    assert failing["subject"] == "n1" and numbers["current_value"] == 8.0
    assert numbers["fleet_median"] == pytest.approx(2.2)
    assert list(table["severity"]) == sorted(table["severity"], key=["critical", "high", "medium", "low"].index)


def test_a_live_code_regression_is_bisected_and_an_undone_one_is_not():
    incidents = pd.DataFrame([
        {"incident_id": "i1", "attribution": "code_change", "kind": "regression", "timestamp": T0,
         "first_test_run_id": "run-7", "first_commit": "abc", "node_id": None},
        {"incident_id": "i2", "attribution": "code_change", "kind": "regression",
         "timestamp": T0 + pd.Timedelta(days=1), "first_test_run_id": "run-19", "first_commit": "def",
         "node_id": None}])
    changes = pd.DataFrame([
        _change("test", "test_execution_time", test="a", magnitude=35.0),
        _change("test", "test_execution_time", test="b", magnitude=4.0),  # below the threshold
        _change("test", "test_execution_time", test="c", incident="i2", at=T0 + pd.Timedelta(days=1)),
        _change("test", "test_execution_time", test="c", kind="improvement", magnitude=-25.0,
                incident="i3", at=T0 + pd.Timedelta(days=3))])
    causes = pd.DataFrame([
        {"incident_id": "i1", "rank": 1, "cause_type": "commit", "cause": "aaa..abc", "score": 0.9,
         "evidence": "bisect after aaa up to abc"},
        {"incident_id": "i2", "rank": 1, "cause_type": "commit", "cause": "ccc..def", "score": 0.9,
         "evidence": "bisect after ccc up to def"}])
    table = recommend(**_inputs(incidents=incidents, changes=changes, causes=causes))
    bisect, numbers = _only(table, "bisect_regression")
    assert bisect["action"] == "bisect commits aaa..abc" and numbers["tests"] == ["a"]
    assert numbers["first_test_run_id"] == "run-7" and numbers["worst_magnitude_percent"] == 35.0
    assert bisect["severity"] == "high" and bisect["incident_id"] == "i1"


def test_a_slowed_node_and_a_node_at_risk_are_drained_with_their_evidence():
    incidents = pd.DataFrame([{"incident_id": "n", "attribution": "node_problem", "kind": "regression",
                               "timestamp": T0, "first_test_run_id": "run-7", "first_commit": None,
                               "node_id": "n2"}])
    changes = pd.DataFrame([_change("node", "test_execution_time", node="n2", magnitude=40.0, incident="n")])
    causes = pd.DataFrame([{"incident_id": "n", "rank": 1, "cause_type": "context",
                            "cause": "runner_image = r2", "score": 1.0, "evidence": "new image"}])
    risk = pd.DataFrame([{"node_id": "n6", "metric_name": "memory_utilization", "current_value": 85.0,
                          "limit_value": 90.0, "slope_per_day": 1.0, "days_to_limit": 5.0,
                          "risk_score": 85.0, "node_risk_score": 85.0, "evidence": "memory 85%"},
                         {"node_id": "n7", "metric_name": "memory_utilization", "current_value": 50.0,
                          "limit_value": 90.0, "slope_per_day": 0.1, "days_to_limit": 400.0,
                          "risk_score": 0.0, "node_risk_score": 0.0, "evidence": "quiet"}])
    table = recommend(**_inputs(incidents=incidents, changes=changes, causes=causes, risk=risk))
    drains = table[table["kind"] == "drain_node"].set_index("subject")
    assert set(drains.index) == {"n2", "n6"}
    slowed = json.loads(drains.loc["n2", "evidence_json"])
    assert slowed["magnitude_percent"] == 40.0 and slowed["timestamp"] == T0.isoformat()
    assert "runner_image = r2" in drains.loc["n2", "action"]
    assert drains.loc["n2", "expected_gain_percent"] == pytest.approx(100 * (1 - 1 / 1.4))
    assert json.loads(drains.loc["n6", "evidence_json"])["days_to_limit"] == 5.0
    # the same condition keeps its key from run to run; a new start is a new condition
    again = recommend(**_inputs(incidents=incidents, changes=changes, causes=causes, risk=risk))
    assert list(again["condition_key"]) == list(table["condition_key"])
    later = changes.assign(timestamp=T0 + pd.Timedelta(days=9))
    moved = recommend(**_inputs(incidents=incidents, changes=later, causes=causes, risk=risk))
    assert set(moved["condition_key"]) != set(table["condition_key"])


def test_slow_node_types_and_idle_capacity_with_queueing_are_reported():
    penalties = pd.DataFrame([{"test_type": "e2e", "node_type": "small", "best_node_type": "large",
                               "slowdown_percent": 50.0, "p_value": 1e-8, "n_points": 300}])
    fleet = {"cpu_usage": 30.0, "queue_wait_time": 150.0, "parallel_tests": 4.0}
    table = recommend(**_inputs(penalties=penalties, fleet=fleet))
    move, numbers = _only(table, "move_test_type")
    assert move["subject"] == "e2e@small" and numbers["slowdown_percent"] == 50.0
    assert move["expected_gain_percent"] == pytest.approx(100 / 3)
    parallel, numbers = _only(table, "raise_parallelism")
    assert numbers == {"cpu_usage": 30.0, "queue_wait_time": 150.0, "parallel_tests": 4.0,
                       "suggested_parallel_tests": 10, "target_cpu_percent": 75.0}
    busy = recommend(**_inputs(fleet={**fleet, "cpu_usage": 65.0}))
    assert busy.empty

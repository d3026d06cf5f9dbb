"""The alert outbox: one alert per regression, never twice, a lifecycle, mutes; delivery once
per channel through real servers on loopback, with retries after a receiver's outage."""

import json
from datetime import datetime, timedelta

import pandas as pd
import pytest

from perf_pipeline.alerts import ALERT_COLUMNS, backoff, deliver_outbox, reconcile
from perf_pipeline.config import MonitoringSettings
from perf_pipeline.notify.slack import SlackWebhookChannel
from perf_pipeline.storage.warehouse import open_warehouse

SECRET_URL_PATH = "/services/T000/B000/secret"

T0 = pd.Timestamp("2026-11-10 12:00")
NOW = datetime(2026, 11, 20, 8)


def _change(test, *, kind="regression", magnitude=30.0, at=T0, incident="i1", node=None, scope="test"):
    return {"scope": scope, "metric_name": "test_execution_time", "test_name": test, "node_id": node,
            "timestamp": at, "first_test_run_id": "run-7", "kind": kind, "before": 2.0,
            "after": 2.0 * (1 + magnitude / 100), "magnitude_percent": magnitude, "p_value": 1e-9,
            "incident_id": incident}


def _incident(incident="i1", at=T0, attribution="code_change", node=None, kind="regression"):
    return {"incident_id": incident, "attribution": attribution, "kind": kind, "timestamp": at,
            "first_test_run_id": "run-7", "first_commit": "abcdef1234567890", "node_id": node}


CAUSES = pd.DataFrame([{"incident_id": "i1", "rank": 1, "cause_type": "commit", "cause": "aaa..abc",
                        "score": 0.9, "evidence": "bisect after aaa up to abc"}])
NO_TRENDS = pd.DataFrame(columns=["scope", "metric_name", "test_name", "node_id", "is_significant",
                                  "trend_direction", "change_over_window_percent"])
EMPTY = pd.DataFrame(columns=ALERT_COLUMNS)


def _reconcile(outbox, incidents, changes, *, settings=MonitoringSettings(), now=NOW, trends=NO_TRENDS):
    return reconcile(outbox, incidents=pd.DataFrame(incidents), changes=pd.DataFrame(changes),
                     causes=CAUSES, trends=trends, settings=settings, now=now)


def test_one_alert_per_incident_with_its_evidence_and_never_twice():
    changes = [_change("a", magnitude=35.0), _change("b", magnitude=20.0), _change("c", magnitude=4.0)]
    outbox, counts = _reconcile(EMPTY, [_incident()], changes)
    assert counts["created"] == 1 and len(outbox) == 1
    alert = outbox.iloc[0]
    assert list(alert.tests) == ["a", "b"]  # c moved less than the threshold
    assert alert.magnitude_percent == 35.0 and alert.before == 2.0 and alert.after == pytest.approx(2.7)
    assert alert.suspected_cause == "commit: aaa..abc" and alert.cause_evidence.startswith("bisect")
    assert alert.status == "new" and alert.severity == "critical"  # a critical metric
    # the next run places the start one run later and calls the incident by another name
    moved = [{**c, "incident_id": "i9", "timestamp": T0 + pd.Timedelta(hours=2)} for c in changes]
    again, counts = _reconcile(outbox, [_incident("i9", at=T0 + pd.Timedelta(hours=2))], moved,
                               now=NOW + timedelta(days=1))
    assert counts == {"created": 0, "updated": 1, "resolved": 0, "suppressed": 0}
    assert list(again.alert_id) == list(outbox.alert_id) and again.iloc[0].status == "new"


def test_an_alert_marked_invalid_is_not_raised_again():
    outbox, _ = _reconcile(EMPTY, [_incident()], [_change("a")])
    outbox.loc[0, "status"] = "invalid"
    again, counts = _reconcile(outbox, [_incident()], [_change("a")])
    assert counts["suppressed"] == 1 and counts["created"] == 0 and list(again.status) == ["invalid"]


def test_an_alert_resolves_itself_when_the_series_recovers():
    outbox, _ = _reconcile(EMPTY, [_incident()], [_change("a")])
    outbox.loc[0, "status"] = "acknowledged"
    recovered = [_change("a"), _change("a", kind="improvement", magnitude=-23.0,
                                       at=T0 + pd.Timedelta(days=3), incident="i2")]
    later, counts = _reconcile(outbox, [_incident(), _incident("i2", kind="improvement")], recovered)
    assert counts["resolved"] == 1 and later.iloc[0].status == "resolved"
    assert later.iloc[0].status_note == "auto-resolved: the series recovered"
    # a regression that only ages out of the window stays open: nobody saw it recover
    aged, counts = _reconcile(outbox, [], [])
    assert counts["resolved"] == 0 and aged.iloc[0].status == "acknowledged"


def test_muted_tests_and_small_or_untracked_changes_raise_nothing():
    muted = MonitoringSettings(mutes=[{"test": "tests/flaky/*", "until": "2026-12-01"}])
    outbox, _ = _reconcile(EMPTY, [_incident()], [_change("tests/flaky/x.py::t")], settings=muted)
    assert outbox.empty
    assert _reconcile(EMPTY, [_incident()], [_change("a", magnitude=8.0)])[0].empty
    untracked = MonitoringSettings(metrics_to_track=["cpu_usage"])
    assert _reconcile(EMPTY, [_incident()], [_change("a")], settings=untracked)[0].empty
    off = MonitoringSettings(alert_on_regression=False)
    assert _reconcile(EMPTY, [_incident()], [_change("a")], settings=off)[0].empty


def test_a_degrading_node_is_one_alert_whether_seen_as_a_trend_or_a_step():
    trends = pd.DataFrame([
        {"scope": "node", "metric_name": m, "test_name": None, "node_id": "n5", "is_significant": True,
         "trend_direction": "degrading", "change_over_window_percent": c,
         "change_rate_percent": c / 4, "window_mean": 50.0, "window_start": T0, "n_days": 30,
         "p_value_adjusted": 1e-8, "unit": "percent"}
        for m, c in (("memory_utilization", 45.0), ("node_error_rate", 120.0))])
    outbox, _ = _reconcile(EMPTY, [], [], trends=trends)
    assert len(outbox) == 1 and outbox.iloc[0].attribution == "trend"
    assert "node_error_rate" in outbox.iloc[0].title and "memory_utilization" in outbox.iloc[0].title
    step = [_change(None, node="n5", scope="node", incident="n")]
    both, _ = _reconcile(EMPTY, [_incident("n", attribution="node_problem", node="n5")], step, trends=trends)
    assert list(both.attribution) == ["node_problem"]
    calm = trends.assign(is_significant=False)
    resolved, counts = _reconcile(outbox, [], [], trends=calm)
    assert counts["resolved"] == 1 and resolved.iloc[0].status == "resolved"


def test_backoff_doubles_up_to_an_hour_and_honours_retry_after():
    assert [backoff(n).total_seconds() for n in (1, 2, 3)] == [30, 60, 120]
    assert backoff(20) == timedelta(hours=1) and backoff(1, retry_after=300) == timedelta(seconds=300)


def _stored_outbox(tmp_path):
    outbox, _ = _reconcile(EMPTY, [_incident()], [_change("tests/a.py::t")])
    path = tmp_path / "perf.duckdb"
    with open_warehouse(path) as wh:
        wh.replace_table("regression_alerts", outbox)
    return path


def test_a_receiver_that_fails_for_a_while_gets_the_alert_once_after_it_recovers(tmp_path, receiver):
    path = _stored_outbox(tmp_path)
    channel = SlackWebhookChannel(f"http://127.0.0.1:{receiver.port}{SECRET_URL_PATH}")
    receiver.reply(503, b"down")
    with open_warehouse(path) as wh:
        assert deliver_outbox(wh, [channel], now=NOW) == {"sent": 0, "failed": 1, "gave_up": 0, "in_doubt": 0}
        # before the backoff has passed nothing is tried again
        assert deliver_outbox(wh, [channel], now=NOW + timedelta(seconds=10)) == {"sent": 0, "failed": 0, "gave_up": 0, "in_doubt": 0}
        assert deliver_outbox(wh, [channel], now=NOW + timedelta(seconds=31))["sent"] == 1
        for minutes in (5, 60, 600):
            assert deliver_outbox(wh, [channel], now=NOW + timedelta(minutes=minutes))["sent"] == 0
        state = wh.table("alert_deliveries").iloc[0]
    delivered = [json.loads(r["body"]) for r in receiver.requests]
    assert len(delivered) == 2  # the refused attempt and the delivery
    assert state.state == "sent" and state.attempts == 2 and "503" in state.last_error
    assert "secret" not in state.last_error
    text = json.dumps(delivered[-1])
    for evidence in ("test_execution_time", "tests/a.py::t", "run-7", "abcdef1", "aaa..abc", "+30"):
        assert evidence in text, evidence


def test_acknowledged_alerts_are_not_delivered_and_dead_receivers_are_given_up_on(tmp_path, receiver):
    path = _stored_outbox(tmp_path)
    gone = SlackWebhookChannel(f"http://127.0.0.1:{receiver.port}/missing")
    receiver.reply(404, b"no_service")
    with open_warehouse(path) as wh:
        alert_id = wh.table("regression_alerts").alert_id.iloc[0]
        assert deliver_outbox(wh, [gone], now=NOW) == {"sent": 0, "failed": 0, "gave_up": 1, "in_doubt": 0}
        assert deliver_outbox(wh, [gone], now=NOW + timedelta(days=1))["gave_up"] == 0
        wh.set_alert_status(alert_id, "acknowledged", "on it", NOW)
        assert wh.due_deliveries(["another_channel"], NOW).empty
    assert len(receiver.requests) == 1


def test_a_node_sick_in_several_metrics_and_the_trend_of_a_code_change_are_one_alert_each():
    node_changes = [
        {**_change(None, node="n5", scope="node", incident="n1", magnitude=60.0), "metric_name": "node_error_rate"},
        {**_change(None, node="n5", scope="node", incident="n2", magnitude=25.0,
                   at=T0 + pd.Timedelta(days=5)), "metric_name": "memory_utilization"}]
    incidents = [_incident("n1", attribution="node_problem", node="n5"),
                 _incident("n2", attribution="node_problem", node="n5", at=T0 + pd.Timedelta(days=5)),
                 _incident("i1")]
    fleet_trend = pd.DataFrame([{
        "scope": "overall", "metric_name": "test_execution_time", "test_name": None, "node_id": None,
        "is_significant": True, "trend_direction": "degrading", "change_over_window_percent": 14.0,
        "change_rate_percent": 3.0, "window_mean": 1.0, "window_start": T0, "n_days": 30,
        "p_value_adjusted": 1e-6, "unit": "ratio"}])
    outbox, counts = _reconcile(EMPTY, incidents, [*node_changes, _change("a")], trends=fleet_trend)
    assert sorted(outbox.attribution) == ["code_change", "node_problem"]
    node = outbox[outbox.attribution == "node_problem"].iloc[0]
    assert node.metric_name == "node_error_rate" and "memory_utilization +25%" in node.title
    # the next run finds the memory step first: still the same alert about the node
    later = _reconcile(outbox, incidents[1:], [*node_changes[1:], _change("a")], trends=fleet_trend)[0]
    assert len(later) == 2 and set(later.alert_id) == set(outbox.alert_id)


def _trend(scope, change, *, test=None, node=None, metric="test_execution_time"):
    return {"scope": scope, "metric_name": metric, "test_name": test, "node_id": node,
            "is_significant": True, "trend_direction": "degrading", "change_over_window_percent": change,
            "change_rate_percent": change / 4, "window_mean": 1.0, "window_start": T0, "n_days": 30,
            "p_value_adjusted": 1e-6, "unit": "ratio"}


def test_a_fleet_that_drifts_is_one_alert_and_a_test_drifting_beyond_it_another():
    trends = pd.DataFrame([_trend("overall", 26.0),
                           *[_trend("test", 25.0 + t % 3, test=f"t{t}") for t in range(5)],
                           *[_trend("node", 24.0 + n, node=f"n{n}") for n in range(3)],
                           _trend("test", 60.0, test="beyond")])
    outbox, _ = _reconcile(EMPTY, [], [], trends=trends)
    assert sorted(outbox.title) == [
        "test_execution_time trending +26% on the fleet (5 tests and 3 nodes alike)",
        "test_execution_time trending +60% on beyond"]
    # the fleet's run series saw the drift as a ramp and alerted it: that alert stands for it
    ramp = {**_change(None, scope="overall", incident="c1"), "shape": "ramp",
            "end_timestamp": T0 + pd.Timedelta(days=20)}
    with_ramp, _ = _reconcile(EMPTY, [_incident("c1", attribution="ci_metric")], [ramp], trends=trends)
    assert sorted(with_ramp.attribution) == ["ci_metric", "trend"]
    assert list(with_ramp[with_ramp.attribution == "trend"].tests) == [["beyond"]]


def test_a_ramp_is_titled_as_one_with_how_long_it_lasted():
    ramp = {**_change("a"), "shape": "ramp", "end_timestamp": T0 + pd.Timedelta(days=6, hours=12)}
    outbox, _ = _reconcile(EMPTY, [_incident()], [ramp])
    assert outbox.iloc[0].title == "test_execution_time +30% on a, a ramp over 6.5 days from run run-7"
    step = {**ramp, "shape": "step", "end_timestamp": None}
    assert _reconcile(EMPTY, [_incident()], [step])[0].iloc[0].title == "test_execution_time +30% on a from run run-7"


def test_a_node_problem_of_some_tests_names_the_tests_and_the_node():
    incident = [_incident(attribution="node_problem", node="n3")]
    some = [_change(t, node="n3", scope="node") for t in ("a", "b")]
    assert _reconcile(EMPTY, incident, some)[0].iloc[0].title == \
        "test_execution_time +30% on 2 tests on n3 from run run-7"
    one = _reconcile(EMPTY, incident, some[:1])[0].iloc[0]
    assert one.title == "test_execution_time +30% on a on n3 from run run-7" and list(one.tests) == ["a"]
    whole = _reconcile(EMPTY, incident, [_change(None, node="n3", scope="node")])[0].iloc[0]
    assert whole.title == "test_execution_time +30% on n3 from run run-7"


def test_steps_of_one_commit_placed_a_few_runs_apart_and_their_run_series_are_one_alert():
    later = T0 + pd.Timedelta(hours=10)
    changes = [_change("a", incident="i1"), _change("b", incident="i2", at=later),
               {**_change(None, scope="overall", incident="c1", at=T0 - pd.Timedelta(days=2)),
                "test_name": None}]
    incidents = [_incident("i1"), _incident("i2", at=later),
                 _incident("c1", attribution="ci_metric", at=T0 - pd.Timedelta(days=2))]
    outbox, _ = _reconcile(EMPTY, incidents, changes)
    assert len(outbox) == 1 and list(outbox.iloc[0].tests) == ["a", "b"]
    far = [_change("a", incident="i1"), _change("b", incident="i2", at=T0 + pd.Timedelta(days=2))]
    assert len(_reconcile(EMPTY, [_incident("i1"), _incident("i2", at=T0 + pd.Timedelta(days=2))], far)[0]) == 2

"""Regression alerts: one per incident, never twice for the same regression, with a lifecycle.

Candidates come from this run's findings: every regression incident whose change is still in
effect (no later change of the series has undone it) and at least the metric's threshold in
size with a p-value of at most 1e-3, and every significant degrading trend at least that
large that no incident already covers (a node drifting towards trouble before any step is
confirmed). One alert per incident, not per series: a code change slowing five tests is one
alert naming five tests, a node whose five health metrics drift is one alert about the node,
and a CI metric that moved with a code change (throughput) is a note on that alert.

Deduplication matches a candidate to an alert already in the outbox — same kind of finding,
metric and node, overlapping tests, start within a day — rather than by an identifier
recomputed from this run's numbers, which would move when the detector places the start
one run later. A matched alert is updated; an unmatched one is created with status `new`.
An open change alert whose series has since changed back (a later improvement) is
`resolved`; a trend alert is resolved when its trend is no longer significant. People move
alerts to `acknowledged`, `invalid` or `resolved` (`perf-pipeline alerts`); an alert marked
invalid is never raised again for the same finding.

Muted tests, nodes and metrics (perf_pipeline.yaml) produce no alert while the mute lasts.

Delivery (`deliver_outbox`, run by a sensor) sends each new alert once to each channel and
stores the outcome in `alert_deliveries` before the next send; failures are retried with
backoff. A tick that dies mid-delivery loses nothing: the one message in flight is sent again,
marked as a possible repeat (see `deliver_outbox`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from perf_pipeline.analysis.regressions import changes_in_effect
from perf_pipeline.catalog import get_metric
from perf_pipeline.config import MonitoringSettings
from perf_pipeline.notify import DeliveryError

STATUSES = ("new", "acknowledged", "invalid", "resolved")
OPEN = ("new", "acknowledged")
ALERT_COLUMNS = ["alert_id", "dedup_key", "incident_id", "attribution", "severity", "title",
                 "metric_name", "unit", "direction", "tests", "node_id", "before", "after",
                 "magnitude_percent", "p_value", "first_test_run_id", "first_commit", "started_at",
                 "suspected_cause", "cause_evidence", "status", "created_at", "updated_at",
                 "resolved_at", "status_note"]
# Two findings of the same kind on the same series starting this close are one regression.
SAME_START = pd.Timedelta(days=1)
# A change that is confirmed within the detector's false-alarm budget but whose own p-value
# is above this is too weak to wake a person: real regressions on the simulated fleets have
# p below 1e-10, the false changes that reached the outbox 0.01.
ALERT_MAX_P_VALUE = 1e-3
# A CI metric that moves with a code change or node problem (throughput falls when tests
# slow down) is part of that alert, not an alert of its own.
SAME_EVENT = pd.Timedelta(hours=12)


def _severity(metric: str, magnitude: float, threshold: float) -> str:
    importance = get_metric(metric).importance
    if importance == "critical" or abs(magnitude) >= 3 * threshold:
        return "critical"
    if importance == "high" or abs(magnitude) >= 2 * threshold:
        return "high"
    return "medium"


def _where(tests: list[str], node: str | None) -> str:
    """What changed, for a title: the tests (one by name), the node, or both where some
    tests changed on one node only."""
    tests_part = (tests[0] if len(tests) == 1 else f"{len(tests)} tests") if tests else None
    if node:
        return f"{tests_part} on {node}" if tests_part else node
    return tests_part or "the fleet"


def _change_candidates(incidents: pd.DataFrame, changes: pd.DataFrame, causes: pd.DataFrame,
                       settings: MonitoringSettings, now: datetime) -> list[dict]:
    live = changes_in_effect(changes, settings.threshold_percent)
    live = live[live["p_value"] <= ALERT_MAX_P_VALUE] if len(live) else live
    out = []
    for incident in incidents.itertuples():
        members = live[(live["incident_id"] == incident.incident_id)
                       & live["metric_name"].map(settings.tracks).astype(bool)]
        if members.empty:
            continue
        worst = members.loc[members["magnitude_percent"].abs().idxmax()]
        tests = sorted(members["test_name"].dropna().unique().tolist())
        node = incident.node_id if isinstance(incident.node_id, str) else None
        if settings.muted(metric=worst.metric_name, tests=tests, node=node, now=now):
            continue
        top = causes[(causes["incident_id"] == incident.incident_id)].sort_values("rank").head(1)
        metric = get_metric(worst.metric_name)
        first_run = incident.first_test_run_id if isinstance(incident.first_test_run_id, str) else None
        out.append({
            "incident_id": incident.incident_id, "attribution": incident.attribution,
            "metric_name": worst.metric_name, "unit": metric.unit, "direction": metric.direction.value,
            "tests": tests, "node_id": node, "before": float(worst.before), "after": float(worst.after),
            "magnitude_percent": float(worst.magnitude_percent), "p_value": float(worst.p_value),
            "first_test_run_id": first_run,
            "first_commit": incident.first_commit if isinstance(incident.first_commit, str) else None,
            "started_at": pd.Timestamp(incident.timestamp).to_pydatetime(),
            "suspected_cause": (f"{top.iloc[0].cause_type}: {top.iloc[0].cause}" if len(top) else None),
            "cause_evidence": top.iloc[0].evidence if len(top) else None,
            "severity": _severity(worst.metric_name, worst.magnitude_percent,
                                  settings.threshold_percent(worst.metric_name)),
            "title": (f"{worst.metric_name} {worst.magnitude_percent:+.0f}% on {_where(tests, node)}"
                      + _since(worst, first_run)),
        })
    return out


def _since(change: pd.Series, first_run: str | None) -> str:
    """Where a change begins, for its title: the first run of a step; a ramp's run and how
    long it lasted (a ramp is a drift, not one run's doing)."""
    start = f" from run {first_run}" if first_run else ""
    # a row's fields by name: `change.shape` would be the row's own length
    if change.get("shape") != "ramp" or pd.isna(change.get("end_timestamp")):
        return start
    days = (pd.Timestamp(change["end_timestamp"]) - pd.Timestamp(change["timestamp"])) / pd.Timedelta(days=1)
    return f", a ramp over {days:.1f} days{start}"


def _merge_node_problems(candidates: list[dict]) -> list[dict]:
    """One candidate per sick node: its worst change, the others named in the title. A node
    that degrades for weeks confirms steps in several metrics at different times."""
    kept, by_node = [], {}
    for candidate in sorted(candidates, key=lambda c: -abs(c["magnitude_percent"])):
        node = candidate["node_id"] if candidate["attribution"] == "node_problem" else None
        if node is None:
            kept.append(candidate)
        elif node in by_node:
            first = by_node[node]
            first["title"] += f" (with {candidate['metric_name']} {candidate['magnitude_percent']:+.0f}%)"
            first["started_at"] = min(first["started_at"], candidate["started_at"])
        else:
            by_node[node] = candidate
            kept.append(candidate)
    return kept


def _merge_code_changes(candidates: list[dict]) -> list[dict]:
    """Code changes of one metric starting within SAME_EVENT of each other are one alert: the
    detector can place one test's step a few runs after another's when both came from one
    commit, and a person bisects them together."""
    kept, last = [], {}
    for candidate in sorted(candidates, key=lambda c: pd.Timestamp(c["started_at"])):
        anchor = last.get(candidate["metric_name"]) if candidate["attribution"] == "code_change" else None
        if anchor is not None and (pd.Timestamp(candidate["started_at"])
                                   - pd.Timestamp(anchor["started_at"])) <= SAME_EVENT:
            anchor["tests"] = sorted(set(anchor["tests"]) | set(candidate["tests"]))
            anchor["title"] += f" (with {_where(candidate['tests'], None)} from run {candidate['first_test_run_id']})"
            continue
        if candidate["attribution"] == "code_change":
            last[candidate["metric_name"]] = candidate
        kept.append(candidate)
    return kept


def _fold_ci_metrics(candidates: list[dict]) -> list[dict]:
    """CI-metric candidates that started with a code change or node problem become a note on
    that candidate's title; a per-test metric's run series (every test of a run at once) is
    left out where code changes of that metric are alerted already: it sees them too."""
    anchors = [c for c in candidates if c["attribution"] in ("code_change", "node_problem")]
    changed = {c["metric_name"] for c in anchors if c["attribution"] == "code_change"}
    kept = []
    for candidate in candidates:
        if candidate["attribution"] == "ci_metric" and candidate["metric_name"] in changed:
            continue
        if candidate["attribution"] == "ci_metric":
            near = [a for a in anchors if abs(pd.Timestamp(a["started_at"])
                                               - pd.Timestamp(candidate["started_at"])) <= SAME_EVENT]
            if near:
                near[0]["title"] += (f" (with {candidate['metric_name']} "
                                     f"{candidate['magnitude_percent']:+.0f}%)")
                continue
        kept.append(candidate)
    return kept


def _trend_candidates(trends: pd.DataFrame, covered_nodes: set[str], covered_metrics: set[str],
                      settings: MonitoringSettings, now: datetime, *,
                      fleet_changed: Collection[str] = ()) -> list[dict]:
    """Trends no change alert explains: not on a node with a node-problem alert, not a
    fleet or test trend of a metric a code change moved (daily medians see the step as a
    trend), not a fleet trend of a metric whose fleet series has a change alert
    (`fleet_changed`), and not a test's or node's trend that the fleet's own trend of the
    metric explains (`_fleet_explained`)."""
    if trends.empty:
        return []
    worse = trends[trends["is_significant"] & (trends["trend_direction"] == "degrading")]
    # astype: a map over no rows keeps the names' text dtype, which (Arrow-backed, as
    # pandas 3 keeps text when pyarrow is installed) refuses to be compared with numbers
    worse = worse[worse["metric_name"].map(settings.tracks).astype(bool)
                  & (worse["change_over_window_percent"].abs()
                     >= worse["metric_name"].map(settings.threshold_percent).astype(float))]
    explained = _fleet_explained(worse, settings)
    alike = {metric: group["scope"].value_counts().to_dict()
             for metric, group in worse[explained].groupby("metric_name", observed=True)}
    worse = worse[~explained & ~((worse["scope"] == "overall") & worse["metric_name"].isin(fleet_changed))]
    out = []
    for (scope, test, node), group in worse.groupby(["scope", "test_name", "node_id"], dropna=False):
        node = node if isinstance(node, str) else None
        test = test if isinstance(test, str) else None
        if node in covered_nodes:
            continue
        if node is None:
            group = group[~group["metric_name"].isin(covered_metrics)]
        tests = [test] if test else []
        group = group[[settings.muted(metric=m, tests=tests, node=node, now=now) is None
                       for m in group["metric_name"]]]
        if group.empty:
            continue
        worst = group.loc[group["change_over_window_percent"].abs().idxmax()]
        metric = get_metric(worst.metric_name)
        half = worst.window_mean * worst.change_over_window_percent / 200
        others = sorted(set(group["metric_name"]) - {worst.metric_name})
        also = f" (also {', '.join(others)})" if others else ""
        if scope == "overall" and worst.metric_name in alike:
            moved = alike[worst.metric_name]
            also += " (" + " and ".join(f"{moved[s]} {s}{'s' if moved[s] > 1 else ''}"
                                        for s in ("test", "node") if s in moved) + " alike)"
        out.append({
            "incident_id": f"trend:{scope}:{test or ''}:{node or ''}", "attribution": "trend",
            "metric_name": worst.metric_name, "unit": metric.unit if worst.unit != "ratio" else "ratio",
            "direction": metric.direction.value, "tests": tests, "node_id": node,
            "before": float(worst.window_mean - half), "after": float(worst.window_mean + half),
            "magnitude_percent": float(worst.change_over_window_percent),
            "p_value": float(worst.p_value_adjusted), "first_test_run_id": None, "first_commit": None,
            "started_at": pd.Timestamp(worst.window_start).to_pydatetime(),
            "suspected_cause": None,
            "cause_evidence": (f"{worst.metric_name} trending {worst.change_rate_percent:+.1f}%/week "
                               f"over {int(worst.n_days)} days (Mann–Kendall q={worst.p_value_adjusted:.2g})"
                               f"{also}"),
            "severity": _severity(worst.metric_name, worst.change_over_window_percent,
                                  settings.threshold_percent(worst.metric_name)),
            "title": f"{worst.metric_name} trending {worst.change_over_window_percent:+.0f}% on "
                     f"{_where(tests, node) if (tests or node) else 'the fleet'}{also}",
        })
    return out


def _fleet_explained(worse: pd.DataFrame, settings: MonitoringSettings) -> pd.Series:
    """The test and node trends that the fleet's own trend of their metric explains: what
    is left of them after the fleet's change over the window is under the metric's alert
    threshold. When the whole fleet drifts, every test and node drifts with it, and one
    alert says so instead of one per test and node; a test drifting well beyond the fleet
    keeps its own."""
    fleet = worse[worse["scope"] == "overall"].groupby("metric_name", observed=True)[
        "change_over_window_percent"].first()
    fleet_change = worse["metric_name"].map(fleet).astype(float)
    left = (worse["change_over_window_percent"] - fleet_change).abs()
    return ((worse["scope"] != "overall") & fleet_change.notna()
            & (left < worse["metric_name"].map(settings.threshold_percent).astype(float)))


def _same_finding(alert: dict, candidate: dict) -> bool:
    if candidate["attribution"] == "node_problem":  # one open problem alert per node
        return alert["attribution"] == "node_problem" and alert["node_id"] == candidate["node_id"]
    if (alert["attribution"], alert["metric_name"], alert["node_id"]) != (
            candidate["attribution"], candidate["metric_name"], candidate["node_id"]):
        return False
    if candidate["attribution"] == "trend":
        return alert["incident_id"] == candidate["incident_id"]
    if alert["tests"] or candidate["tests"]:
        if not set(alert["tests"]) & set(candidate["tests"]):
            return False
    return abs(pd.Timestamp(alert["started_at"]) - pd.Timestamp(candidate["started_at"])) <= SAME_START


def _dedup_key(candidate: dict) -> str:
    where = candidate["node_id"] or ",".join(candidate["tests"][:5])
    return (f"{candidate['attribution']}|{candidate['metric_name']}|{where}|"
            f"{pd.Timestamp(candidate['started_at']):%Y-%m-%dT%H:%M}")


def _recovered(alert: dict, changes: pd.DataFrame) -> bool:
    """Whether every series of a change alert changed back after it started."""
    if changes.empty:
        return False
    later = changes[(changes["metric_name"] == alert["metric_name"]) & (changes["kind"] == "improvement")
                    & (changes["timestamp"] > pd.Timestamp(alert["started_at"]))]
    if alert["tests"]:
        return all((later["test_name"] == t).any() for t in alert["tests"])
    if alert["node_id"]:
        return bool((later["node_id"] == alert["node_id"]).any())
    return bool((later["scope"] == "overall").any())


def reconcile(outbox: pd.DataFrame, *, incidents: pd.DataFrame, changes: pd.DataFrame,
              causes: pd.DataFrame, trends: pd.DataFrame, settings: MonitoringSettings,
              now: datetime) -> tuple[pd.DataFrame, dict[str, int]]:
    """The outbox after this run's findings, and counts of what changed (created, updated,
    resolved, suppressed: matched an alert someone marked invalid)."""
    alerts = [] if outbox.empty else outbox.to_dict("records")
    for alert in alerts:
        alert["tests"] = list(alert["tests"]) if alert["tests"] is not None else []
        alert["node_id"] = alert["node_id"] if isinstance(alert["node_id"], str) else None
    counts = {"created": 0, "updated": 0, "resolved": 0, "suppressed": 0}
    candidates = []
    if settings.alert_on_regression:
        regressions = incidents[incidents["kind"] == "regression"] if len(incidents) else incidents
        candidates = _fold_ci_metrics(_merge_code_changes(_merge_node_problems(
            _change_candidates(regressions, changes, causes, settings, now))))
        nodes = {c["node_id"] for c in candidates if c["attribution"] == "node_problem"}
        metrics = {c["metric_name"] for c in candidates if c["attribution"] == "code_change"}
        fleet = {c["metric_name"] for c in candidates if c["attribution"] == "ci_metric"}
        candidates += _trend_candidates(trends, nodes, metrics, settings, now, fleet_changed=fleet)
    matched_ids = set()
    for candidate in candidates:
        match = next((a for a in alerts if a["status"] != "resolved" and _same_finding(a, candidate)), None)
        if match is not None:
            matched_ids.add(match["alert_id"])
            if match["status"] == "invalid":
                counts["suppressed"] += 1
                continue
            match.update({k: v for k, v in candidate.items() if k != "started_at"}, updated_at=now)
            counts["updated"] += 1
            continue
        key = _dedup_key(candidate)
        alert_id = hashlib.sha1(key.encode()).hexdigest()[:12]
        alerts.append({**candidate, "alert_id": alert_id, "dedup_key": key, "status": "new",
                       "created_at": now, "updated_at": now, "resolved_at": None, "status_note": ""})
        matched_ids.add(alert_id)
        counts["created"] += 1
    for alert in alerts:
        if alert["status"] not in OPEN or alert["alert_id"] in matched_ids:
            continue
        if alert["attribution"] == "trend" or _recovered(alert, changes):
            alert.update(status="resolved", resolved_at=now, updated_at=now,
                         status_note="auto-resolved: the series recovered" if alert["attribution"] != "trend"
                         else "auto-resolved: the trend is no longer significant")
            counts["resolved"] += 1
    table = pd.DataFrame(alerts, columns=ALERT_COLUMNS)
    table["tests"] = table["tests"].map(lambda t: list(t) if isinstance(t, (list, np.ndarray)) else [])
    return table, counts


# ----------------------------------------------------------------------------- delivery

MAX_ATTEMPTS = 8
FIRST_BACKOFF = timedelta(seconds=30)
LONGEST_BACKOFF = timedelta(hours=1)


def backoff(attempts: int, retry_after: float | None = None) -> timedelta:
    """Wait before attempt `attempts + 1`: doubling from 30 s up to an hour, or what the
    receiver asked for (Retry-After) when that is longer."""
    wait = min(FIRST_BACKOFF * 2 ** max(attempts - 1, 0), LONGEST_BACKOFF)
    return max(wait, timedelta(seconds=retry_after or 0))


def alert_message(row: dict, asset_url: str | None) -> dict:
    """An outbox row as the channels take it."""
    alert = {key: row[key] for key in ALERT_COLUMNS}
    alert["tests"] = [str(t) for t in row["tests"]] if row["tests"] is not None else []
    for key in ("node_id", "first_test_run_id", "first_commit", "suspected_cause", "cause_evidence"):
        alert[key] = row[key] if isinstance(row[key], str) else None
    alert["started_at"] = pd.Timestamp(row["started_at"]).to_pydatetime()
    alert["asset_url"] = asset_url
    return alert


def deliver_outbox(wh, channels, *, now: datetime, asset_url: str | None = None,
                   max_attempts: int = MAX_ATTEMPTS) -> dict[str, int]:
    """Send every due (alert, channel) pair once, recording each outcome before the next send.

    A pair is due when its alert is `new` and the channel has not had it, or when its last
    attempt failed and the backoff has passed. A failure the receiver will not get over (a
    revoked webhook, a rejected address) or the last of `max_attempts` gives up.

    Each attempt is recorded as `sending` (committed) before the message leaves, so a tick
    that dies mid-delivery leaves a trace: alerts it had sent stay sent, alerts it had not
    reached stay due, and the one in flight is in doubt. That one is sent again, because a
    lost alert is worse than a repeat, marked as a possible repeat, and under the same email
    Message-ID, which mail systems use to drop the second copy.
    """
    by_name = {channel.name: channel for channel in channels}
    counts = {"sent": 0, "failed": 0, "gave_up": 0, "in_doubt": 0}
    for row in wh.due_deliveries(list(by_name), now).to_dict("records"):
        attempts = int(row["attempts"]) + 1
        message = alert_message(row, asset_url)
        if row["previous_state"] == "sending":
            message["interrupted_at"] = pd.Timestamp(row["last_attempt_at"]).to_pydatetime()
            counts["in_doubt"] += 1
        wh.record_delivery(row["alert_id"], row["channel"], state="sending", attempts=attempts, now=now)
        try:
            by_name[row["channel"]].deliver_alert(message)
        except DeliveryError as error:
            final = not error.retryable or attempts >= max_attempts
            wh.record_delivery(row["alert_id"], row["channel"], state="gave_up" if final else "failed",
                               attempts=attempts, now=now, error=str(error),
                               next_attempt_at=None if final else now + backoff(attempts, error.retry_after))
            counts["gave_up" if final else "failed"] += 1
            continue
        wh.record_delivery(row["alert_id"], row["channel"], state="sent", attempts=attempts, now=now)
        counts["sent"] += 1
    return counts

"""Optimization recommendations: what to do about the trends, risks and regressions found.

Every recommendation carries the numbers it rests on in `evidence_json` (metric, node,
test type, values, slope, change point), so anyone — or a test — can check it against the
tables it came from, a one-line `evidence` for people, an expected gain, and a
`condition_key` that stays the same for as long as the condition lasts: automated actions
act once per condition, not once per run.

The seed's rules:
- rising memory → raise memory limits (a significant degrading memory trend on a node whose
  memory is above the threshold or will reach its limit within the look-ahead);
- rising test execution time → adjust parallelism (the fleet's test durations trend up);
- node failure rate above 5% → investigate the node.

Data-driven ones:
- bisect the regression that started at run R (code-change incidents with a commit range);
- drain node N (a node problem regression, or a node at high predicted risk);
- move a test type off a slow node type (same tests, clearly slower on that node type);
- raise parallelism where CPU is idle and the queue wait is high.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from perf_pipeline.analysis.nodes import SPEED_METRIC
from perf_pipeline.analysis.regressions import changes_in_effect

SEVERITIES = ("critical", "high", "medium", "low")
COLUMNS = ["recommendation_id", "condition_key", "kind", "severity", "subject", "title", "action",
           "evidence", "evidence_json", "expected_gain", "expected_gain_percent", "node_id",
           "metric_name", "incident_id"]


@dataclass(frozen=True)
class RecommendationSettings:
    memory_threshold_percent: float = 80.0  # memory utilization that makes a rising trend urgent
    memory_lookahead_days: float = 60.0  # …or a predicted breach of the memory limit this soon
    failure_rate_percent: float = 5.0  # the seed's "investigate the node" line
    drain_risk_score: float = 50.0  # node_health_risk at or above which a node is drained
    idle_cpu_percent: float = 50.0  # fleet CPU below this is idle capacity…
    queue_wait_seconds: float = 60.0  # …while runs wait longer than this in the queue
    target_cpu_percent: float = 75.0  # utilization to aim for when raising parallelism
    min_slowdown_percent: float = 20.0  # node-type slowdown worth moving a test type for


def _clean(value):
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (pd.Timestamp,)):
        return value.isoformat()
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_clean(v) for v in value]
    return value


def _recommendation(kind: str, severity: str, subject: str, title: str, action: str, evidence: str,
                    numbers: dict, gain: str, gain_percent: float | None, *, anchor: str = "",
                    node_id: str | None = None, metric_name: str | None = None,
                    incident_id: str | None = None) -> dict:
    condition = f"{kind}|{subject}|{anchor}"
    return {
        "recommendation_id": hashlib.sha1(condition.encode()).hexdigest()[:16],
        "condition_key": condition, "kind": kind, "severity": severity, "subject": subject,
        "title": title, "action": action, "evidence": evidence,
        "evidence_json": json.dumps({k: _clean(v) for k, v in numbers.items()}, sort_keys=True),
        "expected_gain": gain,
        "expected_gain_percent": None if gain_percent is None else float(gain_percent),
        "node_id": node_id, "metric_name": metric_name, "incident_id": incident_id}


def _memory(trends: pd.DataFrame, risk: pd.DataFrame, levels: pd.DataFrame,
            settings: RecommendationSettings) -> list[dict]:
    out = []
    rising = trends[(trends["scope"] == "node") & (trends["trend_direction"] == "degrading")
                    & trends["metric_name"].isin(["memory_utilization", "memory_usage"])]
    for node_id, group in rising.groupby("node_id"):
        utilization = levels[(levels["node_id"] == node_id)
                             & (levels["metric_name"] == "memory_utilization")]["current_value"]
        current = float(utilization.iloc[0]) if len(utilization) else None
        breach = risk[(risk["node_id"] == node_id) & (risk["metric_name"] == "memory_utilization")]
        days = breach["days_to_limit"].dropna()
        days = float(days.iloc[0]) if len(days) else None
        above = current is not None and current >= settings.memory_threshold_percent
        soon = days is not None and days <= settings.memory_lookahead_days
        if not (above or soon):
            continue
        trend = group.sort_values("metric_name").iloc[-1]  # memory_utilization if present
        severity = "high" if above or (days is not None and days <= 14) else "medium"
        when = f"reaches its limit in {days:.0f} days" if days is not None else "is above threshold"
        out.append(_recommendation(
            "raise_memory_limit", severity, node_id, f"Memory on {node_id} keeps rising",
            f"raise the memory limit of {node_id} (or find the leak) before it runs out",
            f"{trend.metric_name} up {trend.change_over_window_percent:.0f}% over the window "
            f"(Theil–Sen {trend.theil_sen_slope_per_day:.3g}/day, q={trend.p_value_adjusted:.2g}); "
            f"utilization {current if current is None else round(current, 1)}% {when}",
            {"node_id": node_id, "metric_name": trend.metric_name,
             "slope_per_day": trend.theil_sen_slope_per_day,
             "change_over_window_percent": trend.change_over_window_percent,
             "p_value_adjusted": trend.p_value_adjusted, "memory_utilization": current,
             "days_to_limit": days},
            "avoid out-of-memory failures on the node", None, node_id=node_id,
            metric_name=trend.metric_name))
    return out


def _durations(trends: pd.DataFrame, fleet: dict) -> list[dict]:
    rising = trends[(trends["scope"] == "overall") & (trends["metric_name"] == "test_execution_time")
                    & (trends["trend_direction"] == "degrading")]
    out = []
    for trend in rising.itertuples():
        cpu = fleet.get("cpu_usage")
        busy = cpu is not None and cpu >= 80
        out.append(_recommendation(
            "adjust_parallelism", "medium", "fleet", "Test execution time is rising fleet-wide",
            ("lower the number of parallel test workers: the nodes are saturated" if busy else
             "review the parallel worker count and the tests whose duration rose"),
            f"test_execution_time up {trend.change_over_window_percent:.0f}% over the window "
            f"({trend.change_rate_percent:.1f}%/week, q={trend.p_value_adjusted:.2g}); "
            f"fleet CPU median {cpu if cpu is None else round(cpu)}%",
            {"metric_name": "test_execution_time", "scope": "overall",
             "change_over_window_percent": trend.change_over_window_percent,
             "change_rate_percent": trend.change_rate_percent,
             "p_value_adjusted": trend.p_value_adjusted, "fleet_cpu_percent": cpu},
            f"win back up to {trend.change_over_window_percent:.0f}% of test time",
            trend.change_over_window_percent, metric_name="test_execution_time"))
    return out


def _failing_nodes(levels: pd.DataFrame, settings: RecommendationSettings) -> list[dict]:
    failing = levels[(levels["metric_name"] == "node_failure_rate")
                     & (levels["current_value"] > settings.failure_rate_percent)]
    fleet = levels.loc[levels["metric_name"] == "node_failure_rate", "current_value"].median()
    return [_recommendation(
        "investigate_node", "critical" if row.current_value > 2 * settings.failure_rate_percent
        else "high", row.node_id, f"{row.node_id} fails {row.current_value:.1f}% of its tests",
        f"investigate {row.node_id}: its test failure rate is above {settings.failure_rate_percent:g}%",
        f"node_failure_rate {row.current_value:.1f}% over the last day vs fleet median {fleet:.1f}%",
        {"node_id": row.node_id, "metric_name": "node_failure_rate",
         "current_value": row.current_value, "fleet_median": fleet,
         "threshold": settings.failure_rate_percent},
        f"about {row.current_value - fleet:.1f} points fewer failed tests on the node",
        row.current_value - fleet, node_id=row.node_id, metric_name="node_failure_rate")
        for row in failing.itertuples()]


def _bisections(incidents: pd.DataFrame, changes: pd.DataFrame, causes: pd.DataFrame) -> list[dict]:
    out = []
    live = changes_in_effect(changes)
    code = incidents[incidents["attribution"] == "code_change"]
    for incident in code.itertuples():
        members = live[live["incident_id"] == incident.incident_id]
        commit = causes[(causes["incident_id"] == incident.incident_id)
                        & (causes["cause_type"] == "commit")]
        if members.empty or commit.empty:
            continue
        cause = commit.iloc[0]
        tests = sorted(members["test_name"].dropna().unique())
        magnitude = float(members["magnitude_percent"].max())
        metrics = sorted(members["metric_name"].unique())
        out.append(_recommendation(
            "bisect_regression", "high" if magnitude >= 20 else "medium",
            str(incident.first_test_run_id),
            f"Regression from run {incident.first_test_run_id}: {len(tests)} test(s) slower",
            f"bisect commits {cause.cause}", cause.evidence,
            {"incident_id": incident.incident_id, "first_test_run_id": incident.first_test_run_id,
             "first_commit": incident.first_commit, "commit_range": cause.cause,
             "timestamp": pd.Timestamp(incident.timestamp), "metrics": metrics,
             "tests": tests, "worst_magnitude_percent": magnitude},
            f"undo a {magnitude:.0f}% slowdown of {len(tests)} test(s)", magnitude,
            anchor=str(incident.first_commit), metric_name=metrics[0],
            incident_id=incident.incident_id))
    return out


def _drains(incidents: pd.DataFrame, changes: pd.DataFrame, causes: pd.DataFrame,
            risk: pd.DataFrame, settings: RecommendationSettings) -> list[dict]:
    out, seen = [], set()
    live = changes_in_effect(changes)
    slowed = live[(live["scope"] == "node") & (live["metric_name"] == SPEED_METRIC)]
    for change in slowed.sort_values("timestamp").itertuples():
        incident = incidents[incidents["incident_id"] == change.incident_id]
        if incident.empty or incident.iloc[0]["attribution"] != "node_problem":
            continue
        seen.add(change.node_id)
        context = causes[(causes["incident_id"] == change.incident_id)
                         & (causes["cause_type"] == "context")]
        suspect = f"; suspected cause: {context.iloc[0].cause}" if len(context) else ""
        magnitude = float(change.magnitude_percent)
        out.append(_recommendation(
            "drain_node", "high", change.node_id,
            f"{change.node_id} runs its tests {magnitude:.0f}% slower since "
            f"{pd.Timestamp(change.timestamp):%Y-%m-%d %H:%M}",
            f"drain {change.node_id} and repair it{suspect}",
            f"{SPEED_METRIC} on {change.node_id} {magnitude:+.0f}% against the other nodes of the "
            f"same runs from run {change.first_test_run_id} (p={change.p_value:.2g}), not undone "
            f"since{suspect}",
            {"incident_id": change.incident_id, "node_id": change.node_id,
             "metric_name": SPEED_METRIC, "timestamp": pd.Timestamp(change.timestamp),
             "first_test_run_id": change.first_test_run_id, "before": change.before,
             "after": change.after, "magnitude_percent": magnitude, "p_value": change.p_value},
            f"tests scheduled elsewhere run about {100 * (1 - 1 / (1 + magnitude / 100)):.0f}% faster",
            100 * (1 - 1 / (1 + magnitude / 100)), anchor=f"{pd.Timestamp(change.timestamp):%Y-%m-%d}",
            node_id=change.node_id, metric_name=SPEED_METRIC, incident_id=change.incident_id))
    at_risk = risk.groupby("node_id")["node_risk_score"].max() if len(risk) else pd.Series(dtype=float)
    for node_id, score in at_risk[at_risk >= settings.drain_risk_score].items():
        if node_id in seen:
            continue
        worst = risk[risk["node_id"] == node_id].sort_values("risk_score").iloc[-1]
        out.append(_recommendation(
            "drain_node", "critical" if score >= 90 else "high", node_id,
            f"{node_id} is heading for failure (risk {score:.0f})",
            f"drain {node_id} before {worst.metric_name} reaches its limit",
            worst.evidence,
            {"node_id": node_id, "node_risk_score": score, "metric_name": worst.metric_name,
             "current_value": worst.current_value, "limit_value": worst.limit_value,
             "days_to_limit": worst.days_to_limit, "slope_per_day": worst.slope_per_day},
            "avoid the failures a node past its limits causes", None, anchor="risk",
            node_id=node_id, metric_name=worst.metric_name))
    return out


def _node_types(penalties: pd.DataFrame) -> list[dict]:
    return [_recommendation(
        "move_test_type", "medium", f"{row.test_type}@{row.node_type}",
        f"{row.test_type} tests run {row.slowdown_percent:.0f}% slower on {row.node_type}",
        f"schedule {row.test_type} tests on {row.best_node_type} nodes rather than {row.node_type}",
        f"same tests, {row.n_points} runs on {row.node_type}: {row.slowdown_percent:.0f}% slower "
        f"than on {row.best_node_type} (Mann–Whitney p={row.p_value:.2g})",
        {"test_type": row.test_type, "node_type": row.node_type,
         "best_node_type": row.best_node_type, "slowdown_percent": row.slowdown_percent,
         "p_value": row.p_value, "n_points": row.n_points},
        f"{row.test_type} tests moved off {row.node_type} run up to "
        f"{100 * (1 - 1 / (1 + row.slowdown_percent / 100)):.0f}% faster",
        100 * (1 - 1 / (1 + row.slowdown_percent / 100)))
        for row in penalties.itertuples()]


def _parallelism(fleet: dict, settings: RecommendationSettings) -> list[dict]:
    cpu, wait, workers = fleet.get("cpu_usage"), fleet.get("queue_wait_time"), fleet.get("parallel_tests")
    if cpu is None or wait is None or cpu >= settings.idle_cpu_percent or wait <= settings.queue_wait_seconds:
        return []
    headroom = settings.target_cpu_percent / max(cpu, 1.0)
    suggested = None if workers is None else int(np.floor(workers * headroom))
    return [_recommendation(
        "raise_parallelism", "medium", "fleet",
        f"Runs wait {wait:.0f}s in the queue while CPU sits at {cpu:.0f}%",
        (f"raise parallel test workers from {workers:g} to {suggested}" if suggested
         else "raise the number of parallel test workers"),
        f"fleet median cpu_usage {cpu:.0f}% (< {settings.idle_cpu_percent:g}%) while median "
        f"queue_wait_time {wait:.0f}s (> {settings.queue_wait_seconds:g}s)",
        {"cpu_usage": cpu, "queue_wait_time": wait, "parallel_tests": workers,
         "suggested_parallel_tests": suggested, "target_cpu_percent": settings.target_cpu_percent},
        f"up to {100 * (headroom - 1):.0f}% more tests per hour at {settings.target_cpu_percent:g}% CPU",
        100 * (headroom - 1), metric_name="queue_wait_time")]


def recommend(*, trends: pd.DataFrame, risk: pd.DataFrame, levels: pd.DataFrame,
              incidents: pd.DataFrame, changes: pd.DataFrame, causes: pd.DataFrame, penalties: pd.DataFrame,
              fleet: dict[str, float], settings: RecommendationSettings = RecommendationSettings()
              ) -> pd.DataFrame:
    """All recommendations, most severe first.

    `trends`: trend_stats; `risk`: node_health_risk; `levels`: current level per node metric
    (node_id, metric_name, current_value); `incidents`, `changes`, `causes`:
    change_incidents, change_points and regression_causes; `penalties`: `nodes.node_type_penalties`; `fleet`: fleet-wide medians
    of recent metrics by name (cpu_usage, queue_wait_time, parallel_tests).
    """
    rows = [*_memory(trends, risk, levels, settings), *_durations(trends, fleet),
            *_failing_nodes(levels, settings), *_bisections(incidents, changes, causes),
            *_drains(incidents, changes, causes, risk, settings), *_node_types(penalties),
            *_parallelism(fleet, settings)]
    table = pd.DataFrame(rows, columns=COLUMNS)
    if table.empty:
        return table
    table = table.drop_duplicates("recommendation_id")
    order = table["severity"].map({s: i for i, s in enumerate(SEVERITIES)})
    gain = table["expected_gain_percent"].fillna(0.0)
    return (table.assign(_order=order, _gain=-gain).sort_values(["_order", "_gain", "subject"])
            .drop(columns=["_order", "_gain"]).reset_index(drop=True))

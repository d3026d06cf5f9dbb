"""Node ranking, predicted limit breaches, and performance-aware node selection.

Scores are relative to the fleet, 0–100, with 50 for a node at the fleet's median and each
robust σ worse (or better) moving the score like a normal tail: 2σ worse is about 2, 2σ
better about 98. A node's per-test metric is compared on the same tests: a two-way robust
fit (median polish) of log values, log y[test, node] = test effect + node effect, so a node
that happens to run the slow e2e tests is not ranked below one that runs unit tests. The
node effect is a ratio ("31% slower than the fleet on the same tests"). Stability is the
spread of a node's residuals around that fit (per-test metrics) or of its hour-to-hour
changes (node metrics), again relative to the fleet.

Risk extrapolates the robust (Theil–Sen) trend of each node's health metrics to their
limits: gradient-boosted forecasts (performance_forecasts) do not extrapolate trends, a
slope does, and its confidence interval gives the earliest plausible date.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
from scipy import stats

from perf_pipeline.analysis.robust import MAD_TO_SIGMA, mostly_one_value
from perf_pipeline.catalog import IMPORTANCE_LEVELS, get_metric

# A node's level within this relative distance of the fleet's is "the same" however tight
# the fleet is: a 2% difference is not worth ranking a node last for.
_MIN_RELATIVE_SPREAD = 0.05
# Likewise a node's noise must be 25% above the fleet's typical noise to count as unstable.
_MIN_STABILITY_SPREAD = np.log(1.25)
_POLISH_ITERATIONS = 10
IMPORTANCE_WEIGHTS = dict(zip(IMPORTANCE_LEVELS, (4.0, 3.0, 2.0, 1.0)))
STABILITY = "stability"
OVERALL = "overall"
SPEED_METRIC = "test_execution_time"
# Levels that follow a node's size rather than its health: a 64 GB node uses more MB than
# a 16 GB one. They get scores of their own but no say in the overall score.
CAPACITY_METRICS = frozenset({"memory_usage", "swap_usage", "disk_io_read", "disk_io_write",
                              "network_io_received", "network_io_sent"})


def median_polish(cells: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Row (test) and column (node) effects of `cells` (test_name, node_id, value), the
    values' two-way robust fit; node effects are centred on their median."""
    frame = cells[["test_name", "node_id", "value"]].copy()
    test_effect = frame.groupby("test_name")["value"].median()
    node_effect = pd.Series(0.0, index=pd.Index(frame["node_id"].unique(), name="node_id"))
    for _ in range(_POLISH_ITERATIONS):
        # names may be categories, whose map gives categories: the effects as floats
        residual = frame["value"] - frame["test_name"].map(test_effect).astype(float)
        node_effect = residual.groupby(frame["node_id"]).median()
        node_effect -= node_effect.median()
        residual = frame["value"] - frame["node_id"].map(node_effect).astype(float)
        test_effect = residual.groupby(frame["test_name"]).median()
    return test_effect, node_effect


def _robust_z(effect: pd.Series, floor: float) -> pd.Series:
    centre = effect.median()
    spread = MAD_TO_SIGMA * (effect - centre).abs().median()
    return (effect - centre) / max(spread, floor)


def _score(worse_z: pd.Series) -> pd.Series:
    return pd.Series(100 * stats.norm.sf(worse_z.to_numpy()), index=worse_z.index)


def _percent(ratio: float) -> str:
    change = 100 * (ratio - 1)
    return f"{abs(change):.0f}% {'higher' if change >= 0 else 'lower'}"


def _test_metric_scores(metric: str, points: pd.DataFrame) -> pd.DataFrame:
    points = points[(points["value"] > 0) & points["test_name"].notna()]
    if points.empty or mostly_one_value(points["value"].to_numpy()):
        return pd.DataFrame()
    logs = points.assign(value=np.log(points["value"]))
    cells = logs.groupby(["test_name", "node_id"], as_index=False)["value"].median()
    test_effect, node_effect = median_polish(cells)
    residual = (logs["value"] - logs["test_name"].map(test_effect).astype(float)
                - logs["node_id"].map(node_effect).astype(float))
    noise = residual.abs().groupby(logs["node_id"]).median() * MAD_TO_SIGMA
    counts = logs.groupby("node_id").agg(n_points=("value", "size"), n_tests=("test_name", "nunique"))
    sign = get_metric(metric).degrading_sign
    z = _robust_z(sign * node_effect, _MIN_RELATIVE_SPREAD)
    out = counts.assign(effect=np.exp(node_effect), noise=noise, score=_score(z))
    out["evidence"] = [
        f"{metric} {_percent(row.effect)} than the fleet on the same {row.n_tests} tests "
        f"({row.n_points} runs)" for row in out.itertuples()]
    return out.reset_index().assign(metric_name=metric)


def _node_metric_scores(metric: str, points: pd.DataFrame) -> pd.DataFrame:
    points = points.sort_values("timestamp")
    if points.empty or mostly_one_value(points["value"].to_numpy()):
        return pd.DataFrame()
    level = points.groupby("node_id")["value"].median()
    fleet = level.median()
    positive = bool((points["value"] > 0).all()) and fleet > 0
    sign = get_metric(metric).degrading_sign
    if positive:
        effect, floor = np.log(level / fleet), _MIN_RELATIVE_SPREAD
    else:
        effect, floor = level - fleet, _MIN_RELATIVE_SPREAD * max(abs(fleet), 1e-9)
    # hour-to-hour changes: the node's noise without its trend or its slow daily cycle
    steps = points.groupby("node_id")["value"].diff()
    noise = steps.abs().groupby(points["node_id"]).median() * MAD_TO_SIGMA / np.sqrt(2)
    if positive:
        noise = noise / level
    out = pd.DataFrame({"effect": level / fleet if fleet else np.nan, "noise": noise,
                        "score": _score(_robust_z(sign * effect, floor)),
                        "n_points": points.groupby("node_id").size(), "n_tests": 0})
    unit = get_metric(metric).unit
    out["evidence"] = [
        f"median {metric} {level[node]:.3g} {unit} vs fleet median {fleet:.3g} {unit}"
        for node in out.index]
    out.index.name = "node_id"
    return out.reset_index().assign(metric_name=metric)


def node_scores(points: pd.DataFrame) -> pd.DataFrame:
    """Scores of every node: per metric, for stability and overall.

    `points` are normalized points of the window (metric_name, test_name, node_id, value,
    metric_scope, timestamp). Returns node_id, metric_name (a metric, "stability" or
    "overall"), score, rank (1 = best), effect (node level / fleet level), noise, n_points,
    n_tests and evidence.
    """
    parts = []
    for metric, group in points.groupby("metric_name", sort=True):
        scope = group["metric_scope"].iloc[0]
        if scope == "test":
            parts.append(_test_metric_scores(metric, group))
        elif scope == "node":
            parts.append(_node_metric_scores(metric, group))
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=["node_id", "metric_name", "score", "rank", "effect", "noise",
                                     "n_points", "n_tests", "evidence"])
    metrics = pd.concat(parts, ignore_index=True)
    frames = [metrics, _stability(metrics)]
    frames.append(_overall(pd.concat(frames, ignore_index=True)))
    table = pd.concat(frames, ignore_index=True)
    table["rank"] = table.groupby("metric_name")["score"].rank(ascending=False, method="min").astype(int)
    return table.sort_values(["metric_name", "rank", "node_id"], ignore_index=True)


def _stability(metrics: pd.DataFrame) -> pd.DataFrame:
    """Each node's noise relative to the fleet's on each metric, the median over metrics."""
    noisy = metrics[metrics["noise"] > 0]
    if noisy.empty:
        return pd.DataFrame()
    ratio = np.log(noisy["noise"]) - np.log(noisy["noise"]).groupby(noisy["metric_name"]).transform("median")
    per_node = ratio.groupby(noisy["node_id"]).median()
    worst = noisy.assign(ratio=ratio).sort_values("ratio").groupby("node_id").tail(1).set_index("node_id")
    out = pd.DataFrame({"effect": np.exp(per_node), "noise": np.nan,
                        "score": _score(_robust_z(per_node, _MIN_STABILITY_SPREAD)),
                        "n_points": noisy.groupby("node_id")["n_points"].sum(), "n_tests": 0})
    out["evidence"] = [
        f"noise {np.exp(per_node[n]):.2f}× the fleet's (median over {int((noisy['node_id'] == n).sum())} "
        f"metrics; worst {worst.loc[n, 'metric_name']} at {np.exp(worst.loc[n, 'ratio']):.2f}×)"
        for n in out.index]
    out.index.name = "node_id"
    return out.reset_index().assign(metric_name=STABILITY)


def _overall(parts: pd.DataFrame) -> pd.DataFrame:
    parts = parts[~parts["metric_name"].isin(CAPACITY_METRICS)]
    weights = parts["metric_name"].map(
        lambda m: IMPORTANCE_WEIGHTS["high"] if m == STABILITY
        else IMPORTANCE_WEIGHTS[get_metric(m).importance]).astype(float)  # float when empty too
    weighted = parts.assign(w=weights, ws=weights * parts["score"])
    grouped = weighted.groupby("node_id")
    score = grouped["ws"].sum() / grouped["w"].sum()
    worst = parts.sort_values("score").groupby("node_id").head(2)
    evidence = worst.groupby("node_id").apply(
        lambda g: "; ".join(f"{r.metric_name} {r.score:.0f}" for r in g.itertuples()),
        include_groups=False)
    out = pd.DataFrame({"score": score, "effect": np.nan, "noise": np.nan,
                        "n_points": grouped["n_points"].sum(), "n_tests": 0,
                        "evidence": "importance-weighted mean of " + grouped.size().astype(str)
                        + " scores; lowest: " + evidence})
    out.index.name = "node_id"
    return out.reset_index().assign(metric_name=OVERALL)


def speed_by_test_type(points: pd.DataFrame, metric: str = SPEED_METRIC) -> pd.DataFrame:
    """Per test type, each node's speed on that type's tests: test_type, node_id, node_type,
    effect (ratio to the fleet on the same tests), score, n_points."""
    rows = []
    chosen = points[(points["metric_name"] == metric) & points["test_type"].notna()]
    for test_type, group in chosen.groupby("test_type", sort=True):
        scores = _test_metric_scores(metric, group)
        if len(scores):
            types = group.groupby("node_id")["node_type"].first()
            rows.append(scores.assign(test_type=test_type, node_type=scores["node_id"].map(types)))
    if not rows:
        return pd.DataFrame(columns=["test_type", "node_id", "node_type", "effect", "score",
                                     "n_points", "n_tests", "evidence"])
    return pd.concat(rows, ignore_index=True)[
        ["test_type", "node_id", "node_type", "effect", "score", "n_points", "n_tests", "evidence"]]


def node_type_penalties(points: pd.DataFrame, metric: str = SPEED_METRIC, *,
                        min_slowdown_percent: float = 20.0, alpha: float = 0.01) -> pd.DataFrame:
    """Test types that run clearly slower on one node type than on the best node type, on
    the same tests: test_type, node_type, best_node_type, slowdown_percent, p_value, n_points.

    Each run's log duration is compared with its test's median (so the test mix cancels);
    the node types are compared with a Mann–Whitney test on those residuals.
    """
    chosen = points[(points["metric_name"] == metric) & points["test_type"].notna()
                    & points["node_type"].notna() & (points["value"] > 0)]
    rows = []
    for test_type, group in chosen.groupby("test_type", sort=True):
        logs = np.log(group["value"])
        residual = logs - logs.groupby(group["test_name"]).transform("median")
        by_type = residual.groupby(group["node_type"])
        medians = by_type.median()
        if len(medians) < 2:
            continue
        best = medians.idxmin()
        for node_type, value in medians.items():
            slowdown = 100 * (np.exp(value - medians[best]) - 1)
            if node_type == best or slowdown < min_slowdown_percent:
                continue
            p = stats.mannwhitneyu(residual[group["node_type"] == node_type],
                                   residual[group["node_type"] == best], alternative="greater").pvalue
            if p < alpha:
                rows.append({"test_type": test_type, "node_type": node_type, "best_node_type": best,
                             "slowdown_percent": float(slowdown), "p_value": float(p),
                             "n_points": int((group["node_type"] == node_type).sum())})
    return pd.DataFrame(rows, columns=["test_type", "node_type", "best_node_type",
                                       "slowdown_percent", "p_value", "n_points"])


@dataclass(frozen=True)
class Limit:
    metric_name: str
    value: float


# Limits a node's health metrics must stay within; a deployment overrides them in config.
DEFAULT_LIMITS: tuple[Limit, ...] = (
    Limit("memory_utilization", 90.0),
    Limit("node_error_rate", 5.0),
    Limit("node_failure_rate", 5.0),
    Limit("node_responsiveness", 500.0),
    Limit("node_availability", 95.0),
)
RISK_HORIZON_DAYS = 30.0


def health_risk(trends: pd.DataFrame, levels: pd.DataFrame, *, as_of: datetime,
                limits: Sequence[Limit] = DEFAULT_LIMITS,
                horizon_days: float = RISK_HORIZON_DAYS) -> pd.DataFrame:
    """Each node's predicted limit crossings and risk.

    `trends` are node-scope rows of trend_stats (node_id, metric_name,
    theil_sen_slope_per_day, theil_sen_low, theil_sen_high, trend_direction, p_value_adjusted);
    `levels` the current level of each node metric (node_id, metric_name, current_value).
    A metric at or past its limit has risk 100; one heading for it on a significant
    degrading trend has risk 100·exp(−days to limit / horizon); anything else 0. A node's
    risk combines its metrics as independent chances: 100·(1 − Π(1 − risk/100)).
    """
    limit_of = {limit.metric_name: limit.value for limit in limits}
    current = levels[levels["metric_name"].isin(limit_of)]
    table = current.merge(trends, on=["node_id", "metric_name"], how="left")
    rows = []
    for row in table.itertuples():
        metric = get_metric(row.metric_name)
        sign = metric.degrading_sign
        limit = limit_of[row.metric_name]
        headroom = sign * (limit - row.current_value)  # > 0: still inside the limit
        slope = row.theil_sen_slope_per_day if pd.notna(row.theil_sen_slope_per_day) else 0.0
        steepest = row.theil_sen_high if sign > 0 else row.theil_sen_low
        degrading = row.trend_direction == "degrading" and sign * slope > 0
        days = earliest = None
        if headroom <= 0:
            risk, days, earliest = 100.0, 0.0, 0.0
            evidence = f"{row.metric_name} {row.current_value:.3g} is past its limit {limit:g}"
        elif degrading:
            days = headroom / (sign * slope)
            fastest = sign * steepest if pd.notna(steepest) and sign * steepest > 0 else sign * slope
            earliest = headroom / fastest
            risk = float(100 * np.exp(-days / horizon_days))
            evidence = (f"{row.metric_name} {row.current_value:.3g} {metric.unit}, "
                        f"{'rising' if slope > 0 else 'falling'} {abs(slope):.3g}/day "
                        f"(Theil–Sen, q={row.p_value_adjusted:.2g}): limit {limit:g} in {days:.0f} days")
        else:
            risk = 0.0
            evidence = f"{row.metric_name} {row.current_value:.3g} {metric.unit}, no degrading trend"
        rows.append({
            "node_id": row.node_id, "metric_name": row.metric_name, "current_value": row.current_value,
            "limit_value": limit, "slope_per_day": float(slope), "days_to_limit": days,
            "predicted_crossing": None if days is None else as_of + timedelta(days=days),
            "earliest_crossing": None if earliest is None else as_of + timedelta(days=earliest),
            "risk_score": risk, "evidence": evidence})
    columns = ["node_id", "metric_name", "current_value", "limit_value", "slope_per_day",
               "days_to_limit", "predicted_crossing", "earliest_crossing", "risk_score",
               "node_risk_score", "evidence"]
    out = pd.DataFrame(rows, columns=[c for c in columns if c != "node_risk_score"])
    if out.empty:
        return pd.DataFrame(columns=columns)
    survival = (1 - out["risk_score"] / 100).groupby(out["node_id"]).transform("prod")
    out["node_risk_score"] = 100 * (1 - survival)
    return out.sort_values(["node_risk_score", "risk_score"], ascending=False, ignore_index=True)[columns]


def select_nodes(speed: pd.DataFrame, stability: pd.DataFrame, risk: pd.DataFrame, *,
                 test_type: str | None = None, k: int = 5, max_risk: float = 50.0,
                 weights: Mapping[str, float] | None = None) -> pd.DataFrame:
    """The k best nodes for a kind of test: healthy first, then fast, then stable.

    `speed` has node_id, score (and test_type, to choose a kind of test); `stability` and
    `risk` have node_id and score / node_risk_score. Nodes at or above `max_risk` are
    placed after every healthy node. Returns node_id, score, speed_score,
    stability_score, risk_score, healthy, reason — best first.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    weights = {"speed": 2.0, "stability": 1.0, **(weights or {})}
    if test_type is not None:
        if "test_type" not in speed or not (speed["test_type"] == test_type).any():
            raise ValueError(f"no node has run tests of type {test_type!r}")
        speed = speed[speed["test_type"] == test_type]
    table = pd.DataFrame({"speed_score": speed.groupby("node_id")["score"].mean()})
    table["stability_score"] = stability.groupby("node_id")["score"].mean().reindex(table.index).fillna(50.0)
    node_risk = risk.groupby("node_id")["node_risk_score"].max() if len(risk) else pd.Series(dtype=float)
    table["risk_score"] = node_risk.reindex(table.index).fillna(0.0)
    table["healthy"] = table["risk_score"] < max_risk
    table["score"] = ((weights["speed"] * table["speed_score"]
                       + weights["stability"] * table["stability_score"])
                      / (weights["speed"] + weights["stability"]))
    table["reason"] = [
        (f"speed {r.speed_score:.0f}, stability {r.stability_score:.0f}, risk {r.risk_score:.0f}"
         + ("" if r.healthy else " (at risk: placed last)")) for r in table.itertuples()]
    table = table.sort_values(["healthy", "score"], ascending=[False, False])
    return table.head(k).reset_index()[["node_id", "score", "speed_score", "stability_score",
                                        "risk_score", "healthy", "reason"]]

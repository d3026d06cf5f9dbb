"""Small markdown tables for asset metadata and CLI summaries."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from datetime import datetime

import pandas as pd


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, datetime):
        midnight = (value.hour, value.minute, value.second, value.microsecond) == (0, 0, 0, 0)
        return f"{value:%Y-%m-%d}" if midnight else f"{value:%Y-%m-%d %H:%M}"
    return _MARKUP.sub(r"\\\g<0>", " ".join(str(value).splitlines()))


# What markdown (and the HTML it may carry) would read as markup in a cell, escaped with a
# backslash, which renders as the character itself: a test named `test_io[*-<tmp>]` or
# `test_x[a](b)` must show as its name, not as emphasis, a tag or a link; `|` would end the
# cell and `&amp;` would show as `&`. Only where it would be markup, since the CLI prints
# the same tables: an underscore inside a word, brackets not followed by a link's target,
# a `<` that opens no tag and a backslash before a letter stay as they are
# (`test_case_7[1-2]`, `C:\tmp`).
_MARKUP = re.compile(r"[`*~|]|\\(?=[!-/:-@\[-`{-~])|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])"
                     r"|\](?=[(\[])|<(?=[A-Za-z/!?])|&(?=#?[A-Za-z0-9]+;)")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


INCIDENT_HEADERS = ["attribution", "kind", "first run", "commit", "node", "metrics", "tests", "worst %"]


def incident_table(incidents) -> str:
    """The change_incidents rows people read first, as markdown."""
    def text(value: object) -> str:
        return value if isinstance(value, str) else ""

    return markdown_table(INCIDENT_HEADERS, [
        (r.attribution, r.kind, text(r.first_test_run_id), text(r.first_commit)[:10],
         text(r.node_id), ", ".join(r.metrics), len(r.tests), r.worst_magnitude_percent)
        for r in incidents.itertuples(index=False)])


def trend_table(trends) -> str:
    """`Warehouse.top_trends` rows."""
    return markdown_table(
        ["scope", "metric", "test", "node", "% per week", "% over window", "p (BH)"],
        trends[["scope", "metric_name", "test_name", "node_id", "change_rate_percent",
                "change_over_window_percent", "p_value_adjusted"]].itertuples(index=False))


def anomaly_table(anomalies) -> str:
    """`Warehouse.top_anomalies` rows."""
    return markdown_table(["scope", "metric", "test", "node", "at", "kind", "score", "reason"],
                          anomalies.itertuples(index=False))


def outlier_node_table(nodes) -> str:
    """`Warehouse.outlier_nodes` rows."""
    return markdown_table(["node", "outlier days", "first", "last", "worst score", "worst day's reason"],
                          nodes.itertuples(index=False))


def correlation_table(pairs) -> str:
    """`Warehouse.flagged_correlations` rows."""
    return markdown_table(["grain", "metric", "metric", "Pearson r", "Spearman ρ", "q", "n"],
                          pairs.itertuples(index=False))


def configuration_table(effects) -> str:
    """`Warehouse.flagged_configuration_effects` rows."""
    return markdown_table(["metric", "factor", "|Cliff's δ|", "q", "medians by group"],
                          effects.itertuples(index=False))


def cause_table(causes) -> str:
    """`Warehouse.top_causes` rows: the most likely cause of each worst incident."""
    return markdown_table(
        ["attribution", "at", "node", "metrics", "cause type", "cause", "score", "evidence"],
        [(r.attribution, r.timestamp, r.node_id, ", ".join(r.metrics), r.cause_type, r.cause,
          r.score, r.evidence) for r in causes.itertuples(index=False)])


def ranking_table(ranking) -> str:
    """`Warehouse.node_ranking` rows."""
    return markdown_table(["rank", "node", "score", "evidence"],
                          ranking[["rank", "node_id", "score", "evidence"]].itertuples(index=False))


def risk_table(risks) -> str:
    """`Warehouse.top_risks` rows."""
    return markdown_table(["node", "risk", "worst metric", "first predicted crossing", "evidence"],
                          risks.itertuples(index=False))


def recommendation_table(recommendations) -> str:
    """`Warehouse.top_recommendations` rows."""
    return markdown_table(["severity", "kind", "subject", "action", "evidence", "expected gain"],
                          recommendations.itertuples(index=False))


def action_table(decisions) -> str:
    """optimization_actions rows."""
    return markdown_table(["decided at", "kind", "subject", "decision", "reason", "detail"],
                          decisions[["decided_at", "kind", "subject", "decision", "reason",
                                     "detail"]].itertuples(index=False))


def model_table(models) -> str:
    """performance_models rows: each metric's method and its cross-validated errors."""
    return markdown_table(
        ["metric", "method", "model MAE", "best baseline", "baseline MAE", "80% interval coverage",
         "why"],
        models[["metric_name", "method", "cv_mae", "best_baseline", "baseline_mae",
                "interval_coverage", "reason"]].itertuples(index=False))


def forecast_table(forecasts) -> str:
    """performance_forecasts rows at one time: the median series' forecast of each metric."""
    summary = forecasts.groupby("metric_name").agg(
        series=("series", "nunique"), forecast=("forecast", "median"), lower=("lower", "median"),
        upper=("upper", "median"), method=("method", "first")).reset_index()
    return markdown_table(["metric", "series", "median forecast", "lower", "upper", "method"],
                          summary.itertuples(index=False))


def alert_table(alerts) -> str:
    """regression_alerts rows."""
    return markdown_table(
        ["alert", "status", "severity", "title", "before", "after", "p", "first run", "suspected cause"],
        alerts[["alert_id", "status", "severity", "title", "before", "after", "p_value",
                "first_test_run_id", "suspected_cause"]].itertuples(index=False))

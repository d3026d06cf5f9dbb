"""Which metrics move together, and which configurations shift a metric.

Metric × metric: every pair of metrics on aligned series, at two grains: per node and hour
(node samples and that node's per-test ratios in the hour, each node's own median
removed so that a fast node is not "correlated" with a big one) and per CI run (per-run CI
metrics and the run's median per-test ratios). Pearson and Spearman correlations both;
their p-values use an effective sample size that allows for each series' lag-1
autocorrelation (Bartlett: n_eff = n (1 − ρ_a ρ_b) / (1 + ρ_a ρ_b)), since hourly load is
autocorrelated and would otherwise make every wobble significant. Benjamini–Hochberg over
all pairs; a pair is flagged when both correlations are strong (|r| ≥ 0.5) and both
significant (q < 0.01). The whole matrix is kept.

Metric × configuration: whether a metric differs between node types (unit: a node's
median), test types (unit: a test's median) or the values of a context field such as a
runner image or a Python version (unit: a run on a node, its median per-test ratio).
Kruskal–Wallis across the groups, BH over all tests; the effect size is the largest
|Cliff's δ| of one group against the rest (the share of pairs where one is larger minus
the share where it is smaller: unlike ε² it is not diluted when the odd group is small,
such as the one node on a new image); flagged when q < 0.01 and |δ| ≥ 0.474 (Romano's
"large").
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from scipy import stats

from perf_pipeline.analysis.robust import lag1_autocorrelation

PAIR_COLUMNS = ["grain", "metric_a", "metric_b", "n", "pearson_r", "pearson_p", "spearman_rho",
                "spearman_p", "q_value", "flagged"]
CONFIG_COLUMNS = ["metric_name", "factor", "groups", "n", "statistic", "p_value", "q_value",
                  "effect_size", "flagged", "detail"]
STRONG_CORRELATION = 0.5
LARGE_EFFECT = 0.474
FDR = 0.01
MIN_PAIRED = 30
# A context field with more values than this (a commit hash, a run id) is an identifier,
# not a configuration.
MAX_CONFIGURATIONS = 20
MIN_GROUP = 3


def _aligned(series: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Wide frames, one column per metric: node × hour and CI run."""
    series = series[["scope", "metric_scope", "metric_name", "node_id", "test_run_id", "timestamp",
                     "level", "relative"]]  # slicing and grouping copy every column kept
    per_node = series[series["scope"] == "node"]
    # per-test metrics as plain ratios to the test's median, not the node's ratio to its
    # peers in the same run: load that rises fleet-wide slows every node's tests, and that
    # is part of how durations follow load
    value = per_node["relative"].where(per_node["metric_scope"] == "test", per_node["level"])
    hour = per_node["timestamp"].dt.floor("h").rename("hour")
    node_hour = (value.groupby([per_node["node_id"], hour, per_node["metric_name"]])
                 .mean().unstack("metric_name").sort_index())
    node_hour = node_hour - node_hour.groupby(level="node_id").transform("median")
    per_run = pd.concat([
        series[series["scope"] == "overall"],
        series[(series["scope"] == "node") & (series["metric_scope"] == "test")]
        .assign(level=lambda f: f["relative"])])
    run = (per_run.dropna(subset=["test_run_id"])
           .groupby(["test_run_id", "metric_name"])["level"].median().unstack("metric_name"))
    first_seen = per_run.groupby("test_run_id")["timestamp"].min()
    run = run.loc[first_seen.reindex(run.index).sort_values(kind="stable").index]
    return {"node_hour": node_hour, "run": run}


def _p_values(r: np.ndarray, n_eff: np.ndarray) -> np.ndarray:
    dof = np.maximum(n_eff - 2, 1)
    t = np.abs(r) * np.sqrt(dof / np.maximum(1 - r**2, 1e-12))
    return 2 * stats.t.sf(t, dof)


def _pairs(grain: str, wide: pd.DataFrame) -> pd.DataFrame:
    wide = wide.loc[:, wide.nunique() > 2]
    if wide.shape[1] < 2:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    present = wide.notna().to_numpy(dtype=float)
    n = present.T @ present
    pearson = wide.corr(method="pearson", min_periods=MIN_PAIRED).to_numpy()
    spearman = wide.rank().corr(method="pearson", min_periods=MIN_PAIRED).to_numpy()
    rho = np.array([lag1_autocorrelation(wide[c].dropna().to_numpy()) for c in wide.columns])
    rho = np.clip(rho, 0, None)
    product = np.outer(rho, rho)
    n_eff = n * (1 - product) / (1 + product)
    upper = np.triu_indices(wide.shape[1], k=1)
    frame = pd.DataFrame({
        "grain": grain, "metric_a": wide.columns[upper[0]], "metric_b": wide.columns[upper[1]],
        "n": n[upper].astype(int), "pearson_r": pearson[upper],
        "pearson_p": _p_values(pearson[upper], n_eff[upper]),
        "spearman_rho": spearman[upper], "spearman_p": _p_values(spearman[upper], n_eff[upper])})
    return frame.dropna(subset=["pearson_r", "spearman_rho"])


def metric_correlations(series: pd.DataFrame) -> pd.DataFrame:
    """Every metric pair's correlations at each grain; `series` is `build_series` output."""
    frames = [_pairs(grain, wide) for grain, wide in _aligned(series).items()]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    pairs = pd.concat(frames, ignore_index=True)
    pairs["q_value"] = stats.false_discovery_control(
        np.maximum(pairs["pearson_p"], pairs["spearman_p"]).to_numpy())
    pairs["flagged"] = ((pairs["q_value"] < FDR)
                        & (pairs[["pearson_r", "spearman_rho"]].abs().min(axis=1) >= STRONG_CORRELATION))
    return pairs[PAIR_COLUMNS].sort_values(["flagged", "pearson_r"], ascending=False,
                                           key=lambda c: c.abs() if c.name == "pearson_r" else c,
                                           ignore_index=True)


def _flat_fields(document: dict, prefix: str = "") -> dict:
    """`document`'s scalar fields, nested keys joined with dots, in pd.json_normalize's order
    (a level's own values first, then its nested objects')."""
    fields = {f"{prefix}{key}": value for key, value in document.items() if not isinstance(value, dict)}
    for key, value in document.items():
        if isinstance(value, dict):
            fields.update(_flat_fields(value, f"{prefix}{key}."))
    return fields


def _context_fields(text: object) -> list[tuple[str, str]]:
    """(field, value as text) of one context document; none when it is not a JSON object."""
    try:
        document = json.loads(text)
    except (TypeError, ValueError):
        return []
    if not isinstance(document, dict):
        return []
    fields = _flat_fields(document)
    numbers = [v for v in fields.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    # one row of numbers only is one float column to pandas: an int beside a float reads 1.0
    if len(numbers) == len(fields) and any(isinstance(v, float) for v in numbers):
        fields = {field: float(value) for field, value in fields.items()}
    return [(field, str(value)) for field, value in fields.items()
            if value is not None and not isinstance(value, list)]


def flatten_contexts(contexts: pd.DataFrame) -> pd.DataFrame:
    """(test_run_id, node_id, field, value) from `run_contexts`' JSON text, nested keys
    joined with dots; values as text, in the order of `contexts` and of each document's
    fields. Runs share a handful of documents: each is parsed once, and its fields are laid
    out for its rows by array indexing, not a Python tuple per row (at L, 266k runs: 1.2 s
    that way, 0.36 s this way)."""
    documents, texts = pd.factorize(contexts["context"], use_na_sentinel=False)
    fields = [_context_fields(text) for text in texts]
    per_document = np.array([len(f) for f in fields], dtype=np.int64)
    first = np.cumsum(per_document) - per_document  # each document's first field, in `names`
    names = np.array([name for f in fields for name, _ in f], dtype=object)
    values = np.array([value for f in fields for _, value in f], dtype=object)
    counts = per_document[documents]  # fields of each row
    rows = np.repeat(np.arange(len(contexts)), counts)
    within = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    taken = np.repeat(first[documents], counts) + within
    return pd.DataFrame({"test_run_id": contexts["test_run_id"].to_numpy()[rows],
                         "node_id": contexts["node_id"].to_numpy()[rows],
                         "field": names[taken], "value": values[taken]},
                        columns=["test_run_id", "node_id", "field", "value"])


def _cliffs_delta(units: pd.DataFrame, group: str) -> float:
    inside = units["group"] == group
    a, b = units.loc[inside, "level"].to_numpy(), units.loc[~inside, "level"].to_numpy()
    u = stats.mannwhitneyu(a, b, method="asymptotic").statistic
    return float(2 * u / (len(a) * len(b)) - 1)


def _kruskal(metric: str, factor: str, units: pd.DataFrame) -> dict | None:
    """Kruskal–Wallis of `units`' level across their `group`s (groups of ≥ MIN_GROUP)."""
    units = units.dropna(subset=["level", "group"])
    sizes = units["group"].value_counts()
    units = units[units["group"].isin(sizes[sizes >= MIN_GROUP].index)]
    groups = [g["level"].to_numpy() for _, g in units.groupby("group")]
    if len(groups) < 2 or np.ptp(units["level"].to_numpy()) == 0:
        return None
    statistic, p_value = stats.kruskal(*groups)
    medians = units.groupby("group")["level"].median().sort_values()
    return {"metric_name": metric, "factor": factor, "groups": len(groups), "n": len(units),
            "statistic": float(statistic), "p_value": float(p_value),
            "effect_size": max(abs(_cliffs_delta(units, group)) for group in medians.index),
            "detail": "; ".join(f"{g}: {m:.4g}" for g, m in medians.items())}


def configuration_effects(series: pd.DataFrame, contexts: pd.DataFrame) -> pd.DataFrame:
    """Kruskal–Wallis tests of every metric against node type, test type and each context
    field with 2 to MAX_CONFIGURATIONS values; `contexts` is `flatten_contexts` output."""
    results = []
    # only the columns each grouping needs: grouping the whole frame copies every column
    per_node = series.loc[series["scope"] == "node",
                          ["metric_name", "node_id", "level", "node_type", "metric_scope", "test_run_id"]]
    node_units = per_node.groupby(["metric_name", "node_id"]).agg(
        level=("level", "median"), group=("node_type", "first"))
    for metric, units in node_units.groupby(level="metric_name"):
        results.append(_kruskal(metric, "node_type", units.droplevel("metric_name")))
    per_test = series.loc[series["scope"] == "test", ["metric_name", "test_name", "value", "test_type"]]
    test_units = per_test.groupby(["metric_name", "test_name"]).agg(
        level=("value", "median"), group=("test_type", "first"))
    for metric, units in test_units.groupby(level="metric_name"):
        results.append(_kruskal(metric, "test_type", units.droplevel("metric_name")))
    if len(contexts):
        ratios = per_node[per_node["metric_scope"] == "test"]
        run_levels = (ratios.groupby(["metric_name", "test_run_id", "node_id"])["level"].median()
                      .reset_index())
        for field, values in contexts.groupby("field"):
            if not 2 <= values["value"].nunique() <= MAX_CONFIGURATIONS:
                continue
            labelled = run_levels.merge(values.drop(columns="field").drop_duplicates(
                ["test_run_id", "node_id"]), on=["test_run_id", "node_id"])
            for metric, units in labelled.groupby("metric_name"):
                results.append(_kruskal(metric, f"context.{field}", units.rename(columns={"value": "group"})))
    table = pd.DataFrame([r for r in results if r is not None],
                         columns=[c for c in CONFIG_COLUMNS if c not in ("q_value", "flagged")])
    if table.empty:
        return pd.DataFrame(columns=CONFIG_COLUMNS)
    table["q_value"] = stats.false_discovery_control(table["p_value"].to_numpy())
    table["flagged"] = (table["q_value"] < FDR) & (table["effect_size"] >= LARGE_EFFECT)
    return table[CONFIG_COLUMNS].sort_values(["flagged", "effect_size"], ascending=False,
                                             ignore_index=True)

"""Metric correlations and configuration effects on data with known truth."""

import json

import numpy as np
import pandas as pd
import pytest

from perf_pipeline.analysis.correlations import configuration_effects, flatten_contexts, metric_correlations

HOURS = 24 * 14


def _ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    e = np.zeros(n)
    for i in range(1, n):
        e[i] = phi * e[i - 1] + rng.normal(0, np.sqrt(1 - phi**2))
    return e


def _node_series(rng: np.random.Generator, *, nodes: int = 8, node_type_effect: float = 0.0) -> pd.DataFrame:
    """cpu drives load (a known relation); swap and network wander on their own, slowly."""
    rows = []
    start = pd.Timestamp("2026-03-01")
    times = start + pd.to_timedelta(np.arange(HOURS), unit="h")
    for n in range(nodes):
        node, node_type = f"node-{n}", ("big" if n % 2 else "small")
        cpu = 40 + 8 * _ar1(rng, HOURS, 0.7) + (node_type_effect if node_type == "big" else 0)
        metrics = {
            "cpu_usage": cpu,
            "load_average": cpu / 100 + 0.03 * rng.normal(size=HOURS),
            "swap_usage": 50 + 5 * _ar1(rng, HOURS, 0.97),  # slow random wander
            "network_io_sent": 3 + 0.3 * _ar1(rng, HOURS, 0.97),
        }
        for metric, values in metrics.items():
            rows.append(pd.DataFrame({
                "timestamp": times, "metric_name": metric, "node_id": node, "node_type": node_type,
                "scope": "node", "metric_scope": "node", "level": values, "value": values,
                "relative": np.nan, "test_run_id": None, "test_name": None, "test_type": None}))
    return pd.concat(rows, ignore_index=True)


def test_a_real_relation_is_flagged_and_slow_independent_wanders_are_not():
    pairs = metric_correlations(_node_series(np.random.default_rng(1)))
    assert len(pairs) == 6  # every pair of four metrics, once
    flagged = {frozenset(p) for p in pairs.loc[pairs.flagged, ["metric_a", "metric_b"]].itertuples(index=False)}
    assert flagged == {frozenset({"cpu_usage", "load_average"})}
    cpu_load = pairs[pairs.flagged].iloc[0]
    assert cpu_load.pearson_r > 0.9 and cpu_load.spearman_rho > 0.9 and cpu_load.q_value < 1e-10
    # Random walks drift together by chance; with 2,688 points a naive test calls that
    # significant, the effective sample size does not.
    wander = pairs[(pairs.metric_a.isin(["network_io_sent", "swap_usage"]))
                   & (pairs.metric_b.isin(["network_io_sent", "swap_usage"]))].iloc[0]
    assert wander.n == 8 * HOURS and not wander.flagged


def test_a_node_type_that_runs_hotter_is_a_configuration_effect():
    series = _node_series(np.random.default_rng(2), nodes=12, node_type_effect=15.0)
    effects = configuration_effects(series, pd.DataFrame(columns=["test_run_id", "node_id", "field", "value"]))
    flagged = effects[effects.flagged]
    assert set(zip(flagged.metric_name, flagged.factor)) == {("cpu_usage", "node_type"),
                                                           ("load_average", "node_type")}
    cpu = flagged[flagged.metric_name == "cpu_usage"].iloc[0]
    assert cpu.effect_size == 1.0 and cpu.detail.startswith("small: ")


def test_context_fields_are_flattened_and_a_new_image_is_an_effect_on_its_runs():
    rng = np.random.default_rng(3)
    contexts, rows = [], []
    for run in range(120):
        for n in range(6):
            image = "v2" if n == 0 and run >= 60 else "v1"
            contexts.append({"test_run_id": f"r{run}", "node_id": f"node-{n}",
                             "context": json.dumps({"commit": f"c{run}", "runner": {"image": image}})})
            ratio = np.exp(rng.normal(0, 0.05)) * (1.3 if image == "v2" else 1.0)
            rows.append({"timestamp": pd.Timestamp("2026-03-01") + pd.Timedelta(hours=run),
                         "metric_name": "test_execution_time", "node_id": f"node-{n}",
                         "node_type": "linux", "scope": "node", "metric_scope": "test",
                         "level": ratio, "relative": ratio, "value": ratio,
                         "test_run_id": f"r{run}", "test_name": None, "test_type": "unit"})
    contexts.append({"test_run_id": "r0", "node_id": "node-9", "context": "not json"})
    flat = flatten_contexts(pd.DataFrame(contexts))
    assert set(flat.field) == {"commit", "runner.image"}
    effects = configuration_effects(pd.DataFrame(rows), flat)
    # the commit is an identifier (120 values), not a configuration
    assert list(effects.factor) == ["context.runner.image"]
    image = effects.iloc[0]
    assert image.flagged and image.effect_size > 0.9
    medians = dict(part.split(": ") for part in image.detail.split("; "))
    assert float(medians["v1"]) == pytest.approx(1.0, abs=0.02)
    assert float(medians["v2"]) == pytest.approx(1.3, abs=0.04)


def test_each_runs_context_fields_come_in_run_order_and_documents_without_fields_give_none():
    shared = json.dumps({"runner": {"image": "v1", "cores": 8}, "flaky": True, "tags": ["a"]})
    contexts = pd.DataFrame({
        "test_run_id": ["r1", "r2", "r3", "r4", "r5", "r6"],
        "node_id": ["n1", "n2", "n1", "n3", "n2", "n1"],
        "context": [shared, "not json", json.dumps({"ratio": 0.5, "count": 2}), None,
                    json.dumps([1, 2]), shared]})
    flat = flatten_contexts(contexts)
    # a level's own values before its nested objects' (pd.json_normalize's order); a list is
    # no configuration, and numbers of one document read alike (2 beside 0.5: 2.0)
    assert flat.to_dict("records") == [
        {"test_run_id": "r1", "node_id": "n1", "field": "flaky", "value": "True"},
        {"test_run_id": "r1", "node_id": "n1", "field": "runner.image", "value": "v1"},
        {"test_run_id": "r1", "node_id": "n1", "field": "runner.cores", "value": "8"},
        {"test_run_id": "r3", "node_id": "n1", "field": "ratio", "value": "0.5"},
        {"test_run_id": "r3", "node_id": "n1", "field": "count", "value": "2.0"},
        {"test_run_id": "r6", "node_id": "n1", "field": "flaky", "value": "True"},
        {"test_run_id": "r6", "node_id": "n1", "field": "runner.image", "value": "v1"},
        {"test_run_id": "r6", "node_id": "n1", "field": "runner.cores", "value": "8"},
    ]
    assert flatten_contexts(contexts.iloc[:0]).empty
    assert flatten_contexts(contexts.iloc[[1, 3, 4]]).empty  # no document with a field

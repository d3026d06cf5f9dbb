"""The simulator writes realistic landing data whose injected truth is really in the rows."""

import json
from datetime import datetime, timezone

import pandas as pd
import pytest

from perf_pipeline.catalog import METRICS
from perf_pipeline.ingest.simulator import simulate_fleet

END = datetime(2026, 11, 20, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    summary = simulate_fleet(out, days=20, nodes=6, tests=10, seed=3, end=END, runs_per_day=12)
    rows = pd.concat([pd.read_json(p, lines=True, dtype=False).assign(folder=p.parent.name)
                      for p in sorted(out.glob("*/*.jsonl"))], ignore_index=True)
    rows["ts"] = pd.to_datetime(rows["timestamp"], utc=True)
    return summary, json.loads(summary.truth_path.read_text()), rows


def test_every_catalog_metric_within_its_range_in_its_own_day_folder(fleet):
    summary, _, rows = fleet
    assert summary.rows == len(rows)
    assert set(rows["metric_name"]) == {m.name for m in METRICS}
    for metric in METRICS:
        values = rows.loc[rows["metric_name"] == metric.name, "metric_value"]
        assert metric.min_value is None or values.min() >= metric.min_value
        assert metric.max_value is None or values.max() <= metric.max_value
    assert (rows["ts"].dt.strftime("%Y-%m-%d") == rows["folder"]).all()
    assert rows["ts"].max() <= pd.Timestamp(END)


def test_same_seed_same_files_other_seed_other_data(tmp_path):
    a = simulate_fleet(tmp_path / "a", days=3, nodes=5, tests=5, seed=1, end=END)
    b = simulate_fleet(tmp_path / "b", days=3, nodes=5, tests=5, seed=1, end=END)
    c = simulate_fleet(tmp_path / "c", days=3, nodes=5, tests=5, seed=2, end=END)
    read = lambda s: [p.read_bytes() for p in sorted(s.out_dir.glob("*/*.jsonl"))]  # noqa: E731
    assert read(a) == read(b) and read(a) != read(c)
    assert a.truth_path.read_text() == b.truth_path.read_text()


def _durations(rows):
    return rows[rows["metric_name"] == "test_execution_time"]


def test_injected_code_steps_are_in_the_data(fleet):
    _, truth, rows = fleet
    durations = _durations(rows)
    for step in (i for i in truth["injections"] if i["kind"] == "step"):
        at = pd.Timestamp(step["timestamp"])
        for test in step["test_names"]:
            series = durations[durations["test_name"] == test]
            ratio = series[series["ts"] >= at]["metric_value"].median() / \
                series[series["ts"] < at]["metric_value"].median()
            assert ratio == pytest.approx(1 + step["magnitude_percent"] / 100, rel=0.12), step
        first = durations[durations["test_run_id"] == step["test_run_id"]]
        assert (first["context_data"].map(lambda c: c["commit"]) == step["commit"]).all()


def test_degrading_noisy_and_slow_nodes_look_as_labelled(fleet):
    _, truth, rows = fleet
    by_kind = {i["kind"]: i for i in truth["injections"] if i["kind"] != "spike"}
    memory = rows[rows["metric_name"] == "memory_usage"]
    node = memory[memory["node_id"] == by_kind["trend"]["node_id"]].sort_values("ts")
    quarter = len(node) // 4
    growth = node["metric_value"].iloc[-quarter:].median() / node["metric_value"].iloc[:quarter].median()
    assert growth > 1.2

    cpu = rows[rows["metric_name"] == "cpu_usage"]
    spread = cpu.groupby("node_id")["metric_value"].apply(lambda v: v.diff().abs().median())
    assert spread.idxmax() == by_kind["noisy_node"]["node_id"]

    # the slow node against its peers on the same tests, before any step
    durations = _durations(rows)
    durations = durations[durations["ts"] < min(pd.Timestamp(i["timestamp"]) for i in truth["injections"]
                                                if i["kind"] in ("step", "node_step"))]
    relative = durations["metric_value"] / durations.groupby("test_name")["metric_value"].transform("median")
    per_node = relative.groupby(durations["node_id"]).median()
    assert per_node.idxmax() == by_kind["slow_node"]["node_id"]
    assert per_node.max() == pytest.approx(by_kind["slow_node"]["speed_factor"], rel=0.1)


def test_spikes_are_single_points_far_above_their_level(fleet):
    _, truth, rows = fleet
    spikes = [i for i in truth["injections"] if i["kind"] == "spike"]
    assert 10 <= len(spikes) <= 20
    for spike in spikes:
        series = rows[(rows["metric_name"] == spike["metric_name"]) & (rows["node_id"] == spike["node_id"])]
        if spike["test_name"]:
            series = series[series["test_name"] == spike["test_name"]]
        point = series[series["ts"] == pd.Timestamp(spike["timestamp"])]
        assert len(point) == 1, spike
        assert point["metric_value"].iloc[0] > 2 * series["metric_value"].median(), spike


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="nodes >= 5"):
        simulate_fleet(tmp_path, nodes=3)
    with pytest.raises(ValueError, match="days >= 1"):
        simulate_fleet(tmp_path, days=0)

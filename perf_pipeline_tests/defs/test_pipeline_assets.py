"""The assets through real Dagster machinery: materialize on a real instance and DuckDB file."""

from datetime import date, datetime, timedelta, timezone

import dagster as dg
import numpy as np
import pytest

from perf_pipeline.defs.actions import ActionsResource, optimization_actions, optimization_recommendations
from perf_pipeline.defs.analysis import anomalies, change_points, metric_correlations, regression_causes, trend_stats
from perf_pipeline.config import configure_performance_monitoring
from perf_pipeline.defs.ingest import raw_metrics
from perf_pipeline.defs.normalize import normalized_timeseries
from perf_pipeline.defs.models import (
    node_health_risk,
    node_performance_scores,
    performance_forecasts,
    performance_models,
)
from perf_pipeline.defs.resources import model_store_resource, monitoring_resource, warehouse_resource
from perf_pipeline.defs.runner import RANGE_END_TAG, RANGE_START_TAG
from perf_pipeline.ingest.landing import ingest_files
from perf_pipeline.storage.warehouse import open_warehouse
from perf_pipeline_tests.conftest import metric_row, write_jsonl

START = date(2026, 10, 1)
DAYS = 28
RUNS_PER_DAY = 6
SPIKE = (2, 10, 3)  # node, day, run


def _fleet_rows(rng: np.random.Generator) -> list[dict]:
    """Two tests on three nodes: `slow` gets 40% slower over the window, `flat` does not;
    node cpu is flat with a daily cycle, and node-2's spikes once; durations come in ms for
    half the runs."""
    rows = []
    for d in range(DAYS):
        for r in range(RUNS_PER_DAY):
            at = datetime(2026, 10, 1, tzinfo=timezone.utc) + timedelta(days=d, hours=4 * r, minutes=7)
            run = f"run-{d:02d}-{r}"
            for test, base, growth in (("tests/t.py::slow", 2.0, 0.4), ("tests/t.py::flat", 5.0, 0.0)):
                value = base * (1 + growth * d / (DAYS - 1)) * rng.lognormal(0, 0.04)
                node = f"node-{rng.integers(1, 4)}"
                if r % 2:
                    rows.append(metric_row(at.isoformat(), "test_duration_ms", value * 1000,
                                           test_name=test, node_id=node, run=run))
                else:
                    rows.append(metric_row(at.isoformat(), value=value, test_name=test,
                                           node_id=node, run=run))
            for n in (1, 2, 3):
                cpu = 40 + 10 * np.sin(2 * np.pi * at.hour / 24) + rng.normal(0, 3)
                if (n, d, r) == SPIKE:
                    cpu = 95.0
                rows.append(metric_row(at.isoformat(), "cpu_usage", cpu, test_name=None,
                                       node_id=f"node-{n}", run=None))
    return rows


@pytest.fixture
def landed(paths, tmp_path):
    rows = _fleet_rows(np.random.default_rng(4))
    # the same run reporting one test twice (a retry) must become one value
    first = next(r for r in rows if r["test_run_id"] == "run-00-0" and r["test_name"] == "tests/t.py::flat")
    rows.append({**first, "timestamp": "2026-10-01T00:07:30+00:00"})
    ingest_files([write_jsonl(tmp_path / "fleet.jsonl", rows)], paths.landing, today=date(2026, 11, 28))
    return paths


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        yield instance


def _materialize(assets, paths, instance, **kwargs) -> dg.ExecuteInProcessResult:
    return dg.materialize(assets, resources={"warehouse": warehouse_resource(paths),
                                             "model_store": model_store_resource(paths),
                                             "actions": ActionsResource(),
                                             "monitoring": monitoring_resource(paths.home)},
                          instance=instance, **kwargs)


def test_raw_metrics_twice_leaves_identical_rows_and_passing_checks(landed, instance):
    first = _materialize([raw_metrics], landed, instance, partition_key="2026-10-05")
    with open_warehouse(landed.database) as wh:
        before = wh.con.execute("SELECT count(*), sum(metric_value) FROM performance_metrics").fetchall()
    second = _materialize([raw_metrics], landed, instance, partition_key="2026-10-05")
    with open_warehouse(landed.database) as wh:
        after = wh.con.execute("SELECT count(*), sum(metric_value) FROM performance_metrics").fetchall()
    assert before == after and before[0][0] == RUNS_PER_DAY * 5
    for result in (first, second):
        assert result.success
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert checks == {"rows_accounted_for": True, "quarantine_share": True}
    metadata = second.asset_materializations_for_node("raw_metrics")[0].metadata
    assert metadata["rows_loaded"].value == RUNS_PER_DAY * 5
    assert metadata["rows_quarantined"].value == 0


def test_a_range_run_then_normalization_and_trends_find_the_known_trend(landed, instance):
    tags = {RANGE_START_TAG: "2026-10-01", RANGE_END_TAG: "2026-10-28"}
    result = _materialize([raw_metrics, normalized_timeseries], landed, instance, tags=tags)
    assert result.success
    assert len(result.asset_materializations_for_node("raw_metrics")) == DAYS
    assert all(e.passed for e in result.get_asset_check_evaluations())

    with open_warehouse(landed.database) as wh:
        units = wh.con.execute("""
            SELECT metric_name, min(value), max(value), max(sample_count) FROM normalized_timeseries
            WHERE test_name = 'tests/t.py::flat' GROUP BY metric_name""").fetchall()
        (retried,), = wh.con.execute("""
            SELECT sample_count FROM normalized_timeseries
            WHERE test_run_id = 'run-00-0' AND test_name = 'tests/t.py::flat'""").fetchall()
        hourly = wh.table_counts(["metric_rollups_hourly"])["metric_rollups_hourly"]
    (metric, low, high, _), = units
    assert metric == "test_execution_time" and 3.5 < low and high < 7  # ms became seconds
    assert retried == 2
    assert hourly > 0

    trends = _materialize([trend_stats], landed, instance)
    assert trends.success
    with open_warehouse(landed.database) as wh:
        table = wh.con.execute("""
            SELECT scope, test_name, node_id, trend_direction, is_significant,
                   change_over_window_percent
            FROM trend_stats WHERE metric_name IN ('test_execution_time', 'cpu_usage')
        """).df()
    slow = table[(table.scope == "test") & (table.test_name == "tests/t.py::slow")].iloc[0]
    assert slow.trend_direction == "degrading" and slow.is_significant
    assert 25 < slow.change_over_window_percent < 45
    flat = table[(table.scope == "test") & (table.test_name == "tests/t.py::flat")].iloc[0]
    assert flat.trend_direction == "stable"
    cpu = table[table.node_id.notna() & (table.scope == "node")]
    assert len(cpu) >= 3
    metadata = trends.asset_materializations_for_node("trend_stats")[0].metadata
    assert "tests/t.py::slow" in metadata["top_degrading"].value
    configure_performance_monitoring(landed.home / "perf_pipeline.yaml", enable_trend_analysis=False)
    off = _materialize([trend_stats], landed, instance)
    assert off.asset_materializations_for_node("trend_stats")[0].metadata["disabled_by"].value == "enable_trend_analysis"
    with open_warehouse(landed.database) as wh:
        assert wh.table_counts(["trend_stats"])["trend_stats"] > 0  # the last result is kept
    configure_performance_monitoring(landed.home / "perf_pipeline.yaml", enable_trend_analysis=True)

    changes = _materialize([change_points], landed, instance)
    assert changes.success
    with open_warehouse(landed.database) as wh:
        found = wh.con.execute("SELECT scope, test_name, kind FROM change_points").df()
        incidents = wh.table_counts(["change_incidents"])["change_incidents"]
    per_test = found[found.scope == "test"]
    assert set(per_test.test_name) == {"tests/t.py::slow"}  # the drifting test, not the flat one
    assert set(per_test.kind) == {"regression"}
    assert incidents >= 1

    rest = _materialize([anomalies, metric_correlations, regression_causes], landed, instance)
    assert rest.success
    with open_warehouse(landed.database) as wh:
        odd = wh.con.execute("SELECT metric_name, node_id, timestamp, kind FROM anomalies").df()
        health = wh.table_counts(["node_health"])["node_health"]
        pairs = wh.con.execute("SELECT metric_a, metric_b FROM metric_correlations").df()
        causes = wh.con.execute("SELECT cause_type, evidence FROM regression_causes").df()
    assert list(zip(odd.metric_name, odd.node_id, odd.kind)) == [("cpu_usage", "node-2", "spike")]
    assert odd.timestamp.iloc[0] == datetime(2026, 10, 11, 12, 7)
    assert health == 3 * DAYS
    assert {"cpu_usage", "test_execution_time"} == set(pairs.metric_a) | set(pairs.metric_b)
    # `slow` drifts from the window's first day: no commit range is made up for a drift
    assert set(causes.cause_type) == {"gradual"}
    metadata = rest.asset_materializations_for_node("anomalies")[0].metadata
    assert "node-2" in metadata["top_anomalies"].value
    assert rest.asset_materializations_for_node("regression_causes")[0].metadata["causes"].value == len(causes)


def test_models_scores_risk_and_recommendations_materialize_from_the_analysis(landed, instance):
    tags = {RANGE_START_TAG: "2026-10-01", RANGE_END_TAG: "2026-10-28"}
    assert _materialize([raw_metrics, normalized_timeseries], landed, instance, tags=tags).success
    upstream = [trend_stats, change_points, metric_correlations, regression_causes]
    assert _materialize(upstream, landed, instance).success
    models = {"ops": {"performance_models": {"config": {
        "metrics": ["cpu_usage", "test_execution_time"], "horizon_days": 3}}}}
    result = _materialize([node_performance_scores, node_health_risk, performance_models,
                           performance_forecasts, optimization_recommendations, optimization_actions],
                          landed, instance, run_config=models)
    assert result.success
    with open_warehouse(landed.database) as wh:
        registry = wh.table("performance_models")
        forecasts = wh.table("performance_forecasts")
        scores = wh.node_ranking("test_execution_time")
        decisions = wh.table("optimization_actions")
        recommendations = wh.table("optimization_recommendations")
    assert sorted(registry.metric_name) == ["cpu_usage", "test_execution_time"]
    assert all((landed.models / m).is_dir() and (landed.models / m / f.split("/")[-1]).exists()
               for m, f in zip(registry.metric_name, registry.file))
    cpu = forecasts[forecasts.metric_name == "cpu_usage"]
    assert set(cpu.series) == {"node-1", "node-2", "node-3"} and len(cpu) == 3 * 14 * 24
    assert set(forecasts[forecasts.metric_name == "test_execution_time"].series) == {
        "tests/t.py::slow", "tests/t.py::flat"}
    assert sorted(scores.node_id) == ["node-1", "node-2", "node-3"]
    assert set(decisions.decision) <= {"skipped"} and len(decisions) == len(recommendations)
    metadata = result.asset_materializations_for_node("performance_models")[0].metadata
    assert metadata["metrics"].value == 2 and "cpu_usage" in metadata["cross_validation"].value

    bad = {"ops": {"performance_models": {"config": {"metrics": ["cpu_usgae"]}}}}
    failed = _materialize([performance_models], landed, instance, run_config=bad, raise_on_error=False)
    assert not failed.success
    assert "unknown metric 'cpu_usgae'" in str(failed.get_step_failure_events()[0].event_specific_data.error)


def test_rerunning_a_day_whose_landing_folder_vanished_refuses_to_erase_it(landed, instance):
    assert _materialize([raw_metrics], landed, instance, partition_key="2026-10-03").success
    for path in (landed.landing / "2026-10-03").iterdir():
        path.unlink()
    result = _materialize([raw_metrics], landed, instance, partition_key="2026-10-03",
                          raise_on_error=False)
    assert not result.success
    with open_warehouse(landed.database) as wh:
        assert wh.day_counts(date(2026, 10, 3))["rows_loaded"] == RUNS_PER_DAY * 5

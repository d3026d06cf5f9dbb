"""The whole Definitions object loads, validates, and has what users rely on."""

import dagster as dg

from perf_pipeline.definitions import defs

ASSET_GROUPS = {
    "analysis": ("trend_stats", "change_points", "seasonal_profiles", "anomalies",
                 "metric_correlations", "regression_causes"),
    "models": ("performance_models", "performance_forecasts", "node_performance_scores",
               "node_health_risk"),
    "actions": ("optimization_recommendations", "optimization_actions"),
    "alerts": ("regression_alerts",),
    "reports": ("performance_dashboard",),
}
# Everything the analysis job materializes after ingest, and the group each one shows in.
ANALYSIS_ASSETS = tuple(name for names in ASSET_GROUPS.values() for name in names)
GROUP_OF = {name: group for group, names in ASSET_GROUPS.items() for name in names}


def test_definitions_validate():
    dg.Definitions.validate_loadable(defs)


def test_jobs_and_assets_exist_in_their_groups():
    assert defs.resolve_job_def("daily_ingest_job")
    analysis = defs.resolve_job_def("analysis_job")
    assert {key.to_user_string() for key in analysis.asset_layer.executable_asset_keys} == set(ANALYSIS_ASSETS)
    graph = defs.resolve_asset_graph()
    groups = {key.to_user_string(): graph.get(key).group_name for key in graph.get_all_asset_keys()}
    assert groups == {"raw_metrics": "ingest", "normalized_timeseries": "normalize",
                      **GROUP_OF}


def test_writers_share_the_duckdb_pool_and_carry_descriptions():
    for assets_def in defs.resolve_all_asset_specs():
        assert assets_def.description, assets_def.key
        assert "duckdb" in assets_def.kinds
    for key in ("raw_metrics", "normalized_timeseries", *ANALYSIS_ASSETS):
        node = defs.resolve_assets_def(key).node_def
        # a graph-backed asset (change_points): every step that opens DuckDB is in the pool
        ops = list(node.iterate_op_defs()) if isinstance(node, dg.GraphDefinition) else [node]
        writers = [op for op in ops if "warehouse" in op.required_resource_keys]
        assert writers, key
        for op in writers:
            assert op.pool == "duckdb", (key, op.name)


def test_every_refresh_of_the_analysis_rebuilds_the_dashboard():
    for job in ("analysis_job", "daily_refresh_job", "alerting_job", "landing_job", "model_training_job"):
        keys = defs.resolve_job_def(job).asset_layer.executable_asset_keys
        assert dg.AssetKey("performance_dashboard") in keys, job
    assert defs.resolve_assets_def("performance_dashboard").specs_by_key[
        dg.AssetKey("performance_dashboard")].kinds == {"duckdb", "html"}


def test_checks_guard_the_ingest_stages():
    checks = {(c.asset_key.to_user_string(), c.name) for c in defs.resolve_asset_graph().asset_check_keys}
    assert {("raw_metrics", "rows_accounted_for"), ("raw_metrics", "quarantine_share"),
            ("normalized_timeseries", "one_value_per_run")} <= checks


def test_workspace_and_pyproject_point_at_the_same_module():
    import tomllib
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    workspace = yaml.safe_load((root / "workspace.yaml").read_text())
    module = workspace["load_from"][0]["python_module"]["module_name"]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert module == pyproject["tool"]["dagster"]["module_name"] == "perf_pipeline.definitions"


def test_the_jobs_schedules_and_sensors_that_run_unattended_exist():
    assert {job.name for job in defs.resolve_all_job_defs()} >= {
        "daily_ingest_job", "analysis_job", "daily_refresh_job", "model_training_job",
        "alerting_job", "landing_job", "retention_job"}
    assert {s.name: s.job_name for s in defs.schedules} == {
        "daily_analysis_schedule": "daily_refresh_job", "retention_schedule": "retention_job",
        "weekly_model_schedule": "model_training_job"}
    assert {s.name for s in defs.sensors} == {"landing_sensor", "refresh_after_ingest",
                                              "regression_alert_sensor", "run_failure_alert_sensor"}

"""Analysis over the rolling window: trend_stats, change_points, seasonal_profiles,
anomalies, metric_correlations and regression_causes."""

import re
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pandas as pd

from perf_pipeline.analysis import correlations
from perf_pipeline.analysis.anomalies import fleet_anomalies, node_day_features, node_health_outliers
from perf_pipeline.analysis.causes import suspected_causes
from perf_pipeline.analysis.change_points import DEFAULT_SETTINGS, DetectorSettings
from perf_pipeline.analysis.regressions import (
    CHANGE_COLUMNS,
    LOAD_METRIC,
    build_series,
    group_incidents,
    rows_of_series,
    series_change_points,
)
from perf_pipeline.analysis.seasonality import seasonal_profiles as decompose_profiles
from perf_pipeline.analysis.trends import compute_trend_stats
from perf_pipeline.config import TrendSettings
from perf_pipeline.defs.resources import MonitoringResource, WarehouseResource
from perf_pipeline.parallel import cores
from perf_pipeline.report.markdown import (
    anomaly_table,
    cause_table,
    configuration_table,
    correlation_table,
    incident_table,
    markdown_table,
    outlier_node_table,
    trend_table,
)
from perf_pipeline.report import plots
from perf_pipeline.storage.warehouse import Warehouse

_TRENDS = TrendSettings()


class WindowConfig(dg.Config):
    window_days: int = _TRENDS.window_days
    as_of: str | None = None  # ISO timestamp closing the window; default: the newest data


class TrendConfig(WindowConfig):
    alpha: float = _TRENDS.alpha
    min_change_percent: float = _TRENDS.min_change_percent
    min_days: int = _TRENDS.min_days


class AnomalyConfig(WindowConfig):
    threshold: float = 6.0  # robust σ from the rolling median
    window_points: int = 25  # rolling median window, in points
    max_burst: int = 3  # longer runs of odd values are level changes, not anomalies


class ChangePointConfig(WindowConfig):
    penalty_factor: float = DEFAULT_SETTINGS.penalty_factor
    alpha: float = DEFAULT_SETTINGS.alpha
    min_effect: float = DEFAULT_SETTINGS.min_effect
    # Metrics are detected in steps of at least this many points (1: a step per metric). A
    # step costs a worker process start (seconds) on the multiprocess executor, so a small
    # fleet is one step; lower it to spread a large fleet over more workers.
    points_per_step: int = 250_000
    # Processes each step detects its series in (0: one per CPU core; 1: the step's own).
    # A step of fewer than parallel.MIN_POINTS points uses its own process.
    detection_workers: int = 0


# The steps regression_alerts waits for, and it, run first where a run could pick another
# (Dagster starts the ready step of the highest dagster/priority first, in any executor, and
# hands a pool's slot to it first): a refresh raises its alerts before it works on
# seasonality, forecasts, models and the dashboard, which no alert reads.
ALERT_PATH_TAGS = {"dagster/priority": "10"}


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def analysis_window(context: dg.AssetExecutionContext, config: WindowConfig,
            wh: Warehouse) -> tuple[datetime, datetime]:
    if config.window_days < 2:
        raise dg.Failure(f"{context.asset_key.to_user_string()} config: window_days must be >= 2")
    window_end = datetime.fromisoformat(config.as_of) if config.as_of else wh.latest_timestamp()
    if window_end is None:
        context.log.warning("no normalized data yet: the result is empty")
        window_end = utc_now()
    window_end = window_end.replace(tzinfo=None)
    return window_end - timedelta(days=config.window_days), window_end


def _disabled(context: dg.AssetExecutionContext, setting: str) -> dg.MaterializeResult:
    """An analysis switched off in perf_pipeline.yaml keeps its last table and says so."""
    context.log.info(f"{setting} is off in perf_pipeline.yaml: {context.asset_key.to_user_string()} "
                     "keeps its last result")
    return dg.MaterializeResult(metadata={"disabled_by": dg.MetadataValue.text(setting)})


def plot_metadata(context: dg.AssetExecutionContext, name: str,
                  draw: Callable[[], str | None]) -> dict[str, dg.MetadataValue]:
    """`{name: markdown}` with the images `draw` returns; nothing when it has no data or fails:
    a plot is an extra that never fails the asset."""
    try:
        markdown = draw()
    except Exception as error:  # any plotting error costs only the plot
        context.log.warning(f"{name}: the plot could not be drawn: {error!r}")
        return {}
    return {name: dg.MetadataValue.md(markdown)} if markdown else {}


def _window_series(context: dg.AssetExecutionContext, config: WindowConfig,
                   wh: Warehouse) -> tuple[datetime, datetime, pd.DataFrame]:
    """The window and every series in it, as `regressions.build_series` arranges them."""
    window_start, window_end = analysis_window(context, config, wh)
    return window_start, window_end, build_series(
        wh.window_points(window_start, window_end, names_as_categories=True))


@dg.asset(
    deps=["normalized_timeseries"],
    pool="duckdb",
    op_tags=ALERT_PATH_TAGS,
    group_name="analysis",
    kinds={"duckdb"},
    description="Trend of every series (overall, per test, per node) over the rolling window: "
                "OLS, Theil–Sen, Mann–Kendall, change rate, direction-aware verdict.",
)
def trend_stats(context: dg.AssetExecutionContext, config: TrendConfig,
                warehouse: WarehouseResource, monitoring: MonitoringResource) -> dg.MaterializeResult:
    if not monitoring.settings().enable_trend_analysis:
        return _disabled(context, "enable_trend_analysis")
    if not 0 < config.alpha < 1:
        raise dg.Failure("trend_stats config: alpha must be in (0, 1)")
    with warehouse.open() as wh:
        window_start, window_end = analysis_window(context, config, wh)
        daily = wh.daily_series(window_start, window_end)
        table = compute_trend_stats(
            daily, window_start=window_start,
            window_end=window_end, computed_at=utc_now(), alpha=config.alpha,
            min_change_percent=config.min_change_percent, min_days=config.min_days)
        wh.replace_table("trend_stats", table)
        degrading = wh.top_trends(direction="degrading", limit=15)
        known_changes = wh.incidents_and_changes()[1]
        known_anomalies = wh.table("anomalies")
    # drawn after the writer connection is closed, as change_points does: plotting takes
    # seconds that other assets (and API readers) should not wait for
    plot = plot_metadata(context, "plot_trends", lambda: plots.trend_markdown(
        daily, table, degrading, known_changes, known_anomalies))
    counts = table["trend_direction"].value_counts()
    return dg.MaterializeResult(metadata={
        "series": dg.MetadataValue.int(len(table)),
        "degrading": dg.MetadataValue.int(int(counts.get("degrading", 0))),
        "improving": dg.MetadataValue.int(int(counts.get("improving", 0))),
        "window": dg.MetadataValue.text(f"{window_start:%Y-%m-%d %H:%M} → {window_end:%Y-%m-%d %H:%M} UTC"),
        "top_degrading": dg.MetadataValue.md(
            trend_table(degrading) if len(degrading) else "no significant degrading trend"),
        **plot,
    })


# change_points is a graph, split by metric so that an executor can spread the detection
# over workers: one step reads the window and hands the points on by metric (through the IO
# manager), a step per group of metrics (`points_per_step`) detects their series' changes
# without touching DuckDB, and one step groups the changes into incidents across metrics
# and stores them.


def _detector_settings(config: ChangePointConfig) -> DetectorSettings:
    return DetectorSettings(penalty_factor=config.penalty_factor, alpha=config.alpha,
                            min_effect=config.min_effect)


def _mapping_key(metric_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", metric_name)


def metric_steps(points: pd.DataFrame, points_per_step: int) -> list[list[str]]:
    """The window's metrics in steps of at least `points_per_step` points (the last step
    may hold fewer), in name order."""
    steps: list[list[str]] = [[]]
    size = 0
    counts = points["metric_name"].value_counts().sort_index()
    for metric, count in counts[counts > 0].items():  # categories count their absent names too
        if size >= points_per_step:
            steps.append([])
            size = 0
        steps[-1].append(metric)
        size += int(count)
    return [step for step in steps if step]


@dg.op(ins={"after": dg.In(dg.Nothing)}, out=dg.DynamicOut(), pool="duckdb", tags=ALERT_PATH_TAGS,
       description="The window's points, a part per step of metrics (each with the node load "
                   "metric, which per-test series are judged net of).")
def change_point_window(context: dg.OpExecutionContext, config: ChangePointConfig,
                        warehouse: WarehouseResource):
    if config.points_per_step < 1:
        raise dg.Failure("change_points config: points_per_step must be >= 1")
    with warehouse.open() as wh:
        window_start, window_end = analysis_window(context, config, wh)
        points = wh.window_points(window_start, window_end, names_as_categories=True)
    load = points[points["metric_name"] == LOAD_METRIC]
    for metrics in metric_steps(points, config.points_per_step):
        part = points[points["metric_name"].isin(metrics)]
        if LOAD_METRIC not in metrics:
            part = pd.concat([part, load], ignore_index=True)
        key = metrics[0] if len(metrics) == 1 else f"{metrics[0]}_and_{len(metrics) - 1}_more"
        yield dg.DynamicOutput(((window_start, window_end), metrics, part),
                               mapping_key=_mapping_key(key))


@dg.op(tags=ALERT_PATH_TAGS,
       description="Confirmed changes of some metrics' series (no DuckDB: any worker can run it).")
def detect_metric_changes(config: ChangePointConfig, metric_points: tuple) -> tuple:
    if config.detection_workers < 0:
        raise dg.Failure("change_points config: detection_workers must be >= 0")
    window, metrics, points = metric_points
    series = build_series(points)
    return window, series_change_points(series, metrics=metrics, settings=_detector_settings(config),
                                        workers=config.detection_workers or cores())


@dg.op(pool="duckdb", tags=ALERT_PATH_TAGS,
       description="Incidents across metrics; both tables replaced at once.")
def store_change_points(context: dg.OpExecutionContext, config: ChangePointConfig,
                        warehouse: WarehouseResource, found: list) -> None:
    computed_at = utc_now()
    with warehouse.open() as wh:
        # the window the parts were cut from, though a run may have loaded data since
        window_start, window_end = found[0][0] if found else analysis_window(context, config, wh)
        series = build_series(wh.window_points(window_start, window_end, names_as_categories=True))
        # per-metric results in the order detection over all series at once gives them
        found = pd.concat([frame for _, frame in found if len(frame)]
                          or [pd.DataFrame(columns=CHANGE_COLUMNS)], ignore_index=True)
        found = found.sort_values(["scope", "metric_name", "test_name", "node_id"],
                                  na_position="last", kind="stable", ignore_index=True)
        changes, incidents = group_incidents(found, series)
        wh.replace_table("change_points", changes.assign(computed_at=computed_at))
        wh.replace_table("change_incidents", incidents.assign(computed_at=computed_at))
        top = wh.top_incidents(limit=15)
        known_anomalies = wh.table("anomalies")
    _forget_parts(context)
    regressions = changes[changes["kind"] == "regression"]
    # the plots draw regressions' series only: handing them just those rows spares them
    # searching every row of the window for each one
    drawn = rows_of_series(series, regressions)
    plot = {**plot_metadata(context, "plot_change_points",
                            lambda: plots.change_point_markdown(drawn, changes, known_anomalies)),
            **plot_metadata(context, "plot_regressions",
                            lambda: plots.regression_markdown(drawn, changes))}
    context.add_output_metadata({
        "series": dg.MetadataValue.int(int(series.groupby(
            ["scope", "metric_name", "test_name", "node_id"], dropna=False).ngroups)),
        "change_points": dg.MetadataValue.int(len(changes)),
        "regressions": dg.MetadataValue.int(len(regressions)),
        "incidents": dg.MetadataValue.int(len(incidents)),
        "top_incidents": dg.MetadataValue.md(incident_table(top) if len(top) else "no change point"),
        **plot,
    })


def _forget_parts(context: dg.OpExecutionContext) -> None:
    """Delete the parts change_point_window handed on, once every part is detected, where
    the default filesystem IO manager keeps them (the run's folder in the instance's
    storage): kept, they would grow it by the window's points every run. Other IO managers
    keep them elsewhere (an object store's own lifecycle rules apply there)."""
    graph, _, _ = context.get_step_execution_context().step.key.rpartition(".")  # graph.op
    window_step = f"{graph}.change_point_window" if graph else "change_point_window"
    shutil.rmtree(Path(context.instance.storage_directory()) / context.run_id / window_step,
                  ignore_errors=True)


def _change_point_op_config(config: dict) -> dict:
    """The asset's one config (ChangePointConfig, checked by each step), given to each step."""
    values = {"config": dict(config or {})}
    return {"change_point_window": values, "detect_metric_changes": values,
            "store_change_points": values}


@dg.graph_asset(
    ins={"after": dg.AssetIn("normalized_timeseries", dagster_type=dg.Nothing)},
    config=dg.ConfigMapping(config_fn=_change_point_op_config,
                            config_schema=ChangePointConfig.to_config_schema()),
    group_name="analysis",
    kinds={"duckdb"},
    description="Confirmed level shifts and ramps of every series in the window, with the first "
                "run, job and commit after each, grouped into incidents (change_incidents). "
                "Detection runs as one step per metric.",
)
def change_points(after):
    found = change_point_window(after).map(detect_metric_changes)
    return store_change_points(found.collect())


@dg.asset(
    deps=["normalized_timeseries"],
    pool="duckdb",
    group_name="analysis",
    kinds={"duckdb"},
    description="Daily cycle of every node metric per node (STL) and daily and weekly cycles "
                "fleet-wide (MSTL), with their strength.",
)
def seasonal_profiles(context: dg.AssetExecutionContext, config: WindowConfig,
                      warehouse: WarehouseResource) -> dg.MaterializeResult:
    with warehouse.open() as wh:
        window_start, window_end = analysis_window(context, config, wh)
        profiles = decompose_profiles(wh.node_hourly(window_start, window_end))
        wh.replace_table("seasonal_profiles", profiles.assign(computed_at=utc_now()))
        strongest = wh.strongest_cycles(limit=15)
    return dg.MaterializeResult(metadata={
        "profiles": dg.MetadataValue.int(int(profiles.groupby(
            ["metric_name", "node_id", "cycle"], dropna=False).ngroups)),
        "strongest_fleet_cycles": dg.MetadataValue.md(markdown_table(
            ["metric", "cycle", "strength", "peak to trough"], strongest.itertuples(index=False))
            if len(strongest) else "not enough hourly data yet"),
    })


@dg.asset(
    deps=["normalized_timeseries"],
    pool="duckdb",
    group_name="analysis",
    kinds={"duckdb", "scikitlearn"},
    description="Spikes, dips and short bursts of every series (robust z from the rolling "
                "median and MAD), and node-days whose health metrics set them apart from the "
                "fleet (isolation forest; table node_health).",
)
def anomalies(context: dg.AssetExecutionContext, config: AnomalyConfig,
              warehouse: WarehouseResource, monitoring: MonitoringResource) -> dg.MaterializeResult:
    if not monitoring.settings().enable_anomaly_detection:
        return _disabled(context, "enable_anomaly_detection")
    if config.threshold <= 0 or config.window_points < 5 or config.max_burst < 1:
        raise dg.Failure("anomalies config: threshold must be > 0, window_points >= 5, max_burst >= 1")
    computed_at = utc_now()
    with warehouse.open() as wh:
        window_start, window_end, series = _window_series(context, config, wh)
        found, skipped = fleet_anomalies(series, threshold=config.threshold,
                                         window=config.window_points, max_burst=config.max_burst)
        features = node_day_features(series)
        health = node_health_outliers(
            features, features=[c for c in features.columns if c not in ("node_id", "day")])
        wh.replace_table("anomalies", found.assign(computed_at=computed_at))
        wh.replace_table("node_health", health.assign(computed_at=computed_at, day=health["day"].dt.date))
        top = wh.top_anomalies(limit=15)
        outliers = wh.outlier_nodes(limit=10)
    return dg.MaterializeResult(metadata={
        "anomalies": dg.MetadataValue.int(len(found)),
        "series_skipped_mostly_one_value": dg.MetadataValue.int(skipped),
        "outlier_node_days": dg.MetadataValue.int(int(health["is_outlier"].sum())),
        "top_anomalies": dg.MetadataValue.md(anomaly_table(top) if len(top) else "no anomaly"),
        "outlier_nodes": dg.MetadataValue.md(
            outlier_node_table(outliers) if len(outliers) else "no outlier node"),
    })


@dg.asset(
    deps=["normalized_timeseries"],
    pool="duckdb",
    op_tags=ALERT_PATH_TAGS,
    group_name="analysis",
    kinds={"duckdb"},
    description="Pearson and Spearman correlations of every metric pair per node-hour and per "
                "run (BH-adjusted, strong ones flagged), and metric differences between node "
                "types, test types and context values (table configuration_effects).",
)
def metric_correlations(context: dg.AssetExecutionContext, config: WindowConfig,
                        warehouse: WarehouseResource) -> dg.MaterializeResult:
    computed_at = utc_now()
    with warehouse.open() as wh:
        window_start, window_end, series = _window_series(context, config, wh)
        pairs = correlations.metric_correlations(series)
        effects = correlations.configuration_effects(
            series, correlations.flatten_contexts(wh.run_contexts(window_start, window_end)))
        wh.replace_table("metric_correlations", pairs.assign(computed_at=computed_at))
        wh.replace_table("configuration_effects", effects.assign(computed_at=computed_at))
        strongest = wh.flagged_correlations(limit=15)
        largest = wh.flagged_configuration_effects(limit=15)
    return dg.MaterializeResult(metadata={
        "pairs": dg.MetadataValue.int(len(pairs)),
        "flagged_pairs": dg.MetadataValue.int(int(pairs["flagged"].sum())),
        "flagged_configuration_effects": dg.MetadataValue.int(int(effects["flagged"].sum())),
        "strongest_correlations": dg.MetadataValue.md(
            correlation_table(strongest) if len(strongest) else "no strong correlation"),
        "configuration_effects": dg.MetadataValue.md(
            configuration_table(largest) if len(largest) else "no large configuration effect"),
        **plot_metadata(context, "plot_correlations", lambda: plots.correlation_markdown(pairs)),
    })


@dg.asset(
    deps=["change_points", "metric_correlations"],
    pool="duckdb",
    op_tags=ALERT_PATH_TAGS,
    group_name="analysis",
    kinds={"duckdb"},
    description="Suspected causes of every regression incident, ranked, with evidence: "
                "context values new since the change, the commit range to bisect, the node, "
                "metrics that moved at the same time.",
)
def regression_causes(context: dg.AssetExecutionContext, config: WindowConfig,
                      warehouse: WarehouseResource) -> dg.MaterializeResult:
    with warehouse.open() as wh:
        window_start, window_end, series = _window_series(context, config, wh)
        incidents, changes = wh.incidents_and_changes()
        causes = suspected_causes(
            incidents, changes, series,
            correlations.flatten_contexts(wh.run_contexts(window_start, window_end)),
            wh.correlations())
        wh.replace_table("regression_causes", causes.assign(computed_at=utc_now()))
        top = wh.top_causes(limit=15)
    return dg.MaterializeResult(metadata={
        "regression_incidents": dg.MetadataValue.int(int((incidents["kind"] != "improvement").sum())),
        "causes": dg.MetadataValue.int(len(causes)),
        "most_likely_causes": dg.MetadataValue.md(cause_table(top) if len(top) else "no regression"),
    })

"""Predictions and node ranking: performance_models, performance_forecasts,
node_performance_scores and node_health_risk."""

import json
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from perf_pipeline.analysis import nodes
from perf_pipeline.analysis.forecasting import fit_forecasters, load_forecaster, save_forecaster
from perf_pipeline.catalog import METRICS, Scope, get_metric
from perf_pipeline.defs.analysis import WindowConfig, analysis_window, plot_metadata, utc_now
from perf_pipeline.defs.resources import ModelStoreResource, WarehouseResource
from perf_pipeline.report import plots
from perf_pipeline.report.markdown import forecast_table, model_table, ranking_table, risk_table

# Forecast by default: every critical and high-importance metric, and each node's key
# resource and health metrics.
DEFAULT_MODEL_METRICS = tuple(sorted(
    {m.name for m in METRICS if m.importance in ("critical", "high")}
    | {"cpu_usage", "memory_utilization", "memory_usage", "node_error_rate", "node_failure_rate",
       "node_responsiveness"}))
_KEEP_MODEL_FILES = 3  # trainings kept on disk per metric; the registry keeps every row


class ModelConfig(WindowConfig):
    window_days: int = Field(default=60, description="Days of history to train on.")
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_MODEL_METRICS),
                               description="Metrics to model (catalog names).")
    horizon_days: int = Field(default=14, description="How far ahead models are judged and used.")
    folds: int = Field(default=3, description="Time-ordered cross-validation folds.")
    max_rows: int = Field(default=60_000, description="Training rows per fit (sampled).")


class ForecastConfig(WindowConfig):
    window_days: int = Field(default=60, description="Days of history forecasts start from.")
    horizon_days: int = Field(default=14, description="Days ahead to forecast.")


def _series_points(hourly: pd.DataFrame, metric_name: str) -> pd.DataFrame:
    """Hourly points of a metric with the series each belongs to: a node's own series for
    node metrics, a test's across nodes for per-test metrics, the fleet's for per-run ones."""
    scope = get_metric(metric_name).scope
    if scope is Scope.NODE:
        return hourly.assign(series=hourly["node_id"])
    if scope is Scope.TEST:
        return hourly.assign(series=hourly["test_name"])
    return hourly.assign(series="overall")


def _check_metrics(asset: str, metrics: list[str]) -> None:
    for name in metrics:
        try:
            get_metric(name)
        except KeyError as error:
            raise dg.Failure(f"{asset} config: metrics: {error.args[0]}") from None


@dg.asset(
    deps=["normalized_timeseries"],
    pool="duckdb",
    group_name="models",
    kinds={"duckdb", "scikitlearn"},
    description="A gradient boosting model per metric (calendar, context and recent history), "
                "judged against last-value and seasonal-naive baselines in time-ordered CV and "
                "used only where it beats them; saved under models/, registry in DuckDB.",
)
def performance_models(context: dg.AssetExecutionContext, config: ModelConfig,
                       warehouse: WarehouseResource,
                       model_store: ModelStoreResource) -> dg.MaterializeResult:
    _check_metrics("performance_models", config.metrics)
    if config.horizon_days < 1 or config.folds < 1 or config.max_rows < 1000:
        raise dg.Failure("performance_models config: horizon_days >= 1, folds >= 1, max_rows >= 1000")
    trained_at = utc_now()
    registry, skipped = [], []
    with warehouse.open() as wh:
        window_start, window_end = analysis_window(context, config, wh)
        found = {}
        for metric_name in config.metrics:
            points = _series_points(wh.hourly_points(metric_name, window_start, window_end), metric_name)
            if points.empty:
                skipped.append(metric_name)
            else:
                found[metric_name] = points
        fitted = fit_forecasters(list(found.values()), horizon_hours=24 * config.horizon_days,
                                 folds=config.folds, max_rows=config.max_rows)
        for (metric_name, points), (forecaster, evaluation) in zip(found.items(), fitted, strict=True):
            folder = model_store.folder(metric_name)
            path = folder / f"{trained_at:%Y%m%dT%H%M%S}.joblib"
            save_forecaster(forecaster, path)
            best = evaluation.baseline_mae.get(evaluation.best_baseline)
            registry.append({
                "trained_at": trained_at, "metric_name": metric_name, "rows": evaluation.rows,
                "series": int(points["series"].nunique()), "folds": evaluation.folds,
                "cv_mae": evaluation.model_mae, "baseline_mae": best,
                "best_baseline": evaluation.best_baseline,
                "baseline_errors": json.dumps(evaluation.baseline_mae),
                "method": evaluation.method, "reason": evaluation.reason,
                "interval_coverage": evaluation.interval_coverage, "file": str(path)})
            context.log.info(f"{metric_name}: {evaluation.reason}")
            stale = sorted(folder.glob("*.joblib"))[:-_KEEP_MODEL_FILES]
            for old in stale:
                old.unlink()
            wh.forget_model_files([str(p) for p in stale])
        table = pd.DataFrame(registry, columns=wh.table("performance_models").columns)
        wh.append_table("performance_models", table)
    used = table[table["method"] == "model"]
    return dg.MaterializeResult(metadata={
        "metrics": dg.MetadataValue.int(len(table)),
        "models_used": dg.MetadataValue.int(len(used)),
        "baselines_used": dg.MetadataValue.int(len(table) - len(used)),
        "metrics_without_data": dg.MetadataValue.text(", ".join(skipped) or "none"),
        "cross_validation": dg.MetadataValue.md(model_table(table) if len(table) else "no data"),
    })


@dg.asset(
    deps=["performance_models", "normalized_timeseries"],
    pool="duckdb",
    group_name="models",
    kinds={"duckdb"},
    description="Hourly forecasts with 80% intervals, 14 days ahead, per metric: per node for "
                "node metrics, per test for test metrics, fleet-wide for run metrics.",
)
def performance_forecasts(context: dg.AssetExecutionContext, config: ForecastConfig,
                          warehouse: WarehouseResource) -> dg.MaterializeResult:
    if config.horizon_days < 1:
        raise dg.Failure("performance_forecasts config: horizon_days must be >= 1")
    frames, histories, missing = [], [], []
    with warehouse.open() as wh:
        window_start, window_end = analysis_window(context, config, wh)
        for model in wh.latest_models().itertuples():
            if not isinstance(model.file, str) or not Path(model.file).exists():
                missing.append(model.metric_name)
                continue
            points = _series_points(wh.hourly_points(model.metric_name, window_start, window_end),
                                    model.metric_name)
            if points.empty:
                continue
            histories.append(points[["series", "hour", "value"]].assign(metric_name=model.metric_name))
            forecast = load_forecaster(model.file).forecast(
                points, origin=window_end, horizon_hours=24 * config.horizon_days)
            metric = get_metric(model.metric_name)  # a forecast stays within the metric's range
            bounds = ["forecast", "lower", "upper"]
            forecast[bounds] = forecast[bounds].clip(lower=metric.min_value, upper=metric.max_value)
            frames.append(forecast.assign(metric_name=model.metric_name,
                                          scope=get_metric(model.metric_name).scope.value))
        table = (pd.concat(frames, ignore_index=True) if frames
                 else pd.DataFrame(columns=["series", "hour", "forecast", "lower", "upper", "method",
                                            "metric_name", "scope"]))
        table = table.rename(columns={"hour": "timestamp"}).assign(computed_at=utc_now())
        wh.replace_table("performance_forecasts", table)
    if missing:
        context.log.warning(f"no saved model for {', '.join(missing)}: run performance_models")
    end = table[table["timestamp"] == table["timestamp"].max()] if len(table) else table
    return dg.MaterializeResult(metadata={
        "rows": dg.MetadataValue.int(len(table)),
        "metrics": dg.MetadataValue.int(int(table["metric_name"].nunique()) if len(table) else 0),
        "horizon_end": dg.MetadataValue.text(
            f"{(window_end + timedelta(days=config.horizon_days)):%Y-%m-%d %H:%M} UTC"),
        "fleet_at_horizon": dg.MetadataValue.md(forecast_table(end) if len(end) else "no forecast"),
        **plot_metadata(context, "plot_forecast", lambda: plots.forecast_markdown(
            pd.concat(histories, ignore_index=True), table) if histories else None),
    })


class RiskConfig(WindowConfig):
    limits: dict[str, float] = Field(
        default_factory=lambda: {limit.metric_name: limit.value for limit in nodes.DEFAULT_LIMITS},
        description="Limit per node health metric (upper, or lower for higher-is-better ones).")
    horizon_days: float = Field(default=nodes.RISK_HORIZON_DAYS, description=(
        "A limit this many days away gives risk 100·e⁻¹ ≈ 37; sooner is riskier."))
    current_hours: int = Field(default=24, description="Hours whose median is the current level.")


@dg.asset(
    deps=["normalized_timeseries"],
    pool="duckdb",
    group_name="models",
    kinds={"duckdb"},
    description="0–100 score of every node per metric, for stability and overall (50 = fleet "
                "median), compared on the same tests, with the evidence; per test type too.",
)
def node_performance_scores(context: dg.AssetExecutionContext, config: WindowConfig,
                            warehouse: WarehouseResource) -> dg.MaterializeResult:
    with warehouse.open() as wh:
        window_start, window_end = analysis_window(context, config, wh)
        points = wh.window_points(window_start, window_end, names_as_categories=True)
        scores = nodes.node_scores(points)
        speed = nodes.speed_by_test_type(points)
        speed = speed.assign(
            metric_name=nodes.SPEED_METRIC, noise=None,
            rank=speed.groupby("test_type")["score"].rank(ascending=False, method="min").astype(int))
        table = pd.concat([scores.assign(test_type=None), speed], ignore_index=True)
        wh.replace_table("node_performance_scores", table.assign(computed_at=utc_now()))
        ranking = wh.node_ranking("overall", limit=100)
        stability = wh.node_ranking(nodes.STABILITY, limit=100)
    return dg.MaterializeResult(metadata={
        "nodes": dg.MetadataValue.int(int(scores["node_id"].nunique()) if len(scores) else 0),
        "metrics_scored": dg.MetadataValue.int(
            int(scores["metric_name"].nunique()) - 2 if len(scores) else 0),
        "overall_ranking": dg.MetadataValue.md(ranking_table(ranking) if len(ranking) else "no node"),
        "least_stable": dg.MetadataValue.md(
            ranking_table(stability.tail(5)) if len(stability) else "no node"),
        **plot_metadata(context, "plot_heatmap", lambda: plots.speed_heatmap_markdown(speed)),
    })


@dg.asset(
    deps=["normalized_timeseries", "trend_stats"],
    pool="duckdb",
    group_name="models",
    kinds={"duckdb"},
    description="For every node, when each health metric (memory, error and failure rate, "
                "responsiveness, availability) is predicted to cross its limit, and a 0–100 risk.",
)
def node_health_risk(context: dg.AssetExecutionContext, config: RiskConfig,
                     warehouse: WarehouseResource) -> dg.MaterializeResult:
    limits = []
    for metric_name, value in config.limits.items():
        try:
            get_metric(metric_name)
        except KeyError as error:
            raise dg.Failure(f"node_health_risk config: limits: {error.args[0]}") from None
        limits.append(nodes.Limit(metric_name, float(value)))
    if config.horizon_days <= 0 or config.current_hours < 1:
        raise dg.Failure("node_health_risk config: horizon_days must be > 0, current_hours >= 1")
    with warehouse.open() as wh:
        _, window_end = analysis_window(context, config, wh)
        trends = wh.table("trend_stats")
        risk = nodes.health_risk(trends[trends["scope"] == "node"],
                                 wh.current_node_levels(window_end, hours=config.current_hours),
                                 as_of=window_end, limits=limits, horizon_days=config.horizon_days)
        wh.replace_table("node_health_risk", risk.assign(computed_at=utc_now()))
        top = wh.top_risks(limit=10)
    return dg.MaterializeResult(metadata={
        "nodes": dg.MetadataValue.int(int(risk["node_id"].nunique())),
        "nodes_at_risk": dg.MetadataValue.int(int((risk.groupby("node_id")["node_risk_score"].max()
                                                   >= 50).sum()) if len(risk) else 0),
        "top_risks": dg.MetadataValue.md(risk_table(top) if len(top) else "no node at risk"),
    })

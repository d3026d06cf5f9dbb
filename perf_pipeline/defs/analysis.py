"""trend_stats: trends of every series over the rolling window."""


from datetime import datetime, timedelta, timezone

import dagster as dg

from perf_pipeline.analysis.trends import compute_trend_stats
from perf_pipeline.config import TrendSettings
from perf_pipeline.defs.resources import WarehouseResource
from perf_pipeline.report.markdown import markdown_table

_DEFAULTS = TrendSettings()


class TrendConfig(dg.Config):
    window_days: int = _DEFAULTS.window_days
    alpha: float = _DEFAULTS.alpha
    min_change_percent: float = _DEFAULTS.min_change_percent
    min_days: int = _DEFAULTS.min_days
    as_of: str | None = None  # ISO timestamp closing the window; default: the newest data


@dg.asset(
    deps=["normalized_timeseries"],
    pool="duckdb",
    group_name="analysis",
    kinds={"duckdb"},
    description="Trend of every series (overall, per test, per node) over the rolling window: "
                "OLS, Theil–Sen, Mann–Kendall, change rate, direction-aware verdict.",
)
def trend_stats(context: dg.AssetExecutionContext, config: TrendConfig,
                warehouse: WarehouseResource) -> dg.MaterializeResult:
    if config.window_days < 2 or not 0 < config.alpha < 1:
        raise dg.Failure("trend_stats config: window_days must be >= 2 and alpha in (0, 1)")
    with warehouse.open() as wh:
        window_end = datetime.fromisoformat(config.as_of) if config.as_of else wh.latest_timestamp()
        if window_end is None:
            context.log.warning("no normalized data yet: trend_stats is empty")
            window_end = datetime.now(timezone.utc)
        window_end = window_end.replace(tzinfo=None)
        window_start = window_end - timedelta(days=config.window_days)
        table = compute_trend_stats(
            wh.daily_series(window_start, window_end), window_start=window_start,
            window_end=window_end, computed_at=datetime.now(timezone.utc).replace(tzinfo=None),
            alpha=config.alpha, min_change_percent=config.min_change_percent,
            min_days=config.min_days)
        wh.replace_table("trend_stats", table)
        degrading = wh.top_trends(direction="degrading", limit=15)
    counts = table["trend_direction"].value_counts()
    return dg.MaterializeResult(metadata={
        "series": dg.MetadataValue.int(len(table)),
        "degrading": dg.MetadataValue.int(int(counts.get("degrading", 0))),
        "improving": dg.MetadataValue.int(int(counts.get("improving", 0))),
        "window": dg.MetadataValue.text(f"{window_start:%Y-%m-%d %H:%M} → {window_end:%Y-%m-%d %H:%M} UTC"),
        "top_degrading": dg.MetadataValue.md(markdown_table(
            ["scope", "metric", "test", "node", "%/week", "% over window", "p (BH)"],
            degrading[["scope", "metric_name", "test_name", "node_id", "change_rate_percent",
                       "change_over_window_percent", "p_value_adjusted"]].itertuples(index=False))
            if len(degrading) else "no significant degrading trend"),
    })

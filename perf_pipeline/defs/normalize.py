"""normalized_timeseries: canonical names and units, one value per (metric, test, node, run)."""


from datetime import date

import dagster as dg

from perf_pipeline.defs.partitions import daily_partitions
from perf_pipeline.defs.resources import WarehouseResource


@dg.asset(
    partitions_def=daily_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=["raw_metrics"],
    pool="duckdb",
    group_name="normalize",
    kinds={"duckdb"},
    description="One canonical value per metric, test, node and run of a UTC day, plus hourly "
                "rollups (metric_rollups_hourly) kept for long-term trends.",
    check_specs=[dg.AssetCheckSpec("one_value_per_run", asset="normalized_timeseries",
                                   blocking=True,
                                   description="No (metric, test, node, run) appears twice.")],
)
def normalized_timeseries(context: dg.AssetExecutionContext,
                          warehouse: WarehouseResource) -> dg.MaterializeResult:
    days = [date.fromisoformat(key) for key in context.partition_keys]
    with warehouse.open() as wh:
        counts = wh.replace_normalized_days(days)
        duplicates = wh.duplicate_series_points(days)
    points = sum(day["points"] for day in counts.values())
    rollups = sum(day["hourly_rollups"] for day in counts.values())
    return dg.MaterializeResult(
        metadata={"points": dg.MetadataValue.int(points),
                  "hourly_rollups": dg.MetadataValue.int(rollups),
                  "days": dg.MetadataValue.int(len(context.partition_keys))},
        check_results=[dg.AssetCheckResult(check_name="one_value_per_run", passed=duplicates == 0,
                                           metadata={"duplicate_keys": duplicates})],
    )

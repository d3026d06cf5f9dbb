"""raw_metrics: landing days into DuckDB, validated, with bad rows quarantined; a range of
days (a single-run backfill) is loaded in a few bulk statements."""


from datetime import date

import dagster as dg

from perf_pipeline.defs.partitions import daily_partitions
from perf_pipeline.defs.resources import WarehouseResource
from perf_pipeline.ingest.landing import day_files, load_landing_days
from perf_pipeline.report.markdown import markdown_table

# Above this share of quarantined rows a day is suspicious (a sender broke), not merely noisy.
QUARANTINE_WARN_SHARE = 0.05


@dg.asset(
    partitions_def=daily_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool="duckdb",
    group_name="ingest",
    kinds={"duckdb"},
    description="Validated metric rows of one UTC day (performance_metrics); bad rows go to "
                "quarantined_metrics with a reason.",
    check_specs=[
        dg.AssetCheckSpec("rows_accounted_for", asset="raw_metrics", blocking=True,
                          description="Every record read is loaded or quarantined, none lost."),
        dg.AssetCheckSpec("quarantine_share", asset="raw_metrics",
                          description=f"At most {QUARANTINE_WARN_SHARE:.0%} of records quarantined."),
    ],
)
def raw_metrics(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    days = [date.fromisoformat(key) for key in context.partition_keys]
    per_day, totals, reasons = [], {"rows_read": 0, "rows_loaded": 0, "rows_quarantined": 0}, {}
    with warehouse.open() as wh:
        for day in days:
            if not day_files(warehouse.landing, day) and wh.day_counts(day)["rows_loaded"]:
                raise dg.Failure(
                    f"no landing files for {day}, but rows of that day are stored; refusing to "
                    f"erase them (restore landing/{day}/ or delete the day explicitly)")
        loads = load_landing_days(wh, warehouse.landing, days)
        # one log message for the range: each message is an event the instance stores
        context.log.info("\n".join(
            f"{day}: {loads[day].rows_read} read, {loads[day].rows_loaded} loaded, "
            f"{loads[day].rows_quarantined} quarantined from {loads[day].files} files"
            for day in days))
        for day in days:
            counts, stored = loads[day], wh.day_counts(day)
            per_day.append({"day": day.isoformat(), **stored, "files": counts.files})
            for name in totals:
                totals[name] += stored[name]
            for reason, count in counts.top_reasons:
                reasons[reason] = reasons.get(reason, 0) + count
    accounted = all(d["rows_read"] == d["rows_loaded"] + d["rows_quarantined"] for d in per_day)
    share = totals["rows_quarantined"] / totals["rows_read"] if totals["rows_read"] else 0.0
    top_reasons = sorted(reasons.items(), key=lambda item: -item[1])[:10]
    return dg.MaterializeResult(
        metadata={
            **{name: dg.MetadataValue.int(value) for name, value in totals.items()},
            "days": dg.MetadataValue.int(len(per_day)),
            "quarantine_reasons": dg.MetadataValue.md(
                markdown_table(["reason", "rows"], top_reasons) if top_reasons else "none"),
            "per_day": dg.MetadataValue.md(markdown_table(
                ["day", "read", "loaded", "quarantined", "files"],
                [(d["day"], d["rows_read"], d["rows_loaded"], d["rows_quarantined"], d["files"])
                 for d in per_day[-31:]])),
        },
        check_results=[
            dg.AssetCheckResult(check_name="rows_accounted_for", passed=accounted,
                                metadata={"per_day": str(per_day[-31:])}),
            dg.AssetCheckResult(check_name="quarantine_share",
                                passed=share <= QUARANTINE_WARN_SHARE,
                                severity=dg.AssetCheckSeverity.WARN,
                                metadata={"quarantined_share": float(share)}),
        ],
    )

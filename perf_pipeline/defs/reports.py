"""Reports for people: the performance_dashboard HTML file."""

from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
from pydantic import Field

from perf_pipeline.config import Paths, paths_from_env
from perf_pipeline.defs.analysis import utc_now
from perf_pipeline.defs.resources import WarehouseResource
from perf_pipeline.report.dashboard import build_payload, payload_counts, render_dashboard, write_dashboard
from perf_pipeline.storage.reports import read_dashboard_data, trend_window
from perf_pipeline.storage.warehouse import Warehouse

DASHBOARD_FILE = "performance_dashboard.html"


class ReportsResource(dg.ConfigurableResource):
    """The folder reports are written to (`reports/` under PERF_PIPELINE_HOME)."""

    directory: str = Field(description="Folder of generated reports.")

    def path(self, name: str) -> Path:
        folder = Path(self.directory)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name


def reports_resource(paths: Paths | None = None) -> ReportsResource:
    return ReportsResource(directory=str((paths or paths_from_env()).reports))


class DashboardConfig(dg.Config):
    window_days: int | None = Field(
        default=None, description="Days of history to draw, up to the newest data; default: "
                                  "the window of the last trend_stats run, so trend lines match.")


@dg.asset(
    deps=["normalized_timeseries", "trend_stats", "anomalies", "performance_forecasts",
          "node_performance_scores", "regression_alerts", "optimization_recommendations"],
    # It only reads, but DuckDB locks the file against every other process while one
    # writes, readers included: sharing the writers' pool keeps it from failing on the lock.
    pool="duckdb",
    group_name="reports",
    kinds={"duckdb", "html"},
    description="One self-contained HTML dashboard that works offline: trends with anomalies "
                "and filters, forecasts, node ranking, durations by test type, open alerts, "
                "recommendations.",
)
def performance_dashboard(context: dg.AssetExecutionContext, config: DashboardConfig,
                          warehouse: WarehouseResource, reports: ReportsResource) -> dg.MaterializeResult:
    with warehouse.open() as wh:
        window_start, window_end = _window(wh, config)
        data = read_dashboard_data(wh, window_start, window_end)
    payload = build_payload(data, generated_at=utc_now())
    path = reports.path(DASHBOARD_FILE)
    size = write_dashboard(path, render_dashboard(payload))
    counts = payload_counts(payload)
    context.log.info(f"dashboard written to {path} ({size / 1e6:.1f} MB)")
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(path)),
        "size_bytes": dg.MetadataValue.int(size),
        "window": dg.MetadataValue.text(f"{window_start:%Y-%m-%d %H:%M} – {window_end:%Y-%m-%d %H:%M} UTC"),
        **{name: dg.MetadataValue.int(int(value)) for name, value in counts.items()},
    })


def _window(wh: Warehouse, config: DashboardConfig) -> tuple[datetime, datetime]:
    if config.window_days is None:
        window = trend_window(wh)
        if window is not None:
            return window
    if config.window_days is not None and config.window_days < 1:
        raise dg.Failure("performance_dashboard config: window_days must be >= 1")
    window_end = wh.latest_timestamp() or utc_now()
    return window_end - timedelta(days=config.window_days or 30), window_end

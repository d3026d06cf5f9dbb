"""The one Definitions object of perf_pipeline: assets, checks, jobs, schedules, sensors, resources."""

import dagster as dg

from perf_pipeline.config import Paths, paths_from_env
from perf_pipeline.defs import actions, alerts, analysis, ingest, models, normalize, reports
from perf_pipeline.defs.actions import ActionsResource
from perf_pipeline.defs import automation
from perf_pipeline.defs.executor import step_executor
from perf_pipeline.defs.reports import reports_resource
from perf_pipeline.defs.resources import model_store_resource, monitoring_resource, warehouse_resource


def build_defs(paths: Paths | None = None) -> dg.Definitions:
    """Definitions over the state folder `paths` (default: from PERF_PIPELINE_HOME)."""
    paths = paths or paths_from_env()
    return dg.Definitions(
        assets=dg.load_assets_from_modules([ingest, normalize, analysis, models, actions, alerts, reports]),
        asset_checks=dg.load_asset_checks_from_modules([ingest, normalize, analysis, models, actions, alerts]),
        jobs=[automation.daily_ingest_job, automation.analysis_job, automation.daily_refresh_job,
              automation.model_training_job, automation.alerting_job, automation.landing_job,
              automation.retention_job],
        schedules=[automation.daily_analysis_schedule, automation.retention_schedule,
                   automation.weekly_model_schedule],
        sensors=[automation.landing_sensor, automation.refresh_after_ingest,
                 alerts.regression_alert_sensor, alerts.run_failure_alert_sensor],
        resources={"warehouse": warehouse_resource(paths), "model_store": model_store_resource(paths),
                   "actions": ActionsResource(), "monitoring": monitoring_resource(paths.home),
                   "notifier": alerts.NotifierResource(), "reports": reports_resource(paths)},
        executor=step_executor,
    )


defs = build_defs()

"""The project's definitions with the alerting refresh done by declarative automation instead
of landing_job, for `alert_latency --refresh automation`: the landing sensor launches ingest
runs only (`daily_ingest_job`), and the assets of alerting_job carry an AutomationCondition
that requests them once a parent has been updated and none is in progress, evaluated every
5 s (as often as the project's sensors) by an automation condition sensor. Only the
benchmark loads this module (`dagster dev -m perf_pipeline_tests.benchmarks.automation_variant`).
"""

import dagster as dg

from perf_pipeline.definitions import build_defs
from perf_pipeline.defs import automation

ALERTING = ["trend_stats", "change_points", "metric_correlations", "regression_causes",
            "regression_alerts", "performance_dashboard"]
REFRESH = (dg.AutomationCondition.any_deps_updated().since_last_handled()
           & ~dg.AutomationCondition.any_deps_in_progress()
           & ~dg.AutomationCondition.in_progress())



def _variant() -> dg.Definitions:
    base = build_defs().map_resolved_asset_specs(
        func=lambda spec: spec.replace_attributes(automation_condition=REFRESH),
        selection=dg.AssetSelection.assets(*ALERTING))
    sensors = [automation.landing_sensor.with_attributes(jobs=[automation.daily_ingest_job]),
               *(s for s in base.sensors if s.name not in ("landing_sensor", "refresh_after_ingest")),
               dg.AutomationConditionSensorDefinition(
                   "alerting_automation", target=dg.AssetSelection.assets(*ALERTING),
                   default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=5)]
    return dg.Definitions(assets=base.assets, asset_checks=base.asset_checks, jobs=base.jobs,
                          schedules=base.schedules, sensors=sensors, resources=base.resources)


defs = _variant()

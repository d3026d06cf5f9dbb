"""From findings to action: optimization_recommendations and optimization_actions."""

import dagster as dg
import pandas as pd
from pydantic import Field

from perf_pipeline.actions import DECISION_COLUMNS, ActionRule, decide
from perf_pipeline.analysis import nodes
from perf_pipeline.analysis.recommendations import RecommendationSettings, recommend
from perf_pipeline.defs.analysis import WindowConfig, analysis_window, utc_now
from perf_pipeline.defs.resources import WarehouseResource
from perf_pipeline.report.markdown import action_table, recommendation_table

_DEFAULTS = RecommendationSettings()
_FLEET_METRICS = ("cpu_usage", "queue_wait_time", "parallel_tests")


class RecommendationConfig(WindowConfig):
    memory_threshold_percent: float = _DEFAULTS.memory_threshold_percent
    memory_lookahead_days: float = _DEFAULTS.memory_lookahead_days
    failure_rate_percent: float = _DEFAULTS.failure_rate_percent
    drain_risk_score: float = _DEFAULTS.drain_risk_score
    idle_cpu_percent: float = _DEFAULTS.idle_cpu_percent
    queue_wait_seconds: float = _DEFAULTS.queue_wait_seconds
    target_cpu_percent: float = _DEFAULTS.target_cpu_percent
    min_slowdown_percent: float = _DEFAULTS.min_slowdown_percent
    recent_days: int = Field(default=7, description="Days whose fleet medians describe 'now'.")


class ActionRuleConfig(dg.Config):
    kind: str = Field(description="Recommendation kind, e.g. drain_node or bisect_regression.")
    handler: str = Field(description="Callable as 'package.module:function'.")
    enabled: bool = False
    dry_run: bool = True


class ActionsResource(dg.ConfigurableResource):
    """Which recommendation kinds trigger which handlers. Empty by default: no action runs
    until an operator adds a rule, enables it and turns its dry run off."""

    rules: list[ActionRuleConfig] = Field(default_factory=list)
    max_attempts: int = 3

    def action_rules(self) -> list[ActionRule]:
        return [ActionRule(kind=r.kind, handler=r.handler, enabled=r.enabled, dry_run=r.dry_run)
                for r in self.rules]


@dg.asset(
    deps=["trend_stats", "node_health_risk", "regression_causes", "node_performance_scores"],
    pool="duckdb",
    group_name="actions",
    kinds={"duckdb"},
    description="What to do, with severity, evidence and expected gain: the seed's memory, "
                "duration and failure-rate rules, bisections, node drains, test types to move "
                "off slow node types, parallelism to raise.",
)
def optimization_recommendations(context: dg.AssetExecutionContext, config: RecommendationConfig,
                                 warehouse: WarehouseResource) -> dg.MaterializeResult:
    settings = RecommendationSettings(**{
        name: getattr(config, name) for name in RecommendationSettings.__dataclass_fields__})
    with warehouse.open() as wh:
        window_start, window_end = analysis_window(context, config, wh)
        incidents, changes = wh.incidents_and_changes()
        table = recommend(
            trends=wh.table("trend_stats"), risk=wh.table("node_health_risk"),
            levels=wh.current_node_levels(window_end), incidents=incidents, changes=changes,
            causes=wh.table("regression_causes"),
            # the penalties read only the speed metric's points: the rest of the window
            # would only be filtered away (at L, 10M points for 1M)
            penalties=nodes.node_type_penalties(
                wh.window_points(window_start, window_end, metric_name=nodes.SPEED_METRIC,
                                 names_as_categories=True),
                min_slowdown_percent=settings.min_slowdown_percent),
            fleet=wh.fleet_medians(window_end, _FLEET_METRICS, days=config.recent_days),
            settings=settings)
        wh.replace_table("optimization_recommendations", table.assign(computed_at=utc_now()))
        top = wh.top_recommendations(limit=15)
    counts = table["severity"].value_counts()
    return dg.MaterializeResult(metadata={
        "recommendations": dg.MetadataValue.int(len(table)),
        **{severity: dg.MetadataValue.int(int(counts.get(severity, 0)))
           for severity in ("critical", "high")},
        "top_recommendations": dg.MetadataValue.md(
            recommendation_table(top) if len(top) else "nothing to recommend"),
    })


@dg.asset(
    deps=["optimization_recommendations"],
    pool="duckdb",
    group_name="actions",
    kinds={"duckdb"},
    description="Automated actions on recommendations, off by default: every decision "
                "(applied, dry run, skipped, failed, cleared) logged with its reason and time.",
)
def optimization_actions(context: dg.AssetExecutionContext, warehouse: WarehouseResource,
                         actions: ActionsResource) -> dg.MaterializeResult:
    rules = actions.action_rules()
    with warehouse.open() as wh:
        decisions = decide(
            wh.table("optimization_recommendations"), wh.table("optimization_actions"), rules,
            now=utc_now(), max_attempts=actions.max_attempts,
            on_decision=lambda row: wh.append_table("optimization_actions",
                                                    pd.DataFrame([row], columns=DECISION_COLUMNS)))
    counts = decisions["decision"].value_counts()
    for row in decisions[decisions["decision"] == "failed"].itertuples():
        context.log.warning(f"action {row.handler} on {row.kind} {row.subject} failed: {row.detail}")
    return dg.MaterializeResult(metadata={
        "rules": dg.MetadataValue.int(len(rules)),
        **{decision: dg.MetadataValue.int(int(counts.get(decision, 0)))
           for decision in ("applied", "dry_run", "skipped", "failed", "cleared")},
        "decisions": dg.MetadataValue.md(action_table(decisions.head(20)) if len(decisions)
                                         else "no new decision"),
    })

"""Regression alerts: the outbox asset, the monitoring settings, the channels, and the
sensors that deliver alerts and failed runs."""

from pathlib import Path

import dagster as dg
from dagster_slack import SlackResource

from perf_pipeline.alerts import OPEN, deliver_outbox, reconcile
from perf_pipeline.config import ConfigError, load_monitoring
from perf_pipeline.defs.analysis import ALERT_PATH_TAGS, utc_now
from perf_pipeline.defs.resources import MonitoringResource, WarehouseResource
from perf_pipeline.notify import DeliveryError
from perf_pipeline.notify.email import EmailChannel
from perf_pipeline.notify.slack import SlackBotChannel, SlackWebhookChannel
from perf_pipeline.report.markdown import alert_table
from perf_pipeline.storage.warehouse import WarehouseLockedError, open_warehouse


@dg.asset(
    deps=["change_points", "regression_causes", "trend_stats"],
    pool="duckdb",
    op_tags=ALERT_PATH_TAGS,
    group_name="alerts",
    kinds={"duckdb"},
    description="The alert outbox: one alert per regression incident still in effect and per "
                "significant degrading trend above threshold, deduplicated, with a lifecycle "
                "(new, acknowledged, invalid, resolved; auto-resolved when the series recovers).",
)
def regression_alerts(context: dg.AssetExecutionContext, warehouse: WarehouseResource,
                      monitoring: MonitoringResource) -> dg.MaterializeResult:
    settings = monitoring.settings()
    now = utc_now()
    with warehouse.open() as wh:
        incidents, changes = wh.incidents_and_changes()
        outbox, counts = reconcile(
            wh.table("regression_alerts"), incidents=incidents, changes=changes,
            causes=wh.table("regression_causes"), trends=wh.table("trend_stats"),
            settings=settings, now=now)
        wh.replace_table("regression_alerts", outbox)
        open_alerts = wh.alerts(status="new", limit=15)
    if not settings.alert_on_regression:
        context.log.info("alert_on_regression is off in perf_pipeline.yaml: no new alerts")
    return dg.MaterializeResult(metadata={
        **{name: dg.MetadataValue.int(value) for name, value in counts.items()},
        "open": dg.MetadataValue.int(int(outbox["status"].isin(OPEN).sum())),
        "new_alerts": dg.MetadataValue.md(alert_table(open_alerts) if len(open_alerts) else "no new alert"),
    })


_DEFAULT_SMTP_PORTS = {"none": 25, "starttls": 587, "ssl": 465}


class NotifierResource(dg.ConfigurableResource):
    """The notification channels, configured only by environment variables, read through
    `dg.EnvVar` when a message is sent: secrets never enter code, run config or metadata,
    and a channel whose variables are unset is simply off.

    Slack: `PERF_SLACK_WEBHOOK_URL` (incoming webhook), or `SLACK_BOT_TOKEN` with
    `PERF_SLACK_CHANNEL` (a bot through dagster-slack). Email: `PERF_SMTP_HOST`,
    `PERF_SMTP_PORT`, `PERF_SMTP_USER`, `PERF_SMTP_PASSWORD`, `PERF_SMTP_SECURITY`
    (none | starttls | ssl, default starttls), `PERF_ALERT_EMAIL_FROM`, `PERF_ALERT_EMAIL_TO`
    (comma-separated). Links: `PERF_DAGSTER_URL`, the Dagster UI's address."""

    def _env(self, name: str) -> str | None:
        value = dg.EnvVar(name).get_value()
        return value.strip() if value and value.strip() else None

    @property
    def dagster_url(self) -> str | None:
        url = self._env("PERF_DAGSTER_URL")
        return url.rstrip("/") if url else None

    def asset_url(self, asset: str) -> str | None:
        return f"{self.dagster_url}/assets/{asset}" if self.dagster_url else None

    def run_url(self, run_id: str) -> str | None:
        return f"{self.dagster_url}/runs/{run_id}" if self.dagster_url else None

    def channels(self, wanted: list[str]) -> list:
        """The channels of `wanted` ("slack", "email") whose variables are set."""
        found = []
        if "slack" in wanted:
            if webhook := self._env("PERF_SLACK_WEBHOOK_URL"):
                found.append(SlackWebhookChannel(webhook))
            token, channel = self._env("SLACK_BOT_TOKEN"), self._env("PERF_SLACK_CHANNEL")
            if token and channel:
                found.append(SlackBotChannel(SlackResource(token=token).get_client(), channel))
        if "email" in wanted and (host := self._env("PERF_SMTP_HOST")) and (to := self._env("PERF_ALERT_EMAIL_TO")):
            security = self._env("PERF_SMTP_SECURITY") or "starttls"
            port = self._env("PERF_SMTP_PORT")
            found.append(EmailChannel(
                host, int(port) if port else _DEFAULT_SMTP_PORTS.get(security, 587), security=security,
                user=self._env("PERF_SMTP_USER"), password=self._env("PERF_SMTP_PASSWORD"),
                sender=self._env("PERF_ALERT_EMAIL_FROM") or "perf-pipeline@localhost",
                recipients=[a.strip() for a in to.split(",") if a.strip()]))
        return found


@dg.sensor(minimum_interval_seconds=5, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Delivers new regression alerts to every configured channel, once each, "
                       "retrying failed deliveries with backoff; state in alert_deliveries.")
def regression_alert_sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource,
                            monitoring: MonitoringResource, notifier: NotifierResource):
    try:
        settings = load_monitoring(monitoring.path)
    except ConfigError as error:
        return dg.SkipReason(f"not delivering: {error}")
    channels = notifier.channels(settings.notification_channels)
    if not channels:
        return dg.SkipReason("no notification channel is configured (see the README's alerting section)")
    if not Path(warehouse.database).exists():
        return dg.SkipReason("no database yet")
    try:
        with open_warehouse(warehouse.database) as wh:
            counts = deliver_outbox(wh, channels, now=utc_now(),
                                    asset_url=notifier.asset_url("regression_alerts"))
    except WarehouseLockedError:
        return dg.SkipReason("the database is being written; delivering on the next tick")
    if counts["failed"] or counts["gave_up"]:
        context.log.warning(f"alert deliveries: {counts}")
    return dg.SkipReason(f"deliveries this tick: {counts}")


@dg.run_failure_sensor(default_status=dg.DefaultSensorStatus.RUNNING,
                       description="Posts every failed run to the notification channels.")
def run_failure_alert_sensor(context: dg.RunFailureSensorContext, monitoring: MonitoringResource,
                             notifier: NotifierResource) -> None:
    try:
        wanted = load_monitoring(monitoring.path).notification_channels
    except ConfigError as error:
        context.log.error(f"not posting the failed run: {error}")
        return
    run = context.dagster_run
    failure = {"run_id": run.run_id, "job_name": run.job_name,
               "error": context.failure_event.message or "the run failed",
               "run_url": notifier.run_url(run.run_id)}
    for channel in notifier.channels(wanted):
        try:
            channel.deliver_run_failure(failure)
        except DeliveryError as error:
            context.log.warning(f"could not post the failed run {run.run_id}: {error}")

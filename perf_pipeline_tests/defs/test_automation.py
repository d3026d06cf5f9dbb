"""Sensors, schedules and retention evaluated on a real DagsterInstance and DuckDB file."""

import email
import email.policy
import json
from datetime import date, datetime, timedelta, timezone

import dagster as dg
import pandas as pd
import pytest

from perf_pipeline.config import configure_performance_monitoring
from perf_pipeline.definitions import build_defs
from perf_pipeline.defs.alerts import regression_alert_sensor, run_failure_alert_sensor
from perf_pipeline.defs.runner import RANGE_END_TAG, RANGE_START_TAG
from perf_pipeline.defs.automation import (
    daily_analysis_schedule,
    landing_sensor,
    refresh_after_ingest,
    retention_schedule,
    weekly_model_schedule,
)
from perf_pipeline.ingest.landing import ingest_files, landed_days
from perf_pipeline.storage.warehouse import open_warehouse
from perf_pipeline_tests.conftest import materialized_fleet, metric_row, write_jsonl
from perf_pipeline_tests.test_alerts import _stored_outbox

TODAY = date(2026, 11, 28)


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        yield instance


def _land(paths, tmp_path, days: list[date], name: str = "fleet.jsonl", *,
          today: date = TODAY) -> None:
    rows = [metric_row(f"{d.isoformat()}T{h:02d}:00:00+00:00", "cpu_usage", 40.0 + h, test_name=None,
                       node_id="node-1", run=None) for d in days for h in range(0, 24, 6)]
    ingest_files([write_jsonl(tmp_path / name, rows)], paths.landing, today=today)


def _tick(sensor, instance, defs, cursor=None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources,
                                      definitions=defs)
    return sensor.evaluate_tick(context)


def test_the_landing_sensor_asks_once_per_version_of_each_range_of_days(paths, tmp_path, instance):
    defs = build_defs(paths)
    days = [date(2026, 11, 20), date(2026, 11, 21), date(2026, 11, 24)]
    _land(paths, tmp_path, days)
    first = _tick(landing_sensor, instance, defs)
    ranges = [(r.tags[RANGE_START_TAG], r.tags[RANGE_END_TAG]) for r in first.run_requests]
    assert ranges == [("2026-11-20", "2026-11-21"), ("2026-11-24", "2026-11-24")]
    assert first.run_requests[0].run_key.startswith("ingest:2026-11-20..2026-11-21:")
    again = _tick(landing_sensor, instance, defs, cursor=first.cursor)
    assert again.run_requests == [] and "no new or changed" in again.skip_message

    # once loaded by the job the sensor launches, a fresh sensor (no cursor) finds nothing
    # to do either; the same run refreshed the analysis that can raise an alert
    job = defs.resolve_job_def(landing_sensor.job_name)
    for request in first.run_requests:
        result = job.execute_in_process(instance=instance, tags=request.tags)
        assert result.success
        materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert {"raw_metrics", "normalized_timeseries", "change_points", "regression_alerts"} <= materialized
    assert _tick(landing_sensor, instance, defs).run_requests == []

    # a late file for one day: that day again, under a new run key
    _land(paths, tmp_path, [days[1]], name="late.jsonl")
    late = _tick(landing_sensor, instance, defs, cursor=first.cursor)
    assert [(r.tags[RANGE_START_TAG], r.tags[RANGE_END_TAG]) for r in late.run_requests] == [
        ("2026-11-21", "2026-11-21")]
    assert late.run_requests[0].run_key not in {r.run_key for r in first.run_requests}


def test_a_successful_ingest_run_is_followed_by_the_alerting_refresh(paths, tmp_path, instance):
    defs = build_defs(paths)
    _land(paths, tmp_path, [date(2026, 11, 20)])
    result = defs.resolve_job_def("daily_ingest_job").execute_in_process(
        instance=instance, partition_key="2026-11-20")
    context = dg.build_run_status_sensor_context(
        sensor_name="refresh_after_ingest", dagster_instance=instance,
        dagster_run=result.dagster_run, dagster_event=result.get_run_success_event())
    request = refresh_after_ingest(context)
    assert request.run_key == f"refresh:{result.run_id}"
    assert refresh_after_ingest.job_name == "alerting_job"
    # while a refresh waits in the queue, more ingest runs add no refresh of their own
    instance.create_run_for_job(defs.resolve_job_def("alerting_job"), status=dg.DagsterRunStatus.NOT_STARTED)
    assert "already waiting" in refresh_after_ingest(context).skip_message


def _channels_env(monkeypatch, receiver, smtp_port):
    monkeypatch.setenv("PERF_SLACK_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/services/T/B/hook-secret")
    monkeypatch.setenv("PERF_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("PERF_SMTP_PORT", str(smtp_port))
    monkeypatch.setenv("PERF_SMTP_SECURITY", "none")
    monkeypatch.setenv("PERF_ALERT_EMAIL_TO", "fleet-owners@example.test")
    monkeypatch.setenv("PERF_DAGSTER_URL", "http://127.0.0.1:3000")


def test_the_alert_sensor_delivers_each_alert_once_per_channel(paths, tmp_path, instance, receiver,
                                                               smtp_server, monkeypatch):
    defs = build_defs(paths)
    assert "no notification channel" in _tick(regression_alert_sensor, instance, defs).skip_message
    mailbox, port = smtp_server
    _channels_env(monkeypatch, receiver, port)
    _stored_outbox(paths.database.parent).replace(paths.database)
    for _ in range(3):
        _tick(regression_alert_sensor, instance, defs)
    assert len(receiver.requests) == 1 and len(mailbox.envelopes) == 1
    slack = json.loads(receiver.requests[0]["body"])
    assert "http://127.0.0.1:3000/assets/regression_alerts" in json.dumps(slack)
    mail = email.message_from_bytes(mailbox.envelopes[0].content, policy=email.policy.default)
    body = mail.get_body(("plain",)).get_content()
    assert "test_execution_time" in mail["Subject"] and "tests/a.py::t" in body and "aaa..abc" in body
    with open_warehouse(paths.database, read_only=True) as wh:
        states = wh.table("alert_deliveries")
    assert sorted(zip(states.channel, states.state)) == [("email", "sent"), ("slack_webhook", "sent")]

    configure_performance_monitoring(paths.home / "perf_pipeline.yaml", notification_channels=["email"])
    assert [c.name for c in defs.resources["notifier"].channels(["email"])] == ["email"]


def test_a_failed_run_is_posted_to_the_channels(paths, instance, receiver, smtp_server, monkeypatch):
    mailbox, port = smtp_server
    _channels_env(monkeypatch, receiver, port)
    defs = build_defs(paths)
    bad = {"ops": {"performance_models": {"config": {"metrics": ["cpu_usgae"]}}}}
    result = defs.resolve_job_def("model_training_job").execute_in_process(
        instance=instance, run_config=bad, raise_on_error=False)
    assert not result.success
    failure = result.get_run_failure_event()
    context = dg.build_run_status_sensor_context(
        sensor_name="run_failure_alert_sensor", dagster_instance=instance,
        dagster_run=result.dagster_run, dagster_event=failure, resources=defs.resources).for_run_failure()
    run_failure_alert_sensor(context)
    posted = json.dumps(json.loads(receiver.requests[0]["body"]))
    assert result.run_id in posted and "model_training_job" in posted
    assert f"http://127.0.0.1:3000/runs/{result.run_id}" in posted
    assert len(mailbox.envelopes) == 1


def test_schedules_run_by_default_and_request_their_jobs(paths, instance):
    defs = build_defs(paths)
    for schedule, job in ((daily_analysis_schedule, "daily_refresh_job"),
                          (retention_schedule, "retention_job"),
                          (weekly_model_schedule, "model_training_job")):
        assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
        context = dg.build_schedule_context(instance=instance,
                                            scheduled_execution_time=datetime(2026, 11, 29, 3, tzinfo=timezone.utc))
        assert len(schedule.evaluate_tick(context).run_requests) == 1 and schedule.job_name == job
    refresh = defs.resolve_job_def("daily_refresh_job")
    assert "performance_models" not in {k.to_user_string() for k in refresh.asset_layer.executable_asset_keys}
    for sensor in defs.sensors:
        assert sensor.default_status == dg.DefaultSensorStatus.RUNNING, sensor.name


def test_retention_deletes_what_is_older_than_the_limit_and_keeps_the_rest(paths, tmp_path, instance,
                                                                          monkeypatch):
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    # the job reads this clock too: a midnight passing mid-test would move its cutoff a day
    monkeypatch.setattr("perf_pipeline.defs.automation.utc_now", lambda: now)
    old, young = (now - timedelta(days=40)).date(), (now - timedelta(days=5)).date()
    # landed by today's clock: the days are relative to it, and a fixed TODAY would file a
    # young day that is ahead of it under quarantine as dated in the future
    _land(paths, tmp_path, [old, young], today=now.date())
    defs = build_defs(paths)
    ingest = defs.resolve_job_def("daily_ingest_job")
    for day in (old, young):
        assert ingest.execute_in_process(instance=instance, partition_key=day.isoformat()).success
    configure_performance_monitoring(paths.home / "perf_pipeline.yaml", retention_period_days=30,
                                     rollup_retention_days=60)
    result = defs.resolve_job_def("retention_job").execute_in_process(instance=instance)
    assert result.success
    report = result.output_for_node("apply_retention")
    assert report["rows_deleted_performance_metrics"] == 4 and report["landing_days_removed"] == 1
    assert report["rows_deleted_metric_rollups_hourly"] == 0  # rollups are kept for 60 days
    # Dagster cannot wipe a partition's materializations; the retired day is marked instead
    assert report["partitions_marked_retired"] == 1
    for asset in ("raw_metrics", "normalized_timeseries"):
        observed = instance.fetch_observations(dg.AssetKey(asset), limit=10).records
        assert [(r.partition_key, "retired" in r.asset_observation.metadata) for r in observed] == [
            (old.isoformat(), True)]
    assert report["landing_bytes_freed"] > 0
    with open_warehouse(paths.database, read_only=True) as wh:
        days = wh.con.execute("SELECT DISTINCT CAST(timestamp AS DATE) FROM performance_metrics").fetchall()
        rollups = wh.con.execute("SELECT count(*) FROM metric_rollups_hourly").fetchall()[0][0]
    assert [d for (d,) in days] == [young] and rollups == 8
    assert landed_days(paths.landing) == [young]
    # the young day can still be re-run from its landing folder
    assert ingest.execute_in_process(instance=instance, partition_key=young.isoformat()).success
    assert pd.Timestamp(report["raw_before"]).date() == (now - timedelta(days=30)).date()


def test_a_run_retrains_the_models_only_when_they_are_missing_or_a_week_old(tmp_path):
    """`perf-pipeline run` follows the weekly retraining: a new day is analysed with this
    week's models, and models a week old (or --retrain) are trained again."""
    from perf_pipeline.defs.runner import MODEL_MAX_AGE, models_are_fresh, open_instance, run_pipeline
    from perf_pipeline.ingest.simulator import simulate_fleet

    end = datetime(2026, 11, 20, tzinfo=timezone.utc)
    paths = materialized_fleet(tmp_path, end=end, days=10, nodes=5, tests=5)
    with open_warehouse(paths.database, read_only=True) as wh:
        trained = wh.oldest_current_model()
    assert trained is not None and models_are_fresh(paths)
    assert not models_are_fresh(paths, now=trained + MODEL_MAX_AGE + timedelta(minutes=1))

    def jobs_of(report) -> list[str]:
        with open_instance(paths) as instance:
            return [instance.get_run_by_id(run_id).job_name for run_id in report.run_ids]

    simulate_fleet(tmp_path / "next", days=1, nodes=5, tests=5, seed=2, end=end + timedelta(days=1))
    ingest_files(sorted((tmp_path / "next").rglob("*.jsonl")), paths.landing, today=end.date())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PERF_PIPELINE_HOME", str(tmp_path / "home"))
        patch.delenv("DAGSTER_HOME", raising=False)
        assert jobs_of(run_pipeline(paths, progress=lambda _: None))[-1] == "daily_refresh_job"
        with open_warehouse(paths.database, read_only=True) as wh:
            assert wh.oldest_current_model() == trained  # kept, not retrained
        assert jobs_of(run_pipeline(paths, retrain=True, progress=lambda _: None)) == ["analysis_job"]
    with open_warehouse(paths.database, read_only=True) as wh:
        assert wh.oldest_current_model() > trained


def test_a_refresh_raises_its_alerts_before_the_analysis_no_alert_reads(tmp_path):
    """The steps regression_alerts waits for run first (dagster/priority): the outbox is
    written before seasonality, anomalies, forecasts, models and the dashboard start."""
    from perf_pipeline.defs.runner import open_instance

    paths = materialized_fleet(tmp_path, end=datetime(2026, 11, 20, tzinfo=timezone.utc),
                               days=8, nodes=5, tests=5, runs_per_day=2)
    with open_instance(paths) as instance:
        run = instance.get_runs(limit=1)[0]
        assert run.job_name == "analysis_job" and run.status == dg.DagsterRunStatus.SUCCESS
        events = [(r.dagster_event.event_type, r.dagster_event.step_key)
                  for r in instance.all_logs(run.run_id) if r.dagster_event
                  and r.dagster_event.event_type in (dg.DagsterEventType.STEP_START,
                                                     dg.DagsterEventType.STEP_SUCCESS)]
    started = [key for kind, key in events if kind == dg.DagsterEventType.STEP_START]
    alerted = events.index((dg.DagsterEventType.STEP_SUCCESS, "regression_alerts"))
    before = {key for kind, key in events[:alerted] if kind == dg.DagsterEventType.STEP_START}
    assert before == {"trend_stats", "metric_correlations", "regression_causes", "regression_alerts",
                      *(key for key in started if key.startswith("change_points."))}
    assert {"seasonal_profiles", "anomalies", "performance_models", "performance_forecasts",
            "performance_dashboard"} <= set(started) - before

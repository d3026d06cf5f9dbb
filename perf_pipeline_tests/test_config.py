"""perf_pipeline.yaml: defaults, validation that names the key, the seed's configure function."""

from datetime import datetime

import pytest

from perf_pipeline.config import (
    ConfigError,
    MonitoringSettings,
    configure_performance_monitoring,
    load_monitoring,
)


def test_a_missing_file_means_the_defaults(tmp_path):
    settings = load_monitoring(tmp_path / "perf_pipeline.yaml")
    assert settings.retention_period_days == 90 and settings.regression_threshold_percent == 10
    assert settings.notification_channels == ["slack", "email"] and settings.alert_on_regression
    assert settings.tracks("cpu_usage") and settings.threshold_percent("test_execution_time") == 10
    # the catalog's per-metric thresholds scale with the global one
    assert settings.threshold_percent("load_average") == 20
    doubled = MonitoringSettings(regression_threshold_percent=20, metric_thresholds={"cpu_usage": 3})
    assert doubled.threshold_percent("load_average") == 40 and doubled.threshold_percent("cpu_usage") == 3


@pytest.mark.parametrize("text, message", [
    ("retention_period_days: 0\n", "retention_period_days: Input should be greater than or equal to 1"),
    ("metrics_to_track: [cpu_usage, cpu_usgae]\n", "metrics_to_track: unknown metric 'cpu_usgae'"),
    ("notification_channels: [pager]\n", "notification_channels.0: Input should be 'slack' or 'email'"),
    ("metric_thresholds: {cpu_usage: -1}\n", "metric_thresholds: threshold of cpu_usage must be > 0"),
    ("mutes: [{until: 2026-12-01}]\n", "mutes.0: a mute needs at least one of test, node, metric"),
    ("retention_period_days: 400\n", "rollup_retention_days must be at least retention_period_days"),
    ("slack_webhook_url: https://hooks.example/x\n", "slack_webhook_url: Extra inputs are not permitted"),
    ("- just a list\n", "expected a mapping of settings"),
    ("key: [unclosed\n", "not valid YAML"),
])
def test_invalid_settings_name_the_key(tmp_path, text, message):
    path = tmp_path / "perf_pipeline.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="perf_pipeline.yaml") as error:
        load_monitoring(path)
    assert message in str(error.value)


def test_configure_performance_monitoring_merges_validates_and_saves(tmp_path, monkeypatch):
    monkeypatch.setenv("PERF_PIPELINE_HOME", str(tmp_path))
    settings = configure_performance_monitoring(retention_period_days=30, notification_channels=["slack"])
    assert settings.retention_period_days == 30
    again = configure_performance_monitoring(regression_threshold_percent=15)
    assert again.retention_period_days == 30 and again.regression_threshold_percent == 15
    assert load_monitoring(tmp_path / "perf_pipeline.yaml") == again
    with pytest.raises(ConfigError, match="collection_interval_seconds"):
        configure_performance_monitoring(collection_interval_seconds=0)
    assert load_monitoring(tmp_path / "perf_pipeline.yaml") == again  # a bad change saves nothing


def test_path_is_not_a_setting_name_and_path_as_a_keyword_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PERF_PIPELINE_HOME", str(tmp_path))
    elsewhere = tmp_path / "elsewhere.yaml"
    # positional-only: "path" among the settings is an unknown setting, not a TypeError
    with pytest.raises(ConfigError, match="path: Extra inputs are not permitted"):
        configure_performance_monitoring(path=str(elsewhere))
    with pytest.raises(ConfigError, match="path"):
        configure_performance_monitoring(tmp_path / "perf_pipeline.yaml", path=str(elsewhere))
    assert not elsewhere.exists() and not (tmp_path / "perf_pipeline.yaml").exists()
    assert configure_performance_monitoring(elsewhere, retention_period_days=7).retention_period_days == 7
    assert load_monitoring(elsewhere).retention_period_days == 7


def test_mutes_match_what_they_name_until_they_expire():
    settings = MonitoringSettings(mutes=[
        {"test": "tests/flaky/*", "until": "2026-12-01"},
        {"node": "node-3", "metric": "cpu_usage", "until": "2026-12-01T12:00:00"}])
    now = datetime(2026, 11, 30)
    assert settings.muted(metric="test_execution_time", tests=["tests/flaky/a.py::t"], node=None, now=now)
    assert not settings.muted(metric="test_execution_time", tests=["tests/flaky/a.py::t", "tests/b.py::u"],
                              node=None, now=now)
    both = settings.model_copy(update={"mutes": [*settings.mutes, *MonitoringSettings(
        mutes=[{"test": "tests/b.py::u", "until": "2026-12-01"}]).mutes]})
    assert both.muted(metric="test_execution_time", tests=["tests/flaky/a.py::t", "tests/b.py::u"],
                      node=None, now=now)
    assert settings.muted(metric="cpu_usage", tests=[], node="node-3", now=now)
    assert not settings.muted(metric="memory_usage", tests=[], node="node-3", now=now)
    assert not settings.muted(metric="cpu_usage", tests=[], node="node-3", now=datetime(2026, 12, 2))

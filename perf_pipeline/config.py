"""Where perf_pipeline keeps its state, the analysis defaults, and the monitoring settings.

All state lives under one folder, `PERF_PIPELINE_HOME` (default `./var`): the DuckDB file,
the landing archive, saved models and reports. Nothing else in the package reads the
environment for paths, so a deployment moves everything by setting one variable.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

HOME_ENV = "PERF_PIPELINE_HOME"
DATABASE_ENV = "PERF_PIPELINE_DATABASE"
START_DATE_ENV = "PERF_PIPELINE_START_DATE"

DEFAULT_HOME = "var"
# First day of the daily partitions. Metrics older than this cannot be loaded, so the
# default reaches well back; deployments with older history set PERF_PIPELINE_START_DATE.
DEFAULT_START_DATE = "2024-01-01"


@dataclass(frozen=True)
class Paths:
    home: Path
    database: Path

    @property
    def landing(self) -> Path:
        return self.home / "landing"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    def ensure(self) -> Paths:
        for folder in (self.home, self.landing, self.models, self.reports, self.dagster_home):
            folder.mkdir(parents=True, exist_ok=True)
        self.database.parent.mkdir(parents=True, exist_ok=True)
        return self


def paths_from_env(environ: Mapping[str, str] = os.environ) -> Paths:
    home = Path(environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()
    database = environ.get(DATABASE_ENV)
    return Paths(home=home, database=Path(database).expanduser().resolve() if database
                 else home / "perf.duckdb")


def partitions_start_date(environ: Mapping[str, str] = os.environ) -> str:
    value = environ.get(START_DATE_ENV) or DEFAULT_START_DATE
    try:
        date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{START_DATE_ENV} must be a date like 2024-01-01, got {value!r}") from None
    return value


@dataclass(frozen=True)
class TrendSettings:
    """Defaults of the trend analysis; the Dagster config of `trend_stats` overrides them."""

    window_days: int = 30
    # Benjamini–Hochberg false discovery rate over all series analysed together. 1%, not 5%:
    # with hundreds of series a 5% FDR still alerts on noise in some windows (measured on
    # 30 seeds × 300 noise series: 3–4 false trends at 5%, none at 1%).
    alpha: float = 0.01
    # A trend must move the series by at least this much over the window to matter: with
    # thousands of series, statistically "significant" drifts of 0.5% are noise to an owner.
    min_change_percent: float = 5.0
    # Fewer distinct days than this give no trend (too few points for Mann–Kendall).
    min_days: int = 7


# ----------------------------------------------------------------------- monitoring settings

MONITORING_FILE = "perf_pipeline.yaml"
CHANNELS = ("slack", "email")


class Mute(BaseModel):
    """Silence alerts about a test, a node or a metric (all given fields must match) until a
    time. `test` may hold `*` wildcards."""

    model_config = ConfigDict(extra="forbid")
    test: str | None = None
    node: str | None = None
    metric: str | None = None
    until: datetime
    reason: str = ""

    @model_validator(mode="after")
    def _names_something(self) -> Mute:
        if not (self.test or self.node or self.metric):
            raise ValueError("a mute needs at least one of test, node, metric")
        if self.metric is not None:
            _known_metric(self.metric)
        return self

    @field_validator("until")
    @classmethod
    def _in_utc(cls, until: datetime) -> datetime:
        """An offset is honoured (converted to UTC); a time without one is UTC already."""
        if until.tzinfo is None:
            return until
        try:
            return until.astimezone(timezone.utc).replace(tzinfo=None)
        except OverflowError:
            raise ValueError("until is out of range") from None

    def active(self, now: datetime) -> bool:
        """Whether the mute silences alerts at `now` (naive UTC)."""
        return now < self.until

    def matches(self, *, metric: str | None, tests: list[str], node: str | None) -> bool:
        if self.metric is not None and self.metric != metric:
            return False
        if self.node is not None and self.node != node:
            return False
        if self.test is not None:
            return bool(tests) and all(fnmatch.fnmatchcase(t, self.test) for t in tests)
        return True


def _known_metric(name: str) -> str:
    from perf_pipeline.catalog import BY_NAME

    if name not in BY_NAME:
        raise ValueError(f"unknown metric {name!r}")
    return name


class MonitoringSettings(BaseModel):
    """What to watch, how long to keep it, and whom to tell: the seed's
    `configure_performance_monitoring` options, kept in `$PERF_PIPELINE_HOME/perf_pipeline.yaml`.
    Secrets are never here: channels take them from environment variables."""

    model_config = ConfigDict(extra="forbid")
    metrics_to_track: list[str] | None = None  # None: every metric of the catalog
    collection_interval_seconds: int = Field(default=60, gt=0)
    retention_period_days: int = Field(default=90, ge=1)
    rollup_retention_days: int = Field(default=365, ge=1)
    enable_trend_analysis: bool = True
    enable_anomaly_detection: bool = True
    notification_channels: list[Literal["slack", "email"]] = Field(default_factory=lambda: list(CHANNELS))
    alert_on_regression: bool = True
    regression_threshold_percent: float = Field(default=10.0, gt=0)
    metric_thresholds: dict[str, float] = Field(default_factory=dict)
    mutes: list[Mute] = Field(default_factory=list)

    @field_validator("metrics_to_track")
    @classmethod
    def _tracked_metrics_exist(cls, names: list[str] | None) -> list[str] | None:
        return None if names is None else [_known_metric(n) for n in names]

    @field_validator("metric_thresholds")
    @classmethod
    def _thresholds_are_for_metrics(cls, thresholds: dict[str, float]) -> dict[str, float]:
        for name, value in thresholds.items():
            _known_metric(name)
            if not value > 0:
                raise ValueError(f"threshold of {name} must be > 0, got {value}")
        return thresholds

    @model_validator(mode="after")
    def _rollups_outlive_raw_rows(self) -> MonitoringSettings:
        if self.rollup_retention_days < self.retention_period_days:
            raise ValueError("rollup_retention_days must be at least retention_period_days")
        return self

    def tracks(self, metric: str) -> bool:
        return self.metrics_to_track is None or metric in self.metrics_to_track

    def threshold_percent(self, metric: str) -> float:
        """How large a regression of `metric` must be to alert: its override, else the
        catalog's threshold for it scaled by regression_threshold_percent / 10 — the
        catalog's thresholds are set for the default of 10, which is test durations' own
        (a pass rate falling 5% matters as much as a test slowing 10%)."""
        from perf_pipeline.catalog import get_metric

        if metric in self.metric_thresholds:
            return self.metric_thresholds[metric]
        return get_metric(metric).alert_threshold_percent * self.regression_threshold_percent / 10.0

    def muted(self, *, metric: str | None, tests: list[str], node: str | None,
              now: datetime) -> Mute | None:
        """The mute that silences a finding: one naming its node or metric, or mutes that
        between them cover every one of its tests."""
        active = [m for m in self.mutes if m.active(now)]
        for mute in active:
            if mute.test is None and mute.matches(metric=metric, tests=tests, node=node):
                return mute
        covering = [next((m for m in active if m.test is not None
                          and m.matches(metric=metric, tests=[t], node=node)), None) for t in tests]
        return covering[0] if tests and all(covering) else None


class ConfigError(ValueError):
    """perf_pipeline.yaml is unreadable or invalid; the message names the key."""


def _describe(error: ValidationError) -> str:
    parts = []
    for problem in error.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        parts.append(f"{key}: {message}")
    return "; ".join(parts)


def load_monitoring(path: str | Path) -> MonitoringSettings:
    """Settings from a YAML file; defaults when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return MonitoringSettings()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return MonitoringSettings.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{path}: {_describe(error)}") from None


def save_monitoring(path: str | Path, settings: MonitoringSettings) -> None:
    """Write the settings as YAML, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".yaml.tmp")
    temporary.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_defaults=True),
                                        sort_keys=False))
    temporary.replace(path)


def configure_performance_monitoring(path: str | Path | None = None, /, **changes) -> MonitoringSettings:
    """Change monitoring settings (the seed's function): the named settings are validated,
    merged into `perf_pipeline.yaml` and saved; returns the settings now in force.

        configure_performance_monitoring(retention_period_days=30,
                                         regression_threshold_percent=15,
                                         notification_channels=["slack"])
    """
    path = Path(path) if path is not None else paths_from_env().home / MONITORING_FILE
    current = load_monitoring(path).model_dump()
    try:
        settings = MonitoringSettings.model_validate({**current, **changes})
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
    save_monitoring(path, settings)
    return settings

"""Where perf_pipeline keeps its state, and the analysis defaults.

All state lives under one folder, `PERF_PIPELINE_HOME` (default `./var`): the DuckDB file,
the landing archive, saved models and reports. Nothing else in the package reads the
environment for paths, so a deployment moves everything by setting one variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path

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

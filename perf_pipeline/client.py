"""The Python client: what the pipeline found, asked from code, on this machine or remotely.

`PerformanceTrends(database=PATH)` opens a perf_pipeline DuckDB file read-only. DuckDB
allows no reader while another process holds the file for writing: while a pipeline run
writes, a local read raises WarehouseLockedError (retry after the run's step), and the
server answers 503 with Retry-After. `PerformanceTrends(url=URL, auth_token=TOKEN)` asks a
`perf-pipeline serve` (or `dashboard`) server's JSON API instead; the server answers with
this same class in local mode, so both give the same answers.

    >>> trends = PerformanceTrends(database="var/perf.duckdb")
    >>> trends.get_performance_trends("test_execution_time", test_filter={"test_type": "e2e"})
    {'metric': 'test_execution_time', 'trend_direction': 'degrading', 'change_rate_percent': 2.1, ...}
    >>> trends.get_node_performance_comparison("test_execution_time")
    [('node-07', 91.2), ('node-03', 88.0), ...]            # best first
    >>> trends.select_nodes(test_type="e2e", k=3)
    ['node-07', 'node-11', 'node-03']

Remote errors: a wrong or missing token is a PermissionError (so is changing settings without
the server's admin token, PERF_ADMIN_TOKEN), a request the server refuses (unknown metric, bad
filter) a ValueError with the server's message, a busy, not yet built or older-schema database
a ServiceUnavailableError (retryable; `retry_after` in seconds).
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import numpy as np
import pandas as pd

from perf_pipeline.analysis import nodes
from perf_pipeline.analysis.trends import analyze_trend, classify_trends
from perf_pipeline.catalog import BY_NAME, get_metric
from perf_pipeline.collect.push import _OPENER  # follows no redirect
from perf_pipeline.config import (
    HOME_ENV,
    MONITORING_FILE,
    TrendSettings,
    configure_performance_monitoring,
    paths_from_env,
)
from perf_pipeline.storage.warehouse import Warehouse, filter_clauses, open_warehouse

_SCORE_NAMES = (nodes.OVERALL, nodes.STABILITY)
TOKEN_ENV = "PERF_API_TOKEN"
ADMIN_TOKEN_ENV = "PERF_ADMIN_TOKEN"
ALERT_STATUSES = ("new", "acknowledged", "invalid", "resolved")
CHANGE_KINDS = ("regression", "improvement")
MAX_WINDOW_DAYS = 3650
MAX_LIMIT = 1000
MAX_FILTER_VALUE_CHARS = 1000

TestFilter = Mapping[str, str | Sequence[str]]


class ServiceUnavailableError(RuntimeError):
    """The server cannot answer now (the database is being written or not built yet): retry
    after `retry_after` seconds."""

    retryable = True

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


# ------------------------------------------------------------------ validation (shared with the API)

def check_metric(metric_name: Any, *, scores: bool = False) -> str:
    if not isinstance(metric_name, str) or not metric_name:
        raise ValueError("metric_name is required: a metric of the catalog")
    if metric_name in BY_NAME or (scores and metric_name in _SCORE_NAMES):
        return metric_name
    extra = f", {' or '.join(repr(n) for n in _SCORE_NAMES)}" if scores else ""
    raise ValueError(f"unknown metric_name {metric_name[:100]!r}; use a catalog metric{extra}")


def check_filter(test_filter: TestFilter | None) -> dict[str, str | list[str]]:
    """The filter as a plain dict, validated by the warehouse's whitelist, in the one form a
    query string can carry back: one value as a string, several as a list (so a local answer
    echoes {"node_id": ["node-01"]} as "node-01", as the server does)."""
    if not test_filter:
        return {}
    if not isinstance(test_filter, Mapping):
        raise ValueError("test_filter must be a mapping such as {'test_type': 'e2e'}")
    plain: dict[str, str | list[str]] = {}
    for key, value in test_filter.items():
        if not isinstance(value, (str, list, tuple, set, frozenset)):
            raise ValueError(f"filter {str(key)[:40]!r} needs a non-empty string or list of strings")
        values = [value] if isinstance(value, str) else (
            sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value))
        if any(isinstance(v, str) and len(v) > MAX_FILTER_VALUE_CHARS for v in values):
            raise ValueError(f"filter {str(key)[:40]!r}: a value is longer than "
                             f"{MAX_FILTER_VALUE_CHARS} characters")
        plain[key] = values[0] if len(values) == 1 else values
    filter_clauses(plain)
    return plain


def check_int(name: str, value: Any, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r:.60}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str | None:
    if value is None or value in choices:
        return value
    raise ValueError(f"{name} must be one of {', '.join(choices)}, got {str(value)[:60]!r}")


def check_text(name: str, value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value and len(value) <= 1000):
        return value
    raise ValueError(f"{name} must be a non-empty string of at most 1000 characters")


def _plain(value: Any) -> Any:
    """A JSON-safe Python value: NaN/NaT → None, timestamps → ISO text, arrays → lists."""
    if value is None or value is pd.NaT:
        return None
    if isinstance(value, (np.ndarray, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (pd.Timestamp, datetime, date)):
        return value.isoformat()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{column: _plain(value) for column, value in row.items()}
            for row in frame.astype(object).to_dict(orient="records")]


# ------------------------------------------------------------------ the client

class PerformanceTrends:
    def __init__(self, database: str | Path | None = None, *, url: str | None = None,
                 auth_token: str | None = None, window_days: int = TrendSettings.window_days,
                 timeout: float = 30.0):
        if (database is None) == (url is None):
            raise ValueError("give either database=PATH (local) or url=URL (remote)")
        # the window of a filtered node comparison, here or (sent as window_days) on the server
        self.window_days = check_int("window_days", window_days, low=1, high=MAX_WINDOW_DAYS)
        self.database: Path | None = None
        self.url: str | None = None
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc:
                raise ValueError(f"not an http(s) URL without credentials: {url!r:.100}")
            self.url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
            self.auth_token = auth_token if auth_token is not None else os.environ.get(TOKEN_ENV)
            self.timeout = timeout
            return
        self.database = Path(database)
        if not self.database.exists():
            raise FileNotFoundError(f"no perf_pipeline database at {self.database}; "
                                    "run the pipeline first (perf-pipeline run)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({'url=' + repr(self.url) if self.url else 'database=' + repr(str(self.database))})"

    def _read(self):
        return open_warehouse(self.database, read_only=True)

    # ---------------------------------------------------------------- trends

    def get_performance_trends(self, metric_name: str, time_window_days: int = 30,
                               test_filter: TestFilter | None = None) -> dict[str, Any]:
        """The trend of `metric_name` over the last `time_window_days` of data, on the points
        `test_filter` matches ({"test_type": "e2e"}, {"test_name": "tests/api/*"},
        {"node_id": [...]}): the daily medians of the matching points (per-test metrics as
        ratios to each test's own median, as trend_stats does for its overall series), tested
        by analysis/trends.py. Significance is judged for this one series (no correction
        across series: one question was asked) at TrendSettings' alpha and minimum change.

        Keys: metric, filter, window_days, window_start, window_end, trend_direction
        ("improving", "degrading" or "stable", by the metric's direction),
        change_rate_percent (per week, relative to the window mean; None when the mean is
        near zero), change_over_window_percent, p_value (Mann–Kendall, corrected for
        autocorrelation; None without enough data), is_significant, confidence (1 - p),
        slope_per_day (Theil–Sen, in `unit` per day), window_mean, unit, n_days, n_points,
        n_series (test × node series the points come from), note.
        """
        check_metric(metric_name)
        check_int("time_window_days", time_window_days, low=1, high=MAX_WINDOW_DAYS)
        plain_filter = check_filter(test_filter)
        if self.url is not None:
            return self._get("trends", {"metric_name": metric_name,
                                        "time_window_days": time_window_days, **plain_filter})
        with self._read() as wh:
            end = wh.latest_timestamp()
            if end is None:
                return _trend_answer(metric_name, plain_filter, time_window_days, None, None,
                                     pd.DataFrame(), 0, "no data: the database holds no points yet")
            start = end - timedelta(days=time_window_days)
            daily, series = wh.filtered_daily_levels(start, end, metric_name, plain_filter)
        note = None if not daily.empty else "no data: no points match this metric and filter in the window"
        return _trend_answer(metric_name, plain_filter, time_window_days, start, end, daily, series, note)

    # ---------------------------------------------------------------- nodes

    def get_node_performance_comparison(self, metric_name: str,
                                        test_filter: TestFilter | None = None
                                        ) -> list[tuple[str, float]]:
        """`[(node_id, score), ...]`, best first; score 0–100, 50 = the fleet's median node.

        `metric_name` is a metric of the catalog, "overall" or "stability". Without a filter
        the scores of the last node_performance_scores run are returned; with `test_filter`
        ({"test_type": "e2e"}, {"test_name": "tests/api/*"}, {"node_type": [...]}) they are
        computed on the matching points of the last `window_days` (the client's option; sent
        to the server remotely), on the same tests for every node.
        """
        check_metric(metric_name, scores=True)
        plain_filter = check_filter(test_filter)
        if plain_filter and metric_name in _SCORE_NAMES:
            raise ValueError("test_filter applies to one metric, not to the overall or "
                             "stability score")
        if self.url is not None:
            window = {"window_days": self.window_days} if plain_filter else {}
            answer = self._get("nodes/comparison", {"metric_name": metric_name, **window,
                                                    **plain_filter})
            return [(str(node), float(score)) for node, score in answer["nodes"]]
        with self._read() as wh:
            scores = (self._filtered_scores(wh, metric_name, plain_filter) if plain_filter
                      else wh.node_ranking(metric_name))
        return [(str(row.node_id), round(float(row.score), 2))
                for row in scores.sort_values(["score", "node_id"], ascending=[False, True])
                .itertuples()]

    def _filtered_scores(self, wh: Warehouse, metric_name: str, test_filter: TestFilter) -> pd.DataFrame:
        end = wh.latest_timestamp()
        if end is None:
            return pd.DataFrame(columns=["node_id", "score"])
        points = wh.window_points(end - timedelta(days=self.window_days), end,
                                  metric_name=metric_name, filters=test_filter)
        scores = nodes.node_scores(points)
        return scores[scores["metric_name"] == metric_name]

    def select_nodes(self, test_type: str | None = None, k: int = 5, *,
                     max_risk: float = 50.0) -> list[str]:
        """The k nodes to run tests of `test_type` on: healthy ones first, then by speed on
        that kind of test and stability (`select_nodes_detail` gives the reasons)."""
        return self.select_nodes_detail(test_type=test_type, k=k, max_risk=max_risk)["node_id"].tolist()

    def select_nodes_detail(self, test_type: str | None = None, k: int = 5, *,
                            max_risk: float = 50.0) -> pd.DataFrame:
        if self.url is not None:
            raise NotImplementedError("select_nodes is local only: use database=PATH")
        with self._read() as wh:
            scores = wh.table("node_performance_scores")
            risk = wh.table("node_health_risk")
        if scores.empty:
            raise LookupError("no node scores: node_performance_scores has not run, or its window "
                              "held no node or per-test metric that varied enough to rank nodes "
                              "by (values all but constant)")
        speed = scores[scores["metric_name"] == nodes.SPEED_METRIC]
        speed = speed[speed["test_type"].notna()] if test_type is not None else speed[speed["test_type"].isna()]
        return nodes.select_nodes(speed, scores[scores["metric_name"] == nodes.STABILITY], risk,
                                  test_type=test_type, k=k, max_risk=max_risk)

    # ---------------------------------------------------------------- alerts, recommendations, change points

    def get_alerts(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Regression alerts newest first, optionally of one status."""
        check_choice("status", status, ALERT_STATUSES)
        check_int("limit", limit, low=1, high=MAX_LIMIT)
        if self.url is not None:
            return self._get("alerts", {"status": status, "limit": limit})["alerts"]
        with self._read() as wh:
            return records(wh.alerts(status=status, limit=limit))

    def get_recommendations(self, limit: int = 10) -> list[dict[str, Any]]:
        """The most important optimization recommendations first."""
        check_int("limit", limit, low=1, high=MAX_LIMIT)
        if self.url is not None:
            return self._get("recommendations", {"limit": limit})["recommendations"]
        with self._read() as wh:
            return records(wh.top_recommendations(limit=limit))

    def get_change_points(self, metric_name: str | None = None, *, test_name: str | None = None,
                          node_id: str | None = None, kind: str | None = None,
                          limit: int = 100) -> list[dict[str, Any]]:
        """Confirmed level shifts, newest first; `kind` is "regression" or "improvement"."""
        if metric_name is not None:
            check_metric(metric_name)
        check_text("test_name", test_name)
        check_text("node_id", node_id)
        check_choice("kind", kind, CHANGE_KINDS)
        check_int("limit", limit, low=1, high=MAX_LIMIT)
        if self.url is not None:
            return self._get("change_points", {"metric_name": metric_name, "test_name": test_name,
                                               "node_id": node_id, "kind": kind,
                                               "limit": limit})["change_points"]
        with self._read() as wh:
            return records(wh.change_point_list(metric_name=metric_name, test_name=test_name,
                                                node_id=node_id, kind=kind, limit=limit))

    # ---------------------------------------------------------------- monitoring settings

    def monitoring_file(self) -> Path:
        """Where local settings go: $PERF_PIPELINE_HOME's perf_pipeline.yaml when that is set
        (the pipeline reads it there), else the one next to the database."""
        if os.environ.get(HOME_ENV):
            return paths_from_env().home / MONITORING_FILE
        return self.database.parent / MONITORING_FILE

    def configure_performance_monitoring(self, *, admin_token: str | None = None,
                                         **settings: Any) -> dict[str, Any]:
        """Validate the named settings (perf_pipeline.config.MonitoringSettings), merge them
        into perf_pipeline.yaml and return the settings now in force. Remote: PUT
        /api/v1/monitoring, which writes the server's file and needs the server's admin token:
        `admin_token`, else $PERF_ADMIN_TOKEN, else the client's token (for a server whose
        PERF_ADMIN_TOKEN is the API token). A refusal (403) is a PermissionError."""
        if self.url is not None:
            token = admin_token or os.environ.get(ADMIN_TOKEN_ENV) or self.auth_token
            return self._request("PUT", "monitoring", body=settings, token=token)["settings"]
        saved = configure_performance_monitoring(self.monitoring_file(), **settings)
        return saved.model_dump(mode="json")

    # ---------------------------------------------------------------- HTTP

    def _get(self, route: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
        query = urlencode({k: v for k, v in parameters.items() if v is not None}, doseq=True)
        return self._request("GET", f"{route}?{query}" if query else route)

    def _request(self, method: str, route: str, body: Any = None,
                 token: str | None = None) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        token = token or self.auth_token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body, allow_nan=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(f"{self.url}/api/v1/{route}", data=data, headers=headers,
                                         method=method)
        retry_after = None
        try:
            # _OPENER follows no redirect: the token must never be sent on to another host.
            with _OPENER.open(request, timeout=self.timeout) as response:  # noqa: S310 (http(s) only)
                status, text = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read()
            retry_after = (error.headers or {}).get("Retry-After")
            error.close()
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ServiceUnavailableError(f"perf_pipeline server at {self.url} unreachable: {reason}") from None
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            payload = None
        message = (payload.get("error") if isinstance(payload, dict) else None) or f"HTTP {status}"
        if status == 200 and isinstance(payload, dict):
            return payload
        if status == 401:
            raise PermissionError(f"wrong or missing token for {self.url}")
        if status == 403:
            raise PermissionError(f"{self.url} refused: {message}")
        if status == 400:
            raise ValueError(message)
        if status in (429, 503):  # rate-limited, or the database is being written
            seconds = float(retry_after) if retry_after and retry_after.isdigit() else None
            raise ServiceUnavailableError(f"server busy, retry later: {message}", seconds)
        if 300 <= status < 400:
            raise ValueError(f"server redirected (HTTP {status}); use the final URL, not {self.url}")
        raise RuntimeError(f"server answered {status}: {message}")


class DistributedTestingCoordinator(PerformanceTrends):
    """The seed's name for the client: `DistributedTestingCoordinator(coordinator_url=URL,
    auth_token=TOKEN)` or `(database=PATH)`."""

    def __init__(self, coordinator_url: str | None = None, auth_token: str | None = None, *,
                 database: str | Path | None = None, **options: Any):
        super().__init__(database, url=coordinator_url, auth_token=auth_token, **options)


def _trend_answer(metric_name: str, test_filter: dict, window_days: int, start: datetime | None,
                  end: datetime | None, daily: pd.DataFrame, series: int,
                  note: str | None) -> dict[str, Any]:
    metric = get_metric(metric_name)
    relative = bool(not daily.empty and daily["relative"].iloc[0])
    answer: dict[str, Any] = {
        "metric": metric_name, "filter": test_filter, "window_days": window_days,
        "window_start": _plain(start), "window_end": _plain(end),
        "trend_direction": "stable", "change_rate_percent": None,
        "change_over_window_percent": None, "p_value": None, "is_significant": False,
        "confidence": None, "slope_per_day": None, "window_mean": None,
        "unit": "ratio to each test's median" if relative else metric.unit,
        "direction": metric.direction.value,
        "n_days": int(len(daily)), "n_points": int(daily["n"].sum()) if not daily.empty else 0,
        "n_series": series, "note": note,
    }
    if daily.empty:
        return answer
    days = pd.to_datetime(daily["day"])
    settings = TrendSettings()
    result = analyze_trend((days - days.min()).dt.days.to_numpy(), daily["value"].to_numpy(dtype=float),
                           weekday=days.dt.day_of_week.to_numpy(), min_days=settings.min_days)
    row = pd.DataFrame([{**result.__dict__, "degrading_sign": metric.degrading_sign}])
    judged = classify_trends(row, alpha=settings.alpha,
                             min_change_percent=settings.min_change_percent).iloc[0]
    p_value = _plain(result.mann_kendall_p_value)
    answer.update({
        "trend_direction": str(judged["trend_direction"]),
        "change_rate_percent": _plain(result.change_rate_percent),
        "change_over_window_percent": _plain(result.change_over_window_percent),
        "p_value": p_value, "is_significant": bool(judged["is_significant"]),
        "confidence": None if p_value is None else 1.0 - p_value,
        "slope_per_day": _plain(result.theil_sen_slope_per_day),
        "window_mean": _plain(result.window_mean),
    })
    if p_value is None:
        answer["note"] = (f"too little data: {len(daily)} days with points, "
                          f"{settings.min_days} needed for a trend")
    return answer

"""The JSON API under /api/v1 (behind the same bearer token as the gateway): read-only on
DuckDB; only PUT /api/v1/monitoring writes, to perf_pipeline.yaml, and it needs the admin
token (PERF_ADMIN_TOKEN; off when that is unset, except under --no-auth on loopback).

Every answer comes from `perf_pipeline.client.PerformanceTrends` in local mode, so the
remote client and a local one give the same answers. Each request opens the DuckDB file
read-only in a worker thread; DuckDB refuses that while another process holds the file for
writing, so a request retries briefly and then answers 503 with Retry-After. Parameters are
checked before any data is touched: an unknown parameter, a bad number, an unknown metric or
a bad choice is a 400 naming the parameter; an error inside a query is the JSON 500. A
database built by an older perf_pipeline (a table missing) is a 503 saying to run the pipeline.
Filters reach SQL only through the warehouse's `filter_clauses` whitelist, as bound parameters.

    GET /api/v1/trends?metric_name=&time_window_days=30&test_type=&test_name=&node_id=&node_type=
    GET /api/v1/nodes/comparison?metric_name=&window_days=30&<same filters>
    GET /api/v1/alerts?status=&limit=100
    GET /api/v1/recommendations?limit=10
    GET /api/v1/change_points?metric_name=&test_name=&node_id=&kind=regression|improvement&limit=100
    PUT /api/v1/monitoring        (JSON object of configure_performance_monitoring's settings)
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from perf_pipeline.client import (
    ALERT_STATUSES,
    CHANGE_KINDS,
    MAX_LIMIT,
    MAX_WINDOW_DAYS,
    PerformanceTrends,
    check_choice,
    check_filter,
    check_metric,
    check_text,
)
from perf_pipeline.config import ConfigError, TrendSettings, configure_performance_monitoring
from perf_pipeline.server.bodies import BodyTooLarge, read_limited
from perf_pipeline.storage.warehouse import FILTER_COLUMNS, WarehouseLockedError

logger = logging.getLogger(__name__)

# A writer (the pipeline) holds the file for seconds to minutes: retrying longer than this
# would only hold the client; it is told when to come back instead.
LOCK_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8)
RETRY_AFTER_SECONDS = 5
MAX_SETTINGS_BYTES = 64 * 1024
_WHOLE_NUMBER = re.compile(r"[0-9]{1,9}")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class QueryParameters:
    """The request's query parameters, refused whole when one is unknown or repeated."""

    def __init__(self, request: Request, allowed: set[str], *, filters: bool = False):
        self.params = request.query_params
        known = allowed | (set(FILTER_COLUMNS) if filters else set())
        for name in self.params:
            if name not in known:
                raise ApiError(400, f"unknown query parameter {name[:40]!r}; known: "
                                    f"{', '.join(sorted(known))}")
            if name not in FILTER_COLUMNS and len(self.params.getlist(name)) > 1:
                raise ApiError(400, f"query parameter {name!r} given more than once")

    def text(self, name: str) -> str | None:
        return self.params.get(name)

    def number(self, name: str, default: int, *, high: int) -> int:
        value = self.params.get(name)
        if value is None:
            return default
        if not _WHOLE_NUMBER.fullmatch(value) or not 1 <= int(value) <= high:
            raise ApiError(400, f"{name} must be a whole number from 1 to {high}, got {value[:40]!r}")
        return int(value)

    def test_filter(self) -> dict[str, str | list[str]]:
        chosen: dict[str, str | list[str]] = {}
        for column in FILTER_COLUMNS:
            values = self.params.getlist(column)
            if values:
                chosen[column] = values[0] if len(values) == 1 else values
        return check_filter(chosen)


class ReadApi:
    """The routes; `database` is the pipeline's DuckDB file, `monitoring_file` its
    perf_pipeline.yaml. `admin_token` guards PUT /api/v1/monitoring; without one the PUT is
    refused (403) unless `open_settings` (--no-auth on loopback: nothing is guarded)."""

    def __init__(self, database: Path, monitoring_file: Path, *, admin_token: str | None = None,
                 open_settings: bool = False):
        self.database = Path(database)
        self.monitoring_file = Path(monitoring_file)
        self.admin_token = admin_token
        self.open_settings = open_settings
        self._settings_lock = threading.Lock()

    def routes(self) -> list[Route]:
        return [
            Route("/api/v1/trends", self.trends, methods=["GET"]),
            Route("/api/v1/nodes/comparison", self.node_comparison, methods=["GET"]),
            Route("/api/v1/alerts", self.alerts, methods=["GET"]),
            Route("/api/v1/recommendations", self.recommendations, methods=["GET"]),
            Route("/api/v1/change_points", self.change_points, methods=["GET"]),
            Route("/api/v1/monitoring", self.monitoring, methods=["PUT"]),
        ]

    def _query(self, ask: Callable[[PerformanceTrends], Any]) -> Any:
        """`ask` a local client on a read-only connection, retrying while a writer holds the
        file. Runs in a worker thread."""
        for delay in (*LOCK_RETRY_DELAYS, None):
            try:
                return ask(PerformanceTrends(database=self.database))
            except WarehouseLockedError:
                if delay is None:
                    raise ApiError(503, "the database is being written by the pipeline (DuckDB "
                                        "allows no reader while another process writes); retry "
                                        f"in {RETRY_AFTER_SECONDS} s",
                                   {"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
                time.sleep(delay)
            except FileNotFoundError:
                raise ApiError(503, "no perf_pipeline database yet: run the pipeline first "
                                    "(perf-pipeline run)",
                               {"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
            except (duckdb.CatalogException, duckdb.BinderException) as error:
                if isinstance(error, duckdb.BinderException) and "not found" not in str(error):
                    raise  # a query's own mistake: the JSON 500
                # a table (or column) the queries need is missing: an older schema, or a
                # database the pipeline has not filled yet
                logger.warning("database %s lacks what the API reads: %s", self.database,
                               str(error).splitlines()[0][:200])
                raise ApiError(503, "the database was built by an older perf_pipeline or the "
                                    "pipeline has not run yet; run the pipeline "
                                    "(perf-pipeline run)",
                               {"Retry-After": str(RETRY_AFTER_SECONDS)}) from None

    async def _answer(self, request: Request, build: Callable[[], Callable[[PerformanceTrends], Any]]
                      ) -> JSONResponse:
        try:
            ask = build()
        except ApiError as error:
            return _error(error.status, str(error), error.headers)
        except ValueError as error:  # the shared check_* validation of the parameters only
            return _error(400, str(error))
        try:
            return JSONResponse(await run_in_threadpool(self._query, ask))
        except ApiError as error:  # busy, missing or older database; anything else is a 500
            return _error(error.status, str(error), error.headers)

    async def trends(self, request: Request) -> JSONResponse:
        def build():
            q = QueryParameters(request, {"metric_name", "time_window_days"}, filters=True)
            metric = check_metric(q.text("metric_name"))
            days = q.number("time_window_days", 30, high=MAX_WINDOW_DAYS)
            test_filter = q.test_filter()
            return lambda client: client.get_performance_trends(metric, days, test_filter)
        return await self._answer(request, build)

    async def node_comparison(self, request: Request) -> JSONResponse:
        def build():
            q = QueryParameters(request, {"metric_name", "window_days"}, filters=True)
            metric = check_metric(q.text("metric_name"), scores=True)
            days = q.number("window_days", TrendSettings.window_days, high=MAX_WINDOW_DAYS)
            test_filter = q.test_filter()
            if test_filter and metric in ("overall", "stability"):
                raise ApiError(400, "a test_filter (test_type, test_name, node_id, node_type) "
                                    "applies to one metric, not to the overall or stability score")

            def ask(client: PerformanceTrends) -> dict[str, Any]:
                client.window_days = days  # a fresh client per request
                return {"metric": metric, "filter": test_filter, "window_days": days,
                        "nodes": client.get_node_performance_comparison(metric, test_filter)}
            return ask
        return await self._answer(request, build)

    async def alerts(self, request: Request) -> JSONResponse:
        def build():
            q = QueryParameters(request, {"status", "limit"})
            status = check_choice("status", q.text("status"), ALERT_STATUSES)
            limit = q.number("limit", 100, high=MAX_LIMIT)
            return lambda client: {"alerts": client.get_alerts(status, limit)}
        return await self._answer(request, build)

    async def recommendations(self, request: Request) -> JSONResponse:
        def build():
            q = QueryParameters(request, {"limit"})
            limit = q.number("limit", 10, high=MAX_LIMIT)
            return lambda client: {"recommendations": client.get_recommendations(limit)}
        return await self._answer(request, build)

    async def change_points(self, request: Request) -> JSONResponse:
        def build():
            q = QueryParameters(request, {"metric_name", "test_name", "node_id", "kind", "limit"})
            metric = q.text("metric_name")
            if metric is not None:
                check_metric(metric)
            options = {"test_name": check_text("test_name", q.text("test_name")),
                       "node_id": check_text("node_id", q.text("node_id")),
                       "kind": check_choice("kind", q.text("kind"), CHANGE_KINDS),
                       "limit": q.number("limit", 100, high=MAX_LIMIT)}
            return lambda client: {"change_points": client.get_change_points(metric, **options)}
        return await self._answer(request, build)

    def _settings_refusal(self, request: Request) -> JSONResponse | None:
        if self.admin_token is None:
            if self.open_settings:
                return None
            return _error(403, "changing settings over HTTP is off; set PERF_ADMIN_TOKEN on the server")
        sent = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(sent, f"Bearer {self.admin_token}".encode()):
            return _error(403, "changing settings needs the admin token (the server's "
                               "PERF_ADMIN_TOKEN) as the bearer token")
        return None

    async def monitoring(self, request: Request) -> JSONResponse:
        refusal = self._settings_refusal(request)
        if refusal is not None:
            return refusal
        if request.query_params:
            return _error(400, "PUT /api/v1/monitoring takes no query parameters; send the "
                               "settings as a JSON object")
        try:
            body = await read_limited(request, MAX_SETTINGS_BYTES)
        except BodyTooLarge:
            return _error(413, f"settings body over {MAX_SETTINGS_BYTES} bytes")
        except ValueError as error:
            return _error(400, str(error))
        except ClientDisconnect:
            return _error(400, "client disconnected mid-body")
        try:
            settings = json.loads(body)
        except (ValueError, RecursionError):
            return _error(400, "body must be a JSON object of monitoring settings")
        if not isinstance(settings, dict) or not settings:
            return _error(400, "body must be a non-empty JSON object of monitoring settings, "
                               "e.g. {\"retention_period_days\": 30}")
        try:
            saved = await run_in_threadpool(self._save_settings, settings)
        except ConfigError as error:
            return _error(400, f"invalid monitoring settings: {error}")
        return JSONResponse({"settings": saved})

    def _save_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        # Read-merge-write of one file: two concurrent PUTs must not lose each other's keys.
        with self._settings_lock:
            return configure_performance_monitoring(self.monitoring_file, **settings).model_dump(mode="json")


_INTERNAL_ERROR = "internal error; the server log has the details"


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    """The last resort: a JSON 500 that reveals nothing; the traceback goes to the log."""
    logger.error("unexpected error answering %s %s", request.method, request.url.path,
                 exc_info=error)
    return _error(500, _INTERNAL_ERROR)


class LastResortMiddleware:
    """The JSON 500 for an unexpected error, logged once: Starlette's own error middleware
    re-raises after answering, and the server then logs the same traceback a second time."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as error:
            logger.error("unexpected error answering %s %s", scope.get("method"),
                         scope.get("path"), exc_info=error)
            if not started:
                await _error(500, _INTERNAL_ERROR)(scope, receive, send)

"""One Starlette app for everything perf_pipeline serves over HTTP, and how to run it.

Every `/api/` route (the metrics gateway and the JSON API) needs `Authorization: Bearer
<PERF_API_TOKEN>` (compared in constant time); `/healthz` does not. The server binds 127.0.0.1
unless told otherwise, and refuses to start without a token unless it is bound to loopback
and started with `--no-auth`. Under `--no-auth` only requests for the Host localhost,
127.0.0.1 or [::1] (any port) are answered: a web page on another site cannot reach the
server by DNS rebinding. `PUT /api/v1/monitoring` (changing settings) needs a second token,
PERF_ADMIN_TOKEN, sent as the bearer token instead of the API token; unset, the PUT is
refused (403), except under `--no-auth`.

`perf-pipeline dashboard` also serves the latest `reports/performance_dashboard.html` at `/`.
A browser cannot send a bearer header, so with a token set `/` shows a small form: the token
is POSTed to `/login` (never put in a URL, where access logs and browser history would keep
it) and answered with an HttpOnly, SameSite=Lax session cookie valid for 12 hours: the issue
time and an HMAC of it keyed by the token, never the token. It opens the dashboard page and
nothing else, never the API; `POST /logout` clears it. The pages forbid framing.

Each client address has a request budget and a stricter budget of failed authentications
(`ratelimit.py`), set by PERF_RATE_LIMIT_PER_SECOND / PERF_RATE_LIMIT_BURST and
PERF_AUTH_FAILURES_PER_MINUTE / PERF_AUTH_FAILURES_BURST; over either, the answer is 429 with
Retry-After.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from perf_pipeline.config import MONITORING_FILE, partitions_start_date, paths_from_env
from perf_pipeline.server.api import LastResortMiddleware, ReadApi, internal_error
from perf_pipeline.server.bodies import BodyTooLarge, read_limited
from perf_pipeline.server.gateway import MetricsGateway
from perf_pipeline.server.ratelimit import RateLimit, RateLimitMiddleware

TOKEN_ENV = "PERF_API_TOKEN"
ADMIN_TOKEN_ENV = "PERF_ADMIN_TOKEN"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
REQUESTS_PER_SECOND_ENV = "PERF_RATE_LIMIT_PER_SECOND"
REQUEST_BURST_ENV = "PERF_RATE_LIMIT_BURST"
AUTH_FAILURES_PER_MINUTE_ENV = "PERF_AUTH_FAILURES_PER_MINUTE"
AUTH_FAILURE_BURST_ENV = "PERF_AUTH_FAILURES_BURST"
# Per client address. A node pushing every 2 s sends 0.5 requests/s, so 20/s leaves 40 times
# that; the burst of 100 covers an agent draining its spool after an outage, or CI jobs on one
# host finishing together. 20/s also stays below what the gateway takes on 2 cores (about 25
# small batches/s), so one runaway client cannot take all of it.
DEFAULT_REQUEST_LIMIT = RateLimit(per_second=20.0, burst=100)
# 10 failed authentications at once, then one every 6 s: a person mistyping the token is never
# held up, an online guesser gets 14,400 guesses a day per address instead of thousands a second.
DEFAULT_AUTH_FAILURE_LIMIT = RateLimit(per_second=10 / 60, burst=10)
DASHBOARD_FILE = "performance_dashboard.html"
SESSION_COOKIE = "perf_pipeline_session"
SESSION_MAX_AGE_SECONDS = 12 * 3600
MAX_LOGIN_FORM_BYTES = 4096
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # as Host headers name them, any port
# `/` and `/login` must never be framed (clickjacking of the login form or the page)
FRAMING_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"}


class ServerConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServerSettings:
    landing: Path
    token: str | None
    host: str = DEFAULT_HOST
    # guards PUT /api/v1/monitoring; None: the PUT is refused unless token is None too
    admin_token: str | None = None
    port: int = 8080
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # The JSON API reads `database` and writes `monitoring_file`; `dashboard` (the HTML file
    # served at `/`) is set only by `perf-pipeline dashboard`.
    database: Path | None = None
    monitoring_file: Path | None = None
    dashboard: Path | None = None
    request_limit: RateLimit = DEFAULT_REQUEST_LIMIT
    auth_failure_limit: RateLimit = DEFAULT_AUTH_FAILURE_LIMIT


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _number(environ, name: str, default: float, *, whole: bool = False) -> float:
    text = environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        raise ServerConfigError(f"{name} must be a {'whole ' if whole else ''}number, "
                                f"got {text[:40]!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ServerConfigError(f"{name} must be 0 or more, got {text[:40]!r}")
    return value


def limits_from_env(environ) -> tuple[RateLimit, RateLimit]:
    """The request and failed-authentication limits; a rate of 0 turns that limit off."""
    requests = RateLimit(_number(environ, REQUESTS_PER_SECOND_ENV, DEFAULT_REQUEST_LIMIT.per_second),
                         int(_number(environ, REQUEST_BURST_ENV, DEFAULT_REQUEST_LIMIT.burst, whole=True)))
    failures = RateLimit(
        _number(environ, AUTH_FAILURES_PER_MINUTE_ENV, DEFAULT_AUTH_FAILURE_LIMIT.per_second * 60) / 60,
        int(_number(environ, AUTH_FAILURE_BURST_ENV, DEFAULT_AUTH_FAILURE_LIMIT.burst, whole=True)))
    for limit, name in ((requests, REQUEST_BURST_ENV), (failures, AUTH_FAILURE_BURST_ENV)):
        if limit.enabled and limit.burst < 1:
            raise ServerConfigError(f"{name} must be 1 or more while its rate is above 0")
    return requests, failures


def settings_from_env(landing: Path, *, host: str, port: int, no_auth: bool,
                      max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                      environ: dict | None = None, serve_dashboard: bool = False) -> ServerSettings:
    """The server's settings, refusing the unsafe ones with a message that says what to do.
    The database, perf_pipeline.yaml and dashboard file are PERF_PIPELINE_HOME's."""
    environ = os.environ if environ is None else environ
    paths = paths_from_env(environ)
    token = environ.get(TOKEN_ENV) or None
    admin_token = environ.get(ADMIN_TOKEN_ENV) or None
    if admin_token is not None and len(admin_token) < 16:
        raise ServerConfigError(f"{ADMIN_TOKEN_ENV} is too short to be a secret: use 16 characters or more")
    if no_auth:
        if not is_loopback(host):
            raise ServerConfigError(f"--no-auth is only allowed on a loopback address, not {host}; "
                                    f"set {TOKEN_ENV} instead")
        token = None
    elif token is None:
        raise ServerConfigError(f"set {TOKEN_ENV} to the token clients must send, or run on "
                                "127.0.0.1 with --no-auth")
    elif len(token) < 16:
        raise ServerConfigError(f"{TOKEN_ENV} is too short to be a secret: use 16 characters or more")
    if max_body_bytes <= 0:
        raise ServerConfigError("the body size limit must be positive")
    request_limit, auth_failure_limit = limits_from_env(environ)
    return ServerSettings(landing=landing, token=token, admin_token=admin_token, host=host, port=port,
                          max_body_bytes=max_body_bytes, database=paths.database,
                          request_limit=request_limit, auth_failure_limit=auth_failure_limit,
                          monitoring_file=paths.home / MONITORING_FILE,
                          dashboard=paths.reports / DASHBOARD_FILE if serve_dashboard else None)


SETTINGS_PATH = "/api/v1/monitoring"


class BearerTokenMiddleware:
    """401 for any /api/ request without the right bearer token (constant-time comparison).
    The settings route also takes the admin token (which the route itself then requires)."""

    def __init__(self, app: ASGIApp, token: str | None, admin_token: str | None = None):
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None
        self.admin = f"Bearer {admin_token}".encode() if admin_token else None

    def _accepted(self, scope: Scope) -> bool:
        sent = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(sent, self.expected):
            return True
        return (self.admin is not None and scope["path"] == SETTINGS_PATH
                and hmac.compare_digest(sent, self.admin))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.expected is not None and scope["type"] == "http"
                and scope["path"].startswith("/api/")):
            if not self._accepted(scope):
                response = JSONResponse(
                    {"error": "missing or wrong bearer token"}, status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="perf_pipeline"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


_NO_DASHBOARD_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>No dashboard yet</title></head>
<body><h1>No dashboard yet</h1><p>The pipeline has not written a dashboard. Run it
(<code>perf-pipeline run</code>, or <code>perf-pipeline demo</code>) and reload this page.</p></body></html>"""

_LOGIN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>perf_pipeline</title></head>
<body><h1>perf_pipeline dashboard</h1>{message}<form method="post" action="/login">
<label>API token <input type="password" name="token" autocomplete="current-password" autofocus></label>
<button type="submit">Open</button></form></body></html>"""


class DashboardPage:
    """`/`: the latest dashboard file; with a token set, for a browser holding a live session
    cookie (or a client sending the bearer token)."""

    def __init__(self, file: Path, token: str | None, *, clock=time.time):
        self.file = file
        self.token = token
        self.clock = clock
        self.key = (hmac.new(token.encode(), b"perf_pipeline dashboard session",
                             hashlib.sha256).digest() if token else None)

    def _sign(self, issued: int) -> str:
        return hmac.new(self.key, str(issued).encode(), hashlib.sha256).hexdigest()

    def new_session(self) -> str:
        issued = int(self.clock())
        return f"{issued}.{self._sign(issued)}"

    def session_valid(self, value: str) -> bool:
        issued, _, signature = value.partition(".")
        if not issued.isdigit() or len(issued) > 12:
            return False
        if not hmac.compare_digest(signature.encode(), self._sign(int(issued)).encode()):
            return False
        age = self.clock() - int(issued)
        return -60 <= age <= SESSION_MAX_AGE_SECONDS  # a minute of clock skew at most

    def _allowed(self, request: Request) -> bool:
        if self.token is None:
            return True
        bearer = request.headers.get("authorization", "")
        return (self.session_valid(request.cookies.get(SESSION_COOKIE, ""))
                or hmac.compare_digest(bearer.encode(), f"Bearer {self.token}".encode()))

    async def page(self, request: Request) -> Response:
        if not self._allowed(request):
            return HTMLResponse(_LOGIN_PAGE.format(message=""), status_code=401, headers=FRAMING_HEADERS)
        if not self.file.is_file():
            return HTMLResponse(_NO_DASHBOARD_PAGE, status_code=404, headers=FRAMING_HEADERS)
        return FileResponse(self.file, media_type="text/html",
                            headers={"Cache-Control": "no-store", **FRAMING_HEADERS})

    async def login(self, request: Request) -> Response:
        if self.token is None:
            return RedirectResponse("/", status_code=303, headers=FRAMING_HEADERS)
        try:
            body = await read_limited(request, MAX_LOGIN_FORM_BYTES)
        except BodyTooLarge:
            return HTMLResponse(_LOGIN_PAGE.format(message="<p>Form too large.</p>"),
                                status_code=413, headers=FRAMING_HEADERS)
        except ValueError as error:
            return HTMLResponse(str(error), status_code=400, headers=FRAMING_HEADERS)
        except ClientDisconnect:  # the browser went away mid-form: nobody to answer
            return HTMLResponse("client disconnected mid-form", status_code=400)
        sent = parse_qs(body.decode("utf-8", errors="replace")).get("token", [""])[0]
        if not hmac.compare_digest(sent.encode(), self.token.encode()):
            return HTMLResponse(_LOGIN_PAGE.format(message="<p>Wrong token.</p>"), status_code=401,
                                headers=FRAMING_HEADERS)
        response = RedirectResponse("/", status_code=303, headers=FRAMING_HEADERS)
        # Lax, not Strict: a link to the dashboard from chat or mail must open it; GET / only reads
        response.set_cookie(SESSION_COOKIE, self.new_session(), max_age=SESSION_MAX_AGE_SECONDS,
                            httponly=True, samesite="lax", secure=request.url.scheme == "https",
                            path="/")
        return response

    async def logout(self, request: Request) -> Response:
        response = RedirectResponse("/", status_code=303, headers=FRAMING_HEADERS)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax",
                               secure=request.url.scheme == "https")
        return response


def create_app(settings: ServerSettings) -> Starlette:
    gateway = MetricsGateway(settings.landing, max_body_bytes=settings.max_body_bytes,
                             earliest_day=date.fromisoformat(partitions_start_date()))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            gateway.close()

    home = paths_from_env()
    api = ReadApi(settings.database or home.database,
                  settings.monitoring_file or home.home / MONITORING_FILE,
                  admin_token=settings.admin_token, open_settings=settings.token is None)
    routes = [
        Route("/api/v1/metrics", gateway.post_metrics, methods=["POST"]),
        *api.routes(),
        Route("/healthz", gateway.healthz, methods=["GET"]),
    ]
    if settings.dashboard is not None:
        dashboard = DashboardPage(settings.dashboard, settings.token)
        routes += [Route("/", dashboard.page, methods=["GET"]),
                   Route("/login", dashboard.login, methods=["POST"]),
                   Route("/logout", dashboard.logout, methods=["POST"])]
    middleware = [Middleware(LastResortMiddleware),
                  Middleware(RateLimitMiddleware, requests=settings.request_limit,
                             auth_failures=settings.auth_failure_limit, session_cookie=SESSION_COOKIE)]
    if settings.token is None:
        # No token: anything that can reach the port is trusted, so a page on another site
        # must not reach it through DNS rebinding (its name resolving to 127.0.0.1): only the
        # loopback names are answered. With a token set any Host may ask; the token protects.
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_HOSTS),
                                     www_redirect=False))
    middleware.append(Middleware(BearerTokenMiddleware, token=settings.token,
                                 admin_token=settings.admin_token))
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware,
                    exception_handlers={Exception: internal_error})
    app.state.gateway = gateway
    return app


def serve(settings: ServerSettings) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level="info", server_header=False, proxy_headers=False)

"""One Starlette app for everything perf_pipeline serves over HTTP, and how to run it.

Every `/api/` route needs `Authorization: Bearer <PERF_API_TOKEN>` (compared in constant
time); `/healthz` does not. The server binds 127.0.0.1 unless told otherwise, and refuses to
start without a token unless it is bound to loopback and started with `--no-auth`.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from perf_pipeline.config import partitions_start_date
from perf_pipeline.server.gateway import MetricsGateway

TOKEN_ENV = "PERF_API_TOKEN"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


class ServerConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServerSettings:
    landing: Path
    token: str | None
    host: str = DEFAULT_HOST
    port: int = 8080
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings_from_env(landing: Path, *, host: str, port: int, no_auth: bool,
                      max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                      environ: dict | None = None) -> ServerSettings:
    """The server's settings, refusing the unsafe ones with a message that says what to do."""
    environ = os.environ if environ is None else environ
    token = environ.get(TOKEN_ENV) or None
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
    return ServerSettings(landing=landing, token=token, host=host, port=port,
                          max_body_bytes=max_body_bytes)


class BearerTokenMiddleware:
    """401 for any /api/ request without the right bearer token (constant-time comparison)."""

    def __init__(self, app: ASGIApp, token: str | None):
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.expected is not None and scope["type"] == "http"
                and scope["path"].startswith("/api/")):
            sent = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(sent, self.expected):
                response = JSONResponse(
                    {"error": "missing or wrong bearer token"}, status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="perf_pipeline"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: ServerSettings) -> Starlette:
    gateway = MetricsGateway(settings.landing, max_body_bytes=settings.max_body_bytes,
                             earliest_day=date.fromisoformat(partitions_start_date()))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            gateway.close()

    routes = [
        Route("/api/v1/metrics", gateway.post_metrics, methods=["POST"]),
        Route("/healthz", gateway.healthz, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(BearerTokenMiddleware, token=settings.token)])
    app.state.gateway = gateway
    return app


def serve(settings: ServerSettings) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level="info", server_header=False, proxy_headers=False)

"""Per-client rate limits: token buckets keyed by the client's address, answered with 429 and
Retry-After.

Two buckets per address. Every request takes a token from the first (`requests`), so one
client in a retry loop cannot take the gateway from the rest of the fleet. The second,
stricter one (`auth failures`) is spent by failed authentication: a 401 or 403 to a request
that presented credentials (an Authorization header, the session cookie, a `POST /login`
form). While it is empty, every request presenting credentials from that address is refused
before its credentials are checked, so a right guess is not told apart from a wrong one and
guessing runs at the bucket's rate. A login takes its token up front (its form arrives over
several reads, so parallel guesses would otherwise all pass the check) and gets it back when
it succeeds.

The address is the TCP peer (uvicorn runs without proxy headers, so X-Forwarded-For cannot
pick a bucket); an IPv6 client is keyed by its /64, which one host usually holds whole.
Behind a reverse proxy every client has the proxy's address: raise the limits, or set them
to 0 and limit at the proxy. No third-party limiter is installed here; these ~100 lines
avoid a new dependency.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Buckets kept at most; beyond it the least recently seen address starts again with a full one.
MAX_TRACKED_CLIENTS = 50_000
LOGIN_PATH = "/login"


@dataclass(frozen=True)
class RateLimit:
    """`per_second` tokens refilled per second up to `burst`; `per_second` 0 turns it off."""

    per_second: float
    burst: int

    @property
    def enabled(self) -> bool:
        return self.per_second > 0


class TokenBuckets:
    """One token bucket per key. Not thread-safe: the ASGI event loop is its only caller."""

    def __init__(self, limit: RateLimit, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = MAX_TRACKED_CLIENTS):
        self.limit = limit
        self.clock = clock
        self.max_keys = max_keys
        self._levels: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key: (tokens, at)

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._levels.get(key, (float(self.limit.burst), now))
        return min(float(self.limit.burst), tokens + (now - at) * self.limit.per_second)

    def _store(self, key: str, tokens: float, now: float) -> None:
        self._levels[key] = (tokens, now)
        self._levels.move_to_end(key)
        while len(self._levels) > self.max_keys:
            self._levels.popitem(last=False)

    def wait(self, key: str) -> float:
        """Seconds until `key` has a whole token; 0 when it has one now. Takes nothing."""
        level = self._level(key, self.clock())
        return 0.0 if level >= 1 else (1 - level) / self.limit.per_second

    def take(self, key: str) -> float:
        """Take a token and return 0, or return the seconds to wait (taking nothing)."""
        now = self.clock()
        level = self._level(key, now)
        if level < 1:
            # seen just now: a client kept refusing must not be the first forgotten
            self._levels.move_to_end(key)
            return (1 - level) / self.limit.per_second
        self._store(key, level - 1, now)
        return 0.0

    def charge(self, key: str) -> None:
        """Spend a token even when none is left: a burst of failures in flight at once costs
        a longer wait (bounded at one burst's worth of debt)."""
        now = self.clock()
        self._store(key, max(self._level(key, now) - 1, -float(self.limit.burst)), now)

    def refund(self, key: str) -> None:
        now = self.clock()
        self._store(key, self._level(key, now) + 1, now)


def client_key(scope: Scope) -> str:
    client = scope.get("client")
    host = client[0] if client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _presents_credentials(scope: Scope, session_cookie: str) -> bool:
    if scope["method"] == "POST" and scope["path"] == LOGIN_PATH:
        return True
    for name, value in scope["headers"]:
        if name == b"authorization" or (name == b"cookie" and f"{session_cookie}=".encode() in value):
            return True
    return False


def too_many(message: str, seconds: float) -> JSONResponse:
    retry_after = max(1, math.ceil(seconds))
    return JSONResponse({"error": f"{message}; retry in {retry_after} s"}, status_code=429,
                        headers={"Retry-After": str(retry_after)})


class RateLimitMiddleware:
    """429 with Retry-After once an address spends its request bucket, or its failed
    authentication bucket (see the module's docstring)."""

    def __init__(self, app: ASGIApp, *, requests: RateLimit, auth_failures: RateLimit,
                 session_cookie: str, clock: Callable[[], float] = time.monotonic):
        self.app = app
        self.requests = TokenBuckets(requests, clock=clock) if requests.enabled else None
        self.failures = TokenBuckets(auth_failures, clock=clock) if auth_failures.enabled else None
        self.session_cookie = session_cookie

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = client_key(scope)
        if self.requests is not None:
            wait = self.requests.take(key)
            if wait:
                await too_many("too many requests from this address", wait)(scope, receive, send)
                return
        failures = self.failures
        if failures is None or not _presents_credentials(scope, self.session_cookie):
            await self.app(scope, receive, send)
            return
        login = scope["method"] == "POST" and scope["path"] == LOGIN_PATH
        wait = failures.take(key) if login else failures.wait(key)
        if wait:
            await too_many("too many failed authentication attempts from this address", wait)(
                scope, receive, send)
            return

        async def judging(message: Message) -> None:
            # Settled before the answer goes out: the next guess already finds the bucket spent.
            if message["type"] == "http.response.start":
                failed = message["status"] in (401, 403)
                if login and not failed:
                    failures.refund(key)
                elif failed and not login:
                    failures.charge(key)
            await send(message)

        await self.app(scope, receive, judging)

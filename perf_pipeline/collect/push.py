"""Sending metric rows to the gateway (`perf-pipeline serve`), for the pytest plugin and the
node agent. Standard library only, so the plugin adds nothing to a test run's imports.

The gateway answers 200 when it stored rows, 422 when every row was rejected (the body
lists them with reasons), 401 without the right token, 413 when the body is too large.
`PushError.retryable` tells a sender whether trying again later can help: connection
failures, timeouts, 429 and 5xx can; a rejected batch or a wrong token cannot.

A 200 or 422 counts only when its body is the gateway's: a JSON object with an integer
`accepted` (and an integer `rejected_count`, when present, and a list of `rejected` rows). A
proxy or captive portal answering 200 with a page of its own is a retryable PushError, never
"0 rows accepted". Redirects are not followed (a POST would turn into a GET, and the token
could go to another host): a 3xx is a PushError that names the URL to use instead. Whatever
goes wrong on the way (connection, protocol, a body that does not parse) is a PushError.

Credentials in the URL (`http://user:pass@host`) are taken out of it before it is used: they
become HTTP Basic authentication when no token is given (a token, sent as Bearer, wins), and
`redact_url` gives the URL to show in logs.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

METRICS_PATH = "/api/v1/metrics"
TOKEN_ENV = "PERF_API_TOKEN"
_NOT_GATEWAY = "not a perf_pipeline gateway answer"


class PushError(RuntimeError):
    def __init__(self, message: str, *, retryable: bool, status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status


@dataclass(frozen=True)
class PushResult:
    status: int
    accepted: int
    rejected: list[dict[str, Any]]
    body: dict[str, Any]
    # Rows the gateway rejected; it lists at most a bounded number of them in `rejected`.
    rejected_count: int = field(default=-1)

    def __post_init__(self) -> None:
        if self.rejected_count < 0:
            object.__setattr__(self, "rejected_count", len(self.rejected))

    @property
    def answered(self) -> int:
        """Rows the answer accounts for, accepted or rejected."""
        return self.accepted + self.rejected_count


def _without_userinfo(netloc: str) -> str:
    return netloc.rpartition("@")[2]


def redact_url(url: str) -> str:
    """`url` without the credentials of its user-info part, to show in logs and messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=_without_userinfo(parts.netloc)))


def metrics_url(url: str) -> str:
    """The gateway's metrics endpoint from a base URL (`http://host:8080`) or the full URL.
    Credentials in the URL are kept here (push_bytes takes them out); log `redact_url` of it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not _without_userinfo(parts.netloc):
        raise ValueError(f"not an http(s) URL: {redact_url(url)!r}")
    try:
        parts.port  # a port that is not a number is a setup error, not a failure to retry
    except ValueError:
        raise ValueError(f"not a valid port in {redact_url(url)!r}") from None
    path = parts.path.rstrip("/")
    if not path:
        path = METRICS_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def jsonl(rows: Iterable[Mapping[str, Any]]) -> bytes:
    return b"".join(json.dumps(row, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"
                    for row in rows)


def push_rows(url: str, rows: Iterable[Mapping[str, Any]], *, token: str | None = None,
              timeout: float = 10.0) -> PushResult:
    return push_bytes(url, jsonl(rows), content_type="application/x-ndjson", token=token,
                      timeout=timeout)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuses every redirect, so that the 3xx reaches push_bytes as an HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _gateway_answer(status: int, payload: Any, text: bytes) -> PushResult:
    """The gateway's 200/422 answer, checked; anything else is a retryable PushError."""
    rejected = payload.get("rejected", []) if isinstance(payload, dict) else None
    if (isinstance(payload, dict) and _is_int(payload.get("accepted"))
            and isinstance(rejected, list) and all(isinstance(r, dict) for r in rejected)
            and _is_int(payload.get("rejected_count", len(rejected)))
            and payload.get("rejected_count", len(rejected)) >= len(rejected)):
        return PushResult(status=status, accepted=payload["accepted"], rejected=list(rejected),
                          body=payload, rejected_count=payload.get("rejected_count", len(rejected)))
    snippet = text[:200].decode("utf-8", errors="replace").strip() or "an empty body"
    raise PushError(f"gateway answered {status} but it is {_NOT_GATEWAY}: {snippet!r}",
                    retryable=True, status=status)


def push_bytes(url: str, body: bytes, *, content_type: str, token: str | None = None,
               timeout: float = 10.0) -> PushResult:
    """POST `body` to the gateway. Returns its 200/422 answer; raises PushError for anything
    else (ValueError only for a URL that is not http(s) at all)."""
    endpoint = urlsplit(metrics_url(url))
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    headers = {"Content-Type": content_type, "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif endpoint.username is not None:
        credentials = f"{unquote(endpoint.username)}:{unquote(endpoint.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode("utf-8")).decode("ascii")
    target = urlunsplit(endpoint._replace(netloc=_without_userinfo(endpoint.netloc)))
    location = None
    try:
        request = urllib.request.Request(target, data=body, headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=timeout) as response:  # noqa: S310 (http(s) only)
                status, text = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, location = error.code, (error.headers or {}).get("Location")
            text = error.read() if not 300 <= status < 400 else b""
            error.close()
    except urllib.error.URLError as error:  # before HTTPError's parent OSError: it has a reason
        raise PushError(f"gateway unreachable: {error.reason}", retryable=True) from None
    except (OSError, http.client.HTTPException, ValueError) as error:
        # refused, reset, timed out; a broken status line, a body cut short; a bad header
        raise PushError(f"gateway unreachable: {type(error).__name__}: {error}",
                        retryable=True) from None
    if 300 <= status < 400:
        where = redact_url(location) if location else "an unnamed location"
        raise PushError(f"gateway redirected to {where} (HTTP {status}); use the final URL",
                        retryable=False, status=status)
    try:
        payload: Any = json.loads(text) if text else None
    except (ValueError, RecursionError):
        payload = None
    if status == 200 or status == 422:
        return _gateway_answer(status, payload, text)
    if not isinstance(payload, dict):
        payload = {"error": text[:200].decode("utf-8", errors="replace")} if text else {}
    message = payload.get("error") or payload.get("detail") or f"HTTP {status}"
    raise PushError(f"gateway answered {status}: {message}",
                    retryable=status == 429 or status >= 500, status=status)

"""Sending metric rows to the gateway (`perf-pipeline serve`), for the pytest plugin and the
node agent. Standard library only, so the plugin adds nothing to a test run's imports.

The gateway answers 200 when it stored rows, 422 when every row was rejected (the body
lists them with reasons), 401 without the right token, 413 when the body is too large.
`PushError.retryable` tells a sender whether trying again later can help: connection
failures, timeouts, 429 and 5xx can; a rejected batch or a wrong token cannot.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

METRICS_PATH = "/api/v1/metrics"
TOKEN_ENV = "PERF_API_TOKEN"


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


def metrics_url(url: str) -> str:
    """The gateway's metrics endpoint from a base URL (`http://host:8080`) or the full URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
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


def push_bytes(url: str, body: bytes, *, content_type: str, token: str | None = None,
               timeout: float = 10.0) -> PushResult:
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    headers = {"Content-Type": content_type, "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(metrics_url(url), data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http(s) only)
            status, text = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read()
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise PushError(f"gateway unreachable: {reason}", retryable=True) from None
    try:
        payload = json.loads(text) if text else {}
    except ValueError:
        payload = {"error": text[:200].decode("utf-8", errors="replace")}
    if not isinstance(payload, dict):
        payload = {"body": payload}
    if status == 200 or status == 422:
        return PushResult(status=status, accepted=int(payload.get("accepted", 0)),
                          rejected=list(payload.get("rejected", [])), body=payload)
    message = payload.get("error") or payload.get("detail") or f"HTTP {status}"
    raise PushError(f"gateway answered {status}: {message}",
                    retryable=status == 429 or status >= 500, status=status)

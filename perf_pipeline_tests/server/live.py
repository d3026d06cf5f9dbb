"""Raw HTTP to a real `perf-pipeline serve` (conftest's `live_server`), for tests that send
hundreds of requests from chosen loopback addresses."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self):
        return json.loads(self.body)


def request(port: int, method: str, target: str, body: bytes | Iterable[bytes] | None = None,
            headers: dict[str, str] | None = None, *, source: str = "127.0.0.1") -> Answer:
    """One request on a fresh connection from `source` (any 127.0.0.0/8 address), the target
    sent as given (no quoting); a dropped connection raises. A body given as chunks is sent
    one chunk at a time, with the Content-Length the caller sets."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60,
                                            source_address=(source, 0))
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        sent = {"Content-Length": str(len(body))} if isinstance(body, bytes) else {}
        for name, value in {**sent, **(headers or {})}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()

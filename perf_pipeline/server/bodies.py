"""Reading a request body under a size limit, so that a client sending too much still reads
its 413.

A server that answers before the body has arrived and closes the connection leaves the rest
of the body unread; the kernel then resets the connection, and a client still sending (most
send the whole body before reading any answer) sees a broken pipe instead of the 413, which
senders treat as "gateway unreachable" and retry for ever. So a body over the limit is read
and dropped up to `DRAIN_FACTOR` times the limit (bounded work per request, and the rate
limits bound the requests), and only a body declared larger still is refused unread.
"""

from __future__ import annotations

from starlette.requests import Request

DRAIN_FACTOR = 4


class BodyTooLarge(Exception):
    """The body is over `limit` bytes; `declared` is its Content-Length when sent."""

    def __init__(self, limit: int, declared: int | None):
        super().__init__(f"body over {limit} bytes")
        self.limit = limit
        self.declared = declared


async def read_limited(request: Request, limit: int) -> bytes:
    """The whole body, or BodyTooLarge once it is over `limit` bytes (ValueError for a
    Content-Length that is not a number; ClientDisconnect passes through)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isascii() or not declared.isdigit():
            raise ValueError("Content-Length is not a number")
        if int(declared) > limit * DRAIN_FACTOR:
            raise BodyTooLarge(limit, int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > limit * DRAIN_FACTOR:
            break
    if size > limit:
        raise BodyTooLarge(limit, int(declared) if declared is not None else None)
    return b"".join(chunks)

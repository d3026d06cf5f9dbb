"""The metrics gateway: `POST /api/v1/metrics` takes metric rows from test nodes and CI.

The body is JSON Lines, a JSON document (an array of rows, one row, or pytest-benchmark
output), CSV, or JUnit XML, chosen by Content-Type or `?format=`. Query parameters such as
`node_id` or `test_run_id` fill fields the rows lack (JUnit has no node or run id).

Each row is validated by the same rules loading applies (an in-memory DuckDB with the
metric catalog); the answer lists every rejected row with its reason. Accepted rows are
written to `landing/<day>/gateway-<checksum>.jsonl` (temporary file, fsync, atomic rename),
split by each row's own UTC day. The name is the content's checksum, so a batch sent twice
(a client retrying after a lost answer) lands as the same file once. The gateway never opens
the pipeline's DuckDB file: the landing sensor picks the files up.
"""

from __future__ import annotations

import hashlib
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from perf_pipeline.collect.files import write_atomic
from perf_pipeline.ingest.formats import PARSERS, stage_bytes
from perf_pipeline.ingest.landing import day_folder, outside_partitions
from perf_pipeline.server.bodies import BodyTooLarge, read_limited
from perf_pipeline.storage.warehouse import Warehouse, connect

# Content types → the format's file suffix (formats.PARSERS is keyed by suffix).
CONTENT_TYPES = {
    "application/x-ndjson": ".jsonl",
    "application/jsonl": ".jsonl",
    "application/json-lines": ".jsonl",
    "application/jsonlines": ".jsonl",
    "text/plain": ".jsonl",
    "application/json": ".json",
    "text/csv": ".csv",
    "application/xml": ".xml",
    "text/xml": ".xml",
}
FORMATS = {"jsonl": ".jsonl", "ndjson": ".jsonl", "json": ".json", "pytest-benchmark": ".json",
           "csv": ".csv", "junit": ".xml", "xml": ".xml"}
# Query parameters that fill a field each row lacks; commit and branch go into context_data.
DEFAULT_FIELDS = ("node_id", "node_type", "test_type", "test_run_id", "ci_job_id", "timestamp")
CONTEXT_FIELDS = ("commit", "branch")
# Rejected rows echoed back in full; beyond this the answer gives only the count.
MAX_REJECTED_LISTED = 1000
MAX_RECORD_ECHO = 500


class RequestError(ValueError):
    """A request the gateway refuses as a whole: (HTTP status, message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class GatewayResult:
    received: int = 0
    accepted: int = 0
    rejected: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    days: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"received": self.received, "accepted": self.accepted,
                "rejected_count": len(self.rejected),
                "rejected": self.rejected[:MAX_REJECTED_LISTED],
                "files": self.files, "days": self.days}


class MetricsGateway:
    """Validates batches and writes accepted rows to the landing archive."""

    def __init__(self, landing: Path, *, max_body_bytes: int, earliest_day: date):
        self.landing = Path(landing)
        self.max_body_bytes = max_body_bytes
        # Days before the first daily partition are never loaded: refuse them now, while
        # the sender still has the rows, rather than land files nothing will read.
        self.earliest_day = earliest_day
        # One in-memory DuckDB (schema and catalog only) judges every batch; a DuckDB
        # connection is not for concurrent use, so batches take turns.
        self._warehouse = Warehouse.for_writing(connect())
        self._lock = threading.Lock()

    def close(self) -> None:
        self._warehouse.con.close()

    def store(self, body: bytes, *, suffix: str, defaults: dict | None,
              now: datetime | None = None) -> GatewayResult:
        staged = stage_bytes(body, suffix=suffix, source_file="gateway", defaults=defaults)
        result = GatewayResult(received=len(staged))
        if staged.empty:
            return result
        with self._lock:
            checked = self._warehouse.check_records(staged)
        today = (now or datetime.now(timezone.utc)).date()
        by_day: dict[date, list[str]] = defaultdict(list)
        for (line, reason, day), raw in zip(checked, staged["raw_line"], strict=True):
            if reason is None and day is not None:
                reason = outside_partitions(day, earliest_day=self.earliest_day, today=today,
                                            clock="the gateway's clock")
            if reason is None:
                by_day[day].append(raw)
            else:
                result.rejected.append({"line": line, "reason": reason,
                                        "record": raw[:MAX_RECORD_ECHO]})
        for day in sorted(by_day):
            content = ("\n".join(by_day[day]) + "\n").encode("utf-8")
            name = f"gateway-{hashlib.sha256(content).hexdigest()[:16]}.jsonl"
            target = day_folder(self.landing, day) / name
            if not target.exists():
                write_atomic(target, content)
            result.files.append(f"{day.isoformat()}/{name}")
            result.days.append(day.isoformat())
            result.accepted += len(by_day[day])
        return result

    # ------------------------------------------------------------------ HTTP

    def suffix_of(self, request: Request) -> str:
        chosen = request.query_params.get("format")
        if chosen is not None:
            try:
                return FORMATS[chosen.lower()]
            except KeyError:
                raise RequestError(400, f"unknown format {chosen[:40]!r}; use one of "
                                        f"{', '.join(sorted(FORMATS))}") from None
        content_type = request.headers.get("content-type", "application/x-ndjson")
        media = content_type.split(";")[0].strip().lower()
        suffix = CONTENT_TYPES.get(media)
        if suffix is None or suffix not in PARSERS:
            raise RequestError(415, f"unsupported Content-Type {media[:60]!r}; use one of "
                                    f"{', '.join(sorted(CONTENT_TYPES))} or ?format=")
        return suffix

    @staticmethod
    def defaults_of(request: Request) -> dict | None:
        known = set(DEFAULT_FIELDS) | set(CONTEXT_FIELDS) | {"format"}
        unknown = sorted(set(request.query_params) - known)
        if unknown:
            raise RequestError(400, f"unknown query parameter {unknown[0][:40]!r}; known: "
                                    f"{', '.join(sorted(known))}")
        defaults: dict = {name: request.query_params[name] for name in DEFAULT_FIELDS
                          if request.query_params.get(name)}
        context = {name: request.query_params[name] for name in CONTEXT_FIELDS
                   if request.query_params.get(name)}
        if context:
            defaults["context_data"] = context
        return defaults or None

    async def read_body(self, request: Request) -> bytes:
        try:
            return await read_limited(request, self.max_body_bytes)
        except ValueError as error:
            raise RequestError(400, str(error)) from None
        except BodyTooLarge as error:
            size = f"of {error.declared} bytes " if error.declared is not None else ""
            raise RequestError(413, f"body {size}is over the limit of {self.max_body_bytes} "
                                    "bytes; send smaller batches") from None

    async def post_metrics(self, request: Request) -> JSONResponse:
        try:
            suffix = self.suffix_of(request)
            defaults = self.defaults_of(request)
            body = await self.read_body(request)
        except RequestError as error:
            return JSONResponse({"error": str(error)}, status_code=error.status)
        except ClientDisconnect:
            # The client went away before the whole body arrived: nothing was written.
            return JSONResponse({"error": "client disconnected mid-body"}, status_code=400)
        try:
            result = await run_in_threadpool(self.store, body, suffix=suffix, defaults=defaults)
        except Exception as error:  # noqa: BLE001 - a body we cannot read is the client's to fix
            # Not a 5xx: a retry would fail the same way and block a client's queue.
            return JSONResponse({"error": f"could not read the body: {type(error).__name__}: "
                                          f"{str(error)[:200]}"}, status_code=400)
        status = 422 if result.received and not result.accepted else 200
        return JSONResponse(result.as_json(), status_code=status)

    async def healthz(self, request: Request) -> JSONResponse:
        try:
            self.landing.mkdir(parents=True, exist_ok=True)
            probe = self.landing / f".healthz.{threading.get_ident()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError:
            return JSONResponse({"status": "landing folder is not writable"}, status_code=503)
        return JSONResponse({"status": "ok"})

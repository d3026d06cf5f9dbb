"""The node agent (`perf-pipeline agent`): samples the node with psutil every interval and pushes
the samples to the gateway, through a local spool so that an outage loses nothing.

Every sample becomes one batch of metric rows, written atomically to the spool folder before
anything is sent; batches go out oldest first. A batch's bytes never change once spooled, so a
resend after a lost response carries identical content, and the gateway, which names landing
files by a checksum of their content, stores it as the same file: resending is idempotent.

- 200 with every row accepted: the batch file is deleted.
- 422, or 200 with some rows rejected, or 400/413: the batch can never succeed as it is; it
  moves to `rejected/` next to the gateway's answer, and the reasons are logged.
- an answer that does not account for every row of the batch (accepted + rejected is not the
  batch's row count), or that is not the gateway's (a proxy's page): the batch stays, as below.
- unreachable, timeout, 429, 5xx: the batch stays; sending backs off exponentially with jitter
  (capped) while sampling goes on into the spool.
- 401/403 and other answers that a fix of the setup cures (404: wrong URL, 3xx: a redirect,
  which is never followed): logged loudly, every batch stays, sending backs off the same way.

A failure inside one round (the disk full when spooling, psutil failing to read a counter) is
logged and the agent goes on with the next round.

The spool is bounded (`--spool-max-mb`): when a new batch would not fit, the oldest rejected
batches and then the oldest pending batches are dropped, and the log says how many batches and
rows were lost. That is the only way the agent loses a sample.

The token comes from PERF_API_TOKEN only, never from the command line, and is never logged.
Standard library and psutil only: the agent runs on test nodes, where its own footprint counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from perf_pipeline.collect.files import write_atomic
from perf_pipeline.collect.push import (TOKEN_ENV, PushError, jsonl, metrics_url, push_bytes,
                                        redact_url)

log = logging.getLogger("perf_pipeline.agent")

MB = 1_000_000  # the catalog's MB (bytes × 1e-6)
BATCH_SUFFIX = ".jsonl"
RESPONSE_SUFFIX = ".response.json"
REJECTED_FOLDER = "rejected"
# Answers that say the batch itself is wrong: resending it cannot help.
_BATCH_REFUSED = (400, 413)
AGENT_NAME = "perf-pipeline-agent"


# ------------------------------------------------------------------------------ sampling

def counter_rate(before: Mapping[str, int], after: Mapping[str, int], seconds: float) -> float:
    """MB/s moved between two readings of byte counters keyed by device. A counter that went
    backwards (it wrapped, or its device was reset or re-created) counts as nothing for that
    interval, and a device present in only one reading counts as nothing: a rate is never
    negative, and never inflated by a whole counter's history."""
    if seconds <= 0:
        return 0.0
    moved = sum(max(after[key] - before[key], 0) for key in after.keys() & before.keys())
    return moved / seconds / MB


def _utc_iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class _Reading:
    at: float  # monotonic seconds
    disk_read: dict[str, int] | None
    disk_write: dict[str, int] | None
    net_received: dict[str, int]
    net_sent: dict[str, int]


class Sampler:
    """One row per node metric each time `sample()` is called, rates and CPU measured over the
    time since the previous call (or since the sampler was made)."""

    def __init__(self, node_id: str, node_type: str | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        import psutil

        self._psutil = psutil
        self.node_id = node_id
        self.node_type = node_type
        self._clock = clock
        self._now = now
        self._cores = psutil.cpu_count() or 1
        psutil.cpu_percent(interval=None)  # starts the interval the first sample's CPU covers
        self._last = self._read()

    def _read(self) -> _Reading:
        psutil = self._psutil
        disk = psutil.disk_io_counters()
        nics = psutil.net_io_counters(pernic=True)
        stats = psutil.net_if_stats()
        # Loopback traffic never leaves the node: it is not network I/O.
        external = {name: counters for name, counters in nics.items()
                    if name not in ("lo", "lo0") and "loopback" not in getattr(stats.get(name), "flags", "")}
        return _Reading(
            at=self._clock(),
            disk_read={"all": disk.read_bytes} if disk else None,
            disk_write={"all": disk.write_bytes} if disk else None,
            net_received={name: c.bytes_recv for name, c in external.items()},
            net_sent={name: c.bytes_sent for name, c in external.items()})

    def sample(self) -> list[dict[str, Any]]:
        psutil = self._psutil
        reading = self._read()
        seconds = reading.at - self._last.at
        previous, self._last = self._last, reading
        memory = psutil.virtual_memory()
        values: list[tuple[str, float, str]] = [
            ("cpu_usage", min(max(psutil.cpu_percent(interval=None), 0.0), 100.0), "percent"),
            # used = total - available, the same notion of "in use" as memory.percent.
            ("memory_usage", (memory.total - memory.available) / MB, "MB"),
            ("memory_utilization", min(max(memory.percent, 0.0), 100.0), "percent"),
            ("swap_usage", psutil.swap_memory().used / MB, "MB"),
        ]
        if reading.disk_read is not None and previous.disk_read is not None:
            values += [("disk_io_read", counter_rate(previous.disk_read, reading.disk_read, seconds), "MB/s"),
                       ("disk_io_write", counter_rate(previous.disk_write, reading.disk_write, seconds), "MB/s")]
        values += [
            ("network_io_received", counter_rate(previous.net_received, reading.net_received, seconds), "MB/s"),
            ("network_io_sent", counter_rate(previous.net_sent, reading.net_sent, seconds), "MB/s"),
            # The catalog's load_average is per core, so nodes of different sizes compare.
            ("load_average", psutil.getloadavg()[0] / self._cores, "count"),
        ]
        timestamp = _utc_iso(self._now())
        context = {"source": AGENT_NAME, "interval_s": round(seconds, 3), "cpu_count": self._cores}
        rows = []
        for name, value, unit in values:
            row = {"timestamp": timestamp, "metric_name": name, "metric_value": round(float(value), 6),
                   "node_id": self.node_id}
            if self.node_type:
                row["node_type"] = self.node_type
            row["unit"] = unit
            row["context_data"] = context
            rows.append(row)
        return rows


# -------------------------------------------------------------------------------- spool

def _rows_in(data: bytes) -> int:
    return data.count(b"\n")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # sent meanwhile by another agent on the same spool
        return 0


class Spool:
    """Batches waiting to be sent, one file each, named so that name order is spool order."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"the spool needs room for at least one batch, got {max_bytes} bytes")
        self.folder = Path(folder)
        self.rejected_folder = self.folder / REJECTED_FOLDER
        self.max_bytes = max_bytes
        self.dropped_batches = 0
        self.dropped_rows = 0
        self._last_stamp = 0
        self.folder.mkdir(parents=True, exist_ok=True)

    def pending(self) -> list[Path]:
        return sorted(self.folder.glob(f"*{BATCH_SUFFIX}"))

    def rejected(self) -> list[Path]:
        return sorted(self.rejected_folder.glob(f"*{BATCH_SUFFIX}"))

    def _next_name(self) -> str:
        stamp = max(time.time_ns(), self._last_stamp + 1)
        self._last_stamp = stamp
        return f"{stamp:020d}-{os.getpid()}{BATCH_SUFFIX}"

    def add(self, rows: list[dict[str, Any]]) -> Path:
        """Spool a batch, first making room for it; its bytes never change afterwards."""
        data = jsonl(rows)
        self._make_room(len(data))
        path = self.folder / self._next_name()
        write_atomic(path, data)
        return path

    def _make_room(self, incoming: int) -> None:
        rejected = [(p, [p, p.with_name(p.name + RESPONSE_SUFFIX)]) for p in self.rejected()]
        pending = [(p, [p]) for p in self.pending()]
        sizes = {path: sum(_size(f) for f in files) for path, files in rejected + pending}
        used = sum(sizes.values())
        if used + incoming <= self.max_bytes:
            return
        dropped_rejected = dropped_batches = dropped_rows = 0
        # Rejected batches go first: they are only evidence, while pending ones are data.
        for path, files in rejected + pending:
            if used + incoming <= self.max_bytes:
                break
            if path.parent == self.folder:
                try:
                    dropped_rows += _rows_in(path.read_bytes())
                except FileNotFoundError:
                    pass
                dropped_batches += 1
            else:
                dropped_rejected += 1
            for file in files:
                file.unlink(missing_ok=True)
            used -= sizes[path]
        self.dropped_batches += dropped_batches
        self.dropped_rows += dropped_rows
        log.warning("spool full (%.1f MB limit): dropped %d oldest pending batches (%d rows lost) "
                    "and %d rejected batches; %d batches (%d rows) dropped since start",
                    self.max_bytes / MB, dropped_batches, dropped_rows, dropped_rejected,
                    self.dropped_batches, self.dropped_rows)

    def delete(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def reject(self, path: Path, response: Mapping[str, Any]) -> Path:
        """Move a batch the gateway refused to rejected/, its answer written beside it first, so
        a crash in between leaves the batch pending rather than lost."""
        target = self.rejected_folder / path.name
        write_atomic(target.with_name(target.name + RESPONSE_SUFFIX),
                     json.dumps(response, indent=2, sort_keys=True).encode("utf-8"))
        os.replace(path, target)
        return target


# ------------------------------------------------------------------------------ sending

class Backoff:
    """Exponential delays with jitter: base, 2×base, 4×base … up to cap, each scaled by a
    random factor in [0.5, 1] so that a fleet of agents does not retry in step."""

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base = min(base, cap)
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2 ** min(self.failures, 60))
        self.failures += 1
        return delay * self._rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.failures = 0


@dataclass
class FlushResult:
    delivered: int = 0
    rejected: int = 0
    remaining: int = 0
    failure: PushError | None = None


class Agent:
    def __init__(self, spool: Spool, push_url: str, *, sampler: Sampler | None = None,
                 interval: float = 60.0, token: str | None = None, timeout: float = 10.0,
                 backoff: Backoff | None = None) -> None:
        if interval <= 0:
            raise ValueError(f"the interval must be positive, got {interval}")
        self.spool = spool
        self.push_url = metrics_url(push_url)
        self.sampler = sampler
        self.interval = interval
        self.timeout = timeout
        self.backoff = backoff or Backoff(base=1.0, cap=300.0)
        self._token = token
        self._stop = threading.Event()
        self.samples = 0
        self.delivered = 0
        self.rejected = 0

    def stop(self) -> None:
        self._stop.set()

    def sample_once(self) -> Path:
        assert self.sampler is not None
        rows = self.sampler.sample()
        path = self.spool.add(rows)
        self.samples += 1
        log.debug("sampled %d metrics into %s", len(rows), path.name)
        return path

    def flush(self, deadline: float | None = None) -> FlushResult:
        """Send spooled batches oldest first, until one fails in a way that needs waiting, or
        until `deadline` (monotonic) when the next sample is due."""
        result = FlushResult()
        batches = self.spool.pending()
        for index, path in enumerate(batches):
            if deadline is not None and time.monotonic() >= deadline:
                result.remaining = len(batches) - index
                return result
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # another agent on the same spool sent it
                continue
            try:
                answer = push_bytes(self.push_url, data, content_type="application/x-ndjson",
                                    token=self._token, timeout=self.timeout)
            except PushError as error:
                if not error.retryable and error.status in _BATCH_REFUSED:
                    self._reject(path, data, {"status": error.status, "error": str(error)}, [])
                    result.rejected += 1
                    continue
                result.failure = error
                result.remaining = len(batches) - index
                return result
            rows = _rows_in(data)
            if answer.answered != rows:
                # Not an answer for this batch: deleting or setting it aside could lose rows.
                result.failure = PushError(
                    f"gateway answered {answer.status} for {answer.answered} rows "
                    f"({answer.accepted} accepted, {answer.rejected_count} rejected) of the "
                    f"{rows} in {path.name}", retryable=True, status=answer.status)
                result.remaining = len(batches) - index
                return result
            if answer.status == 200 and answer.rejected_count == 0:
                self.spool.delete(path)
                result.delivered += 1
                self.delivered += 1
                log.info("delivered %s: %d rows accepted (%d batches left)", path.name,
                         answer.accepted, len(batches) - index - 1)
            else:
                self._reject(path, data, {"status": answer.status, **answer.body}, answer.rejected,
                             answer.rejected_count)
                result.rejected += 1
        self.backoff.reset()
        return result

    def _reject(self, path: Path, data: bytes, response: dict[str, Any],
                rejected: list[dict[str, Any]], rejected_count: int | None = None) -> None:
        target = self.spool.reject(path, response)
        self.rejected += 1
        count = rejected_count if rejected_count is not None else len(rejected)
        reasons = "; ".join(f"line {r.get('line')}: {r.get('reason')}" for r in rejected[:5])
        if count > 5:
            reasons += f"; … {count - min(len(rejected), 5)} more"
        log.error("gateway refused %d of %d rows of %s (HTTP %s): %s; batch kept in %s, not resent",
                  count or _rows_in(data), _rows_in(data), path.name, response.get("status"),
                  reasons or response.get("error", "no reason given"), target.parent)

    def _log_failure(self, result: FlushResult, delay: float | None) -> None:
        error = result.failure
        assert error is not None
        then = (f"next try in {delay:.1f}s" if delay is not None
                else "they wait for the next run")
        if error.status in (401, 403):
            log.error("GATEWAY REFUSED THE TOKEN (HTTP %d): set %s to a token the gateway accepts; "
                      "%d batches kept in the spool, %s", error.status, TOKEN_ENV, result.remaining, then)
        elif error.retryable:
            log.warning("%s; %d batches kept in the spool, %s", error, result.remaining, then)
        else:
            log.error("%s (is --push right?); %d batches kept in the spool, %s",
                      error, result.remaining, then)

    def _pending_count(self) -> int:
        try:
            return len(self.spool.pending())
        except OSError:
            return -1

    def run(self, *, count: int | None = None) -> int:
        """Sample every interval and send, until `count` samples were taken (or tried) or
        `stop()`; a last flush sends what it can. Returns the number of batches still pending."""
        log.info("agent started: node %s, every %gs, pushing to %s, spool %s (%d batches pending)%s",
                 self.sampler.node_id if self.sampler else "-", self.interval,
                 redact_url(self.push_url), self.spool.folder, self._pending_count(),
                 "" if self._token else f"; {TOKEN_ENV} is not set")
        next_sample = time.monotonic() + self.interval
        retry_at = 0.0  # a leftover spool from an earlier run goes out right away
        attempts = 0
        while not self._stop.is_set():
            now = time.monotonic()
            if self.sampler is not None and now >= next_sample:
                # Each sample starts a full interval, also a late one (after a slow send):
                # two samples never come back to back, and a failing one cannot spin.
                next_sample = now + self.interval
                attempts += 1
                try:
                    self.sample_once()
                except Exception as error:  # disk full, psutil failing: this sample is lost
                    log.error("sample lost: %s: %s; next sample in %gs", type(error).__name__,
                              error, self.interval, exc_info=not isinstance(error, OSError))
                if count is not None and attempts >= count:
                    break
            now = time.monotonic()
            wake = next_sample
            if now >= retry_at:
                try:
                    result = self.flush(deadline=next_sample)
                except Exception as error:  # the spool unreadable or unwritable: try again later
                    result = FlushResult(remaining=max(self._pending_count(), 0),
                                         failure=PushError(f"sending the spool failed: "
                                                           f"{type(error).__name__}: {error}",
                                                           retryable=True))
                    if not isinstance(error, OSError):
                        log.error("unexpected error while sending", exc_info=True)
                if result.failure is not None:
                    delay = self.backoff.next_delay()
                    self._log_failure(result, delay)
                    retry_at = time.monotonic() + delay
                    wake = min(wake, retry_at)
                elif result.remaining:
                    wake = now  # the deadline cut the flush short: sample, then go on
            else:
                wake = min(wake, retry_at)
            self._stop.wait(max(wake - time.monotonic(), 0.0))
        return self.finish()

    def finish(self) -> int:
        """One last pass over the spool (stopping at the first failure); returns what is left."""
        try:
            result = self.flush()
        except Exception as error:
            result = FlushResult(remaining=max(self._pending_count(), 1),
                                 failure=PushError(f"sending the spool failed: "
                                                   f"{type(error).__name__}: {error}",
                                                   retryable=True))
        if result.failure is not None:
            self._log_failure(result, None)
        log.info("agent stopped: %d samples, %d batches delivered, %d rejected, %d batches "
                 "(%d rows) dropped for room, %d batches pending", self.samples, self.delivered,
                 self.rejected, self.spool.dropped_batches, self.spool.dropped_rows,
                 result.remaining)
        return result.remaining


# ----------------------------------------------------------------------- command line

def default_spool() -> Path:
    from perf_pipeline.config import paths_from_env

    return paths_from_env().home / "agent-spool"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--push", required=True, metavar="URL",
                        help="gateway base URL (http://host:8080) or its /api/v1/metrics URL; "
                             f"the token is read from {TOKEN_ENV}")
    parser.add_argument("--interval", type=float, default=60.0,
                        help="seconds between samples; rates and CPU cover this span (default 60)")
    parser.add_argument("--node-id", help="default: PERF_NODE_ID, the CI runner's name, or the host name")
    parser.add_argument("--node-type", help="e.g. linux-large (default: PERF_NODE_TYPE)")
    parser.add_argument("--spool", help="folder of batches not yet sent "
                                        "(default: $PERF_PIPELINE_HOME/agent-spool)")
    parser.add_argument("--spool-max-mb", type=float, default=100.0,
                        help="when the spool reaches this size the oldest batches are dropped "
                             "(default 100)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per push (default 10)")
    parser.add_argument("--max-backoff", type=float, default=300.0,
                        help="longest wait between tries while the gateway fails (default 300)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true",
                      help="one sample over --interval seconds, send the spool, exit (for cron)")
    mode.add_argument("--count", type=int, help="stop after this many samples")
    mode.add_argument("--flush-only", action="store_true", help="send the spool and exit")
    parser.epilog = ("Exit status 0 when the spool is empty at the end, 1 when batches stay in it "
                     "for a later run (gateway down, token refused).")


def _stop_on_signals(agent: Agent) -> None:
    def stop(signum: int, _frame: object) -> None:
        log.info("%s received: stopping after a last flush (send it again to stop now)",
                 signal.Signals(signum).name)
        # Not agent.stop() here: the handler may interrupt this thread inside Event.wait while
        # it holds the event's lock, and setting the event would then deadlock.
        threading.Thread(target=agent.stop, daemon=True).start()
        signal.signal(signum, signal.SIG_DFL)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


def run_from_args(args: argparse.Namespace) -> int:
    """Exit status 0 when the spool is empty at the end, 1 when batches wait for a later run."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.count is not None and args.count < 1:
        raise ValueError(f"--count must be at least 1, got {args.count}")
    spool = Spool(Path(args.spool) if args.spool else default_spool(),
                  max_bytes=int(args.spool_max_mb * MB))
    sampler = None
    if not args.flush_only:
        from perf_pipeline.collect.run_metadata import detect

        metadata = detect()
        sampler = Sampler(args.node_id or metadata.node_id, args.node_type or metadata.node_type)
    agent = Agent(spool, args.push, sampler=sampler, interval=args.interval,
                  token=os.environ.get(TOKEN_ENV) or None, timeout=args.timeout,
                  backoff=Backoff(base=1.0, cap=args.max_backoff))
    _stop_on_signals(agent)
    if args.flush_only:
        pending = agent.finish()
    else:
        pending = agent.run(count=1 if args.once else args.count)
    return 1 if pending else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perf-pipeline agent", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

"""The landing archive: `landing/<YYYY-MM-DD>/*`, the immutable source every day is built from.

`ingest_files` splits input files by each record's own UTC day and writes them here as
JSON Lines; `read_landing_day` stages a day's files for `raw_metrics`. Files are written to a
temporary name, fsynced and renamed, so a reader never sees half a file; names carry the
content's checksum, so ingesting the same data twice writes nothing new (the same records
under another input file name land again, as a file of their own, and load twice).

Every record ingest reads reaches a day that loads: a record without a usable timestamp, or
dated outside the daily partitions (`outside_partitions`, the rule the HTTP gateway applies
too), is filed under the ingest day and quarantined with its reason when that day loads.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from perf_pipeline.collect.files import write_atomic
from perf_pipeline.config import START_DATE_ENV, partitions_start_date
from perf_pipeline.ingest.formats import (
    UTF8_BOM,
    is_supported,
    json_lines,
    rejected_record,
    stage_bytes,
)
from perf_pipeline.storage.warehouse import (
    STAGING_COLUMNS,
    LandingFile,
    LoadCounts,
    Warehouse,
    connect,
)

_DAY_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# DuckDB reads a path holding one of these as a pattern of file names.
_WILDCARD = re.compile(r"[*?\[\]{}]")
_JSON_LINES = (".jsonl", ".ndjson")
# A load stages at most this many bytes of landing files: a long backfill is a few large
# statements rather than one per day, and its memory stays bounded.
LOAD_CHUNK_BYTES = 256 * 2**20
# Split JSON Lines reach DuckDB's staging table in groups of files of about this size: few
# inserts, and little held in Python at once. At M (311 MB in 31 files) staging took
# 0.9-1.1 s with a 1.2 GB peak, against 1.4-1.6 s and 1.35-1.4 GB for a whole load at once
# and 1.9 s and 1.0 GB for a file at a time.
STAGE_GROUP_BYTES = 64 * 2**20
# Clocks on test nodes drift; a record further ahead than this is a bad clock, not a metric.
FUTURE_TOLERANCE = timedelta(days=1)
# What loading skips as a blank line (bytes.strip() in formats.json_lines and parse_jsonl).
_BLANK = " \t\n\r\x0b\x0c"


@dataclass
class IngestReport:
    files_read: int = 0
    records_read: int = 0
    files_written: list[Path] = field(default_factory=list)
    records_by_day: Counter = field(default_factory=Counter)
    unreadable_records: int = 0  # kept in the archive with their reason; quarantined on load
    undated_records: int = 0  # no usable timestamp: filed under the ingest day, quarantined on load
    # Dated outside the daily partitions: filed under the ingest day with the reason (see
    # outside_partitions), quarantined on load.
    out_of_range_records: int = 0
    # Records of landing files that already existed (the same data ingested before): counted
    # in records_read and records_by_day, written once.
    records_already_landed: int = 0


def outside_partitions(day: date | str, *, earliest_day: date, today: date,
                       clock: str = "the ingesting host's clock") -> str | None:
    """Why a record of UTC `day` can never load (None if it can): dated before the first
    daily partition, or more than FUTURE_TOLERANCE ahead of `today` by `clock`. DuckDB gives
    a day before year 1 or after 9999 as text, which no partition holds either."""
    if not isinstance(day, date):
        return f"timestamp's day {str(day)[:40]} is outside the years 1 to 9999"
    latest = today + FUTURE_TOLERANCE
    if day > latest:
        return f"timestamp is dated after {latest.isoformat()} (UTC), ahead of {clock}"
    if day < earliest_day:
        return (f"timestamp is before the first daily partition, {earliest_day.isoformat()} "
                f"({START_DATE_ENV})")
    return None


def checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def day_folder(landing: Path, day: date) -> Path:
    return landing / day.isoformat()


def day_files(landing: Path, day: date) -> list[Path]:
    """The day's landing files in a stable order; temporary and unsupported files are not data."""
    folder = day_folder(landing, day)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith((".", "_")) and is_supported(p))


def landed_days(landing: Path) -> list[date]:
    if not landing.is_dir():
        return []
    return sorted(date.fromisoformat(p.name) for p in landing.iterdir()
                  if p.is_dir() and _DAY_FOLDER.match(p.name) and day_files(landing, date.fromisoformat(p.name)))


# Checksums of landing files by (path, size, modification time): the landing sensor asks for
# the whole archive's state every few seconds, and re-reading every file each time grows
# with the archive. A file that is replaced gets a new mtime (writes are renames), so a
# stale entry is never used; the cache lives as long as the process (the daemon's code
# server) and is bounded.
_CHECKSUMS: dict[tuple[str, int, int], str] = {}
_CHECKSUM_CACHE_LIMIT = 200_000


def file_checksum(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    known = _CHECKSUMS.get(key)
    if known is None:
        known = checksum(path.read_bytes())
        if len(_CHECKSUMS) >= _CHECKSUM_CACHE_LIMIT:
            _CHECKSUMS.clear()
        _CHECKSUMS[key] = known
    return known


def landing_state(landing: Path) -> dict[date, dict[str, str]]:
    """{day: {path relative to landing: checksum}} of everything in the archive now."""
    return {day: {_relative(landing, p): file_checksum(p) for p in day_files(landing, day)}
            for day in landed_days(landing)}


def remove_days_before(landing: Path, cutoff: date) -> tuple[list[date], int]:
    """Delete the landing folders of days before `cutoff`: (days removed, bytes freed)."""
    removed, freed = [], 0
    if not landing.is_dir():
        return removed, freed
    for folder in sorted(landing.iterdir()):
        if folder.is_dir() and _DAY_FOLDER.match(folder.name) and date.fromisoformat(folder.name) < cutoff:
            freed += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            shutil.rmtree(folder)
            removed.append(date.fromisoformat(folder.name))
    return removed, freed


def _relative(landing: Path, path: Path) -> str:
    return path.relative_to(landing).as_posix()


def _read(landing: Path, path: Path, day: date) -> tuple[bytes, LandingFile]:
    """A landing file's bytes, and how loading records it."""
    data = path.read_bytes()
    return data, LandingFile(path=_relative(landing, path), checksum=checksum(data),
                             size_bytes=len(data), day=day)


def read_landing_day(landing: Path, day: date) -> tuple[pd.DataFrame, list[LandingFile]]:
    """Stage every record of one landing day through the format parsers, with its files."""
    frames, files = [], []
    for path in day_files(landing, day):
        data, file = _read(landing, path, day)
        files.append(file)
        frames.append(stage_bytes(data, suffix=path.suffix, source_file=file.path))
    staged = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=STAGING_COLUMNS)
    return staged, files


def load_landing_days(warehouse: Warehouse, landing: Path, days: Sequence[date], *,
                      chunk_bytes: int = LOAD_CHUNK_BYTES) -> dict[date, LoadCounts]:
    """Replace `days` in the warehouse with their landing files, validated, in loads of at
    most `chunk_bytes` of files (a day is never split; each load is one transaction).

    JSON Lines files, everything the archive writes itself, are read whole by DuckDB's
    read_json where their records are objects, one per line (Warehouse.read_json_lines);
    the others, and the lines of records validation rejected there, are split into lines
    by formats.json_lines (NumPy over the bytes, no Python object per line). Any other
    format, and a JSON Lines file that is not UTF-8, goes through its parser in formats.py.
    All three give the same records."""
    counts: dict[date, LoadCounts] = {}
    sized = [(day, [(path, path.stat().st_size) for path in day_files(landing, day)]) for day in days]
    for chunk in _load_chunks(sized, chunk_bytes):
        warehouse.begin_staging()
        files, whole, by_name = [], [], {}
        stager = _LineStager(warehouse)
        for day, entries in chunk:
            for path, _ in entries:
                data, file = _read(landing, path, day)
                files.append(file)
                by_name[file.path] = (path, day)
                if path.suffix.lower() not in _JSON_LINES:
                    warehouse.stage_records(
                        stage_bytes(data, suffix=path.suffix, source_file=file.path), day)
                elif (lines := _line_count(path, data)) is not None:
                    whole.append((str(path), file.path, day, lines))
                else:
                    stager.add(file.path, path, day, data=data)
        for name in warehouse.read_json_lines(whole):
            stager.add(name, *by_name[name])
        for name, numbers in warehouse.quarantined_json_lines().items():
            stager.add(name, *by_name[name], only=numbers)
        stager.flush()
        counts.update(warehouse.replace_staged_days([day for day, _ in chunk], files))
    return counts


def _line_count(path: Path, data: bytes) -> int | None:
    """The lines of a JSON Lines file, if read_json may read it whole (see
    Warehouse.read_json_lines): None where its path holds a character read_json would take
    for a wildcard, or where the file holds what read_json and from_json read apart. That
    is a vertical tab or form feed, which read_json trims from a line's ends as if it were
    blank space and from_json, like JSON, refuses (a JSON text holds neither byte
    elsewhere); a byte order mark first is left to formats.json_lines too."""
    if (data.startswith(UTF8_BOM) or b"\x0b" in data or b"\x0c" in data
            or _WILDCARD.search(str(path))):
        return None
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


class _LineStager:
    """Stages JSON Lines files line by line (formats.json_lines, or the file's parser where
    it is not UTF-8), in groups of about STAGE_GROUP_BYTES."""

    def __init__(self, warehouse: Warehouse):
        self.warehouse, self.split, self.size = warehouse, [], 0

    def add(self, name: str, path: Path, day: date, *, data: bytes | None = None,
            only: np.ndarray | None = None) -> None:
        """Stage file `name` (its bytes, read from `path` unless given), or only the lines
        numbered in `only`."""
        data = path.read_bytes() if data is None else data
        lines = json_lines(data)
        if lines is None:
            staged = stage_bytes(data, suffix=path.suffix, source_file=name)
            if only is not None:
                staged = staged[staged["source_line"].isin(only)]
            self.warehouse.stage_records(staged, day)
            return
        numbers, texts = lines
        if only is not None:
            keep = np.isin(numbers, only)
            numbers, texts = numbers[keep], texts.filter(pa.array(keep))
        self.split.append((name, day, numbers, texts))
        self.size += len(data) if only is None else int(pc.sum(pc.binary_length(texts)).as_py() or 0)
        if self.size >= STAGE_GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        self.warehouse.stage_lines(self.split)
        self.split, self.size = [], 0


def _load_chunks(days: list[tuple[date, list[tuple[Path, int]]]], limit: int):
    chunk, size = [], 0
    for day, entries in days:
        day_size = sum(size for _, size in entries)
        if chunk and size + day_size > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append((day, entries))
        size += day_size
    if chunk:
        yield chunk


def landing_stem(path: Path) -> str:
    """The input file's part of its landing names: safe characters only, and never a leading
    "." or "_", which day_files takes for a temporary file and skips."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).stem)[:80].lstrip("._") or "metrics"


def ingest_files(paths: list[Path], landing: Path, *, today: date | None = None,
                 defaults: Mapping | None = None,
                 earliest_day: date | None = None) -> IngestReport:
    """Copy metric files (any format in formats.PARSERS) into the landing archive as JSON
    Lines, each record under its own UTC day; `defaults` fill the fields records lack
    (formats.DEFAULT_FIELDS: node, run, commit …).

    Records whose timestamp cannot be read are filed under `today` (the ingest day), so they
    reach quarantine with a reason when that day loads instead of disappearing here; so are
    records dated outside the daily partitions (before `earliest_day`, by default the
    configured first partition, or more than a day after `today`), kept whole with that reason.
    """
    today = today or datetime.now(timezone.utc).date()
    earliest_day = earliest_day or date.fromisoformat(partitions_start_date())
    report = IngestReport()
    with connect() as con:
        warehouse = Warehouse(con)
        for path in paths:
            data = Path(path).read_bytes()
            staged = stage_bytes(data, suffix=Path(path).suffix, source_file=str(path),
                                 defaults=defaults)
            report.files_read += 1
            report.records_read += len(staged)
            report.unreadable_records += int(staged["pre_reason"].notna().sum())
            if staged.empty:
                continue
            lines, filed = [], []
            for line, pre_reason, day in zip(staged["raw_line"], staged["pre_reason"],
                                              warehouse.landing_days_of(staged), strict=True):
                if day is None:
                    report.undated_records += 1
                    day = today
                else:
                    reason = outside_partitions(day, earliest_day=earliest_day, today=today)
                    if reason is not None:
                        report.out_of_range_records += 1
                        if pd.isna(pre_reason):  # a rejected record keeps its own reason
                            line = rejected_record(reason, line)
                        day = today
                if not line.strip(_BLANK):
                    # "\ufeff " read as a first line: written as it reads, the line would be
                    # blank in the archive, and loading skips blank lines.
                    line = rejected_record("line is not valid JSON", line)
                lines.append(line)
                filed.append(day)
            stem = landing_stem(path)
            for day, group in pd.DataFrame({"day": filed, "line": lines}).groupby("day", sort=True):
                content = ("\n".join(group["line"]) + "\n").encode("utf-8")
                target = day_folder(landing, day) / f"{stem}-{checksum(content)[:16]}.jsonl"
                if target.exists():
                    report.records_already_landed += len(group)
                else:
                    write_atomic(target, content)
                    report.files_written.append(target)
                report.records_by_day[day] += len(group)
    return report

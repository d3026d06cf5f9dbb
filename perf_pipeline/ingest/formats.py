"""Input formats: each turns a file's bytes into staged records, one per record read.

A staged record is (source_file, source_line, raw_line, pre_reason): `raw_line` is the record
as one JSON object text, `pre_reason` says why the format layer could not read it (kept, so
the record is quarantined with that reason rather than dropped). Validation of the fields
happens later, in DuckDB, the same way for every format. A new format registers a parser in
PARSERS by file suffix.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from perf_pipeline.storage.warehouse import RAW_KEY, REJECTED_KEY, STAGING_COLUMNS

StagedRecord = tuple[int, str, str | None]  # (line number, JSON text, reason it is unreadable)
Parser = Callable[[bytes], Iterator[StagedRecord]]


class UnsupportedFormatError(ValueError):
    pass


def _decode_lines(data: bytes) -> Iterator[tuple[int, str | None, bytes]]:
    """(line number, text or None if not UTF-8, raw bytes) of each non-blank line."""
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            yield number, raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            yield number, None, raw


def rejected_record(reason: str, raw: str, timestamp: str | None = None) -> str:
    """A record the format layer could not read, kept whole with the reason (and its
    timestamp where known, so it is quarantined under its own day)."""
    record = {REJECTED_KEY: reason, RAW_KEY: raw}
    if timestamp is not None:
        record["timestamp"] = timestamp
    return json.dumps(record, ensure_ascii=False)


def parse_jsonl(data: bytes) -> Iterator[StagedRecord]:
    for number, text, raw in _decode_lines(data):
        if text is None:
            reason = "line is not valid UTF-8"
            yield number, rejected_record(reason, raw.decode("utf-8", errors="backslashreplace")), reason
        else:
            yield number, text.lstrip("\ufeff") if number == 1 else text, None


def parse_csv(data: bytes) -> Iterator[StagedRecord]:
    """CSV with a header row; empty cells are missing values; context_data may hold JSON."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("utf-8-sig", errors="backslashreplace")
        yield 1, rejected_record("file is not valid UTF-8", text), "file is not valid UTF-8"
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = 2
    try:
        for row in reader:
            number, start = start, reader.line_num + 1
            extra = row.pop(None, None)
            record = {key.strip(): (value if value not in ("", None) else None)
                      for key, value in row.items() if key is not None}
            context = record.get("context_data")
            if isinstance(context, str) and context.lstrip().startswith("{"):
                try:
                    record["context_data"] = json.loads(context)
                except json.JSONDecodeError:
                    pass  # left as text: validation quarantines it as "not a JSON object"
            if extra:
                reason = "CSV row has more fields than the header"
                record["_extra_fields"] = extra
                raw = json.dumps(record, ensure_ascii=False)
                yield number, rejected_record(reason, raw, record.get("timestamp")), reason
            else:
                yield number, json.dumps(record, ensure_ascii=False), None
    except csv.Error as error:
        yield start, rejected_record(f"CSV is malformed: {error}", ""), f"CSV is malformed: {error}"


PARSERS: dict[str, Parser] = {
    ".jsonl": parse_jsonl,
    ".ndjson": parse_jsonl,
    ".csv": parse_csv,
}


def is_supported(path: Path) -> bool:
    return path.suffix.lower() in PARSERS


def stage_bytes(data: bytes, *, suffix: str, source_file: str) -> pd.DataFrame:
    try:
        parser = PARSERS[suffix.lower()]
    except KeyError:
        raise UnsupportedFormatError(
            f"{source_file}: unsupported format {suffix or '(no suffix)'}; "
            f"supported: {', '.join(sorted(PARSERS))}") from None
    rows = [(source_file, number, line, reason) for number, line, reason in parser(data)]
    return pd.DataFrame(rows, columns=STAGING_COLUMNS).astype(
        {"source_file": object, "source_line": "int64", "raw_line": object, "pre_reason": object})

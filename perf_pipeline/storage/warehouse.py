"""The warehouse: every SQL statement perf_pipeline runs against DuckDB.

Writers open the file through `open_warehouse(path)`, which applies migrations and refreshes
the metric catalog tables; readers pass `read_only=True`. Every writer first holds
`writer_lock(path)`, a lock file beside the database, so that writing processes on a host take
turns even where a scheduler's own limit lets two start at once. Each write of a partition is
"delete that day, insert it again" inside one transaction, so re-running a day or a backfill
never duplicates or loses rows. Values are always bound as parameters; the only SQL text
built at run time comes from constants in this module.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from filelock import FileLock, Timeout

from perf_pipeline import catalog
from perf_pipeline.frames import sorted_categories
from perf_pipeline.storage.schema import migrate

MAX_TEXT_FIELD = 1000
# normalized_timeseries is rebuilt at most this many raw rows at a time (see
# Warehouse.replace_normalized_days).
NORMALIZE_CHUNK_ROWS = 2_000_000

# One DuckDB expression turns a record's timestamp into UTC: ISO 8601 text (an offset is
# honoured, none means UTC) or epoch seconds (milliseconds above 1e11). Ingest uses the
# same expression to choose a record's landing day, so the two can never disagree.
TIMESTAMP_SQL = """
    CASE
        -- a number never contains ':' and an ISO timestamp's time does: the cheap test
        -- spares most records a failing cast
        WHEN NOT contains({text}, ':') AND TRY_CAST({text} AS DOUBLE) IS NOT NULL THEN
            CASE
                WHEN TRY_CAST({text} AS DOUBLE) BETWEEN 0 AND 1e11
                    THEN to_timestamp(TRY_CAST({text} AS DOUBLE))
                WHEN TRY_CAST({text} AS DOUBLE) BETWEEN 1e11 AND 1e14
                    THEN to_timestamp(TRY_CAST({text} AS DOUBLE) / 1000)
            END
        ELSE TRY_CAST({text} AS TIMESTAMPTZ)
    END AT TIME ZONE 'UTC'
"""

# Ingest keeps a record it cannot place (undecodable bytes, a broken CSV row) in the
# landing archive as {"_rejected": reason, "_raw": original}; loading quarantines it with
# that reason.
REJECTED_KEY = "_rejected"
RAW_KEY = "_raw"

# Staged records: one row per record read, in the form every input format is turned into.
STAGING_COLUMNS = ["source_file", "source_line", "raw_line", "pre_reason"]

_FIELDS = ("timestamp", "metric_name", "metric_value", "test_name", "test_type", "node_id",
           "node_type", "test_run_id", "ci_job_id", "unit", "context_data", REJECTED_KEY)
_TEXT_FIELDS = ("metric_name", "test_name", "test_type", "node_id", "node_type", "test_run_id",
                "ci_job_id", "unit")
# Each record is parsed once, into a struct of its fields' JSON texts; the type of a field is
# read from its text's first character and a string's value is its text unquoted (a text
# with an escape is decoded by the JSON parser). Parsing each line once instead of six times
# took loading from 0.05 to 0.17 of the speed of DuckDB's own read_json into a table (see
# docs/architecture.md); the rest is validating every field and keeping each row's lineage.
_RECORD_STRUCT = "{" + ", ".join(f'"{name}": "JSON"' for name in _FIELDS) + "}"


def _is_string(text: str) -> str:
    """Whether a field's JSON text is a string."""
    return f"starts_with({text}, '\"')"


def _json_string(text: str) -> str:
    """A field's value as text: a string unquoted, anything else its JSON text."""
    return f"""CASE WHEN NOT {_is_string(text)} THEN {text}
        WHEN contains({text}, '\\') THEN json_extract_string({text}, '$')
        ELSE {text}[2:-2] END"""


# staging_input (source_file, source_line, raw_line, pre_reason, partition_day) -> each
# record's fields as JSON texts (j_<field>), what the record is ('OBJECT': an object whose
# fields could be read) and any reason the format layer gave; partition_day is NULL where
# records are only judged.
_STAGED_FIELDS_SQL = f"""
WITH decoded AS (
    SELECT source_file, source_line, raw_line, pre_reason, partition_day,
        {{decode}}(from_json(raw_line, '{_RECORD_STRUCT}')) AS r,
        ltrim(raw_line, ' \t\r\n')[1] = '{{' AS braced
    FROM staging_input
)
SELECT source_file, source_line, partition_day, pre_reason,
    CASE WHEN pre_reason IS NOT NULL THEN NULL
         WHEN r IS NOT NULL AND braced THEN 'OBJECT'
         -- the rare line that is not a readable object: what it is instead
         WHEN NOT json_valid(raw_line) THEN NULL
         WHEN braced THEN 'UNREADABLE'
         ELSE json_type(raw_line) END AS record_type,
    {", ".join(f"CAST(r.{name} AS VARCHAR) AS j_{name}" for name in _FIELDS)}
FROM decoded
"""

# json_records (whole JSON Lines files read by DuckDB's read_json, see
# Warehouse.read_json_lines) -> the same. read_json parses a line as from_json does (the same
# parser and field conversion) and fails on any line it cannot read as an object, so every
# record here is an object; a line of `null` gives a record without fields, which validation
# quarantines and loading then judges again from its text (see Warehouse._validate).
_FILE_FIELDS_SQL = f"""
SELECT f.source_file, CAST(r.rowid - f.first_row + 1 AS INTEGER) AS source_line,
    f.partition_day, CAST(NULL AS VARCHAR) AS pre_reason, 'OBJECT' AS record_type,
    {", ".join(f'CAST(r."{name}" AS VARCHAR) AS j_{name}' for name in _FIELDS)}
FROM json_records r JOIN json_files f USING (filename)
"""

# typed records (either of the above) -> one row per record with its fields typed.
_PARSED_SQL = f"""
WITH typed AS ({{typed}}), fields AS (
    SELECT source_file, source_line, partition_day, record_type,
        -- a record that holds the reserved field is quarantined with what it says, or, if
        -- it says nothing (a client may send the field), with a reason of our own
        coalesce(pre_reason, CASE WHEN j_{REJECTED_KEY} IS NOT NULL THEN coalesce(
            CASE WHEN {_is_string("j_" + REJECTED_KEY)}
                 THEN nullif(trim({_json_string("j_" + REJECTED_KEY)}), '') END,
            'record holds the reserved field {REJECTED_KEY} without a reason') END) AS pre_reason,
        CASE {" ".join(f"WHEN NOT {_is_string('j_' + n)} THEN '{n}'" for n in _TEXT_FIELDS)}
            END AS non_string_field,
        CASE WHEN j_metric_value IS NULL OR {_is_string('j_metric_value')} THEN true
             ELSE j_metric_value[1] NOT IN ('{{', '[', 't', 'f') END AS value_is_scalar,
        CASE WHEN j_timestamp IS NULL OR {_is_string('j_timestamp')} THEN true
             ELSE j_timestamp[1] NOT IN ('{{', '[', 't', 'f') END AS timestamp_is_scalar,
        j_context_data IS NULL OR starts_with(j_context_data, '{{') AS context_is_object,
        {", ".join(f"{_json_string('j_' + name)} AS {name}" for name in _TEXT_FIELDS)},
        {_json_string("j_timestamp")} AS timestamp_text,
        {_json_string("j_metric_value")} AS value_text,
        CASE WHEN starts_with(j_context_data, '{{') THEN CAST(j_context_data AS JSON) END AS context_data
    FROM typed
)
SELECT * EXCLUDE (metric_name, unit), metric_name AS metric_name_sent, unit AS unit_sent,
    TRY_CAST(value_text AS DOUBLE) AS value_sent,
    {TIMESTAMP_SQL.format(text="timestamp_text")} AS ts,
    greatest({", ".join(f"coalesce(length({n}), 0)" for n in _TEXT_FIELDS)}) AS longest_text
FROM fields
"""

# typed records -> a table of every record with its reason to be quarantined (NULL: load it).
_VALIDATE_SQL = f"""
CREATE OR REPLACE TEMP TABLE {{target}} AS
WITH parsed AS ({_PARSED_SQL})
SELECT p.source_file, p.source_line, p.partition_day, p.ts, p.metric_name_sent, p.value_sent,
    p.test_name, p.test_type, p.node_id, p.node_type, p.test_run_id, p.ci_job_id,
    p.context_data, p.unit_sent,
    CASE
        WHEN p.pre_reason IS NOT NULL THEN p.pre_reason
        WHEN p.record_type IS NULL THEN 'line is not valid JSON'
        WHEN p.record_type = 'UNREADABLE' THEN 'record cannot be read as a metric row'
        WHEN p.record_type <> 'OBJECT' THEN 'record is not a JSON object'
        WHEN p.metric_name_sent IS NULL OR trim(p.metric_name_sent) = '' THEN 'missing metric_name'
        WHEN p.non_string_field IS NOT NULL THEN p.non_string_field || ' must be a string'
        WHEN p.longest_text > {MAX_TEXT_FIELD}
            THEN 'a text field is longer than {MAX_TEXT_FIELD} characters'
        WHEN a.metric_name IS NULL THEN 'unknown metric: ' || left(p.metric_name_sent, 200)
        WHEN p.value_text IS NULL THEN 'missing metric_value'
        WHEN NOT p.value_is_scalar OR p.value_sent IS NULL THEN 'metric_value is not a number'
        WHEN NOT isfinite(p.value_sent) THEN 'metric_value is not finite'
        WHEN p.timestamp_text IS NULL THEN 'missing timestamp'
        WHEN NOT p.timestamp_is_scalar OR p.ts IS NULL OR NOT isfinite(p.ts) THEN 'invalid timestamp: ' || left(p.timestamp_text, 64)
        WHEN CAST(p.ts AS DATE) <> p.partition_day
            THEN 'timestamp ' || strftime(p.ts, '%Y-%m-%dT%H:%M:%S') || ' is outside partition day '
                 || strftime(p.partition_day, '%Y-%m-%d')
        WHEN p.node_id IS NULL OR trim(p.node_id) = '' THEN 'missing node_id'
        WHEN c.scope = 'test' AND (p.test_name IS NULL OR trim(p.test_name) = '')
            THEN 'missing test_name for per-test metric ' || c.metric_name
        WHEN p.unit_sent IS NOT NULL AND a.alias_unit IS NOT NULL
             AND lower(trim(p.unit_sent)) <> lower(a.alias_unit)
            THEN 'unit ' || left(p.unit_sent, 50) || ' contradicts metric name ' || p.metric_name_sent
        WHEN u.factor IS NULL THEN 'unit ' || left(coalesce(p.unit_sent, ''), 50)
             || ' is not accepted for metric ' || c.metric_name
        WHEN c.min_value IS NOT NULL AND p.value_sent * u.factor < c.min_value
            THEN 'metric_value ' || p.value_sent || ' is below the minimum ' || c.min_value
                 || ' for ' || c.metric_name
        WHEN c.max_value IS NOT NULL AND p.value_sent * u.factor > c.max_value
            THEN 'metric_value ' || p.value_sent || ' is above the maximum ' || c.max_value
                 || ' for ' || c.metric_name
        WHEN NOT p.context_is_object THEN 'context_data is not a JSON object'
    END AS reason
FROM parsed p
LEFT JOIN metric_aliases a ON a.alias = lower(trim(p.metric_name_sent))
LEFT JOIN metric_catalog c ON c.metric_name = a.metric_name
LEFT JOIN metric_units u ON u.metric_name = a.metric_name
    AND u.unit = lower(trim(coalesce(p.unit_sent, a.alias_unit, c.unit)))
"""

# A line that is not JSON makes from_json fail the whole statement, and `try` costs every
# line a third of the parse: validation first runs without it, and again with it only when
# a batch holds such a line.
_VALIDATE_STRICT_SQL, _VALIDATE_TOLERANT_SQL = (
    _VALIDATE_SQL.replace("{typed}", _STAGED_FIELDS_SQL).replace("{decode}", decode)
    .replace("{target}", "validated_staged") for decode in ("", "try"))
_VALIDATE_FILES_SQL = (_VALIDATE_SQL.replace("{typed}", _FILE_FIELDS_SQL)
                       .replace("{target}", "validated_files"))


# Each staged record's UTC day, in staging order (see Warehouse.landing_days_of).
_RECORD_DAYS_SQL = f"""
WITH parsed AS ({_PARSED_SQL.replace("{typed}", _STAGED_FIELDS_SQL).replace("{decode}", "try")})
SELECT CASE WHEN isfinite(ts) THEN CAST(ts AS DATE) END FROM parsed
ORDER BY source_file, source_line
"""

# Canonical name and factor of every stored raw row: the same lookup validation used.
_CANONICAL_JOIN = """
JOIN metric_aliases a ON a.alias = lower(trim(m.metric_name))
JOIN metric_catalog c ON c.metric_name = a.metric_name
JOIN metric_units u ON u.metric_name = a.metric_name
    AND u.unit = lower(trim(coalesce(m.unit, a.alias_unit, c.unit)))
"""

# Normalizing works on a set of days ($3) within a range of time ($1, $2): each day by
# itself, as its partition, so a run that crosses midnight has a value on both days.
_IN_DAYS = "CAST({column} AS DATE) IN (SELECT unnest(CAST($3 AS DATE[])))"
_NORMALIZE_SQL = f"""
INSERT INTO normalized_timeseries
SELECT min(m.timestamp), c.metric_name, m.test_name, any_value(m.test_type),
    m.node_id, any_value(m.node_type), m.test_run_id, any_value(m.ci_job_id),
    any_value(json_extract_string(m.context_data, '$.commit')),
    avg(m.metric_value * u.factor), count(*)
FROM performance_metrics m {_CANONICAL_JOIN}
WHERE m.timestamp >= $1 AND m.timestamp < $2 AND {_IN_DAYS.format(column="m.timestamp")}
GROUP BY CAST(m.timestamp AS DATE), c.metric_name, m.test_name, m.node_id, m.test_run_id,
    CASE WHEN m.test_run_id IS NULL THEN m.timestamp END
ORDER BY 1
"""
_ROLLUP_SQL = f"""
INSERT INTO metric_rollups_hourly
SELECT date_trunc('hour', timestamp) AS hour, metric_name, test_name,
    any_value(test_type), node_id, any_value(node_type), count(*), avg(value),
    min(value), max(value), quantile_cont(value, 0.5), quantile_cont(value, 0.95)
FROM normalized_timeseries
WHERE timestamp >= $1 AND timestamp < $2 AND {_IN_DAYS.format(column="timestamp")}
GROUP BY hour, metric_name, test_name, node_id
ORDER BY hour
"""
_DELETE_NORMALIZED_SQL = f"""
DELETE FROM normalized_timeseries
WHERE timestamp >= $1 AND timestamp < $2 AND {_IN_DAYS.format(column="timestamp")}
"""
_DELETE_ROLLUPS_SQL = f"""
DELETE FROM metric_rollups_hourly WHERE hour >= $1 AND hour < $2 AND {_IN_DAYS.format(column="hour")}
"""
_COUNT_RAW_DAYS_SQL = f"""
SELECT CAST(timestamp AS DATE), count(*) FROM performance_metrics
WHERE timestamp >= $1 AND timestamp < $2 AND {_IN_DAYS.format(column="timestamp")} GROUP BY 1
"""
_COUNT_NORMALIZED_SQL = f"""
SELECT CAST(timestamp AS DATE), count(*) FROM normalized_timeseries
WHERE timestamp >= $1 AND timestamp < $2 AND {_IN_DAYS.format(column="timestamp")} GROUP BY 1
"""
_DUPLICATE_POINTS_SQL = f"""
SELECT count(*) FROM (
    SELECT 1 FROM normalized_timeseries
    WHERE timestamp >= $1 AND timestamp < $2 AND {_IN_DAYS.format(column="timestamp")}
    GROUP BY CAST(timestamp AS DATE), metric_name, test_name, node_id, test_run_id,
        CASE WHEN test_run_id IS NULL THEN timestamp END
    HAVING count(*) > 1)
"""
_COUNT_ROLLUPS_SQL = f"""
SELECT CAST(hour AS DATE), count(*) FROM metric_rollups_hourly
WHERE hour >= $1 AND hour < $2 AND {_IN_DAYS.format(column="hour")} GROUP BY 1
"""

# Tables whose content is written whole by an analysis asset or counted for reports.
TABLES = ("performance_metrics", "quarantined_metrics", "ingested_files", "normalized_timeseries",
          "metric_rollups_hourly", "trend_stats", "change_points", "change_incidents",
          "seasonal_profiles", "anomalies", "node_health", "metric_correlations",
          "configuration_effects", "regression_causes", "performance_models",
          "performance_forecasts", "node_performance_scores", "node_health_risk",
          "optimization_recommendations", "optimization_actions", "regression_alerts",
          "alert_deliveries")
_COUNT_SQL = {t: f"SELECT count(*) FROM {t}" for t in TABLES}
# The catalog's mirror in DuckDB (see Warehouse.refresh_catalog): table -> its column count.
_CATALOG_TABLES = {"metric_catalog": 10, "metric_aliases": 3, "metric_units": 3}
_SELECT_CATALOG_SQL = {t: f"SELECT * FROM {t}" for t in _CATALOG_TABLES}
_CLEAR_CATALOG_SQL = {t: f"DELETE FROM {t}" for t in _CATALOG_TABLES}
_INSERT_CATALOG_SQL = {t: f"INSERT INTO {t} VALUES ({', '.join('?' * n)})"
                       for t, n in _CATALOG_TABLES.items()}
_CLEAR_SQL = {t: f"DELETE FROM {t}" for t in TABLES}
_INSERT_ALL_SQL = {t: f"INSERT INTO {t} SELECT * FROM replacement" for t in TABLES}
_SELECT_ALL_SQL = {t: f"SELECT * FROM {t}" for t in TABLES}


# Columns a caller may filter points on, and the SQL that does it with the value as a
# parameter: no name or value from a caller is ever formatted into SQL.
FILTER_COLUMNS = ("test_name", "test_type", "node_id", "node_type")
_FILTER_IN_SQL = {c: f"n.{c} IN (SELECT unnest(CAST(? AS VARCHAR[])))" for c in FILTER_COLUMNS}
_FILTER_LIKE_SQL = {c: f"n.{c} LIKE ? ESCAPE '\\'" for c in FILTER_COLUMNS}


# The window's points with names only, in stored order (see Warehouse._window_categories),
# and with each metric's scope and direction, in time order.
_WINDOW_COLUMNS = ("n.timestamp, n.metric_name, n.test_name, n.test_type, n.node_id, n.node_type, "
                   "n.value, n.test_run_id, n.ci_job_id, n.commit_sha")
_WINDOW_NAMES_SQL = f"""
    SELECT {_WINDOW_COLUMNS}
    FROM normalized_timeseries n
    WHERE n.timestamp > ? AND n.timestamp <= ? /* filters */
"""
_WINDOW_BATCH_ROWS = 1_000_000
_WINDOW_POINTS_SQL = f"""
    SELECT {_WINDOW_COLUMNS}, c.scope AS metric_scope, c.direction
    FROM normalized_timeseries n JOIN metric_catalog c USING (metric_name)
    WHERE n.timestamp > ? AND n.timestamp <= ? /* filters */
    ORDER BY n.timestamp
"""


def filter_clauses(filters: Mapping[str, str | Sequence[str]]) -> tuple[list[str], list]:
    """WHERE clauses and parameters for `filters`: column -> value, list of values, or a
    pattern with `*` wildcards. ValueError names an unknown column or an empty value."""
    clauses, parameters = [], []
    for column, value in filters.items():
        if column not in FILTER_COLUMNS:
            raise ValueError(f"cannot filter on {column!r}; filter keys: {', '.join(FILTER_COLUMNS)}")
        values = [value] if isinstance(value, str) else list(value)
        if not values or not all(isinstance(v, str) and v for v in values):
            raise ValueError(f"filter {column!r} needs a non-empty string or list of strings")
        try:
            for v in values:
                v.encode("utf-8")  # a lone surrogate cannot reach DuckDB
        except UnicodeEncodeError:
            raise ValueError(f"filter {column!r} holds text that is not valid Unicode") from None
        if len(values) == 1 and "*" in values[0]:
            escaped = values[0].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            clauses.append(_FILTER_LIKE_SQL[column])
            parameters.append(escaped.replace("*", "%"))
        else:
            clauses.append(_FILTER_IN_SQL[column])
            parameters.append(values)
    return clauses, parameters


_STAGING_TABLE_SQL = """
CREATE OR REPLACE TEMP TABLE staging_input (source_file VARCHAR, source_line INTEGER,
    raw_line VARCHAR, pre_reason VARCHAR, partition_day DATE)
"""
_STAGE_RECORDS_SQL = """
INSERT INTO staging_input
SELECT source_file, source_line, raw_line, pre_reason, CAST(? AS DATE) FROM staged_frame
"""
_STAGE_LINES_SQL = """
INSERT INTO staging_input
SELECT source_file, source_line, raw_line, NULL, partition_day FROM staged_lines
"""
# Whole JSON Lines files, read by DuckDB itself (see Warehouse.read_json_lines): their
# records in file order, each field as JSON text, and which file each came from.
_JSON_COLUMNS = "{" + ", ".join(f"'{name}': 'JSON'" for name in _FIELDS) + "}"
_JSON_RECORDS_SQL = f"""
CREATE OR REPLACE TEMP TABLE json_records ({", ".join(f'"{name}" JSON' for name in _FIELDS)},
    filename VARCHAR)
"""
_READ_JSON_SQL = f"""
INSERT INTO json_records BY NAME
SELECT * FROM read_json(?, format = 'newline_delimited', records = true, filename = true,
    columns = {_JSON_COLUMNS})
"""
# The files read whole, where each gave one record per line: rowid counts records in the
# order they were inserted, so a file's records run from its first rowid, one per line.
_JSON_FILES_SQL = """
CREATE OR REPLACE TEMP TABLE json_files AS
SELECT i.filename, i.source_file, CAST(i.partition_day AS DATE) AS partition_day, r.first_row
FROM json_inputs i JOIN (
    SELECT filename, min(rowid) AS first_row, max(rowid) AS last_row, count(*) AS n
    FROM json_records GROUP BY filename) r USING (filename)
WHERE r.n = i.lines AND r.last_row - r.first_row + 1 = r.n
"""
# What a load stores: the records read whole that passed, in the order of their days and
# files, then every staged record.
_VALIDATED_VIEW_SQL = """
CREATE OR REPLACE TEMP VIEW validated AS
SELECT * FROM validated_files WHERE reason IS NULL UNION ALL SELECT * FROM validated_staged
"""
_VALIDATED_STAGED_VIEW_SQL = "CREATE OR REPLACE TEMP VIEW validated AS SELECT * FROM validated_staged"
_DELETE_DAYS_SQL = {table: f"DELETE FROM {table} WHERE partition_day IN (SELECT unnest(CAST(? AS DATE[])))"
                    for table in ("quarantined_metrics", "ingested_files", "normalized_days")}
# Rows go in as read (see validated): a load's days in order, so the table stays in day
# order for the zone maps. Sorting each load by timestamp as well cost 0.3 s of 1.1 s
# for this insert at M (1M rows); queries of raw rows take whole days or a window of weeks.
_INSERT_LOADED_SQL = """
INSERT INTO performance_metrics (timestamp, metric_name, metric_value, test_name, test_type,
    node_id, node_type, test_run_id, ci_job_id, context_data, unit, source_file, source_line)
SELECT ts, metric_name_sent, value_sent, test_name, test_type, node_id, node_type,
    test_run_id, ci_job_id, context_data, unit_sent, source_file, source_line
FROM validated WHERE reason IS NULL
"""
_INSERT_QUARANTINED_SQL = """
INSERT INTO quarantined_metrics
SELECT v.partition_day, v.source_file, v.source_line, s.raw_line, v.reason, now()::TIMESTAMP
FROM validated v JOIN staging_input s USING (source_file, source_line)
WHERE v.reason IS NOT NULL
"""
_INSERT_FILES_SQL = """
INSERT INTO ingested_files
SELECT f.partition_day, f.path, f.checksum, f.size_bytes, count(v.source_line),
    count(v.source_line) FILTER (v.reason IS NULL),
    count(v.source_line) FILTER (v.reason IS NOT NULL),
    CASE WHEN count(v.source_line) FILTER (v.reason IS NOT NULL) = 0 THEN 'loaded'
         ELSE 'loaded_with_quarantine' END,
    now()::TIMESTAMP
FROM loaded_files f LEFT JOIN validated v ON v.source_file = f.path
GROUP BY f.partition_day, f.path, f.checksum, f.size_bytes
"""


def _day_bounds(days: Sequence[date]) -> list:
    """The parameters of the day-set statements (_IN_DAYS) for sorted `days`: the range they
    span, then the days themselves."""
    return [_day_start(days[0]), _day_start(days[-1]) + timedelta(days=1), list(days)]


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day)


class WarehouseLockedError(RuntimeError):
    """Another process holds the DuckDB file open for writing."""


@dataclass(frozen=True)
class LandingFile:
    path: str  # relative to the landing folder, as records name their source
    checksum: str
    size_bytes: int
    day: date | None = None  # the partition it belongs to


@dataclass(frozen=True)
class LoadCounts:
    rows_read: int
    rows_loaded: int
    rows_quarantined: int
    files: int
    top_reasons: list[tuple[str, int]]


def connect(database: str = ":memory:", *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection whose session time zone is UTC (text without an offset is UTC)."""
    con = duckdb.connect(database, read_only=read_only)
    # Set after connecting: as a connect-time option DuckDB tries to autoload ICU and fails
    # offline, while the statement uses the ICU that the Python package already bundles.
    con.execute("SET TimeZone = 'UTC'")
    return con


def _locked_message(path: Path) -> str:
    return (f"the database {path} is in use by another process; DuckDB allows one writer "
            "at a time, so wait for it to finish and retry")


@contextmanager
def writer_lock(path: str | Path, *, timeout: float = 0.0,
                on_wait: Callable[[], None] | None = None) -> Iterator[float]:
    """Hold the database's writer lock (`<database>.writer.lock`) for the body; yields the
    seconds spent waiting for it. Waits up to `timeout` seconds (negative: without limit),
    calling `on_wait` once if it has to wait, then raises WarehouseLockedError.

    DuckDB itself lets one process write a file, but a process that finds it taken fails
    (dagster-duckdb retries for about 100 s); this lock makes writers queue instead. The
    lock is reentrant within a process, so a writer may open the warehouse again inside."""
    path = Path(path)
    if str(path) == ":memory:":
        yield 0.0
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{path}.writer.lock", is_singleton=True)
    started = time.monotonic()
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if timeout == 0:
            raise WarehouseLockedError(_locked_message(path)) from None
        if on_wait is not None:
            on_wait()
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise WarehouseLockedError(
                f"{_locked_message(path)} (waited {timeout:.0f} s for its writer lock)") from None
    try:
        yield time.monotonic() - started
    finally:
        lock.release()


@contextmanager
def open_warehouse(path: str | Path, *, read_only: bool = False) -> Iterator[Warehouse]:
    """The warehouse at `path`. A writer that finds another process writing raises
    WarehouseLockedError at once (the Dagster resource waits instead)."""
    path = Path(path)
    if read_only and not path.exists():
        raise FileNotFoundError(f"no perf_pipeline database at {path}; run the pipeline first")
    with nullcontext() if read_only else writer_lock(path):
        try:
            con = connect(str(path), read_only=read_only)
        except duckdb.IOException as error:
            if "lock" in str(error).lower():
                raise WarehouseLockedError(_locked_message(path)) from error
            raise
        try:
            yield Warehouse(con) if read_only else Warehouse.for_writing(con)
        finally:
            con.close()


class Warehouse:
    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con
        self._read_whole = False  # whether the load being staged read files whole

    @classmethod
    def for_writing(cls, con: duckdb.DuckDBPyConnection) -> Warehouse:
        """A warehouse on a writable connection: UTC session, schema migrated, catalog fresh."""
        con.execute("SET TimeZone = 'UTC'")
        migrate(con)
        warehouse = cls(con)
        warehouse.refresh_catalog()
        return warehouse

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    def refresh_catalog(self) -> None:
        """Mirror the code's metric catalog into DuckDB, where validation joins against it."""
        rows = {
            "metric_catalog": [(m.name, m.category, m.unit, m.direction.value, m.importance,
                                m.alert_threshold_percent, m.scope.value, m.min_value,
                                m.max_value, m.description) for m in catalog.METRICS],
            "metric_aliases": catalog.alias_rows(),
            "metric_units": catalog.unit_rows(),
        }
        # Rewriting the rows took 0.16 s per open (executemany runs a statement per row),
        # and every asset opens the warehouse: a catalog that already matches is left alone.
        if all(Counter(map(tuple, self.con.execute(_SELECT_CATALOG_SQL[table]).fetchall()))
               == Counter(map(tuple, wanted)) for table, wanted in rows.items()):
            return
        with self.transaction():
            for table, wanted in rows.items():
                self.con.execute(_CLEAR_CATALOG_SQL[table])
                self.con.executemany(_INSERT_CATALOG_SQL[table], wanted)

    # ---------------------------------------------------------------- raw metrics

    def begin_staging(self) -> None:
        """An empty staging_input, and no files read whole: the records of one load, from
        any number of files and days."""
        self.con.execute(_STAGING_TABLE_SQL)
        self._read_whole = False

    def read_json_lines(self, files: Sequence[tuple[str, str, date, int]]) -> list[str]:
        """Read whole JSON Lines files with DuckDB's read_json, DuckDB's own bulk load, and
        validate their records: (path to read, name to record, partition day, its number of
        lines) per file. Returns the names of the files it did not take, to be staged line
        by line instead: files read_json cannot read through (a line that is not a JSON
        object, bytes that are not UTF-8) or where records and lines do not match one to one
        (a blank line, which read_json skips). Validation then loads the records that pass
        from here; the others' lines must be staged to be judged again (see
        quarantined_json_lines), so that what every rejected record is stored with, and
        why, is exactly what line-by-line staging gives.

        The fast path for the archive's own files: at M (1M rows) it took loading from 0.12
        to 0.24 of the speed of read_json into a bare table (docs/architecture.md)."""
        if not files:
            return []
        self.con.execute(_JSON_RECORDS_SQL)
        unread = self._insert_json_records([path for path, _, _, _ in files])
        self.con.register("json_inputs", pd.DataFrame(
            [(path, name, day, lines) for path, name, day, lines in files if path not in unread],
            columns=["filename", "source_file", "partition_day", "lines"]).astype(
                {"partition_day": "datetime64[s]", "lines": "int64"}))
        try:
            self.con.execute(_JSON_FILES_SQL)
        finally:
            self.con.unregister("json_inputs")
        taken = {name for (name,) in self.con.execute("SELECT source_file FROM json_files").fetchall()}
        self.con.execute(_VALIDATE_FILES_SQL)
        self.con.execute("DROP TABLE json_records")  # its memory, before the insert
        self._read_whole = True
        return [name for _, name, _, _ in files if name not in taken]

    def _insert_json_records(self, paths: list[str]) -> set[str]:
        """Append the records of `paths` to json_records, in order; the paths read_json failed
        on, found by halving the list, so a bad file costs a few reads rather than one read
        per file."""
        try:
            self.con.execute(_READ_JSON_SQL, [paths])
            return set()
        except (duckdb.InvalidInputException, duckdb.ConversionException, duckdb.IOException,
                UnicodeDecodeError):  # see _validate
            if len(paths) == 1:
                return set(paths)
        middle = len(paths) // 2
        return self._insert_json_records(paths[:middle]) | self._insert_json_records(paths[middle:])

    def quarantined_json_lines(self) -> dict[str, np.ndarray]:
        """The line numbers, per file, of the records read whole that validation rejected."""
        if not self._read_whole:
            return {}
        return {name: np.array(lines, dtype=np.int64) for name, lines in self.con.execute(
            "SELECT source_file, list(source_line ORDER BY source_line) FROM validated_files "
            "WHERE reason IS NOT NULL GROUP BY source_file").fetchall()}

    def stage_records(self, staged: pd.DataFrame, day: date | None = None) -> None:
        """Add records a format parser staged (STAGING_COLUMNS) to partition `day` (None:
        records only judged, as the gateway does)."""
        self.con.register("staged_frame", staged[STAGING_COLUMNS])
        try:
            self.con.execute(_STAGE_RECORDS_SQL, [day])
        finally:
            self.con.unregister("staged_frame")

    def stage_lines(self, files: Sequence[tuple[str, date, np.ndarray, pa.Array]]) -> None:
        """Add files' records split by formats.json_lines: (name to record, partition day,
        line numbers, texts) per file, in one statement."""
        if not files:
            return
        sizes = [len(numbers) for _, _, numbers, _ in files]
        which = np.repeat(np.arange(len(files), dtype=np.int32), sizes)
        staged = pa.table({
            "source_file": pa.DictionaryArray.from_arrays(which, [name for name, _, _, _ in files]),
            "source_line": np.concatenate([numbers for _, _, numbers, _ in files]),
            "raw_line": pa.chunked_array([lines for _, _, _, lines in files], pa.large_string()),
            "partition_day": pa.DictionaryArray.from_arrays(
                which, pa.array([day for _, day, _, _ in files], pa.date32())),
        })
        self.con.register("staged_lines", staged)
        try:
            self.con.execute(_STAGE_LINES_SQL)
        finally:
            self.con.unregister("staged_lines")

    def _validate(self) -> None:
        """staging_input -> validated (see _VALIDATE_SQL), with the records of files read
        whole that passed validation (read_json_lines); those it rejected are judged from
        their staged lines."""
        try:
            self.con.execute(_VALIDATE_STRICT_SQL)
        except (duckdb.InvalidInputException, duckdb.ConversionException, UnicodeDecodeError):
            # UnicodeDecodeError: DuckDB quoted a line that is not JSON in its message, cut
            # inside a character (a line of 100 "é"), and the driver could not decode it
            self.con.execute(_VALIDATE_TOLERANT_SQL)
        self.con.execute(_VALIDATED_VIEW_SQL if self._read_whole else _VALIDATED_STAGED_VIEW_SQL)

    def landing_days_of(self, staged: pd.DataFrame) -> list[date | None]:
        """Each staged record's UTC day by the rule validation applies (None if it has none).

        Records are identified by (source_file, source_line), which every parser keeps
        unique and ascending, so the result lines up with `staged`.
        """
        self.begin_staging()
        self.stage_records(staged)
        return [row[0] for row in self.con.execute(_RECORD_DAYS_SQL).fetchall()]

    def check_records(self, staged: pd.DataFrame) -> list[tuple[int, str | None, date | None]]:
        """Validate staged records by the rules loading applies, storing nothing: each record's
        (source_line, reason or None, UTC day) in `staged`'s order. Used where rows must be
        judged before they reach the landing archive (the HTTP gateway)."""
        self.begin_staging()
        self.stage_records(staged)
        self._validate()
        return [(int(line), reason, day) for line, reason, day in self.con.execute(
            "SELECT source_line, reason, CASE WHEN isfinite(ts) THEN CAST(ts AS DATE) END "
            "FROM validated ORDER BY source_file, source_line").fetchall()]

    def replace_raw_day(self, day: date, staged: pd.DataFrame,
                        files: Sequence[LandingFile]) -> LoadCounts:
        """Validate one day's staged records and replace that day's rows, quarantine and files."""
        self.begin_staging()
        self.stage_records(staged, day)
        return self.replace_staged_days([day], [replace(f, day=day) for f in files])[day]

    def replace_staged_days(self, days: Sequence[date],
                            files: Sequence[LandingFile]) -> dict[date, LoadCounts]:
        """Validate everything staged and replace the rows, quarantine and file records of
        `days` with it, in one transaction: re-running a range never duplicates or loses a
        row. Every staged record must belong to one of `days`; `files` are what was read."""
        days = sorted(set(days))
        if not days:
            return {}
        self._validate()
        strays = self.con.execute(
            "SELECT count(*) FROM validated WHERE partition_day IS NULL "
            "OR partition_day NOT IN (SELECT unnest(CAST(? AS DATE[])))", [days]).fetchall()[0][0]
        if strays:
            raise ValueError(f"{strays} staged records belong to none of the days being replaced")
        self.con.register("loaded_files", pd.DataFrame(
            [(f.day, f.path, f.checksum, f.size_bytes) for f in files],
            columns=["partition_day", "path", "checksum", "size_bytes"]).astype(
                {"partition_day": "datetime64[s]", "size_bytes": "int64"}))
        try:
            with self.transaction():
                self.con.execute(
                    "DELETE FROM performance_metrics WHERE timestamp >= ? AND timestamp < ? "
                    "AND CAST(timestamp AS DATE) IN (SELECT unnest(CAST(? AS DATE[])))",
                    _day_bounds(days))
                # a day loaded again is not normalized until normalized_timeseries says so:
                # a process killed between the two leaves the day to be loaded again
                for table in ("quarantined_metrics", "ingested_files", "normalized_days"):
                    self.con.execute(_DELETE_DAYS_SQL[table], [days])
                self.con.execute(_INSERT_LOADED_SQL)
                self.con.execute(_INSERT_QUARANTINED_SQL)
                self.con.execute(_INSERT_FILES_SQL)
        finally:
            self.con.unregister("loaded_files")
        counts = {day: [0, 0] for day in days}
        for day, read, loaded in self.con.execute(
                "SELECT partition_day, count(*), count(*) FILTER (reason IS NULL) FROM validated "
                "GROUP BY partition_day").fetchall():
            counts[day] = [int(read), int(loaded)]
        reasons: dict[date, list[tuple[str, int]]] = {day: [] for day in days}
        for day, kind, number in self.con.execute("""
            SELECT partition_day, kind, n FROM (
                SELECT partition_day, regexp_replace(reason, ':.*$', '') AS kind, count(*) AS n
                FROM validated WHERE reason IS NOT NULL GROUP BY ALL)
            QUALIFY row_number() OVER (PARTITION BY partition_day ORDER BY n DESC, kind) <= 5
            ORDER BY partition_day, n DESC, kind
        """).fetchall():
            reasons[day].append((str(kind), int(number)))
        files_per_day = {day: sum(f.day == day for f in files) for day in days}
        return {day: LoadCounts(rows_read=read, rows_loaded=loaded,
                                rows_quarantined=read - loaded, files=files_per_day[day],
                                top_reasons=reasons[day])
                for day, (read, loaded) in counts.items()}

    def normalized_day_set(self) -> set[date]:
        """Days whose normalized series were rebuilt since raw_metrics last loaded them."""
        return {day for (day,) in self.con.execute("SELECT partition_day FROM normalized_days").fetchall()}

    def ingested_checksums(self) -> dict[date, dict[str, str]]:
        """{day: {landing path: checksum}} of what raw_metrics last loaded."""
        loaded: dict[date, dict[str, str]] = {}
        for day, path, checksum in self.con.execute(
                "SELECT partition_day, path, checksum FROM ingested_files").fetchall():
            loaded.setdefault(day, {})[path] = checksum
        return loaded

    def day_counts(self, day: date) -> dict[str, int]:
        day_start = datetime(day.year, day.month, day.day)
        loaded = self.con.execute(
            "SELECT count(*) FROM performance_metrics WHERE timestamp >= ? AND timestamp < ?",
            [day_start, day_start + timedelta(days=1)]).fetchall()[0][0]
        quarantined = self.con.execute(
            "SELECT count(*) FROM quarantined_metrics WHERE partition_day = ?", [day]).fetchall()[0][0]
        read = self.con.execute(
            "SELECT coalesce(sum(rows_read), 0) FROM ingested_files WHERE partition_day = ?",
            [day]).fetchall()[0][0]
        return {"rows_read": int(read), "rows_loaded": int(loaded),
                "rows_quarantined": int(quarantined)}

    # ---------------------------------------------------------------- normalized series

    def replace_normalized_days(self, days: Sequence[date]) -> dict[date, dict[str, int]]:
        """Rebuild the canonical series (one value per metric, test, node, run and UTC day) and
        hourly rollups of `days` in one transaction: {day: {"points", "hourly_rollups"}}."""
        days = sorted(set(days))
        if not days:
            return {}
        # the range bounds let DuckDB skip row groups by their zone maps; the list picks the days
        bounds = _day_bounds(days)
        with self.transaction():
            self.con.execute(_DELETE_NORMALIZED_SQL, bounds)
            self.con.execute(_DELETE_ROLLUPS_SQL, bounds)
            # a few days at a time: grouping a long backfill's rows at once held them all in
            # DuckDB's hash tables (10M rows: a 5.0 GB peak)
            for chunk in self._normalize_chunks(days):
                self.con.execute(_NORMALIZE_SQL, _day_bounds(chunk))
                self.con.execute(_ROLLUP_SQL, _day_bounds(chunk))
            self.con.execute("INSERT OR REPLACE INTO normalized_days "
                             "SELECT unnest(CAST(? AS DATE[])), now()::TIMESTAMP", [days])
        counts = {day: {"points": 0, "hourly_rollups": 0} for day in days}
        for table, sql in (("points", _COUNT_NORMALIZED_SQL), ("hourly_rollups", _COUNT_ROLLUPS_SQL)):
            for day, number in self.con.execute(sql, bounds).fetchall():
                counts[day][table] = int(number)
        return counts

    def _normalize_chunks(self, days: list[date]) -> Iterator[list[date]]:
        """`days` in runs of at most NORMALIZE_CHUNK_ROWS raw rows (a day is never split)."""
        rows = dict(self.con.execute(_COUNT_RAW_DAYS_SQL, _day_bounds(days)).fetchall())
        chunk, size = [], 0
        for day in days:
            if chunk and size + rows.get(day, 0) > NORMALIZE_CHUNK_ROWS:
                yield chunk
                chunk, size = [], 0
            chunk.append(day)
            size += rows.get(day, 0)
        yield chunk

    def replace_normalized_day(self, day: date) -> dict[str, int]:
        """Rebuild one day's canonical series and rollups (see replace_normalized_days)."""
        return self.replace_normalized_days([day])[day]

    def duplicate_series_points(self, days: date | Sequence[date]) -> int:
        """Keys (metric, test, node, run, day) stored more than once on `days`: should be none."""
        days = sorted({days} if isinstance(days, date) else set(days))
        if not days:
            return 0
        return int(self.con.execute(_DUPLICATE_POINTS_SQL, _day_bounds(days)).fetchall()[0][0])

    def latest_timestamp(self) -> datetime | None:
        return self.con.execute("SELECT max(timestamp) FROM normalized_timeseries").fetchall()[0][0]

    # ---------------------------------------------------------------- trends

    def daily_series(self, window_start: datetime, window_end: datetime) -> pd.DataFrame:
        """Daily medians of every series in the window: overall, per test and per node.

        Per-test metrics are compared across tests and nodes as ratios to the test's own
        median in the window ("relative" level), so a change in the test mix of a node or of
        the fleet does not look like a trend; everything else keeps its absolute level.
        """
        return self.con.execute("""
            WITH w AS (
                SELECT n.metric_name, n.test_name, n.node_id, n.value,
                       CAST(n.timestamp AS DATE) AS day,
                       c.scope = 'test' AND c.unit <> 'count' AS relative
                FROM normalized_timeseries n JOIN metric_catalog c USING (metric_name)
                WHERE n.timestamp > ? AND n.timestamp <= ?
            ), base AS (
                SELECT metric_name, test_name, median(value) AS base
                FROM w WHERE relative GROUP BY metric_name, test_name
            ), leveled AS (
                SELECT w.*, CASE WHEN NOT w.relative THEN w.value
                                 WHEN b.base > 0 THEN w.value / b.base END AS level
                FROM w LEFT JOIN base b ON b.metric_name = w.metric_name
                    AND b.test_name IS NOT DISTINCT FROM w.test_name
            )
            SELECT 'overall' AS scope, metric_name, NULL AS test_name, NULL AS node_id,
                   any_value(relative) AS relative, day, median(level) AS value, count(*) AS n
            FROM leveled WHERE level IS NOT NULL GROUP BY metric_name, day
            UNION ALL
            SELECT 'test', metric_name, test_name, NULL, false, day, median(value), count(*)
            FROM leveled WHERE test_name IS NOT NULL GROUP BY metric_name, test_name, day
            UNION ALL
            SELECT 'node', metric_name, NULL, node_id, any_value(relative), day, median(level),
                   count(*)
            FROM leveled WHERE level IS NOT NULL GROUP BY metric_name, node_id, day
            ORDER BY scope, metric_name, test_name, node_id, day
        """, [window_start, window_end]).df()

    def window_points(self, window_start: datetime, window_end: datetime, *,
                      metric_name: str | None = None,
                      filters: Mapping[str, str | Sequence[str]] | None = None,
                      names_as_categories: bool = False) -> pd.DataFrame:
        """Every normalized point of the window with its metric's scope and direction,
        optionally of one metric and only where `filters` match (see `filter_clauses`).
        `names_as_categories`: text columns as pandas categories of the sorted names, as
        `regressions.build_series` keeps them (made by Arrow while converting, so the text
        is never held as a pandas column: at L about 1.9 GB of text against 0.3 GB)."""
        clauses, parameters = filter_clauses(filters or {})
        if metric_name is not None:
            clauses.append("n.metric_name = ?")
            parameters.append(metric_name)
        # the clauses are the fixed fragments of _FILTER_IN_SQL / _FILTER_LIKE_SQL; values are parameters
        where = "".join(" AND " + c for c in clauses)
        parameters = [window_start, window_end, *parameters]
        if names_as_categories:
            return self._window_categories(_WINDOW_NAMES_SQL.replace("/* filters */", where),
                                           parameters)
        # Through Arrow, into pandas' Arrow-backed text columns: `.df()` makes a Python object
        # per text value first (1M points: 2.9 s and a 1.2 GB peak, against 0.8 s and 0.7 GB)
        return self.con.sql(_WINDOW_POINTS_SQL.replace("/* filters */", where),
                            params=parameters).to_arrow_table().to_pandas()

    def categories_frame(self, sql: str, parameters: Sequence) -> pd.DataFrame:
        """The query's rows with its text columns as sorted categories, read in batches that
        Arrow dictionary-encodes as they come, so the text is never held whole, nor as a
        Python string per row: for window_points at L (6.6M points) a 0.6 GB peak against
        3.7 GB for one Arrow table of the ordered join; for the dashboard's 4M daily points
        at L, 5.6 s and a 1.8 GB peak against 8.5 s and 3.2 GB through `.df()`. Dates come
        as datetime.date, as Arrow converts them."""
        reader = self.con.sql(sql, params=list(parameters)).to_arrow_reader(batch_size=_WINDOW_BATCH_ROWS)
        schema = pa.schema([pa.field(f.name, pa.dictionary(pa.int32(), f.type))
                            if pa.types.is_string(f.type) else f for f in reader.schema])
        # every column is copied out of DuckDB's batch: one column kept by reference keeps
        # the whole batch's memory, text included
        batches = [pa.RecordBatch.from_arrays(
            [pc.dictionary_encode(column) if pa.types.is_string(column.type)
             else pa.concat_arrays([column]) for column in batch.columns], schema=schema)
            for batch in reader]
        table = pa.Table.from_batches(batches, schema=schema).unify_dictionaries()
        del batches
        frame = table.to_pandas(self_destruct=True, split_blocks=True)
        del table  # self_destruct: its buffers are freed as the columns convert
        # Arrow lists each column's names as it meets them
        return sorted_categories(frame, [c for c in frame.columns
                                         if isinstance(frame[c].dtype, pd.CategoricalDtype)])

    def _window_categories(self, sql: str, parameters: list) -> pd.DataFrame:
        """window_points' rows with names as sorted categories (see `categories_frame`).
        DuckDB returns the table's rows in the order they were stored (its
        preserve_insertion_order), and a stable sort by time keeps that order among equal
        times: the same rows come back in the same order on every read."""
        points = self.categories_frame(sql, parameters)
        names = [c for c in points.columns if isinstance(points[c].dtype, pd.CategoricalDtype)]
        # each metric's scope and direction, looked up by its code rather than per row
        catalog = self.con.execute("SELECT metric_name, scope, direction FROM metric_catalog").df()
        metrics = points["metric_name"].cat
        known = catalog.set_index("metric_name").reindex(metrics.categories)
        codes = metrics.codes.to_numpy()
        for column, values in (("metric_scope", known["scope"]), ("direction", known["direction"])):
            per_metric = pd.Categorical(values.to_numpy(dtype=object))
            per_row = np.where(codes >= 0, per_metric.codes[np.maximum(codes, 0)], -1)
            points[column] = pd.Categorical.from_codes(per_row, dtype=per_metric.dtype)
        unknown = points["metric_scope"].isna()  # a metric the catalog no longer has
        if unknown.any():
            points = points[~unknown]
            points = points.assign(**{c: points[c].cat.remove_unused_categories() for c in names})
        return points.sort_values("timestamp", kind="stable", ignore_index=True)

    def run_contexts(self, window_start: datetime, window_end: datetime) -> pd.DataFrame:
        """The context_data each run reported on each node in the window: one row per
        (test_run_id, node_id, context) as JSON text, for comparing configurations."""
        return self.con.execute("""
            SELECT DISTINCT test_run_id, node_id, CAST(context_data AS VARCHAR) AS context
            FROM performance_metrics
            WHERE timestamp > ? AND timestamp <= ? AND test_run_id IS NOT NULL
                AND context_data IS NOT NULL
        """, [window_start, window_end]).df()

    def node_hourly(self, window_start: datetime, window_end: datetime) -> pd.DataFrame:
        """Hourly means of every node-scope metric per node in the window."""
        return self.con.execute("""
            SELECT r.hour, r.metric_name, r.node_id, r.mean AS value
            FROM metric_rollups_hourly r JOIN metric_catalog c USING (metric_name)
            WHERE c.scope = 'node' AND r.hour > ? AND r.hour <= ?
            ORDER BY r.metric_name, r.node_id, r.hour
        """, [window_start, window_end]).df()

    def strongest_cycles(self, *, limit: int = 10) -> pd.DataFrame:
        return self.con.execute("""
            SELECT metric_name, cycle, any_value(strength) AS strength,
                   max(effect) - min(effect) AS peak_to_trough
            FROM seasonal_profiles WHERE node_id IS NULL
            GROUP BY metric_name, cycle ORDER BY strength DESC LIMIT ?
        """, [limit]).df()

    def top_incidents(self, *, limit: int = 10) -> pd.DataFrame:
        return self.con.execute("""
            SELECT attribution, kind, timestamp, first_test_run_id, first_commit, node_id,
                   metrics, tests, series, worst_magnitude_percent
            FROM change_incidents WHERE kind <> 'improvement'
            ORDER BY abs(worst_magnitude_percent) * series DESC NULLS LAST LIMIT ?
        """, [limit]).df()

    def incidents_and_changes(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The change_incidents and change_points the last change_points run stored."""
        return (self.con.execute("SELECT * EXCLUDE (computed_at) FROM change_incidents").df(),
                self.con.execute("SELECT * EXCLUDE (computed_at) FROM change_points").df())

    def correlations(self) -> pd.DataFrame:
        return self.con.execute("SELECT * EXCLUDE (computed_at) FROM metric_correlations").df()

    def top_anomalies(self, *, limit: int = 10) -> pd.DataFrame:
        return self.con.execute("""
            SELECT scope, metric_name, test_name, node_id, timestamp, kind, score, reason
            FROM anomalies ORDER BY score DESC LIMIT ?
        """, [limit]).df()

    def outlier_nodes(self, *, limit: int = 10) -> pd.DataFrame:
        """Nodes with outlier days: how many, the first and last, and the worst day's reason."""
        return self.con.execute("""
            SELECT node_id, count(*) AS outlier_days, min(day) AS first_day, max(day) AS last_day,
                   max(outlier_score) AS worst_score, arg_max(reason, outlier_score) AS reason
            FROM node_health WHERE is_outlier
            GROUP BY node_id ORDER BY outlier_days DESC, worst_score DESC LIMIT ?
        """, [limit]).df()

    def flagged_correlations(self, *, limit: int = 10) -> pd.DataFrame:
        return self.con.execute("""
            SELECT grain, metric_a, metric_b, pearson_r, spearman_rho, q_value, n
            FROM metric_correlations WHERE flagged ORDER BY abs(pearson_r) DESC LIMIT ?
        """, [limit]).df()

    def flagged_configuration_effects(self, *, limit: int = 10) -> pd.DataFrame:
        return self.con.execute("""
            SELECT metric_name, factor, effect_size, q_value, detail
            FROM configuration_effects WHERE flagged ORDER BY effect_size DESC, q_value LIMIT ?
        """, [limit]).df()

    def top_causes(self, *, limit: int = 10) -> pd.DataFrame:
        """The most likely cause of each of the worst regression incidents."""
        return self.con.execute("""
            SELECT i.attribution, i.timestamp, i.node_id, i.metrics, c.cause_type, c.cause,
                   c.score, c.evidence
            FROM regression_causes c JOIN change_incidents i USING (incident_id)
            WHERE c.rank = 1
            ORDER BY abs(i.worst_magnitude_percent) * i.series DESC NULLS LAST LIMIT ?
        """, [limit]).df()

    def replace_table(self, table: str, frame: pd.DataFrame) -> int:
        """Replace an analysis table's whole content with `frame` (columns in table order)."""
        if table not in TABLES:
            raise ValueError(f"not a perf_pipeline table: {table!r}")
        self.con.register("replacement", frame[self._columns(table)])
        try:
            with self.transaction():
                self.con.execute(_CLEAR_SQL[table])
                self.con.execute(_INSERT_ALL_SQL[table])
        finally:
            self.con.unregister("replacement")
        return len(frame)

    def _columns(self, table: str) -> list[str]:
        return [row[0] for row in self.con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
            "ORDER BY ordinal_position", [table]).fetchall()]

    def top_trends(self, *, direction: str = "degrading", limit: int = 10) -> pd.DataFrame:
        return self.con.execute("""
            SELECT scope, metric_name, test_name, node_id, change_rate_percent,
                   change_over_window_percent, p_value_adjusted, n_days
            FROM trend_stats WHERE is_significant AND trend_direction = ?
            ORDER BY abs(change_over_window_percent) DESC NULLS LAST LIMIT ?
        """, [direction, limit]).df()

    # ---------------------------------------------------------------- models and nodes

    def hourly_points(self, metric_name: str, window_start: datetime,
                      window_end: datetime) -> pd.DataFrame:
        """Hourly means of one metric per test and node in the window, with their context."""
        return self.con.execute("""
            SELECT hour, mean AS value, node_id, node_type, test_name, test_type
            FROM metric_rollups_hourly
            WHERE metric_name = ? AND hour > ? AND hour <= ?
            ORDER BY hour
        """, [metric_name, window_start, window_end]).df()

    def latest_models(self) -> pd.DataFrame:
        """The newest performance_models row of every metric."""
        return self.con.execute("""
            SELECT * FROM performance_models
            QUALIFY row_number() OVER (PARTITION BY metric_name ORDER BY trained_at DESC) = 1
            ORDER BY metric_name
        """).df()

    def oldest_current_model(self) -> datetime | None:
        """When the least recently trained metric's newest model was trained (None: no model)."""
        if "performance_models" not in self.table_names():
            return None
        return self.con.execute("""
            SELECT min(trained_at) FROM (
                SELECT max(trained_at) AS trained_at FROM performance_models GROUP BY metric_name)
        """).fetchall()[0][0]

    def forget_model_files(self, files: Sequence[str]) -> None:
        """Mark model files deleted from the store as gone from the registry."""
        if files:
            self.con.execute("UPDATE performance_models SET file = NULL "
                             "WHERE file IN (SELECT unnest(CAST(? AS VARCHAR[])))", [list(files)])

    def current_node_levels(self, as_of: datetime, *, hours: int = 24) -> pd.DataFrame:
        """Each node metric's median per node over the last `hours` before `as_of`."""
        return self.con.execute("""
            SELECT n.node_id, n.metric_name, median(n.value) AS current_value, count(*) AS n
            FROM normalized_timeseries n JOIN metric_catalog c USING (metric_name)
            WHERE c.scope = 'node' AND n.timestamp > ? - to_hours(CAST(? AS BIGINT))
                AND n.timestamp <= ?
            GROUP BY n.node_id, n.metric_name ORDER BY n.node_id, n.metric_name
        """, [as_of, hours, as_of]).df()

    def fleet_medians(self, as_of: datetime, metrics: Sequence[str], *, days: int = 7) -> dict[str, float]:
        """Fleet-wide medians of the given metrics over the last `days` before `as_of`."""
        rows = self.con.execute("""
            SELECT metric_name, median(value) FROM normalized_timeseries
            WHERE metric_name IN (SELECT unnest(?)) AND timestamp > ? - to_days(CAST(? AS BIGINT))
                AND timestamp <= ?
            GROUP BY metric_name
        """, [list(metrics), as_of, days, as_of]).fetchall()
        return {name: float(value) for name, value in rows if value is not None}

    def table(self, table: str) -> pd.DataFrame:
        """A perf_pipeline table's whole content."""
        if table not in TABLES:
            raise ValueError(f"not a perf_pipeline table: {table!r}")
        return self.con.execute(_SELECT_ALL_SQL[table]).df()

    def append_table(self, table: str, frame: pd.DataFrame) -> int:
        """Append `frame` (columns in table order) to a log table such as optimization_actions."""
        if table not in TABLES:
            raise ValueError(f"not a perf_pipeline table: {table!r}")
        if frame.empty:
            return 0
        self.con.register("replacement", frame[self._columns(table)])
        try:
            self.con.execute(_INSERT_ALL_SQL[table])
        finally:
            self.con.unregister("replacement")
        return len(frame)

    def top_recommendations(self, *, limit: int = 10) -> pd.DataFrame:
        return self.con.execute("""
            SELECT severity, kind, subject, action, evidence, expected_gain
            FROM optimization_recommendations
            ORDER BY list_position(['critical', 'high', 'medium', 'low'], severity),
                     expected_gain_percent DESC NULLS LAST LIMIT ?
        """, [limit]).df()

    def node_ranking(self, metric_name: str = "overall", *, limit: int = 100) -> pd.DataFrame:
        return self.con.execute("""
            SELECT node_id, score, rank, effect, evidence FROM node_performance_scores
            WHERE metric_name = ? AND test_type IS NULL ORDER BY rank, node_id LIMIT ?
        """, [metric_name, limit]).df()

    def top_risks(self, *, limit: int = 10) -> pd.DataFrame:
        return self.con.execute("""
            SELECT node_id, max(node_risk_score) AS risk_score,
                   arg_max(metric_name, risk_score) AS worst_metric,
                   min(predicted_crossing) AS first_crossing,
                   arg_max(evidence, risk_score) AS evidence
            FROM node_health_risk GROUP BY node_id
            HAVING max(node_risk_score) > 0 ORDER BY risk_score DESC LIMIT ?
        """, [limit]).df()

    # ---------------------------------------------------------------- CI gate

    def gate_measurements(self, *, run_id: str | None = None, ci_job_id: str | None = None,
                          baseline_days: int, baseline_runs: int, node_type: str | None = None,
                          metrics: Sequence[str] | None = None
                          ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(the run's measurements, its baseline) from normalized_timeseries.

        The run is a test_run_id, or every run of a CI job. The baseline holds, for each
        (metric, test) the run measured, the most recent `baseline_runs` other runs that
        ended in the `baseline_days` before the run began, on `node_type` if given.
        """
        if (run_id is None) == (ci_job_id is None):
            raise ValueError("give a run id or a CI job id")
        self.con.execute("""
            CREATE OR REPLACE TEMP TABLE gate_run AS
            SELECT metric_name, test_name, node_id, test_run_id, timestamp, value
            FROM normalized_timeseries
            WHERE (test_run_id = $run_id OR ci_job_id = $ci_job_id)
              AND ($node_type IS NULL OR node_type = $node_type)
              AND ($metrics IS NULL OR list_contains($metrics, metric_name))
        """, {"run_id": run_id, "ci_job_id": ci_job_id, "node_type": node_type,
              "metrics": list(metrics) if metrics else None})
        run = self.con.execute("SELECT * FROM gate_run ORDER BY metric_name, test_name, timestamp").df()
        if run.empty:
            return run, run.copy()
        baseline = self.con.execute("""
            WITH keys AS (SELECT DISTINCT metric_name, test_name FROM gate_run),
            bounds AS (SELECT min(timestamp) AS run_start FROM gate_run),
            candidates AS (
                SELECT n.metric_name, n.test_name, n.node_id, n.test_run_id, n.timestamp, n.value
                FROM normalized_timeseries n
                JOIN keys k ON k.metric_name = n.metric_name
                    AND k.test_name IS NOT DISTINCT FROM n.test_name
                CROSS JOIN bounds b
                WHERE n.test_run_id IS NOT NULL
                  AND n.test_run_id NOT IN (SELECT DISTINCT test_run_id FROM gate_run
                                            WHERE test_run_id IS NOT NULL)
                  AND n.timestamp < b.run_start
                  AND n.timestamp >= b.run_start - to_days(CAST($days AS INTEGER))
                  AND ($node_type IS NULL OR n.node_type = $node_type)
            ),
            ranked AS (
                SELECT metric_name, test_name, test_run_id,
                    row_number() OVER (PARTITION BY metric_name, test_name
                                       ORDER BY max(timestamp) DESC, test_run_id) AS recency
                FROM candidates GROUP BY metric_name, test_name, test_run_id
            )
            SELECT c.* FROM candidates c
            JOIN ranked r ON r.metric_name = c.metric_name
                AND r.test_name IS NOT DISTINCT FROM c.test_name
                AND r.test_run_id = c.test_run_id
            WHERE r.recency <= $runs
            ORDER BY c.metric_name, c.test_name, c.timestamp
        """, {"days": baseline_days, "runs": baseline_runs, "node_type": node_type}).df()
        return run, baseline

    # ---------------------------------------------------------------- retention

    def apply_retention(self, raw_before: datetime, rollups_before: datetime) -> dict[str, int]:
        """Delete raw, quarantined and normalized rows (and file records) older than
        `raw_before`, hourly rollups older than `rollups_before`, in one transaction, then
        checkpoint so that the space is reused. Returns rows deleted per table."""
        deleted = {}
        statements = (
            ("performance_metrics", "DELETE FROM performance_metrics WHERE timestamp < ?", raw_before),
            ("normalized_timeseries", "DELETE FROM normalized_timeseries WHERE timestamp < ?", raw_before),
            ("quarantined_metrics", "DELETE FROM quarantined_metrics WHERE partition_day < CAST(? AS DATE)",
             raw_before),
            ("ingested_files", "DELETE FROM ingested_files WHERE partition_day < CAST(? AS DATE)", raw_before),
            ("normalized_days", "DELETE FROM normalized_days WHERE partition_day < CAST(? AS DATE)", raw_before),
            ("metric_rollups_hourly", "DELETE FROM metric_rollups_hourly WHERE hour < ?", rollups_before),
        )
        with self.transaction():
            for table, sql, cutoff in statements:
                (count,), = self.con.execute(sql, [cutoff]).fetchall()  # DuckDB answers a DELETE with its row count
                deleted[table] = int(count)
        self.con.execute("CHECKPOINT")
        return deleted

    # ---------------------------------------------------------------- alerts

    def alerts(self, *, status: str | None = None, limit: int = 100) -> pd.DataFrame:
        """Alerts newest first, optionally of one status."""
        return self.con.execute("""
            SELECT * FROM regression_alerts WHERE ? IS NULL OR status = ?
            ORDER BY created_at DESC, alert_id LIMIT ?
        """, [status, status, limit]).df()

    def set_alert_status(self, alert_id: str, status: str, note: str, now: datetime) -> bool:
        """Move an alert to `status`; False if there is no such alert."""
        rows = self.con.execute("""
            UPDATE regression_alerts SET status = ?, status_note = ?, updated_at = ?,
                resolved_at = CASE WHEN ? = 'resolved' THEN ? ELSE resolved_at END
            WHERE alert_id = ? RETURNING alert_id
        """, [status, note, now, status, now, alert_id]).fetchall()
        return bool(rows)

    def due_deliveries(self, channels: Sequence[str], now: datetime) -> pd.DataFrame:
        """(alert, channel) pairs to attempt now: new alerts without a delivery row for a
        channel, failed deliveries whose backoff has passed, and deliveries left `sending` by
        a tick that died during the send (`previous_state`, `last_attempt_at` tell which)."""
        return self.con.execute("""
            SELECT a.*, c.channel, coalesce(d.attempts, 0) AS attempts,
                   d.state AS previous_state, d.last_attempt_at
            FROM regression_alerts a CROSS JOIN (SELECT unnest(CAST(? AS VARCHAR[])) AS channel) c
            LEFT JOIN alert_deliveries d ON d.alert_id = a.alert_id AND d.channel = c.channel
            WHERE a.status = 'new' AND (d.state IS NULL OR d.state = 'sending'
                                        OR (d.state = 'failed' AND d.next_attempt_at <= ?))
            ORDER BY a.created_at, a.alert_id, c.channel
        """, [list(channels), now]).df()

    def record_delivery(self, alert_id: str, channel: str, *, state: str, attempts: int,
                        now: datetime, next_attempt_at: datetime | None = None,
                        error: str | None = None) -> None:
        """Store one delivery attempt's outcome (its own transaction: stored before the next)."""
        self.con.execute("""
            INSERT INTO alert_deliveries VALUES (?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (alert_id, channel) DO UPDATE SET state = excluded.state,
                attempts = excluded.attempts, next_attempt_at = excluded.next_attempt_at,
                last_attempt_at = excluded.last_attempt_at,
                sent_at = coalesce(excluded.sent_at, alert_deliveries.sent_at),
                last_error = coalesce(excluded.last_error, alert_deliveries.last_error)
        """, [alert_id, channel, state, attempts, next_attempt_at, now,
              now if state == "sent" else None, error])

    def table_names(self) -> set[str]:
        return {row[0] for row in self.con.execute(
            "SELECT table_name FROM information_schema.tables").fetchall()}

    def table_counts(self, tables: Sequence[str] = TABLES) -> dict[str, int]:
        return {t: int(self.con.execute(_COUNT_SQL[t]).fetchall()[0][0]) for t in tables}

    # ---------------------------------------------------------------- client and JSON API (issue 7)

    def filtered_daily_levels(self, window_start: datetime, window_end: datetime,
                              metric_name: str,
                              filters: Mapping[str, str | Sequence[str]] | None = None
                              ) -> tuple[pd.DataFrame, int]:
        """(daily medians of one metric over the points `filters` match, the number of
        (test, node) series they come from), leveled as daily_series levels its overall
        series: per-test metrics as ratios to each test's own median in the window."""
        clauses, parameters = filter_clauses(filters or {})
        # the clauses are the fixed fragments of _FILTER_IN_SQL / _FILTER_LIKE_SQL; values are parameters
        self.con.execute(_FILTERED_POINTS_SQL.replace(
            "/* filters */", "".join(" AND " + c for c in clauses)),
            [window_start, window_end, metric_name, *parameters])
        daily = self.con.execute("""
            WITH base AS (
                SELECT test_name, median(value) AS base FROM filtered_points
                WHERE relative GROUP BY test_name
            ), leveled AS (
                SELECT p.*, CASE WHEN NOT p.relative THEN p.value
                                 WHEN b.base > 0 THEN p.value / b.base END AS level
                FROM filtered_points p LEFT JOIN base b
                    ON b.test_name IS NOT DISTINCT FROM p.test_name
            )
            SELECT day, any_value(relative) AS relative, median(level) AS value, count(*) AS n
            FROM leveled WHERE level IS NOT NULL GROUP BY day ORDER BY day
        """).df()
        (series,), = self.con.execute(
            "SELECT count(*) FROM (SELECT DISTINCT test_name, node_id FROM filtered_points)").fetchall()
        return daily, int(series)

    def change_point_list(self, *, metric_name: str | None = None, test_name: str | None = None,
                          node_id: str | None = None, kind: str | None = None,
                          limit: int = 100) -> pd.DataFrame:
        """Stored change points, newest first, optionally of one metric, test, node or kind."""
        return self.con.execute("""
            SELECT * EXCLUDE (computed_at) FROM change_points
            WHERE ($metric IS NULL OR metric_name = $metric)
              AND ($test IS NULL OR test_name = $test)
              AND ($node IS NULL OR node_id = $node)
              AND ($kind IS NULL OR kind = $kind)
            ORDER BY timestamp DESC, metric_name, test_name, node_id LIMIT $limit
        """, {"metric": metric_name, "test": test_name, "node": node_id, "kind": kind,
              "limit": limit}).df()


_FILTERED_POINTS_SQL = """
    CREATE OR REPLACE TEMP TABLE filtered_points AS
    SELECT n.test_name, n.node_id, n.value, CAST(n.timestamp AS DATE) AS day,
           c.scope = 'test' AND c.unit <> 'count' AS relative
    FROM normalized_timeseries n JOIN metric_catalog c USING (metric_name)
    WHERE n.timestamp > ? AND n.timestamp <= ? AND n.metric_name = ? /* filters */
"""

"""Ingest into the landing archive and validation of a day into DuckDB, on real files."""

import json
from datetime import date, datetime, timezone

import pytest

from perf_pipeline.ingest.formats import UnsupportedFormatError, json_lines, stage_bytes
from perf_pipeline.ingest.landing import (
    ingest_files,
    landed_days,
    load_landing_days,
    read_landing_day,
    write_atomic,
)
from perf_pipeline.ingest import landing as landing_module
from perf_pipeline.ingest.simulator import simulate_fleet
from perf_pipeline.storage import warehouse
from perf_pipeline.storage.warehouse import open_warehouse
from perf_pipeline_tests.conftest import metric_row, write_jsonl

DAY = date(2026, 11, 1)
TODAY = date(2026, 11, 28)

BAD_ROWS = {
    "nan": metric_row("2026-11-01T10:00:00Z", value=float("nan")),
    "inf": metric_row("2026-11-01T10:00:00Z", value=float("inf")),
    "unknown": metric_row("2026-11-01T10:00:00Z", metric_name="flux_capacitance"),
    "injection": metric_row("2026-11-01T10:00:00Z",
                            metric_name="x'); DROP TABLE performance_metrics; --"),
    "text value": metric_row("2026-11-01T10:00:00Z", value="fast"),
    "list value": metric_row("2026-11-01T10:00:00Z", value=[1, 2]),
    "bool value": metric_row("2026-11-01T10:00:00Z", value=True),
    "object node": metric_row("2026-11-01T10:00:00Z", node_id={"id": 1}),
    "no node": metric_row("2026-11-01T10:00:00Z", node_id=None),
    "no test for test metric": metric_row("2026-11-01T10:00:00Z", test_name=None),
    "negative duration": metric_row("2026-11-01T10:00:00Z", value=-1.0),
    "cpu above 100": metric_row("2026-11-01T10:00:00Z", metric_name="cpu_usage", value=140,
                                test_name=None),
    "wrong unit": metric_row("2026-11-01T10:00:00Z", unit="parsecs"),
    "context not object": metric_row("2026-11-01T10:00:00Z", context_data="commit=abc"),
    "bad timestamp": metric_row("2026-13-45T99:00:00Z"),
}
EXPECTED_REASONS = {
    "nan": "metric_value is not finite", "inf": "metric_value is not finite",
    "unknown": "unknown metric: flux_capacitance",
    "injection": "unknown metric: x'); DROP TABLE performance_metrics; --",
    "text value": "metric_value is not a number", "list value": "metric_value is not a number",
    "bool value": "metric_value is not a number", "object node": "node_id must be a string",
    "no node": "missing node_id",
    "no test for test metric": "missing test_name for per-test metric test_execution_time",
    "negative duration": "below the minimum", "cpu above 100": "above the maximum",
    "wrong unit": "unit parsecs is not accepted", "context not object": "context_data is not a JSON object",
    "bad timestamp": "invalid timestamp",
}
GOOD_ROWS = [
    metric_row("2026-11-01T00:00:00Z", value=1.5, run="run-1"),
    metric_row("2026-11-01T12:00:00+02:00", metric_name="test_duration_ms", value=1500, run="run-2"),
    metric_row("2026-11-01T23:59:59", metric_name="memory_usage", value=2_000_000_000,
               unit="bytes", test_name=None, run=None),
    metric_row(1793534400, metric_name="cpu_usage", value=55, test_name=None, run=None),  # epoch s
]


def _load_day(paths, day):
    staged, files = read_landing_day(paths.landing, day)
    with open_warehouse(paths.database) as wh:
        counts = wh.replace_raw_day(day, staged, files)
        stored = wh.day_counts(day)
    return counts, stored


def test_ingest_splits_records_by_their_own_utc_day(paths, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [
        metric_row("2026-10-31T23:30:00Z"), metric_row("2026-11-01T00:30:00+02:00"),
        metric_row("2026-11-01T00:30:00Z"), metric_row("2026-11-02T10:00:00Z")])
    report = ingest_files([source], paths.landing, today=TODAY)
    # 00:30+02:00 is 22:30 UTC on Oct 31st
    assert report.records_by_day == {date(2026, 10, 31): 2, DAY: 1, date(2026, 11, 2): 1}
    assert landed_days(paths.landing) == [date(2026, 10, 31), DAY, date(2026, 11, 2)]
    assert report.records_read == 4 and report.files_read == 1


def test_ingesting_the_same_file_twice_writes_nothing_new(paths, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", GOOD_ROWS)
    first = ingest_files([source], paths.landing, today=TODAY)
    second = ingest_files([source], paths.landing, today=TODAY)
    assert first.files_written and not second.files_written
    assert sum(1 for _ in paths.landing.rglob("*.jsonl")) == len(first.files_written)


def test_every_bad_row_is_quarantined_with_its_reason_and_counts_add_up(paths, tmp_path):
    rows = [*GOOD_ROWS, *BAD_ROWS.values(), "{not json", "[1, 2, 3]"]
    source = write_jsonl(tmp_path / "mixed.jsonl", rows)
    ingest_files([source], paths.landing, today=TODAY)

    counts, stored = _load_day(paths, DAY)
    # A record without a readable timestamp (the bad one, the broken line, the array) is
    # filed under the ingest day.
    assert counts.rows_read == stored["rows_read"] == len(rows) - 3
    assert stored["rows_loaded"] == len(GOOD_ROWS)
    assert stored["rows_read"] == stored["rows_loaded"] + stored["rows_quarantined"]
    with open_warehouse(paths.database) as wh:
        reasons = wh.con.execute(
            "SELECT raw_record, reason FROM quarantined_metrics ORDER BY source_line").fetchall()
        assert wh.con.execute("SELECT count(*) FROM performance_metrics").fetchall()[0][0] == 4
    by_raw = {raw: reason for raw, reason in reasons}
    for name, row in BAD_ROWS.items():
        if name == "bad timestamp":
            continue
        raw = json.dumps(row)
        assert raw in by_raw, name
        assert EXPECTED_REASONS[name] in by_raw[raw], (name, by_raw[raw])

    today_counts, today_stored = _load_day(paths, TODAY)
    assert today_counts.rows_read == today_counts.rows_quarantined == 3
    with open_warehouse(paths.database) as wh:
        by_raw = dict(wh.con.execute("SELECT raw_record, reason FROM quarantined_metrics "
                                     "WHERE partition_day = ?", [TODAY]).fetchall())
    assert by_raw[json.dumps(BAD_ROWS["bad timestamp"])].startswith("invalid timestamp: 2026-13-45")
    assert by_raw["{not json"] == "line is not valid JSON"
    assert by_raw["[1, 2, 3]"] == "record is not a JSON object"


def test_missing_timestamp_and_undecodable_lines_reach_quarantine(paths, tmp_path):
    row = metric_row("2026-11-01T10:00:00Z")
    del row["timestamp"]
    source = tmp_path / "raw.jsonl"
    source.write_bytes(json.dumps(row).encode() + b"\n" + b'{"metric_name": "\xff\xfe"}\n')
    report = ingest_files([source], paths.landing, today=TODAY)
    assert report.undated_records == 2 and report.unreadable_records == 1
    counts, _ = _load_day(paths, TODAY)
    assert counts.rows_read == 2 and counts.rows_quarantined == 2
    with open_warehouse(paths.database) as wh:
        reasons = sorted(r[0] for r in wh.con.execute(
            "SELECT reason FROM quarantined_metrics").fetchall())
    assert reasons == ["line is not valid UTF-8", "missing timestamp"]


def test_csv_rows_load_like_json_rows(paths, tmp_path):
    source = tmp_path / "metrics.csv"
    source.write_text(
        "timestamp,metric_name,metric_value,test_name,node_id,unit,context_data\n"
        '2026-11-01T08:00:00Z,test_execution_time,250,t1,node-01,ms,"{""commit"": ""abc""}"\n'
        "2026-11-01T08:00:00Z,cpu_usage,nan,,node-01,,\n"
        "2026-11-01T08:00:00Z,cpu_usage,20,,node-01,,,surplus\n")
    ingest_files([source], paths.landing, today=TODAY)
    counts, _ = _load_day(paths, DAY)
    assert (counts.rows_read, counts.rows_loaded, counts.rows_quarantined) == (3, 1, 2)
    with open_warehouse(paths.database) as wh:
        (value, unit, commit), = wh.con.execute(
            "SELECT metric_value, unit, context_data->>'commit' FROM performance_metrics").fetchall()
        reasons = {r[0] for r in wh.con.execute("SELECT reason FROM quarantined_metrics").fetchall()}
    assert (value, unit, commit) == (250.0, "ms", "abc")
    assert reasons == {"metric_value is not finite", "CSV row has more fields than the header"}


def test_reloading_a_day_replaces_it_without_duplicates(paths, tmp_path):
    ingest_files([write_jsonl(tmp_path / "a.jsonl", GOOD_ROWS)], paths.landing, today=TODAY)
    first, _ = _load_day(paths, DAY)
    second, stored = _load_day(paths, DAY)
    assert first == second and stored["rows_loaded"] == len(GOOD_ROWS)
    ingest_files([write_jsonl(tmp_path / "late.jsonl", [metric_row("2026-11-01T15:00:00Z", run="run-9")])],
                 paths.landing, today=TODAY)
    _, stored = _load_day(paths, DAY)  # late data for the day: added, nothing lost
    assert stored["rows_loaded"] == len(GOOD_ROWS) + 1


def test_atomic_write_leaves_no_partial_or_temporary_file(tmp_path):
    target = tmp_path / "day" / "file.jsonl"
    write_atomic(target, b"x" * 10_000)
    assert target.read_bytes() == b"x" * 10_000
    assert [p.name for p in target.parent.iterdir()] == ["file.jsonl"]


def test_unsupported_format_is_a_clear_error():
    with pytest.raises(UnsupportedFormatError, match="unsupported format .parquet"):
        stage_bytes(b"", suffix=".parquet", source_file="x.parquet")


def test_landing_state_sees_a_replaced_file(tmp_path):
    """Checksums are cached by size and mtime; a file replaced in place is hashed again."""
    import os

    from perf_pipeline.ingest.landing import landing_state

    landing = tmp_path / "landing"
    target = landing / "2026-11-01" / "a.jsonl"
    write_atomic(target, b'{"x": 1}\n')
    first = landing_state(landing)
    stat = target.stat()
    write_atomic(target, b'{"x": 2}\n')  # same size
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = landing_state(landing)
    assert first != second
    assert second == landing_state(landing)


def _stored(database):
    """Everything a load leaves behind, in a stable order, without load times and ids."""
    with open_warehouse(database, read_only=True) as wh:
        return tuple(wh.con.execute(sql).fetchall() for sql in (
            "SELECT * EXCLUDE (id) FROM performance_metrics ORDER BY source_file, source_line",
            "SELECT * EXCLUDE (quarantined_at) FROM quarantined_metrics "
            "ORDER BY source_file, source_line",
            "SELECT * EXCLUDE (loaded_at) FROM ingested_files ORDER BY path"))


def _load_both_ways(paths, tmp_path):
    """DAY loaded by load_landing_days into paths.database, and through the format parsers
    into a database of its own: (counts, the parsers' counts, that database)."""
    with open_warehouse(paths.database) as wh:
        counts = load_landing_days(wh, paths.landing, [DAY])[DAY]
    by_parser = tmp_path / "by_parser.duckdb"
    staged, files = read_landing_day(paths.landing, DAY)
    with open_warehouse(by_parser) as wh:
        expected = wh.replace_raw_day(DAY, staged, files)
    return counts, expected, by_parser


@pytest.mark.parametrize("group_bytes", [1, landing_module.STAGE_GROUP_BYTES])
def test_the_bulk_splitter_reads_json_lines_exactly_as_the_format_parser_stages_them(
        paths, tmp_path, monkeypatch, group_bytes):
    """The bulk path (formats.json_lines splits the files, staged a file at a time or all
    at once) and the parser path must store the same rows, quarantine the same records for
    the same reasons, and count the same files."""
    monkeypatch.setattr(landing_module, "STAGE_GROUP_BYTES", group_bytes)
    good = metric_row("2026-11-01T10:00:00Z", value=2.5, run="run-1")
    escaped = metric_row("2026-11-01T11:00:00Z", test_name='tests/a "quoted" \\ name', run="r2")
    odd = [
        "\ufeff" + json.dumps(good),                            # byte order mark
        json.dumps(escaped, ensure_ascii=True) + "\r",          # CRLF, escapes
        "", "   \t ",                                           # blank lines, counted
        json.dumps(metric_row("2026-11-01T12:00:00Z", test_name="tëst-ünïcode-✓")),
        json.dumps(metric_row("2026-11-01T12:30:00Z", node_id=12)),       # not a string
        json.dumps(metric_row("2026-11-01T12:40:00Z", value="3.5")),      # number as text
        json.dumps(metric_row(1793534400, metric_name="cpu_usage", value=5, test_name=None)),
        json.dumps(metric_row("2026-11-02T01:00:00Z")),                   # another day
        json.dumps(metric_row("2026-11-01T13:00:00Z", context_data=[1, 2])),
        "{broken", "[1, 2]", "null", "42", '"text"',
        json.dumps({**good, "metric_value": {"v": 1}}),
        json.dumps({**good, "timestamp": True}),
    ]
    folder = paths.landing / DAY.isoformat()
    folder.mkdir(parents=True)
    (folder / "odd.jsonl").write_text("\n".join(odd) + "\n", encoding="utf-8")
    (folder / "latin1.jsonl").write_bytes(json.dumps(good).encode() + b"\n" + b'{"node_id": "\xe9"}\n')
    (folder / "more.ndjson").write_text(json.dumps(good) + "\n")
    (folder / "table.csv").write_text("timestamp,metric_name,metric_value,node_id,test_name\n"
                                      "2026-11-01T09:00:00Z,test_execution_time,1.5,node-01,t1\n")

    counts, expected, by_parser = _load_both_ways(paths, tmp_path)

    assert counts == expected
    assert counts.rows_read == len(odd) - 2 + 2 + 1 + 1 and counts.files == 4
    # the bulk splitter took the UTF-8 file itself (the blank lines skipped, their numbers
    # kept) and refused the other, which the parser read
    numbers, lines = json_lines((folder / "odd.jsonl").read_bytes())
    assert list(numbers) == [1, 2, *range(5, len(odd) + 1)]
    assert lines.to_pylist() == [json.dumps(good), odd[1][:-1], *odd[4:]]
    assert json_lines((folder / "latin1.jsonl").read_bytes()) is None
    assert _stored(paths.database) == _stored(by_parser)
    with open_warehouse(paths.database, read_only=True) as wh:
        reasons = dict(wh.con.execute(
            "SELECT source_line, reason FROM quarantined_metrics WHERE source_file LIKE '%odd.jsonl'"
        ).fetchall())
        loaded = wh.con.execute("SELECT test_name FROM performance_metrics "
                                "WHERE source_file LIKE '%odd.jsonl' ORDER BY source_line").fetchall()
    assert reasons[6] == "node_id must be a string"
    assert reasons[9].startswith("timestamp 2026-11-02T01:00:00 is outside partition day 2026-11-01")
    assert reasons[10] == "context_data is not a JSON object"
    assert reasons[11] == "line is not valid JSON"
    assert {reasons[n] for n in (12, 13, 14, 15)} == {"record is not a JSON object"}
    assert reasons[16] == "metric_value is not a number"
    assert reasons[17].startswith("invalid timestamp")
    assert ('tests/a "quoted" \\ name',) in loaded and ("tëst-ünïcode-✓",) in loaded


def _files_read_whole(monkeypatch) -> tuple[list[str], list[str]]:
    """Record which files each load handed to read_json_lines, and which it took whole."""
    handed, taken = [], []
    read = warehouse.Warehouse.read_json_lines

    def spy(self, files):
        unread = read(self, files)
        handed.extend(name for _, name, _, _ in files)
        taken.extend(name for _, name, _, _ in files if name not in unread)
        return unread

    monkeypatch.setattr(warehouse.Warehouse, "read_json_lines", spy)
    return handed, taken


def test_files_duckdb_reads_whole_load_exactly_as_their_lines_staged_one_by_one(
        paths, tmp_path, monkeypatch):
    """A JSON Lines file of objects, one per line, is read by read_json itself; its records
    that fail validation are judged again from their lines. The result is what staging the
    file line by line gives: the same rows, reasons, stored lines and counts. A file with a
    blank line or a line that is not an object is staged line by line."""
    _, taken = _files_read_whole(monkeypatch)
    folder = paths.landing / DAY.isoformat()
    objects = [*GOOD_ROWS, *BAD_ROWS.values(),
               metric_row("2026-11-01T11:00:00Z", test_name='tests/a "quoted" \\ name ✓'),
               metric_row("2026-11-02T01:00:00Z"),                    # another day
               {**GOOD_ROWS[0], "_rejected": "sent as rejected"}, {**GOOD_ROWS[0], "_rejected": 5},
               {**GOOD_ROWS[0], "metric_value": float("nan")}, {"metric_name": "cpu_usage"}, {}]
    lines = [json.dumps(row, ensure_ascii=i % 2 == 0) for i, row in enumerate(objects)]
    lines[3:3] = ["null", "  " + json.dumps(GOOD_ROWS[0]) + " "]
    folder.mkdir(parents=True)
    (folder / "objects.jsonl").write_bytes("\r\n".join(lines).encode())  # CRLF, no last newline
    write_jsonl(folder / "good.jsonl", GOOD_ROWS * 3)
    write_jsonl(folder / "blank.jsonl", [GOOD_ROWS[0], "", GOOD_ROWS[1]])
    write_jsonl(folder / "broken.jsonl", [GOOD_ROWS[0], "[1, 2]", GOOD_ROWS[1]])
    # read_json would trim a form feed or vertical tab at a line's end; JSON refuses them
    write_jsonl(folder / "feeds.jsonl", [json.dumps(GOOD_ROWS[0]) + "\f", "\v" + json.dumps(GOOD_ROWS[1])])

    counts, expected, by_parser = _load_both_ways(paths, tmp_path)

    assert sorted(taken) == [f"{DAY}/good.jsonl", f"{DAY}/objects.jsonl"]
    assert counts == expected
    assert counts.rows_read == len(lines) + 12 + 2 + 3 + 2 and counts.files == 5
    assert counts.rows_quarantined >= 3  # the feeds' two lines among them
    assert _stored(paths.database) == _stored(by_parser)
    with open_warehouse(paths.database, read_only=True) as wh:
        quarantined = {line: (reason, raw) for line, reason, raw in wh.con.execute(
            "SELECT source_line, reason, raw_record FROM quarantined_metrics "
            "WHERE source_file LIKE '%objects.jsonl'").fetchall()}
    assert quarantined[4] == ("record is not a JSON object", "null")
    assert quarantined[len(lines) - 4][0] == "sent as rejected"
    assert quarantined[len(lines)] == ("missing metric_name", "{}")
    assert {reason for reason, _ in quarantined.values()} >= {
        "node_id must be a string", "metric_value is not finite", "missing node_id",
        "context_data is not a JSON object", "record holds the reserved field _rejected without a reason"}
    assert all(raw == lines[number - 1] for number, (_, raw) in quarantined.items())


def test_records_read_whole_keep_their_files_and_line_numbers(paths, monkeypatch):
    """read_json reads many files in one statement, in parallel: each record must still be
    stored with its own file and line, in large files and small ones."""
    _, taken = _files_read_whole(monkeypatch)
    folder = paths.landing / DAY.isoformat()
    for file, lines in enumerate([50_000, 3, 50_000, 1, 7, 50_000]):
        write_jsonl(folder / f"part-{file}.jsonl", [
            metric_row(f"2026-11-01T{line % 24:02d}:00:00Z", value=float(line), run=f"{file}:{line}")
            for line in range(1, lines + 1)])
    with open_warehouse(paths.database) as wh:
        counts = load_landing_days(wh, paths.landing, [DAY])[DAY]
        misplaced = wh.con.execute(
            "SELECT count(*) FROM performance_metrics WHERE test_run_id <> "
            "regexp_extract(source_file, 'part-(\\d)', 1) || ':' || source_line "
            "OR metric_value <> source_line").fetchall()[0][0]
    assert len(taken) == 6 and counts.rows_loaded == 150_011
    assert misplaced == 0


def test_a_landing_path_read_json_would_take_for_a_pattern_is_staged_line_by_line(
        tmp_path, monkeypatch):
    """read_json takes [1] in a path for a pattern that matches land1/ too: such a file is
    staged line by line, and only its own rows load."""
    handed, _ = _files_read_whole(monkeypatch)
    landing, decoy = tmp_path / "land[1]", tmp_path / "land1"
    write_jsonl(landing / DAY.isoformat() / "a.jsonl", GOOD_ROWS)
    write_jsonl(decoy / DAY.isoformat() / "a.jsonl", GOOD_ROWS * 2)
    with open_warehouse(tmp_path / "db.duckdb") as wh:
        counts = load_landing_days(wh, landing, [DAY])[DAY]
    assert handed == [] and counts.rows_read == counts.rows_loaded == len(GOOD_ROWS)


def test_a_range_of_days_loads_in_bounded_chunks_as_day_by_day(paths, tmp_path):
    simulate_fleet(tmp_path / "fleet", days=4, nodes=5, tests=5, seed=5,
                   end=datetime(2026, 11, 5, tzinfo=timezone.utc))
    ingest_files(sorted((tmp_path / "fleet").rglob("*.jsonl")), paths.landing, today=TODAY)
    days = landed_days(paths.landing)
    assert len(days) >= 4

    with open_warehouse(paths.database) as wh:
        by_day = {day: load_landing_days(wh, paths.landing, [day])[day] for day in days}
    one_at_a_time = _stored(paths.database)
    with open_warehouse(paths.database) as wh:
        in_chunks = load_landing_days(wh, paths.landing, days, chunk_bytes=1)  # a chunk per day
        whole = load_landing_days(wh, paths.landing, days)  # again, in one chunk: replaces
    assert in_chunks == whole == by_day
    assert _stored(paths.database) == one_at_a_time
    assert sum(c.rows_read for c in whole.values()) == sum(
        c.rows_loaded + c.rows_quarantined for c in whole.values()) > 0


def test_normalizing_a_range_gives_each_day_what_normalizing_it_alone_gives(paths, tmp_path,
                                                                           monkeypatch):
    """A run that crosses midnight keeps a value on each of its days, however the days are
    normalized (alone, as one range, or as a range grouped a few rows at a time), and
    normalizing the range again replaces rather than adds."""
    rows = [metric_row("2026-11-01T23:50:00Z", value=2.0, run="late"),
            metric_row("2026-11-01T23:55:00Z", value=4.0, run="late"),
            metric_row("2026-11-02T00:05:00Z", value=8.0, run="late"),
            metric_row("2026-11-02T10:00:00Z", metric_name="cpu_usage", value=40, test_name=None,
                       run=None),
            metric_row("2026-11-03T10:00:00Z", value=1.0, run="next")]
    ingest_files([write_jsonl(tmp_path / "in.jsonl", rows)], paths.landing, today=TODAY)
    days = landed_days(paths.landing)
    assert len(days) == 3

    def normalized(database):
        with open_warehouse(database, read_only=True) as wh:
            return wh.con.execute("SELECT * FROM normalized_timeseries ORDER BY timestamp, metric_name"
                                  ).fetchall(), wh.con.execute(
                "SELECT * FROM metric_rollups_hourly ORDER BY hour, metric_name").fetchall()

    with open_warehouse(paths.database) as wh:
        load_landing_days(wh, paths.landing, days)
        one_by_one = {day: wh.replace_normalized_day(day) for day in days}
    day_by_day = normalized(paths.database)
    with open_warehouse(paths.database) as wh:
        assert wh.replace_normalized_days(days) == one_by_one
        assert wh.replace_normalized_days(days) == one_by_one
        assert wh.duplicate_series_points(days) == 0
    assert normalized(paths.database) == day_by_day
    for chunk_rows in (1, 3):  # a statement per day; the first two days together
        monkeypatch.setattr(warehouse, "NORMALIZE_CHUNK_ROWS", chunk_rows)
        with open_warehouse(paths.database) as wh:
            assert wh.replace_normalized_days(days) == one_by_one
        assert normalized(paths.database) == day_by_day
    points = {(row[0].date(), row[6], row[9]) for row in day_by_day[0] if row[6] == "late"}
    assert points == {(DAY, "late", 3.0), (date(2026, 11, 2), "late", 8.0)}


def test_rows_dated_outside_the_daily_partitions_are_quarantined_under_the_ingest_day(
        paths, tmp_path, monkeypatch):
    """A row before the first partition or far ahead would land in a day folder that never
    loads; ingest files it under the ingest day with the reason instead, as the gateway
    refuses it (the same rule, landing.outside_partitions)."""
    monkeypatch.setenv("PERF_PIPELINE_START_DATE", "2025-01-01")
    dated = {"year 1": "0001-01-01T00:00:00Z", "1970": 0, "before the start": "2024-12-31T23:59:59Z",
             "two days ahead": "2026-11-30T00:00:00Z", "year 9999": "9999-12-31T23:59:59Z",
             "year 200000": "200000-01-01T00:00:00Z", "before Christ": "-0044-03-15T00:00:00Z"}
    rows = [metric_row(stamp, run=name) for name, stamp in dated.items()]
    rows.append(metric_row("2026-11-29T23:00:00Z", run="a day ahead"))  # within the tolerance
    report = ingest_files([write_jsonl(tmp_path / "far.jsonl", rows)], paths.landing, today=TODAY)
    assert report.out_of_range_records == len(dated)
    assert report.records_by_day == {TODAY: len(dated), date(2026, 11, 29): 1}

    counts, stored = _load_day(paths, TODAY)
    assert counts.rows_read == counts.rows_quarantined == stored["rows_quarantined"] == len(dated)
    with open_warehouse(paths.database) as wh:
        by_run = {json.loads(json.loads(raw)["_raw"])["test_run_id"]: reason for raw, reason in
                  wh.con.execute("SELECT raw_record, reason FROM quarantined_metrics").fetchall()}
    ahead = "timestamp is dated after 2026-11-29 (UTC), ahead of the ingesting host's clock"
    before = "timestamp is before the first daily partition, 2025-01-01 (PERF_PIPELINE_START_DATE)"
    assert by_run == {"year 1": before, "1970": before, "before the start": before,
                      "two days ahead": ahead, "year 9999": ahead,
                      "year 200000": "timestamp's day 200000-01-01 is outside the years 1 to 9999",
                      "before Christ": "timestamp's day 0045-03-15 (BC) is outside the years 1 to 9999"}
    assert _load_day(paths, date(2026, 11, 29))[0].rows_loaded == 1


def test_an_unreadable_record_dated_outside_the_partitions_keeps_its_own_reason(paths, tmp_path):
    source = tmp_path / "wide.csv"
    source.write_text("timestamp,metric_name,metric_value,node_id\n"
                      "0001-01-01T00:00:00Z,cpu_usage,5,node-01,surplus\n")
    report = ingest_files([source], paths.landing, today=TODAY)
    assert report.out_of_range_records == report.unreadable_records == 1
    counts, _ = _load_day(paths, TODAY)
    assert counts.top_reasons == [("CSV row has more fields than the header", 1)]


def test_a_first_line_of_only_a_byte_order_mark_and_blanks_is_still_one_record(paths, tmp_path):
    source = tmp_path / "bom.jsonl"
    source.write_bytes("\ufeff \t\n".encode() + json.dumps(metric_row("2026-11-01T10:00:00Z")).encode())
    report = ingest_files([source], paths.landing, today=TODAY)
    assert report.records_read == 2
    assert _load_day(paths, TODAY)[0].top_reasons == [("line is not valid JSON", 1)]
    assert _load_day(paths, DAY)[0].rows_loaded == 1


def test_a_line_of_accented_text_that_is_not_json_is_quarantined_not_a_crash(paths, tmp_path):
    """DuckDB quotes a line it cannot parse in its error, cut after so many bytes: inside a
    character, the driver raised UnicodeDecodeError and the whole load failed (a fuzz test's
    random draw found it)."""
    source = tmp_path / "accents.jsonl"
    source.write_text("é" * 100 + "x\n" + json.dumps(metric_row("2026-11-01T10:00:00Z")) + "\n",
                      encoding="utf-8")
    ingest_files([source], paths.landing, today=TODAY)
    counts = _load_day(paths, TODAY)[0]
    assert (counts.rows_read, counts.rows_quarantined) == (1, 1)
    assert counts.top_reasons == [("line is not valid JSON", 1)]
    assert _load_day(paths, DAY)[0].rows_loaded == 1


def test_a_record_sending_the_reserved_rejected_field_without_a_reason_gets_one(paths, tmp_path):
    good = metric_row("2026-11-01T10:00:00Z")
    rows = [{**good, "_rejected": ""}, {**good, "_rejected": " "}, {**good, "_rejected": 5},
            {**good, "_rejected": "sent as rejected"}, {**good, "_rejected": None},
            {**good, "context_data": {"_rejected": ""}}]
    ingest_files([write_jsonl(tmp_path / "reserved.jsonl", rows)], paths.landing, today=TODAY)
    counts, _ = _load_day(paths, DAY)
    assert (counts.rows_loaded, counts.rows_quarantined) == (2, 4)
    assert dict(counts.top_reasons) == {"record holds the reserved field _rejected without a reason": 3,
                                        "sent as rejected": 1}

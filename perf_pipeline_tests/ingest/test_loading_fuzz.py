"""Property test of loading: DuckDB's own reading of JSON Lines files (read_json of whole
files, or the line splitter) and the format parser stage exactly the same records, whatever
the bytes (line endings, blank lines, byte order marks, odd Unicode, broken JSON, wrong
types, bytes that are not UTF-8, control characters around a record), and every record
read is loaded or quarantined."""

import json
from datetime import date

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perf_pipeline.ingest.formats import json_lines, parse_jsonl
from perf_pipeline.ingest.landing import load_landing_days, read_landing_day
from perf_pipeline.storage.warehouse import Warehouse, connect

DAY = date(2026, 11, 1)
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
VALUE = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                  st.floats(allow_nan=False, allow_infinity=False), TEXT,
                  st.lists(st.integers(), max_size=2), st.dictionaries(TEXT, TEXT, max_size=2))
ROW = st.fixed_dictionaries(
    {"timestamp": st.sampled_from(["2026-11-01T10:00:00Z", "2026-11-01T23:59:59+00:00",
                                   "2026-11-02T00:00:00Z", "1793534400", "not a time"]),
     "metric_name": st.sampled_from(["test_execution_time", "cpu_usage", "test_duration_ms",
                                     "flux", ""]),
     "metric_value": st.one_of(st.floats(-10, 1e6, allow_nan=False), st.sampled_from(["3.5", "x"])),
     "node_id": st.one_of(TEXT, st.just("node-01"))},
    optional={"test_name": st.one_of(TEXT, VALUE), "unit": st.sampled_from(["s", "ms", "bytes", "%"]),
              "context_data": VALUE, "test_run_id": TEXT, "_rejected": TEXT})
LINE = st.one_of(
    ROW.map(lambda row: json.dumps(row, ensure_ascii=False)),
    ROW.map(lambda row: json.dumps(row)),  # escaped
    TEXT, st.sampled_from(["", " ", "\t \x0b\x0c", "{", "[1, 2]", "null", "42", '"s"', "{}"]))
ENDING = st.sampled_from(["\n", "\r\n", "\r\r\n", "\n\n"])


# A record with what may surround it on its line: mostly nothing or JSON's blank space, so
# that many files can be read whole; sometimes a character JSON does not count as blank.
PADDING = st.sampled_from(["", "", "", "", "", "", " ", "\t", "\x0b", "\x0c", "\x00", "\u00a0"])
OBJECT_LINE = st.tuples(PADDING, st.one_of(ROW, st.just({}), st.just(None)), PADDING).map(
    lambda parts: parts[0] + json.dumps(parts[1], ensure_ascii=False) + parts[2])


def _stored(warehouse: Warehouse) -> tuple:
    return tuple(warehouse.con.execute(sql).fetchall() for sql in (
        "SELECT * EXCLUDE (id) FROM performance_metrics ORDER BY source_file, source_line",
        "SELECT * EXCLUDE (quarantined_at) FROM quarantined_metrics ORDER BY source_file, source_line",
        "SELECT * EXCLUDE (loaded_at) FROM ingested_files ORDER BY path"))


def _loaded_both_ways(landing):
    """Load DAY of `landing` by load_landing_days and through the format parsers, each into
    a database of its own; assert the two stored and counted the same. Returns both counts."""
    by_duckdb = Warehouse.for_writing(connect())
    counts = load_landing_days(by_duckdb, landing, [DAY])[DAY]
    by_parser = Warehouse.for_writing(connect())
    staged, files = read_landing_day(landing, DAY)
    expected = by_parser.replace_raw_day(DAY, staged, files)
    assert counts == expected
    assert _stored(by_duckdb) == _stored(by_parser)
    return counts, expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.tuples(LINE, ENDING), min_size=1, max_size=12), bom=st.booleans(),
       undecodable=st.sampled_from([False] * 9 + [True]))
def test_duckdb_and_the_parser_stage_the_same_records(tmp_path_factory, lines, bom, undecodable):
    landing = tmp_path_factory.mktemp("landing")
    folder = landing / DAY.isoformat()
    folder.mkdir()
    data = ("\ufeff" * bom + "".join(line + ending for line, ending in lines)).encode("utf-8")
    if undecodable:
        data += b'{"node_id": "\xff"}\n'
    (folder / "fuzz.jsonl").write_bytes(data)
    expected_records = sum(1 for raw in data.split(b"\n") if raw.rstrip(b"\r").strip())

    counts, expected = _loaded_both_ways(landing)
    assert counts.rows_read == expected_records == counts.rows_loaded + counts.rows_quarantined


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.lists(OBJECT_LINE, min_size=1, max_size=4), min_size=1, max_size=3),
       ending=st.sampled_from(["\n", "\r\n"]))
def test_files_of_objects_load_as_the_parser_stages_them(tmp_path_factory, files, ending):
    """Files whose every line is a record, as the archive writes them, which read_json may
    take whole: loaded exactly as the parser stages them, rejected records included."""
    landing = tmp_path_factory.mktemp("landing")
    folder = landing / DAY.isoformat()
    folder.mkdir()
    for number, lines in enumerate(files):
        (folder / f"part-{number}.jsonl").write_bytes("".join(line + ending for line in lines).encode())

    _loaded_both_ways(landing)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.one_of(LINE, ENDING, st.sampled_from(["\ufeff", "\r", "{", " "])), max_size=20))
def test_the_bulk_splitter_finds_the_records_the_parser_finds(parts):
    """formats.json_lines, which splits the bytes without a Python object per line, yields
    the line numbers and texts parse_jsonl does, whatever the mix of endings and blanks."""
    data = "".join(parts).encode("utf-8")
    numbers, lines = json_lines(data)
    assert list(zip(numbers.tolist(), lines.to_pylist())) == [
        (number, text) for number, text, _ in parse_jsonl(data)]
    assert json_lines(data + b"\n\xff\n") is None  # not UTF-8: left to the parser

"""window_points as text and with names as categories: the same points either way."""

from datetime import datetime, timedelta

import pandas as pd

from perf_pipeline.frames import sorted_categories
from perf_pipeline.storage import warehouse
from perf_pipeline.storage.warehouse import open_warehouse

START = datetime(2026, 11, 1)


def test_names_as_categories_hold_the_same_points_with_sorted_names(tmp_path):
    # names arrive out of order and with gaps (a node metric has no test), so Arrow meets
    # them unsorted: the categories must still come out sorted
    rows = [(START + timedelta(hours=h), metric, test, node, 1.0 + h)
            for h, (metric, test, node) in enumerate([
                ("test_execution_time", "tests/z.py::t", "node-9"),
                ("cpu_usage", None, "node-1"),
                ("test_execution_time", "tests/a.py::t", "node-5"),
                ("build_time", None, "node-3")])]
    with open_warehouse(tmp_path / "perf.duckdb") as wh:
        wh.con.executemany(
            "INSERT INTO normalized_timeseries VALUES (?, ?, ?, NULL, ?, NULL, NULL, NULL, NULL, ?, 1)",
            [list(row) for row in rows])
        text = wh.window_points(START - timedelta(hours=1), START + timedelta(days=1))
        named = wh.window_points(START - timedelta(hours=1), START + timedelta(days=1),
                                 names_as_categories=True)
    for column in ("metric_name", "test_name", "node_id", "metric_scope", "direction"):
        categories = list(named[column].cat.categories)
        assert categories == sorted(categories), column
    assert list(named["node_id"].cat.categories) == ["node-1", "node-3", "node-5", "node-9"]
    assert named["test_name"].isna().sum() == 2
    pd.testing.assert_frame_equal(named.astype(object), text.astype(object))


def test_sorted_categories_reorders_categories_that_astype_would_leave_alone():
    """pandas counts unordered category dtypes with the same names as equal, so an
    `astype` to the sorted dtype keeps the original order: sorted_categories reorders."""
    frame = pd.DataFrame({"name": pd.Categorical(["b", "a", "c"], categories=["c", "b", "a"]),
                          "text": ["y", "x", "y"], "value": [1.0, 2.0, 3.0]})
    out = sorted_categories(frame, ["name", "text"])
    assert list(out["name"].cat.categories) == ["a", "b", "c"]
    assert list(out["name"].astype(object)) == ["b", "a", "c"]
    assert list(out["text"].cat.categories) == ["x", "y"]
    assert out["value"].dtype == float
    assert list(out.sort_values("name")["name"].astype(object)) == ["a", "b", "c"]


def _insert(wh, rows):
    wh.con.executemany(
        "INSERT INTO normalized_timeseries VALUES (?, ?, ?, NULL, ?, NULL, NULL, NULL, NULL, ?, 1)",
        [list(row) for row in rows])


def test_names_read_batch_by_batch_keep_stored_order_among_equal_times(tmp_path, monkeypatch):
    """Batches of three rows, each meeting names the others do not, and five distinct times
    over twenty rows: the points come back sorted by time, rows of the same time in the
    order they were stored, the same on every read, and a metric the catalog does not hold
    is left out (as the text read's join with the catalog leaves it out)."""
    monkeypatch.setattr(warehouse, "_WINDOW_BATCH_ROWS", 3)
    rows = [(START + timedelta(hours=(7 * i) % 5),
             "test_execution_time" if i % 2 else "cpu_usage",
             f"tests/t{(19 - i) % 6}.py::t" if i % 2 else None, f"node-{(3 * i) % 7}", float(i))
            for i in range(20)]
    retired = (START, "retired_metric", None, "node-99", -1.0)
    with open_warehouse(tmp_path / "perf.duckdb") as wh:
        _insert(wh, rows[:10] + [retired] + rows[10:])
        window = (START - timedelta(hours=1), START + timedelta(days=1))
        named = wh.window_points(*window, names_as_categories=True)
        again = wh.window_points(*window, names_as_categories=True)
        text = wh.window_points(*window)
    assert list(named["value"]) == [row[4] for row in sorted(rows, key=lambda row: row[0])]
    pd.testing.assert_frame_equal(named, again)
    assert "retired_metric" not in named["metric_name"].cat.categories
    assert "node-99" not in named["node_id"].cat.categories
    for column in ("metric_name", "test_name", "node_id"):
        assert list(named[column].cat.categories) == sorted(set(text[column].dropna()))
    key = ["timestamp", "value"]
    pd.testing.assert_frame_equal(named.astype(object).sort_values(key, ignore_index=True),
                                  text.astype(object).sort_values(key, ignore_index=True))


def test_an_empty_window_has_the_columns_and_types_of_a_full_one(tmp_path):
    with open_warehouse(tmp_path / "perf.duckdb") as wh:
        _insert(wh, [(START, "cpu_usage", None, "node-1", 50.0)])
        full = wh.window_points(START - timedelta(hours=1), START, names_as_categories=True)
        empty = wh.window_points(START, START + timedelta(days=1), names_as_categories=True)
    assert len(full) == 1 and len(empty) == 0
    assert list(empty.columns) == list(full.columns)
    assert [type(t) for t in empty.dtypes] == [type(t) for t in full.dtypes]

"""Keys and indexes, decided by measurement: what an ART index would cost loads and save
queries on perf_pipeline's tables, against DuckDB's zone maps alone.

`python -m perf_pipeline_tests.benchmarks.indexes [--days 30] [--nodes 40] [--tests 100]`
simulates a fleet, loads and normalizes all but its last day, then, for each variant (no
index; an ART index on the column a query filters on), times loading and normalizing the
last day and the queries the pipeline runs most: a day's rows by time (loads, retention),
the analysis window, one run's points (the CI gate), one node's points. Prints one JSON
line per variant; never asserts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from perf_pipeline.ingest.landing import ingest_files, landed_days, load_landing_days
from perf_pipeline.ingest.simulator import simulate_fleet
from perf_pipeline.storage.warehouse import open_warehouse

# (name, statements creating the index); statements are constants of this benchmark.
VARIANTS = (
    ("zone maps only", ()),
    ("ART on performance_metrics(timestamp)",
     ("CREATE INDEX bench_pm_time ON performance_metrics (timestamp)",)),
    ("ART on normalized_timeseries(test_run_id)",
     ("CREATE INDEX bench_nt_run ON normalized_timeseries (test_run_id)",)),
    ("ART on normalized_timeseries(node_id, metric_name)",
     ("CREATE INDEX bench_nt_node ON normalized_timeseries (node_id, metric_name)",)),
)
QUERIES = {
    "day_rows_by_time": "SELECT count(*), sum(metric_value) FROM performance_metrics "
                        "WHERE timestamp >= ? AND timestamp < ?",
    "window_30_days": "SELECT metric_name, count(*), avg(value) FROM normalized_timeseries "
                      "WHERE timestamp > ? AND timestamp <= ? GROUP BY metric_name",
    "one_run_gate_lookup": "SELECT * FROM normalized_timeseries WHERE test_run_id = ?",
    "one_node_one_metric": "SELECT timestamp, value FROM normalized_timeseries "
                           "WHERE node_id = ? AND metric_name = ?",
}


def _timed(function, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(workdir: Path, *, days: int, nodes: int, tests: int) -> None:
    simulate_fleet(workdir / "fleet", days=days, nodes=nodes, tests=tests, seed=11)
    landing = workdir / "landing"
    ingest_files(sorted((workdir / "fleet").rglob("*.jsonl")), landing)
    all_days = landed_days(landing)
    base = workdir / "base.duckdb"
    with open_warehouse(base) as wh:
        load_landing_days(wh, landing, all_days[:-1])
        wh.replace_normalized_days(all_days[:-1])
        run_id, node, metric = wh.con.execute(
            "SELECT test_run_id, node_id, metric_name FROM normalized_timeseries "
            "WHERE test_run_id IS NOT NULL LIMIT 1").fetchall()[0]
        rows = wh.con.execute("SELECT count(*) FROM performance_metrics").fetchall()[0][0]
    last = all_days[-1]
    day = datetime(last.year, last.month, last.day) - timedelta(days=1)
    parameters = {
        "day_rows_by_time": [day, day + timedelta(days=1)],
        "window_30_days": [day - timedelta(days=29), day + timedelta(days=1)],
        "one_run_gate_lookup": [run_id],
        "one_node_one_metric": [node, metric],
    }
    for name, statements in VARIANTS:
        database = workdir / "variant.duckdb"
        shutil.copy(base, database)
        with open_warehouse(database) as wh:
            started = time.perf_counter()
            for statement in statements:
                wh.con.execute(statement)
            build = time.perf_counter() - started
            started = time.perf_counter()
            load_landing_days(wh, landing, [last])
            wh.replace_normalized_days([last])
            wh.con.execute("CHECKPOINT")
            load = time.perf_counter() - started
            queries = {query: round(_timed(lambda: wh.con.execute(sql, parameters[query]).fetchall()) * 1000, 2)
                       for query, sql in QUERIES.items()}
        database.unlink()
        print(json.dumps({"figure": "index_variant", "variant": name, "rows": rows,
                          "index_build_seconds": round(build, 3),
                          "load_and_normalize_one_day_seconds": round(load, 3),
                          "query_milliseconds": queries}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=40)
    parser.add_argument("--tests", type=int, default=100)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="perf-bench-indexes-") as folder:
        run(Path(folder), days=args.days, nodes=args.nodes, tests=args.tests)


if __name__ == "__main__":
    main()

"""How fast the metrics gateway takes rows: validation and landing alone, and over HTTP.

`python -m perf_pipeline_tests.benchmarks.gateway_throughput [--rows 50000]` prints one JSON
line per figure: `store` (the gateway's own work: staging, validation on its in-memory
DuckDB, the atomic landing write) and `http` (a real `perf-pipeline serve` on 127.0.0.1,
batches posted one after another as the pytest plugin and the agent do). Never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from perf_pipeline.collect.push import push_bytes
from perf_pipeline.server.gateway import MetricsGateway
from perf_pipeline_tests.conftest import free_port, start_gateway, stop_process_group, wait_until_serving

TOKEN = "benchmark-token-0123456789"


def _body(rows: int) -> list[bytes]:
    start = datetime.now(timezone.utc) - timedelta(hours=12)
    return [json.dumps({
        "timestamp": (start + timedelta(milliseconds=500 * i)).isoformat(),
        "metric_name": "test_execution_time", "metric_value": 1.0 + i % 7,
        "test_name": f"tests/test_bench.py::test_{i % 500}", "test_type": "unit",
        "node_id": f"node-{i % 20:02d}", "node_type": "linux-large", "test_run_id": f"run-{i // 500}",
        "ci_job_id": "job-1", "context_data": {"commit": "c0ffee"}}).encode() for i in range(rows)]


def _figure(kind: str, rows: int, batch: int, seconds: float) -> None:
    print(json.dumps({"figure": kind, "rows": rows, "batch_rows": batch, "seconds": round(seconds, 3),
                      "rows_per_second": round(rows / seconds)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=50_000)
    args = parser.parse_args()
    lines = _body(args.rows)
    with tempfile.TemporaryDirectory() as folder:
        gateway = MetricsGateway(Path(folder) / "store", max_body_bytes=1 << 30,
                                 earliest_day=date(2024, 1, 1))
        for batch in (1000, args.rows):
            started = time.perf_counter()
            for first in range(0, args.rows, batch):
                gateway.store(b"\n".join(lines[first:first + batch]) + b"\n", suffix=".jsonl",
                              defaults=None)
            _figure("store", args.rows, batch, time.perf_counter() - started)
        gateway.close()

        port = free_port()
        env = {**os.environ, "PERF_API_TOKEN": TOKEN, "PERF_PIPELINE_HOME": str(Path(folder) / "http")}
        process = start_gateway(port, env, arguments=("--max-body-mb", "256"))
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_serving(url, process)
            for batch in (1000, 10_000):
                started = time.perf_counter()
                for first in range(0, args.rows, batch):
                    push_bytes(url, b"\n".join(lines[first:first + batch]) + b"\n",
                               content_type="application/x-ndjson", token=TOKEN, timeout=120)
                _figure("http", args.rows, batch, time.perf_counter() - started)
        finally:
            stop_process_group(process)


if __name__ == "__main__":
    main()

"""Time from a metric file landing to the Slack message, with `dagster dev` running.

`python -m perf_pipeline_tests.benchmarks.alert_latency [--samples N] [--nodes 20 --tests 50]
[--refresh job|automation]`
prints one JSON line per sample and a summary. Each sample: a simulated fleet whose history
before its first injected code step is loaded by `perf-pipeline run`; `dagster dev` starts
(its daemon runs the sensors) with the Slack webhook pointing at a receiver on 127.0.0.1;
the remaining days are dropped into the landing archive; the clock runs until the receiver
gets the first alert. What it measures is the whole unattended path: landing sensor →
landing_job (ingest, then the alerting refresh) → alert sensor → Slack; with `--refresh
automation`, landing sensor → ingest run → automation condition sensor → a run of the
alerting assets → alert sensor → Slack. Each sample also lists the runs launched after the
files landed, with their creation, start and end, in seconds from the landing. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from perf_pipeline.config import paths_from_env
from perf_pipeline.defs.runner import run_pipeline
from perf_pipeline.ingest.landing import ingest_files
from perf_pipeline.ingest.simulator import simulate_fleet
from perf_pipeline_tests.conftest import free_port, stop_process_group

ROOT = Path(__file__).resolve().parents[2]


def _receiver() -> tuple[ThreadingHTTPServer, list[float]]:
    arrivals: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            arrivals.append(time.monotonic())
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, arrivals


# What `dagster dev` loads: the project (landing_job: ingest and the alerting refresh in one
# run), or the variant whose refresh is declarative automation (see automation_variant.py).
REFRESH_MODULES = {"job": "perf_pipeline.definitions",
                   "automation": "perf_pipeline_tests.benchmarks.automation_variant"}


def sample(seed: int, nodes: int, tests: int, timeout: float, refresh: str = "job") -> dict:
    work = Path(tempfile.mkdtemp(prefix="alert-latency-"))
    server, arrivals = _receiver()
    env = {**os.environ, "PERF_PIPELINE_HOME": str(work / "home"),
           "PERF_SLACK_WEBHOOK_URL": f"http://127.0.0.1:{server.server_port}/hook"}
    env.pop("DAGSTER_HOME", None)
    env.pop("PERF_PIPELINE_DATABASE", None)
    os.environ.update({k: env[k] for k in ("PERF_PIPELINE_HOME",)})
    process = None
    try:
        end = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
        summary = simulate_fleet(work / "sim", days=30, nodes=nodes, tests=tests, seed=seed, end=end)
        truth = json.loads(summary.truth_path.read_text())
        first_step = min(datetime.fromisoformat(i["timestamp"].rstrip("Z"))
                         for i in truth["injections"] if i["kind"] == "step")
        files = sorted((work / "sim").rglob("*.jsonl"))
        before = [f for f in files if datetime.fromisoformat(f.parent.name) + timedelta(days=1) <= first_step]
        after = [f for f in files if f not in before]
        paths = paths_from_env().ensure()
        ingest_files(before, paths.landing, today=end.date())
        run_pipeline(paths, progress=lambda _: None)
        port = free_port()
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster"), "dev", "-m", REFRESH_MODULES[refresh],
             "-p", str(port), "-h", "127.0.0.1"],
            cwd=ROOT, env={**env, "DAGSTER_HOME": str(paths.dagster_home)}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(45)  # webserver and daemon up, sensors ticking on the loaded history
        arrivals.clear()
        started, wall_started = time.monotonic(), time.time()
        ingest_files(after, paths.landing, today=end.date())
        while not arrivals and time.monotonic() - started < timeout:
            time.sleep(0.5)
        seconds = arrivals[0] - started if arrivals else None
        return {"figure": "landing_to_slack_seconds", "refresh": refresh, "seed": seed, "value": seconds,
                "days_landed": len(after), "timed_out": seconds is None,
                "runs": _timeline(paths.dagster_home, wall_started)}
    finally:
        if process is not None:
            stop_process_group(process)
        server.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def _timeline(dagster_home: Path, since: float) -> list[dict]:
    """The runs launched after the files landed: job, and seconds from landing to the run's
    creation, start and end — where the time between a file and its alert goes."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        deadline = time.monotonic() + 120  # let the runs in flight finish, for their end times
        while True:
            records = instance.get_run_records()
            if time.monotonic() > deadline or all(r.dagster_run.is_finished for r in records):
                break
            time.sleep(2)
    rows = []
    for record in sorted(records, key=lambda r: r.create_timestamp.timestamp()):
        created = record.create_timestamp.timestamp()
        if created < since:
            continue
        rows.append({"job": record.dagster_run.job_name,
                     "created": round(created - since, 1),
                     "started": round(record.start_time - since, 1) if record.start_time else None,
                     "ended": round(record.end_time - since, 1) if record.end_time else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--tests", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--refresh", choices=sorted(REFRESH_MODULES), default="job",
                        help="how the alerting refresh follows an ingest (default: the project's)")
    args = parser.parse_args(argv)
    values = []
    for seed in range(1, args.samples + 1):
        result = sample(seed, args.nodes, args.tests, args.timeout, args.refresh)
        print(json.dumps(result), flush=True)
        if result["value"] is not None:
            values.append(result["value"])
    print(json.dumps({"figure": "landing_to_slack_median_seconds", "refresh": args.refresh,
                      "value": statistics.median(values) if values else None, "samples": len(values)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

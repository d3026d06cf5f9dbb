"""Scale benchmark: ingest speed against DuckDB's own bulk load, full and incremental
materialization, memory, and how cost grows with size.

`python -m perf_pipeline_tests.benchmarks [--size S|M|L ...] [--keep DIR]` prints one JSON
line per figure. Sizes are simulated fleets of about 100k (S), 1M (M) and 10M (L) rows; the
last simulated day is held back and landed after the full run, to time an incremental
refresh. The pipeline runs as `perf-pipeline run` subprocesses, as users run it, so each
phase's peak memory is its own process's: the larger of the kernel's high-water mark of it
(VmHWM) and its memory with its worker processes' sampled every 0.2 s; each step's peak is
the latter while the step ran (a spike shorter than that can be missed). Each run also
reports when its alert outbox was written (`alerts_written_after_seconds`, from the
command's start), the delay before a regression can reach Slack. Figures are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

from perf_pipeline.config import paths_from_env
from perf_pipeline.ingest.simulator import simulate_fleet
from perf_pipeline.storage.warehouse import connect

# Target rows, and a fleet whose rows per day make that target in a few weeks.
SIZES = {
    "S": (100_000, {"nodes": 20, "tests": 50, "runs_per_day": 12}),
    "M": (1_000_000, {"nodes": 40, "tests": 100, "runs_per_day": 24}),
    "L": (10_000_000, {"nodes": 200, "tests": 500, "runs_per_day": 48}),
}

Emit = Callable[[dict], None]

# Disk a size needs while it runs, per target row: the simulated fleet, the landing archive
# (a copy of it) and the database are 0.8 GB for M and 8.0 GB for L after a run; DuckDB's
# own load and the change-point steps' parts hold more for a while.
_DISK_BYTES_PER_ROW = 1_200


def _print(figure: dict) -> None:
    print(json.dumps(figure), flush=True)


def _high_water_mb(pid: int) -> float | None:
    """The process's own peak resident memory so far (Linux's VmHWM), or None where the
    kernel does not say. Not the ru_maxrss that wait4 returns for a child: Linux counts in
    it the parent's resident memory when the child was started (exec records the high water
    of the memory it leaves), so a benchmark that had simulated 10M rows itself reported
    7.7 GB for a run whose own peak was 3.6 GB."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


class _MemorySampler(threading.Thread):
    """The memory of a process and its worker processes, sampled every `interval` seconds
    until it ends: (epoch seconds, MB) pairs, so that each step's peak can be read from its
    start and end; `high_water` is the process's own exact peak as last read (None where
    not known). A worker is forked and shares the process's pages until it writes them, so
    it counts with the memory only it holds (USS), and the process with its resident memory."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.process, self.interval, self.samples = psutil.Process(pid), interval, []
        self.high_water: float | None = None

    def run(self) -> None:
        while True:
            try:
                rss = self.process.memory_info().rss
                workers = self.process.children(recursive=True)
            except psutil.Error:  # ended (or a zombie about to be reaped)
                return
            for worker in workers:
                try:
                    rss += worker.memory_full_info().uss
                except psutil.Error:  # ended meanwhile
                    pass
            self.samples.append((time.time(), rss / 2**20))
            self.high_water = _high_water_mb(self.process.pid) or self.high_water
            time.sleep(self.interval)


Samples = list[tuple[float, float]]


def measured(command: list[str], env: dict | None = None) -> tuple[float, float, Samples]:
    """Run `command`; (wall seconds, its own peak resident memory in MB, its memory samples).
    Raises RuntimeError with the end of its stderr if it fails."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = _MemorySampler(process.pid)
    sampler.start()
    errors = process.stderr.read()  # until it exits: a full pipe would stall it
    status = process.wait()
    elapsed = time.perf_counter() - started
    sampler.join()
    process.stderr.close()
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {errors.decode()[-2000:]}")
    # the high-water mark misses only what happened after its last read
    return elapsed, max(sampler.high_water or 0.0, *(mb for _, mb in sampler.samples), 0.0), \
        sampler.samples


def _cli(arguments: list[str], env: dict) -> tuple[float, float, Samples]:
    """Run `perf-pipeline ARGS` (see `measured`)."""
    return measured([sys.executable, "-m", "perf_pipeline.cli", *arguments], env)


def alerts_written(steps_ended: dict[str, float], since: float) -> float | None:
    """Seconds from `since` (a command's start) until the alert outbox was written (the end
    of the regression_alerts step), or None if no run wrote it."""
    return round(steps_ended["regression_alerts"] - since, 1) if "regression_alerts" in steps_ended else None


def _step_seconds(env: dict, since: float, samples: Samples) -> tuple[dict[str, float], dict[str, float],
                                                                       dict[str, float]]:
    """(seconds per asset (step), the process's peak MB while it ran, from `samples`, and
    when (epoch seconds) it last ended) over the runs that started after `since` (epoch
    seconds)."""
    import dagster as dg

    seconds: dict[str, float] = defaultdict(float)
    peaks: dict[str, float] = defaultdict(float)
    ended: dict[str, float] = {}
    # the instance the commands ran with `env` used, whatever DAGSTER_HOME this process has
    home = env.get("DAGSTER_HOME") or str(paths_from_env(env).dagster_home)
    with dg.DagsterInstance.from_config(home) as instance:
        for run in instance.get_runs():
            stats = instance.get_run_stats(run.run_id)
            if stats.start_time is None or stats.start_time < since:
                continue
            for step in instance.get_run_step_stats(run.run_id):
                if step.start_time and step.end_time:
                    seconds[step.step_key] += step.end_time - step.start_time
                    ended[step.step_key] = max(ended.get(step.step_key, 0.0), step.end_time)
                    # a step shorter than the interval: the last sample before it ended
                    during = [mb for at, mb in samples if step.start_time <= at <= step.end_time] \
                        or [mb for at, mb in samples if at <= step.end_time][-1:]
                    peaks[step.step_key] = max(peaks[step.step_key], *during, 0.0)
    return dict(seconds), dict(peaks), ended


def _outside_steps(wall: float, steps: dict[str, float]) -> float:
    """Seconds of a command spent in no asset step: the interpreter and the definitions
    loading, the instance, and Dagster's bookkeeping of runs and steps. Steps run one at
    a time under `perf-pipeline run` (the in-process executor), so they do not overlap; on
    the multiprocess executor steps outside the duckdb pool may, and this is a lower bound."""
    return round(wall - sum(steps.values()), 1)


def _by_size(figures: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in sorted(figures.items(), key=lambda kv: -kv[1])}


def _duckdb_bulk_load(landing: Path, workdir: Path) -> tuple[int, float]:
    """DuckDB's own load of the same landing files into an unindexed copy of the table, in a
    database file of its own, as raw_metrics writes to one (in memory it would skip writing)."""
    database = workdir / "read_json_copy.duckdb"
    database.unlink(missing_ok=True)
    con = connect(str(database))
    try:
        con.execute("""
            CREATE TABLE copy (timestamp TIMESTAMP, metric_name VARCHAR, metric_value DOUBLE,
                test_name VARCHAR, test_type VARCHAR, node_id VARCHAR, node_type VARCHAR,
                test_run_id VARCHAR, ci_job_id VARCHAR, context_data JSON, unit VARCHAR)
        """)
        started = time.perf_counter()
        con.execute("""
            INSERT INTO copy SELECT * FROM read_json(?, format = 'newline_delimited',
                columns = {timestamp: 'TIMESTAMP', metric_name: 'VARCHAR', metric_value: 'DOUBLE',
                           test_name: 'VARCHAR', test_type: 'VARCHAR', node_id: 'VARCHAR',
                           node_type: 'VARCHAR', test_run_id: 'VARCHAR', ci_job_id: 'VARCHAR',
                           context_data: 'JSON', unit: 'VARCHAR'})
        """, [str(landing / "*" / "*.jsonl")])
        con.execute("CHECKPOINT")
        elapsed = time.perf_counter() - started
        rows = con.execute("SELECT count(*) FROM copy").fetchall()[0][0]
    finally:
        con.close()
        database.unlink(missing_ok=True)
    return int(rows), elapsed


def _change_point_throughput(emit: Emit) -> None:
    from perf_pipeline.analysis.change_points import detect_change_points

    rng = np.random.default_rng(0)
    series = [rng.lognormal(0, 0.05, 200) * (1 + 0.2 * (np.arange(200) >= 120) * (i % 5 == 0))
              for i in range(500)]
    started = time.perf_counter()
    for values in series:
        detect_change_points(values)
    elapsed = time.perf_counter() - started
    emit({"figure": "change_point_points_per_second", "series": len(series), "points": 200 * len(series),
          "seconds": round(elapsed, 3), "points_per_second": round(200 * len(series) / elapsed)})


def check_disk(size: str, folder: Path) -> None:
    """Stop before simulating when `folder`'s disk cannot hold the size's files: L needs
    about 12 GB, and running out of space fails it minutes in, half written."""
    needed = SIZES[size][0] * _DISK_BYTES_PER_ROW
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise SystemExit(f"size {size} needs about {needed / 1e9:.0f} GB free in {folder} "
                         f"(simulated files, landing archive, database); {free / 1e9:.1f} GB is: "
                         "pass --keep with a folder on a larger disk, or set TMPDIR")


def run_size(size: str, workdir: Path, emit: Emit = _print, *, incremental: bool = True) -> dict:
    target, fleet = SIZES[size]
    check_disk(size, workdir)
    probe = simulate_fleet(workdir / "probe", days=1, seed=3, **fleet)
    days = max(3, round(target / probe.rows))
    shutil.rmtree(workdir / "probe")

    started = time.perf_counter()
    simulated = simulate_fleet(workdir / "fleet", days=days, seed=3, **fleet)
    emit({"size": size, "figure": "simulated", "rows": simulated.rows, "days": days, **fleet,
          "seconds": round(time.perf_counter() - started, 2)})
    day_folders = sorted(p for p in (workdir / "fleet").iterdir() if p.is_dir())
    held_back = workdir / "held_back"
    held_back.mkdir()
    shutil.move(str(day_folders[-1]), held_back / day_folders[-1].name)

    env = {**os.environ, "PERF_PIPELINE_HOME": str(workdir / "home")}
    env.pop("DAGSTER_HOME", None)
    env.pop("PERF_PIPELINE_DATABASE", None)
    seconds, _, _ = _cli(["ingest", str(workdir / "fleet")], env)
    landing = workdir / "home" / "landing"
    rows_landed = sum(1 for path in landing.rglob("*.jsonl") for _ in path.open("rb"))
    emit({"size": size, "figure": "ingest_to_landing", "rows": rows_landed,
          "seconds": round(seconds, 2), "rows_per_second": round(rows_landed / seconds)})

    since = time.time()
    full_wall, full_peak, samples = _cli(["run"], env)
    steps, step_peaks, ended = _step_seconds(env, since, samples)
    raw_seconds = steps.get("raw_metrics", float("nan"))
    duck_rows, duck_seconds = _duckdb_bulk_load(landing, workdir)
    ours, theirs = rows_landed / raw_seconds, duck_rows / duck_seconds
    emit({"size": size, "figure": "ingest_vs_duckdb_bulk_load", "rows": rows_landed,
          "raw_metrics_seconds": round(raw_seconds, 2), "raw_metrics_rows_per_second": round(ours),
          "duckdb_read_json_seconds": round(duck_seconds, 2), "duckdb_rows_per_second": round(theirs),
          "ratio": round(ours / theirs, 3)})
    emit({"size": size, "figure": "full_materialization", "rows": rows_landed,
          "wall_seconds": round(full_wall, 1), "peak_memory_mb": round(full_peak, 2),
          "alerts_written_after_seconds": alerts_written(ended, since),
          "outside_steps_seconds": _outside_steps(full_wall, steps),
          "seconds_per_asset": _by_size(steps), "peak_memory_mb_per_asset": _by_size(step_peaks)})

    if not incremental:
        return {"rows": rows_landed, "full_wall": full_wall}
    shutil.move(str(held_back / day_folders[-1].name), workdir / "fleet" / day_folders[-1].name)
    _cli(["ingest", str(workdir / "fleet" / day_folders[-1].name)], env)
    since = time.time()
    incremental_wall, incremental_peak, samples = _cli(["run"], env)
    steps, step_peaks, ended = _step_seconds(env, since, samples)
    emit({"size": size, "figure": "incremental_refresh", "new_days": 1,
          "wall_seconds": round(incremental_wall, 1), "peak_memory_mb": round(incremental_peak, 2),
          "share_of_full": round(incremental_wall / full_wall, 3),
          "alerts_written_after_seconds": alerts_written(ended, since),
          # what the refresh would cost if every step took no time at all, as share_of_full
          "outside_steps_seconds": _outside_steps(incremental_wall, steps),
          "outside_steps_share_of_full": round(_outside_steps(incremental_wall, steps) / full_wall, 3),
          "seconds_per_asset": _by_size(steps), "peak_memory_mb_per_asset": _by_size(step_peaks)})
    return {"rows": rows_landed, "full_wall": full_wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m perf_pipeline_tests.benchmarks",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", choices=sorted(SIZES), default=["S"])
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--skip-incremental", action="store_true",
                        help="stop after the full materialization (L's refresh takes as long again)")
    args = parser.parse_args(argv)
    results = {}
    for size in args.size:
        if args.keep:
            workdir = Path(args.keep) / size
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
            results[size] = run_size(size, workdir, incremental=not args.skip_incremental)
        else:
            with tempfile.TemporaryDirectory(prefix=f"perf-bench-{size}-") as folder:
                results[size] = run_size(size, Path(folder), incremental=not args.skip_incremental)
    if "M" in results and "L" in results:
        m, l_ = results["M"], results["L"]
        _print({"figure": "cost_growth_L_over_M", "rows_ratio": round(l_["rows"] / m["rows"], 2),
                "wall_ratio": round(l_["full_wall"] / m["full_wall"], 2)})
    _change_point_throughput(_print)


if __name__ == "__main__":
    main()

"""Worker start benchmark: a whole analysis run on Dagster's multiprocess executor, as the UI,
a schedule or `dagster job execute` runs it, with each step's worker process spawned
(Dagster's default start method) and forked from perf_pipeline's server that has preloaded
the definitions (the project's default, see perf_pipeline/defs/executor.py).

`python -m perf_pipeline_tests.benchmarks.worker_start [--rounds N] [--keep DIR]` simulates
the S size's fleet (20 nodes, 50 tests) for 30 days (about 340k rows), loads and analyses it once with `perf-pipeline run`, then
runs `daily_refresh_job` (every analysis asset but the models) with the two start methods
in turn, N rounds, and prints one JSON line per run and a summary: wall seconds, the steps'
own seconds, and the rest (worker starts and Dagster's scheduling of the steps). Figures are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from perf_pipeline.config import paths_from_env
from perf_pipeline.ingest.simulator import simulate_fleet
from perf_pipeline_tests.benchmarks.scale import SIZES, _cli, _outside_steps, _print, _step_seconds, measured

JOB = "daily_refresh_job"
START_METHODS = {
    "spawn": {"execution": {"config": {"multiprocess": {"start_method": {"spawn": {}}}}}},
    "preloaded_fork_server": {},  # the project's default run config
}


def _run(workdir: Path, env: dict, method: str) -> dict:
    config = workdir / f"{method}.yaml"
    config.write_text(yaml.safe_dump(START_METHODS[method]))
    since = time.time()
    wall, peak, _ = measured([sys.executable, "-m", "dagster", "job", "execute", "-m",
                              "perf_pipeline.definitions", "-j", JOB, "-c", str(config)], env)
    steps, _, _ = _step_seconds(env, since, [])
    return {"figure": "multiprocess_run", "job": JOB, "start_method": method,
            "wall_seconds": round(wall, 1), "steps": len(steps),
            "steps_seconds": round(sum(steps.values()), 1),
            "outside_steps_seconds": _outside_steps(wall, steps),
            "peak_memory_mb": round(peak, 1)}


def run(workdir: Path, rounds: int) -> None:
    _, fleet = SIZES["S"]
    simulated = simulate_fleet(workdir / "fleet", days=30, seed=3, **fleet)
    env = {**os.environ, "PERF_PIPELINE_HOME": str(workdir / "home")}
    env.pop("PERF_PIPELINE_DATABASE", None)
    env.pop("DAGSTER_HOME", None)
    _cli(["ingest", str(workdir / "fleet")], env)
    _cli(["run"], env)
    # `dagster job execute` reads the instance from DAGSTER_HOME: the one `perf-pipeline run`
    # keeps (and wrote the dagster.yaml of), with the duckdb pool's limit
    env["DAGSTER_HOME"] = str(paths_from_env(env).dagster_home)
    _print({"figure": "fleet", "rows": simulated.rows, "days": 30, **fleet})
    walls: dict[str, list[float]] = {method: [] for method in START_METHODS}
    for _ in range(rounds):
        for method in START_METHODS:
            figures = _run(workdir, env, method)
            walls[method].append(figures["wall_seconds"])
            _print(figures)
    _print({"figure": "multiprocess_run_median_wall_seconds", "rounds": rounds,
            **{method: statistics.median(values) for method, values in walls.items()}})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m perf_pipeline_tests.benchmarks.worker_start",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.keep:
        workdir = Path(args.keep)
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        run(workdir, args.rounds)
    else:
        with tempfile.TemporaryDirectory(prefix="perf-worker-start-") as folder:
            run(Path(folder), args.rounds)


if __name__ == "__main__":
    main()

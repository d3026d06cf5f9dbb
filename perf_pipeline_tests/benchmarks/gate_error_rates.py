"""How often the CI gate fails a clean run, and how often it catches a 10% regression.

`python -m perf_pipeline_tests.benchmarks.gate_error_rates [--clean-runs 1000] [--regressed-runs 200]`
prints one JSON line per scenario. Each run has 10 tests, each measured `repeats` times with
3% multiplicative noise (plus `run_noise` shared by a run's measurements), against 30
baseline runs drawn from the same model. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from perf_pipeline.analysis.gate import REGRESSION, compare_run
from perf_pipeline_tests.analysis.test_gate import history, threshold

SLOW_TEST = "tests/test_m.py::test_3"


def _rate(runs: int, *, seed: int, regression: float, repeats: int, run_noise: float) -> dict:
    rng = np.random.default_rng(seed)
    failed = caught = 0
    started = time.perf_counter()
    for _ in range(runs):
        baseline, run = history(rng, repeats=repeats, run_noise=run_noise)
        if regression:
            run.loc[run["test_name"] == SLOW_TEST, "value"] *= 1 + regression
        result = compare_run(run, baseline, threshold_percent=threshold)
        flagged = result[result["verdict"] == REGRESSION]
        failed += not flagged.empty
        caught += SLOW_TEST in set(flagged["test_name"])
    elapsed = time.perf_counter() - started
    figure = {"scenario": "regressed" if regression else "clean", "runs": runs, "tests_per_run": 10,
              "repeats": repeats, "noise_percent": 3.0, "run_noise_percent": run_noise * 100,
              "seconds_per_run": round(elapsed / runs, 4)}
    if regression:
        figure.update(regression_percent=regression * 100, detection_rate=caught / runs,
                      wrong_test_failures=failed - caught)
    else:
        figure.update(false_failure_rate=failed / runs, false_failures=failed)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clean-runs", type=int, default=1000)
    parser.add_argument("--regressed-runs", type=int, default=200)
    args = parser.parse_args()
    for repeats, run_noise in ((5, 0.01), (1, 0.0)):
        print(json.dumps(_rate(args.clean_runs, seed=1, regression=0.0, repeats=repeats,
                               run_noise=run_noise)), flush=True)
    for repeats in (1, 3, 5, 10):
        for run_noise in (0.0, 0.01):
            print(json.dumps(_rate(args.regressed_runs, seed=2, regression=0.10, repeats=repeats,
                                   run_noise=run_noise)), flush=True)


if __name__ == "__main__":
    main()

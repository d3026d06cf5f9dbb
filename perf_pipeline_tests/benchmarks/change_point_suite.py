"""A labelled suite for change-point detection, and the figures it yields.

Run `python -m perf_pipeline_tests.benchmarks.change_point_suite [--scale N]` to print one
JSON line per figure for perf_pipeline's detector and, side by side, plain ruptures PELT
with a fixed penalty. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import ruptures as rpt

from perf_pipeline.analysis.change_points import detect_change_points

FAMILIES = ("gaussian", "lognormal", "bimodal", "ar1", "outliers", "seasonal")
LENGTHS = (100, 300, 1000, 2000)
STEP_SIZES = (0.5, 1.0, 2.0, 4.0)
MIN_AFTER = 30
TOLERANCE = 5


@dataclass
class Case:
    family: str
    values: np.ndarray
    truth: list[int]  # indices of the first value of each new regime
    label: str  # "noise" | "step" | "multi" | "ramp"
    size: float = 0.0  # step size in noise sigmas


def noise(family: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-scale noise of a family (std ~1), shifted to a positive level of 10."""
    if family == "gaussian":
        e = rng.normal(0, 1, n)
    elif family == "lognormal":
        e = (rng.lognormal(0, 0.5, n) - np.exp(0.125)) / 0.6
    elif family == "bimodal":
        e = np.where(rng.random(n) < 0.3, 2.0, 0.0) + rng.normal(0, 0.3, n)
        e = (e - 0.6) / 0.97
    elif family == "ar1":
        phi = 0.5
        e = np.empty(n)
        e[0] = rng.normal()
        shocks = rng.normal(0, np.sqrt(1 - phi**2), n)
        for i in range(1, n):
            e[i] = phi * e[i - 1] + shocks[i]
    elif family == "outliers":
        e = rng.normal(0, 1, n)
        hits = rng.random(n) < 0.02
        e[hits] += rng.choice([-1, 1], hits.sum()) * rng.uniform(5, 10, hits.sum())
    elif family == "seasonal":
        e = rng.normal(0, 1, n) + 1.5 * np.sin(2 * np.pi * np.arange(n) / 24)
    else:
        raise ValueError(family)
    return 10 + e


def suite(rng: np.random.Generator, scale: int) -> Iterator[Case]:
    for family in FAMILIES:
        for n in LENGTHS:
            repeats = max(1, scale * 100 // n)
            for _ in range(repeats):
                yield Case(family, noise(family, n, rng), [], "noise")
            for size in STEP_SIZES:
                for _ in range(repeats):
                    at = int(rng.integers(MIN_AFTER, n - MIN_AFTER))
                    values = noise(family, n, rng)
                    values[at:] += size * rng.choice([-1, 1])
                    yield Case(family, values, [at], "step", size)
            for _ in range(repeats):
                if n < 200:
                    continue
                points = sorted(rng.choice(np.arange(40, n - 40, 40), 3, replace=False).tolist())
                values = noise(family, n, rng)
                for at in points:
                    values[at:] += 2.0 * rng.choice([-1, 1])
                yield Case(family, values, points, "multi", 2.0)
            for _ in range(repeats):
                start = int(rng.integers(20, n - 70))
                values = noise(family, n, rng)
                values[start:start + 50] += np.linspace(0, 3, 50)
                values[start + 50:] += 3
                yield Case(family, values, [start], "ramp", 3.0)


def ours(values: np.ndarray) -> list[int]:
    return [c.index for c in detect_change_points(values)]


def plain_pelt(values: np.ndarray, penalty: float = 10.0) -> list[int]:
    return [int(b) for b in rpt.KernelCPD(kernel="linear", min_size=5)
            .fit(values.reshape(-1, 1)).predict(pen=penalty)[:-1]]


def evaluate(detector: Callable[[np.ndarray], list[int]], cases: list[Case]) -> dict:
    false_alarms = {f: [0, 0] for f in FAMILIES}
    found = {}
    seconds = 0.0
    for case in cases:
        started = time.perf_counter()
        detected = detector(case.values)
        seconds += time.perf_counter() - started
        if case.label == "noise":
            false_alarms[case.family][0] += len(detected)
            false_alarms[case.family][1] += len(case.values)
        elif case.label in ("step", "multi"):
            key = f"{case.label}_{case.size:g}sigma"
            hits = sum(any(abs(d - t) <= TOLERANCE for d in detected) for t in case.truth)
            tally = found.setdefault(key, [0, 0])
            tally[0] += hits
            tally[1] += len(case.truth)
        else:  # a ramp: found if any change falls within the ramp
            tally = found.setdefault("ramp_3sigma_over_50", [0, 0])
            tally[0] += any(case.truth[0] - TOLERANCE <= d <= case.truth[0] + 50 for d in detected)
            tally[1] += 1
    return {
        "false_alarms_per_10k_points": {f: round(1e4 * a / max(p, 1), 3)
                                        for f, (a, p) in false_alarms.items()},
        "detection_rate": {k: round(h / t, 4) for k, (h, t) in sorted(found.items())},
        "seconds": round(seconds, 2),
    }


def throughput(detector: Callable[[np.ndarray], list[int]], series: int, rng) -> float:
    batch = [noise("gaussian", 100, rng) for _ in range(series)]
    for values in batch[::5]:
        values[int(rng.integers(30, 70)):] += 2
    started = time.perf_counter()
    for values in batch:
        detector(values)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=int, default=10, help="series per family, length, label (x100/n)")
    parser.add_argument("--throughput-series", type=int, default=10_000)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(20261128)
    cases = list(suite(rng, args.scale))
    points = sum(len(c.values) for c in cases)
    print(json.dumps({"figure": "suite", "series": len(cases), "points": points}))
    for name, detector in (("perf_pipeline", ours), ("ruptures_pelt_fixed_penalty_10", plain_pelt)):
        print(json.dumps({"figure": "accuracy", "detector": name, **evaluate(detector, cases)}))
    for name, detector in (("perf_pipeline", ours), ("ruptures_pelt_fixed_penalty_10", plain_pelt)):
        seconds = throughput(detector, args.throughput_series, np.random.default_rng(7))
        print(json.dumps({"figure": "throughput", "detector": name,
                          "series_of_100_points": args.throughput_series,
                          "seconds": round(seconds, 2)}))


if __name__ == "__main__":
    main()

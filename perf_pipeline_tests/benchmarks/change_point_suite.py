"""A labelled suite for change-point detection, and the figures it yields.

Run `python -m perf_pipeline_tests.benchmarks.change_point_suite [--scale N] [--seed S]` to
print one JSON line per figure for perf_pipeline's detector and, side by side, plain
ruptures PELT with a fixed penalty. Figures are printed, never asserted.

- `suite`: noise, single steps of 0.5–64σ (at least 30 points from either end), three steps
  of 2σ, and 3σ ramps over 50 points, for every noise family and length.
- `false_alarms`: a separate, larger noise-only sample (`--noise-points` per family, the
  same number of points at every length from 100 to 2,000), so that a rate of 1 in 10,000
  points can be told from 0.
- `accuracy`: detection rates pooled and per family; a step counts as found when a change
  lies within 5 points of it.
- `steps`: a separate, larger sample of 1σ and 2σ steps (`--step-series` per family, size
  and length), with rates per family and length: the suite alone has 15 per family.
- `ramps_reported_as_one_ramp`: of the ramps found, the share reported as one ramp.
- `location_ceiling`: how often a locator that knows there is exactly one step places it
  within 5 points, on series of 100: no detector can do much better, and for a 1σ step
  this is below 90% on every family.
- `throughput`: seconds for series of 100 points (a fifth with a 2σ step).
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
NOISE_LENGTHS = (100, 200, 500, 1000, 2000)
STEP_LENGTHS = (100, 300, 1000)
# 16σ and 64σ: a quiet metric (a build time, an artifact size) that jumps
STEP_SIZES = (0.5, 1.0, 2.0, 4.0, 16.0, 64.0)
MIN_AFTER = 30
TOLERANCE = 5
SEED = 20261128


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


def noise_sample(rng: np.random.Generator, points_per_family: int) -> Iterator[Case]:
    """Noise only: at least `points_per_family` points per family, split evenly over
    NOISE_LENGTHS (so short series weigh as much as long ones)."""
    per_length = -(-points_per_family // len(NOISE_LENGTHS))
    for family in FAMILIES:
        for n in NOISE_LENGTHS:
            for _ in range(-(-per_length // n)):
                yield Case(family, noise(family, n, rng), [], "noise")


def step_sample(rng: np.random.Generator, series: int) -> Iterator[Case]:
    """`series` single steps of 1σ and of 2σ per family and STEP_LENGTHS length, placed as
    in `suite`."""
    for family in FAMILIES:
        for n in STEP_LENGTHS:
            for size in (1.0, 2.0):
                for _ in range(series):
                    at = int(rng.integers(MIN_AFTER, n - MIN_AFTER))
                    values = noise(family, n, rng)
                    values[at:] += size * rng.choice([-1, 1])
                    yield Case(family, values, [at], "step", size)


def ours(values: np.ndarray) -> list[int]:
    return [c.index for c in detect_change_points(values)]


def plain_pelt(values: np.ndarray, penalty: float = 10.0) -> list[int]:
    return [int(b) for b in rpt.KernelCPD(kernel="linear", min_size=5)
            .fit(values.reshape(-1, 1)).predict(pen=penalty)[:-1]]


def _tally(case: Case, detected: list[int]) -> tuple[str, int, int]:
    """(figure key, truths found, truths) for a labelled case with changes."""
    if case.label == "ramp":  # found if any change falls within the ramp
        found = any(case.truth[0] - TOLERANCE <= d <= case.truth[0] + 50 for d in detected)
        return "ramp_3sigma_over_50", int(found), 1
    hits = sum(any(abs(d - t) <= TOLERANCE for d in detected) for t in case.truth)
    return f"{case.label}_{case.size:g}sigma", hits, len(case.truth)


def _rates(tallies: dict[str, list[int]]) -> dict[str, float]:
    return {k: round(h / t, 4) for k, (h, t) in sorted(tallies.items())}


def evaluate(detector: Callable[[np.ndarray], list[int]], cases: list[Case]) -> dict:
    false_alarms = {f: [0, 0] for f in FAMILIES}
    found: dict[str, list[int]] = {}
    by_family: dict[str, dict[str, list[int]]] = {f: {} for f in FAMILIES}
    seconds = 0.0
    for case in cases:
        started = time.perf_counter()
        detected = detector(case.values)
        seconds += time.perf_counter() - started
        if case.label == "noise":
            false_alarms[case.family][0] += len(detected)
            false_alarms[case.family][1] += len(case.values)
            continue
        key, hits, truths = _tally(case, detected)
        for tallies in (found, by_family[case.family]):
            tally = tallies.setdefault(key, [0, 0])
            tally[0] += hits
            tally[1] += truths
    return {
        "false_alarms_per_10k_points": {f: round(1e4 * a / max(p, 1), 3)
                                        for f, (a, p) in false_alarms.items()},
        "detection_rate": _rates(found),
        "detection_rate_by_family": {f: _rates(t) for f, t in by_family.items()},
        "seconds": round(seconds, 2),
    }


def false_alarms(detector: Callable[[np.ndarray], list[int]], cases: list[Case]) -> dict:
    """False changes on noise-only series, per family and, within it, per length."""
    tallies: dict[str, dict[int, list[int]]] = {}
    for case in cases:
        tally = tallies.setdefault(case.family, {}).setdefault(len(case.values), [0, 0])
        tally[0] += len(detector(case.values))
        tally[1] += len(case.values)
    figures = {}
    for family, by_length in tallies.items():
        alarms = sum(a for a, _ in by_length.values())
        points = sum(p for _, p in by_length.values())
        figures[family] = {"false_alarms": alarms, "points": points,
                           "per_10k_points": round(1e4 * alarms / points, 3),
                           "by_length": {n: a for n, (a, _) in sorted(by_length.items())}}
    return figures


def step_rates(detector: Callable[[np.ndarray], list[int]], cases: list[Case]) -> dict:
    """Share of steps found within TOLERANCE points: pooled, per family, and per family and
    length (each length weighs the same)."""
    tallies: dict[str, dict[str, dict[int, list[int]]]] = {}
    for case in cases:
        key, hits, truths = _tally(case, detector(case.values))
        tally = tallies.setdefault(key, {}).setdefault(case.family, {}).setdefault(len(case.values), [0, 0])
        tally[0] += hits
        tally[1] += truths
    figures = {}
    for key, families in sorted(tallies.items()):
        pooled = [0, 0]
        for by_length in families.values():
            for hits, truths in by_length.values():
                pooled[0] += hits
                pooled[1] += truths
        figures[key] = {
            "pooled": round(pooled[0] / pooled[1], 4),
            "by_family": {f: round(sum(h for h, _ in b.values()) / sum(t for _, t in b.values()), 4)
                          for f, b in families.items()},
            "by_family_and_length": {f: {n: round(h / t, 4) for n, (h, t) in sorted(b.items())}
                                     for f, b in families.items()},
        }
    return figures


def _one_step_locator(values: np.ndarray) -> int:
    """Where a single step most likely lies within TOLERANCE points: the split whose
    neighbourhood holds the most posterior mass (flat priors on both levels, Gaussian
    noise), for a locator told that there is exactly one step."""
    n = len(values)
    k = np.arange(5, n - 4)
    bridge = np.cumsum(values - values.mean())[k - 1]
    leverage = k * (n - k) / n
    gain = bridge**2 / leverage
    residual = (np.sum((values - values.mean()) ** 2) - gain.max()) / (n - 2)
    log_post = gain / (2 * residual) - 0.5 * np.log(leverage)
    post = np.exp(log_post - log_post.max())
    mass = np.convolve(post, np.ones(2 * TOLERANCE + 1), mode="same")
    return int(k[np.argmax(mass)])


def location_ceiling(rng: np.random.Generator, repeats: int) -> dict:
    """Share of single steps in series of 100 points that a locator told there is exactly
    one step places within TOLERANCE points, per step size and family: about what any
    detector can reach. Not for outliers or seasonal noise, where the outliers or the cycle
    would have to be known too."""
    figures = {}
    for family in ("gaussian", "lognormal", "bimodal", "ar1"):
        for size in (1.0, 2.0):
            hits = 0
            for _ in range(repeats):
                at = int(rng.integers(MIN_AFTER, 100 - MIN_AFTER))
                values = noise(family, 100, rng)
                values[at:] += size * rng.choice([-1, 1])
                hits += abs(_one_step_locator(values) - at) <= TOLERANCE
            figures.setdefault(family, {})[f"step_{size:g}sigma"] = round(hits / repeats, 4)
    return figures


def ramp_shapes(cases: list[Case]) -> dict:
    """Of the ramps that perf_pipeline finds, the share it reports as one ramp (rather
    than as steps), per family."""
    tallies = {f: [0, 0] for f in FAMILIES}
    for case in cases:
        if case.label != "ramp":
            continue
        within = [c for c in detect_change_points(case.values)
                  if case.truth[0] - TOLERANCE <= c.index <= case.truth[0] + 50]
        if within:
            tallies[case.family][0] += [c.shape for c in within] == ["ramp"]
            tallies[case.family][1] += 1
    return {f: round(r / max(t, 1), 4) for f, (r, t) in tallies.items()}


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
    parser.add_argument("--noise-points", type=int, default=100_000,
                        help="points per family in the noise-only false-alarm sample")
    parser.add_argument("--step-series", type=int, default=100,
                        help="1σ and 2σ steps per family, size and length in the step sample")
    parser.add_argument("--throughput-series", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    cases = list(suite(rng, args.scale))
    quiet = list(noise_sample(rng, args.noise_points))
    steps = list(step_sample(rng, args.step_series))
    print(json.dumps({"figure": "suite", "seed": args.seed, "series": len(cases),
                      "points": sum(len(c.values) for c in cases),
                      "noise_sample_series": len(quiet),
                      "noise_sample_points": sum(len(c.values) for c in quiet),
                      "step_sample_series": len(steps)}))
    detectors = (("perf_pipeline", ours), ("ruptures_pelt_fixed_penalty_10", plain_pelt))
    for name, detector in detectors:
        print(json.dumps({"figure": "false_alarms", "detector": name, **false_alarms(detector, quiet)}))
    for name, detector in detectors:
        print(json.dumps({"figure": "accuracy", "detector": name, **evaluate(detector, cases)}))
    for name, detector in detectors:
        print(json.dumps({"figure": "steps", "detector": name, **step_rates(detector, steps)}))
    print(json.dumps({"figure": "ramps_reported_as_one_ramp", "detector": "perf_pipeline",
                      **ramp_shapes(cases)}))
    print(json.dumps({"figure": "location_ceiling", "series_points": 100,
                      **location_ceiling(np.random.default_rng(args.seed + 1), 2000)}))
    for name, detector in detectors:
        seconds = throughput(detector, args.throughput_series, np.random.default_rng(7))
        print(json.dumps({"figure": "throughput", "detector": name,
                          "series_of_100_points": args.throughput_series,
                          "seconds": round(seconds, 2)}))


if __name__ == "__main__":
    main()

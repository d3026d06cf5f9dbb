"""The CI gate's statistics: did this run regress against the recent history of the same tests?

For each (metric, test) the run measured, the run's measurements are compared with the same
test's measurements in recent baseline runs. Positive metrics are compared as logarithms, so
a change is a ratio and noise that grows with the level (durations) is handled.

The noise model has two parts, both estimated from the baseline itself:
- within a run, repeated measurements (several nodes, repetitions) scatter by sigma_w;
- from run to run the level moves by tau (load, caches, the day's node mix).
The run's mean of n measurements then varies by tau² + sigma_w²/n around the baseline
level, which is itself known only to within the spread of the baseline runs / R. The
difference over that spread is a t statistic with R - 1 degrees of freedom (R baseline runs).
Repeats help only as far as the run-to-run part allows: a gate that treated 20 repeats as 20
independent runs would fail builds on every noisy day.

Every comparison of the run is one family: Holm's step-down keeps the chance that a run
without any change fails at most `alpha`. A regression fails the build when it is
significant after that correction and its estimated size is at least `min_effect_share` of
the metric's threshold: a regression of the threshold's size is caught whenever the noise
and repeats allow (each comparison reports the size it could detect), and changes well below
the threshold never fail a build, however certain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from perf_pipeline import catalog
from perf_pipeline.analysis.robust import MAD_TO_SIGMA

# Verdicts, worst first.
REGRESSION = "regression"  # fails the build
POSSIBLE = "possible regression"  # as large as the threshold, but too noisy to be sure
SMALL = "small regression"  # certain, but below the smallest change that fails a build
NO_BASELINE = "no baseline"
IMPROVEMENT = "improvement"
OK = "ok"
VERDICT_ORDER = (REGRESSION, POSSIBLE, SMALL, NO_BASELINE, IMPROVEMENT, OK)

COLUMNS = ["metric_name", "test_name", "direction", "verdict", "baseline_value", "run_value",
           "change_percent", "p_value", "p_adjusted", "detectable_percent", "threshold_percent",
           "run_measurements", "baseline_runs", "baseline_measurements", "reason"]


# Judged only when asked for with --metric: these describe what ran (how many tests, how
# many workers, the suite's throughput), which changes with the suite and the CI setup
# rather than with the code's speed.
NOT_JUDGED_BY_DEFAULT = frozenset({"test_count", "parallel_tests", "tests_per_hour",
                                   "cyclomatic_complexity", "queue_depth"})


@dataclass(frozen=True)
class GateSettings:
    # Family-wise error over all comparisons of one run. 0.1%, not 1%: a CI system runs the
    # gate on every build, and a gate that fails one clean build in a hundred is soon ignored.
    alpha: float = 0.001
    # Fewer baseline runs than this give no verdict on a test (its noise is unknown).
    min_baseline_runs: int = 5
    # A significant regression fails the build from this share of the threshold up.
    min_effect_share: float = 0.5
    # Baselines that never moved (a pass rate stuck at 100%) still get this much noise, in
    # log units (~0.5%): no measurement is exact.
    noise_floor: float = 0.005

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 0.5:
            raise ValueError("alpha must be between 0 and 0.5")
        if self.min_baseline_runs < 2:
            raise ValueError("at least 2 baseline runs are needed to know a test's noise")


def _log_scale(values: np.ndarray) -> bool:
    return bool(len(values)) and bool(np.all(values > 0))


def _robust_variance(values: np.ndarray) -> float:
    """Variance of the values with outliers clipped to 3 robust sigmas: nearly as efficient
    as the plain variance on normal data (so its t distribution keeps R - 1 degrees of
    freedom, which a MAD-based variance would not), but one wild run cannot set it."""
    if len(values) < 2:
        return 0.0
    center = float(np.median(values))
    scale = MAD_TO_SIGMA * float(np.median(np.abs(values - center)))
    if scale > 0:
        values = np.clip(values, center - 3 * scale, center + 3 * scale)
    return float(np.var(values, ddof=1))


def _within_run_variance(baseline: pd.DataFrame) -> tuple[float | None, float]:
    """Pooled variance of measurements around their run's mean, and mean 1/n over runs."""
    counts = baseline.groupby("test_run_id")["y"].transform("size")
    repeated = baseline[counts >= 2]
    per_run = baseline.groupby("test_run_id")["y"].size()
    mean_inverse_n = float((1.0 / per_run).mean())
    if repeated.empty:
        return None, mean_inverse_n
    residuals = repeated["y"] - repeated.groupby("test_run_id")["y"].transform("mean")
    # Clip wild residuals (a stalled node) at 5 robust sigmas so one does not set the noise.
    scale = MAD_TO_SIGMA * float(np.median(np.abs(residuals))) or float(residuals.std()) or 0.0
    if scale > 0:
        residuals = residuals.clip(-5 * scale, 5 * scale)
    degrees = int((repeated.groupby("test_run_id").size() - 1).sum())
    return float((residuals ** 2).sum() / degrees), mean_inverse_n


def _compare(run: np.ndarray, baseline: pd.DataFrame, settings: GateSettings) -> dict:
    """One (metric, test): the run's values against the baseline's (columns test_run_id, value)."""
    values = np.concatenate([run, baseline["value"].to_numpy(float)])
    log_scale = _log_scale(values)
    transform = np.log if log_scale else (lambda x: np.asarray(x, float))
    baseline = baseline.assign(y=transform(baseline["value"].to_numpy(float)))
    run_y = transform(run)
    run_means = baseline.groupby("test_run_id")["y"].mean().to_numpy()
    runs = len(run_means)
    center = float(np.median(run_means))
    between = _robust_variance(run_means)
    within, mean_inverse_n = _within_run_variance(baseline)
    n = len(run_y)
    if within is None:
        run_variance = between  # no repeats to learn from: treat the run's mean as one measurement
    else:
        run_to_run = max(0.0, between - within * mean_inverse_n)
        run_variance = run_to_run + within / n
    floor = settings.noise_floor if log_scale else settings.noise_floor * abs(center)
    # A baseline stuck at zero (failure rates, retries) has no scale at all; the tiny
    # absolute floor keeps t finite, and a zero level gets no relative verdict below.
    spread = float(np.sqrt(max(run_variance + between / runs, floor ** 2, 1e-24)))
    difference = float(run_y.mean() - center)
    if log_scale:
        baseline_value, run_value = float(np.exp(center)), float(np.exp(run_y.mean()))
        change = float(np.expm1(difference) * 100)
    else:
        baseline_value, run_value = center, float(run_y.mean())
        change = float(difference / abs(center) * 100) if abs(center) > 1e-12 else None
    return {"baseline_value": baseline_value, "run_value": run_value, "change_percent": change,
            "t": difference / spread, "spread": spread, "log_scale": log_scale,
            "run_measurements": n, "baseline_runs": runs,
            "baseline_measurements": len(baseline)}


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control)."""
    p_values = np.asarray(p_values, float)
    m = len(p_values)
    if m == 0:
        return p_values
    order = np.argsort(p_values)
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p_values[order]))
    result = np.empty(m)
    result[order] = adjusted
    return result


def compare_run(run: pd.DataFrame, baseline: pd.DataFrame, *,
                threshold_percent: Callable[[str], float],
                settings: GateSettings = GateSettings()) -> pd.DataFrame:
    """Judge every (metric, test) of `run` against `baseline`.

    Both frames have columns metric_name, test_name (None for run-wide metrics),
    test_run_id and value, with canonical metric names and units; where `run` has node_id,
    the reason of a regression names the nodes its measurements came from (one sick node
    fails the builds that land on it, and the person reading the verdict should see that).
    """
    rows = []
    # Run-wide metrics have no test: group them under "" so both frames key alike.
    run = run.assign(test_key=run["test_name"].fillna(""))
    baseline = baseline.assign(test_key=baseline["test_name"].fillna(""))
    baseline_groups = dict(iter(baseline.groupby(["metric_name", "test_key"], sort=False)))
    for (metric, test), group in run.groupby(["metric_name", "test_key"], sort=True):
        history = baseline_groups.get((metric, test))
        test = test or None
        direction = catalog.get_metric(metric).direction
        row = {"metric_name": metric, "test_name": test, "direction": direction.value,
               "threshold_percent": float(threshold_percent(metric)),
               "run_measurements": len(group),
               "nodes": sorted(group["node_id"].dropna().unique()) if "node_id" in group else []}
        runs = 0 if history is None else history["test_run_id"].nunique()
        if runs < settings.min_baseline_runs:
            row.update(verdict=NO_BASELINE, baseline_runs=runs,
                       reason=f"{runs} baseline run(s); {settings.min_baseline_runs} needed")
            rows.append(row)
            continue
        row.update(_compare(group["value"].to_numpy(float), history, settings))
        worse = 1.0 if direction == catalog.Direction.LOWER_IS_BETTER else -1.0
        row["t"] *= worse
        row["p_value"] = float(stats.t.sf(row["t"], df=row["baseline_runs"] - 1))
        rows.append(row)
    result = pd.DataFrame(rows)
    if result.empty:
        return pd.DataFrame(columns=COLUMNS)
    if "p_value" not in result:
        result["p_value"] = np.nan
    tested = result["p_value"].notna()
    result["p_adjusted"] = np.nan
    result.loc[tested, "p_adjusted"] = holm(result.loc[tested, "p_value"].to_numpy())
    family = int(tested.sum())
    for column in ("verdict", "detectable_percent", "reason"):
        result[column] = result[column].astype(object) if column in result else None
    for index in result.index[tested]:
        verdict, detectable, reason = _verdict(result.loc[index], family, settings)
        nodes = result.at[index, "nodes"]
        if verdict in (REGRESSION, POSSIBLE, SMALL) and nodes:
            reason += f"; measured on {_names(nodes)}"
        result.at[index, "verdict"] = verdict
        result.at[index, "detectable_percent"] = detectable
        result.at[index, "reason"] = reason
    for column in COLUMNS:
        if column not in result:
            result[column] = None
    order = {verdict: rank for rank, verdict in enumerate(VERDICT_ORDER)}
    result = result.assign(_rank=result["verdict"].map(order)).sort_values(
        ["_rank", "p_adjusted", "metric_name", "test_name"], na_position="last")
    return result[COLUMNS].reset_index(drop=True)


def _names(nodes: list[str], shown: int = 3) -> str:
    more = len(nodes) - shown
    return ", ".join(nodes[:shown]) + (f" and {more} more" if more > 0 else "")


def _verdict(row: pd.Series, family: int, settings: GateSettings) -> list:
    degrees = int(row["baseline_runs"]) - 1
    worse = 1.0 if row["direction"] == catalog.Direction.LOWER_IS_BETTER.value else -1.0
    # The size this comparison detects nine times in ten at the family's bar (Bonferroni).
    reach = (stats.t.isf(settings.alpha / family, degrees) + stats.t.isf(0.1, degrees)) * row["spread"]
    if row["log_scale"]:
        detectable = float(np.expm1(reach) * 100)
    elif row["baseline_value"]:
        detectable = float(reach / abs(row["baseline_value"]) * 100)
    else:
        detectable = None
    change = row["change_percent"]
    worsening = None if change is None or pd.isna(change) else float(change) * worse
    bar = settings.min_effect_share * row["threshold_percent"]
    significant = row["p_adjusted"] < settings.alpha
    if worsening is None:
        return [OK, detectable, "baseline level is zero: no relative change to judge"]
    if significant and worsening >= bar:
        return [REGRESSION, detectable,
                f"{worsening:.1f}% worse than the last {int(row['baseline_runs'])} runs "
                f"(p={row['p_adjusted']:.2g} after Holm over {family} comparisons)"]
    if worsening >= row["threshold_percent"]:
        return [POSSIBLE, detectable,
                f"{worsening:.1f}% worse, but this test's noise hides it (p={row['p_adjusted']:.2g}; "
                f"detectable from about {detectable:.0f}%)" if detectable is not None else
                f"{worsening:.1f}% worse, but not significant"]
    if significant and worsening > 0:
        return [SMALL, detectable, f"{worsening:.1f}% worse: real, but under {bar:.1f}%"]
    # Improvements are judged by the same bar as regressions (the test is two-sided in effect).
    improved = stats.t.cdf(row["t"], degrees) * family
    if worsening <= -bar and improved < settings.alpha:
        return [IMPROVEMENT, detectable, f"{-worsening:.1f}% better"]
    return [OK, detectable, ""]

"""Change points: lasting shifts in a series' level, confirmed, located and sized.

`detect_change_points(values)` works in four steps:

1. **Prepare.** Positive skewed series (durations) are analysed in log space, so a step is
   a ratio and log-normal noise becomes symmetric. A periodic cycle, found by the
   autocorrelation of the series around its rolling median (or given as `period`), is
   removed by subtracting each phase's median. Isolated outliers are clipped to the
   rolling median ± 4 robust σ, so one spike cannot make a segment.
2. **Segment.** ruptures' PELT (the C-accelerated linear-kernel cost, which is the L2
   cost) with a penalty calibrated to the series: `penalty_factor · σ² · log n`, σ being
   the robust noise level from first differences. A cheap CUSUM screen skips the
   segmentation for series whose largest standardized cumulative deviation is too small
   for any change to pass the later tests.
3. **Confirm.** Each candidate is tested between its neighbouring segments: a
   Mann–Whitney test (robust to skew and bimodality) whose variance is inflated for the
   residuals' lag-1 autocorrelation, and a minimum effect size in noise units. Candidates
   that fail are merged away and the rest re-tested, until all stand.
4. **Ramps.** Where a run of same-direction steps is better explained by a straight line
   (a gradual drift), it is reported once, as a ramp from its start.

The result is a list of `ChangePoint`s with the index of the first value of the new
regime, robust levels before and after (medians, in the caller's units), the magnitude in
percent, the p-value and whether it is a regression or an improvement for the metric's
direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ruptures as rpt
from scipy import stats

from perf_pipeline.analysis.robust import MAD_TO_SIGMA, ar1_variance_inflation, lag1_autocorrelation

LOWER_IS_BETTER = "lower_is_better"
HIGHER_IS_BETTER = "higher_is_better"


@dataclass(frozen=True)
class ChangePoint:
    index: int  # position of the first value of the new regime
    before: float
    after: float
    magnitude_percent: float | None  # None when the level before is ~0
    p_value: float
    kind: str  # "regression" | "improvement"
    shape: str = "step"  # "step" | "ramp"
    effect_size: float = 0.0  # shift in units of the series' noise
    end_index: int | None = None  # for a ramp: first value after it ends
    timestamp: object | None = None


@dataclass(frozen=True)
class DetectorSettings:
    # PELT penalty in units of sigma^2 * log(n).
    penalty_factor: float = 3.0
    # Smallest segment, in points, either side of a change.
    min_size: int = 5
    # Confirmation: Mann–Whitney p-value (after the autocorrelation correction) ...
    alpha: float = 1e-4
    # ... and a shift of at least this many noise sigmas.
    min_effect: float = 0.6
    # CUSUM screen: series whose max standardized bridge stays below this never reach PELT.
    screen_threshold: float = 1.1
    # Outliers beyond this many robust sigmas from the rolling median are clipped.
    clip_sigmas: float = 4.0


DEFAULT_SETTINGS = DetectorSettings()
# A cycle must cut the spread of lag-p differences to this share of the lag-p/2 ones.
_PERIOD_RATIO = 0.7


def robust_sigma(values: np.ndarray) -> float:
    """Noise level from first differences: insensitive to steps and slow level changes."""
    if len(values) < 3:
        return 0.0
    diffs = np.diff(values)
    return float(MAD_TO_SIGMA * np.median(np.abs(diffs - np.median(diffs))) / np.sqrt(2))


def _rolling_median(values: np.ndarray, window: int) -> np.ndarray:
    window = max(3, min(window, len(values)) | 1)
    half = window // 2
    padded = np.pad(values, half, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, window)
    return np.median(windows, axis=1)


def _spread(values: np.ndarray) -> float:
    """Mean absolute deviation from the median: robust to outliers, but unlike the median
    absolute deviation it does not jump between the modes of a bimodal series."""
    return float(np.mean(np.abs(values - np.median(values))))


def find_period(values: np.ndarray, *, max_period: int | None = None) -> int | None:
    """The cycle length of a clear periodic pattern (at least three cycles), or None.

    For a cycle of length p, differences at lag p cancel it while differences at lag p/2
    double it; on noise, steps or AR(1) load both spread alike. The period is the shortest
    lag whose spread ratio is well below one (and near the best): robust to a step in the
    middle, which defeats the plain autocorrelation of a short series.
    """
    n = len(values)
    max_period = min(max_period or n // 3, n // 3)
    ratios = {}
    for lag in range(4, max_period + 1, 2):
        half = _spread(values[lag // 2:] - values[: -(lag // 2)])
        if half > 0:
            ratios[lag] = _spread(values[lag:] - values[:-lag]) / half
    if not ratios or min(ratios.values()) > _PERIOD_RATIO:
        return None
    # The shortest lag that cancels the cycle about as well as the best (multiples of the
    # period do too); then, around it and odd lags included, the one whose phase profile
    # leaves the least behind. A multiple of the period is harmless: it holds whole cycles.
    best = min(ratios.values())
    shortest = min(lag for lag, ratio in ratios.items() if ratio <= best * 1.1)
    around = range(max(4, shortest - 2), min(max_period, shortest + 2) + 1)
    return min(around, key=lambda lag: _spread(np.diff(remove_cycle(values, lag))))


def remove_cycle(values: np.ndarray, period: int) -> np.ndarray:
    """Values minus the median of their phase of the cycle (around the rolling level)."""
    level = _rolling_median(values, 2 * period + 1)
    phases = np.arange(len(values)) % period
    deviations = values - level
    profile = np.array([np.median(deviations[phases == p]) for p in range(period)])
    return values - (profile - profile.mean())[phases]


def cusum_statistic(values: np.ndarray, sigma: float) -> float:
    """Largest standardized deviation of the cumulative sum from its bridge."""
    n = len(values)
    if n < 4 or sigma <= 0:
        return 0.0
    centred = np.cumsum(values - values.mean())
    return float(np.max(np.abs(centred)) / (sigma * np.sqrt(n)))


def _segment_residuals(x: np.ndarray, bounds: list[int]) -> np.ndarray:
    starts = [0, *bounds]
    ends = [*bounds, len(x)]
    return np.concatenate([x[a:b] - np.median(x[a:b]) for a, b in zip(starts, ends)])


def _refine(x: np.ndarray, bounds: list[int], min_size: int) -> list[int]:
    """Each boundary moved, within min_size, to where the two neighbouring segments' absolute
    deviations from their medians are least: PELT's squared cost lets one heavy-tailed value
    near the step pull the boundary off the first changed run."""
    refined = list(bounds)
    for i, k in enumerate(refined):
        low = (refined[i - 1] if i else 0) + min_size
        high = (refined[i + 1] if i + 1 < len(refined) else len(x)) - min_size
        start, end = (refined[i - 1] if i else 0), (refined[i + 1] if i + 1 < len(refined) else len(x))

        def cost(split: int) -> float:
            left, right = x[start:split], x[split:end]
            return float(np.abs(left - np.median(left)).sum() + np.abs(right - np.median(right)).sum())

        candidates = range(max(low, k - min_size), min(high, k + min_size) + 1)
        if candidates:
            refined[i] = min(candidates, key=lambda split: (cost(split), abs(split - k)))
    return refined


def _confirm(x: np.ndarray, bounds: list[int], sigma: float, settings: DetectorSettings
             ) -> list[tuple[int, float, float]]:
    """Drop the weakest unconfirmed boundary until every one stands; (index, p, effect)."""
    bounds = list(bounds)
    while bounds:
        residuals = _segment_residuals(x, bounds)
        inflation = np.sqrt(ar1_variance_inflation(lag1_autocorrelation(residuals)))
        # Effects in units of the residuals' own spread: the difference-based sigma
        # understates the noise of autocorrelated series and would overstate their shifts.
        spread = max(sigma, MAD_TO_SIGMA * float(np.median(np.abs(residuals))))
        edges = [0, *bounds, len(x)]
        results = []
        for i, k in enumerate(bounds):
            left, right = x[edges[i]:k], x[k:edges[i + 2]]
            effect = abs(np.median(right) - np.median(left)) / spread
            u = stats.mannwhitneyu(left, right, alternative="two-sided", method="asymptotic")
            z = stats.norm.isf(max(u.pvalue, 1e-300) / 2) / inflation
            results.append((k, float(2 * stats.norm.sf(z)), float(effect)))
        failing = [r for r in results if r[1] >= settings.alpha or r[2] < settings.min_effect]
        if not failing:
            return results
        weakest = max(failing, key=lambda r: (r[1], -r[2]))
        bounds.remove(weakest[0])
    return []


def _ramp_between(x: np.ndarray, start: int, end: int) -> bool:
    """Whether x[start:end] is better described by one straight line than by steps."""
    segment = x[start:end]
    t = np.arange(len(segment))
    if len(segment) < 8:
        return False
    fit = stats.linregress(t, segment)
    residual = segment - (fit.intercept + fit.slope * t)
    step_residual = segment - np.where(t < len(t) // 2, np.median(segment[: len(t) // 2]),
                                       np.median(segment[len(t) // 2:]))
    return fit.pvalue < 1e-3 and np.sum(residual**2) < 0.8 * np.sum(step_residual**2)


def _as_prepared(values: np.ndarray, period: int | None, settings: DetectorSettings) -> np.ndarray:
    use_log = bool(np.all(values > 0)) and np.ptp(values) > 1e-9 * np.max(values) and (
        abs(stats.skew(np.log(values))) < abs(stats.skew(values)))
    x = np.log(values) if use_log else values.astype(float)
    cycle = period if period is not None else find_period(x)
    if cycle:
        x = remove_cycle(x, cycle)
    sigma = robust_sigma(x)
    if sigma > 0:
        level = _rolling_median(x, 2 * settings.min_size + 1)
        x = np.clip(x, level - settings.clip_sigmas * sigma, level + settings.clip_sigmas * sigma)
    return x


def detect_change_points(values: Sequence[float], *, timestamps: Sequence | None = None,
                         direction: str = LOWER_IS_BETTER, period: int | None = None,
                         settings: DetectorSettings = DEFAULT_SETTINGS) -> list[ChangePoint]:
    """Confirmed lasting level changes in `values` (time order), oldest first."""
    if direction not in (LOWER_IS_BETTER, HIGHER_IS_BETTER):
        raise ValueError(f"direction must be {LOWER_IS_BETTER!r} or {HIGHER_IS_BETTER!r}")
    raw = np.asarray(values, dtype=float)
    keep = np.flatnonzero(np.isfinite(raw))
    y = raw[keep]
    if len(y) < 2 * settings.min_size:
        return []
    x = _as_prepared(y, period, settings)
    sigma = robust_sigma(x)
    if sigma == 0:
        sigma = float(np.std(x))
        if sigma == 0:
            return []
    if cusum_statistic(x, sigma) < settings.screen_threshold:
        return []
    penalty = settings.penalty_factor * sigma**2 * np.log(len(x))
    bounds = [int(b) for b in rpt.KernelCPD(kernel="linear", min_size=settings.min_size)
              .fit(x.reshape(-1, 1)).predict(pen=penalty)[:-1]]
    confirmed = _confirm(x, _refine(x, bounds, settings.min_size), sigma, settings)
    if not confirmed:
        return []

    sign = 1 if direction == LOWER_IS_BETTER else -1
    edges = [0, *[k for k, _, _ in confirmed], len(y)]

    def step_sign(m: int) -> float:  # direction of the m-th confirmed change
        return np.sign(np.median(y[edges[m + 1]:edges[m + 2]]) - np.median(y[edges[m]:edges[m + 1]]))

    changes: list[ChangePoint] = []
    i = 0
    while i < len(confirmed):
        # a run of same-direction changes that a straight line explains is one ramp
        j = i
        while (j + 1 < len(confirmed) and step_sign(j + 1) == step_sign(i)
               and _ramp_between(x, edges[i + 1] - settings.min_size, edges[j + 2] + settings.min_size)):
            j += 1
        k, p_value, effect = confirmed[i]
        shape, end = "step", None
        if j > i:
            shape, end = "ramp", int(keep[edges[j + 1]]) if edges[j + 1] < len(y) else None
            p_value = min(r[1] for r in confirmed[i:j + 1])
            effect = sum(r[2] for r in confirmed[i:j + 1])
        before = float(np.median(y[edges[i]:k]))
        after = float(np.median(y[edges[j + 1]:edges[j + 2]]))
        magnitude = (after - before) / abs(before) * 100 if abs(before) > 1e-9 else None
        worse = np.sign(after - before) * sign > 0
        changes.append(ChangePoint(
            index=int(keep[k]), before=before, after=after, magnitude_percent=magnitude,
            p_value=p_value, kind="regression" if worse else "improvement", shape=shape,
            effect_size=effect, end_index=end,
            timestamp=timestamps[int(keep[k])] if timestamps is not None else None))
        i = j + 1
    return changes

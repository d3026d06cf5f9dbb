"""Change points: lasting shifts in a series' level, confirmed, located and sized.

`detect_change_points(values)` works in five steps:

1. **Prepare.** Positive skewed series (durations) are analysed in log space, so a step is
   a ratio and log-normal noise becomes symmetric. A periodic cycle, found by the spread of
   lag differences (or given as `period`), is removed by subtracting each phase's median
   around the rolling level; once changes are found, the cycle is looked for and estimated
   again around the found levels, as a step both hides a cycle and bends its profile;
   where nothing is confirmed and no cycle was found, the cycle is looked for around the
   best single split (a 2σ step hides 4 cycles of a daily pattern in 100 hourly points
   now and then, and the unremoved cycle then hides the step).
   Outliers are clipped to the rolling median ± `clip_sigmas` robust σ.
2. **Segment.** ruptures' PELT (the C-accelerated linear-kernel cost, which is the L2
   cost) with a penalty calibrated to the noise: `penalty_factor · σ² · c(n)²`, c(n) being
   the critical value of step 3 for the whole series and σ the first-difference σ, then,
   where PELT's segments leave autocorrelated residuals, their long-run σ. A screen skips
   series whose largest CUSUM or MOSUM statistic stays below `screen_threshold`.
3. **Confirm.** Each candidate is tested between its neighbouring boundaries by the
   largest two-sample t over all splits of that stretch (and, where a side has under 30
   points, by a Mann–Whitney z too: short means of skewed noise have fat tails), in units
   of the long-run noise: AR(1) inflation from the residuals' lag-1 autocorrelation,
   corrected for the levels fitted (or from lag differences, where boundaries that follow
   the wander of autocorrelated noise have soaked it up), and for the degrees of freedom a
   removed cycle took. As segmentation picked the position, the statistic is judged as a
   maximum over positions: its tail probability (Siegmund's approximation with the
   discrete correction, widened for the error of the estimated inflation) must be at most
   `alpha` per point of the stretch, so stationary noise raises about `alpha` false
   changes per point at any length. Two neighbouring changes of opposite direction must
   also pass as an excursion, judged as the maximum over all stretches (both of its ends
   were picked). A change must shift the level by `min_effect` noise σ. Failing
   candidates are merged away and the rest located and tested again.
4. **Locate.** Each change is placed at the mode of the posterior of one step's position
   within its stretch (flat priors on the levels, Gaussian noise): the least-squares
   split, nudged off the stretch's ends; the choice most often exactly right.
5. **Ramps.** A run of same-direction steps, or a single step, that a ramp (flat,
   straight line, flat) explains better than the staircase or a single step, by BIC, is
   reported once, as a ramp from the fitted start of the line to its end (a drift over
   50 points is usually confirmed as one step at its middle). A single step becomes a
   ramp only where the fitted line is at least `_MIN_RAMP` points long and wins by a
   margin (`_RAMP_MARGIN`), and the BIC's likelihood ratio is divided by the noise's AR(1)
   variance inflation, as autocorrelated noise makes a sharp step look smooth. A ramp's
   fitted start is uncertain (a 3σ ramp over 50 points: about ±6 points).

The result is a list of `ChangePoint`s with the index of the first value of the new
regime, robust levels before and after (medians, in the caller's units), the magnitude in
percent, the p-value (of the maximum over the stretch, so comparable across lengths) and
whether it is a regression or an improvement for the metric's direction.

Limits that no tuning removes (figures from perf_pipeline_tests/benchmarks):
- Even a locator told there is exactly one step puts a 1σ step on white noise within 5
  points only ~85% of the time, at any length (the argmax of a random walk with drift):
  "1σ within 5 points ≥ 90%" is out of reach on every family. For a 2σ step the
  least-squares split manages ~99.0–99.3%; a locator that maximised the posterior mass
  within ±5 points would reach ~99.7%, but would place the step exactly right a third as
  often, and the exact run is what attribution needs.
- AR(1) noise with φ = 0.5 has a long-run σ √3 times its marginal σ, and φ itself is
  known only to ±0.09 from 100 points: a 1σ step at n = 100 (z ≈ 2.6 against a critical
  value near 3.9) is mostly missed, and a 2σ step is placed within 5 points at most ~94%
  of the time at any length.
- With 4 cycles (a daily cycle in 100 hourly points), a 2σ step keeps the cycle from
  being found, or the cycle's estimate is poor enough to hide the step, in ~1 series in
  10 (~1 in 8 before the cycle was also looked for around the best split).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import ruptures as rpt
from scipy import ndimage, optimize
from scipy.special import ndtr, ndtri

from perf_pipeline.analysis.robust import MAD_TO_SIGMA, ar1_variance_inflation, mostly_one_value

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
    # PELT penalty as a share of the cost of a step at the confirmation's critical value:
    # below one, so segmentation proposes every change that confirmation could accept.
    penalty_factor: float = 0.5
    # Smallest segment, in points, either side of a change.
    min_size: int = 5
    # False changes per point of stationary noise that confirmation allows (a third of the
    # 1-in-10,000 budget: the rest covers misestimated autocorrelation and cycles).
    alpha: float = 3e-5
    # A change must also shift the level by this many noise sigmas.
    min_effect: float = 0.5
    # Screen: series whose largest standardized CUSUM or MOSUM statistic (in units of the
    # first-difference sigma) stays below this never reach PELT.
    screen_threshold: float = 2.5
    # Outliers beyond this many robust sigmas from the rolling median are clipped.
    clip_sigmas: float = 3.0


DEFAULT_SETTINGS = DetectorSettings()
# A cycle must cut the spread of lag-p differences to this share of the lag-p/2 ones.
_PERIOD_RATIO = 0.7
# Lags whose differences `_lag_spreads` handles at once.
_LAG_ROWS = 32
# Rows at least this long have their medians selected rather than sorted.
_SELECTION_WIDTH = 256
# No stretch is judged at a false-alarm probability above this, however long it is.
_MAX_STRETCH_ALPHA = 0.5
# Series where one value holds half the points (rare-event counts, rates at 100%) are
# judged by permutation: enough random orders to tell a p-value this many times smaller
# than the stretch's alpha, up to a limit.
_PERMUTATION_RESOLUTION = 20
_MAX_PERMUTATIONS = 20_000
_MIN_RARE_PER_SIDE = 1.0
# A mean of fewer points than this keeps too much of skewed or heavy-tailed noise for the
# t's normal tail: where a side is this short, a rank test must pass as well.
_SHORT_SIDE = 30
# A single change is reported as a ramp only where the fitted ramp is at least this long.
_MIN_RAMP = 10
# Where nothing is confirmed and no cycle found, look for a cycle around the best split.
_HIDDEN_CYCLE = True
# A single change becomes a ramp only where the ramp wins by this many parameters' worth of
# BIC more: at 0, 0.7% of sharp 2σ steps became ramps (moved to the ramp's start); at 0.5,
# as few as before single changes were offered a ramp.
_RAMP_MARGIN = 0.5
# A difference between neighbours of a clipped series (see _clipped) larger than this
# many first-difference sigmas is a step's, not the noise's (see _lag1_from_differences):
# twice the default clip, the most two clipped noise values can differ around one level.
# At 8, a step of 6-8 sigmas was kept and read as autocorrelation, and hid itself: a 30%
# step 14 points from the end of a node's 45 runs was missed in 4 series of 20 at 8 and in
# 2 at 6 (1 once the boundaries' own differences are left out too); the noise-only false
# alarms and the labelled suite's figures are the same at 5, 6 and 8.
_STEP_DIFFERENCE = 6.0


def _median(values: np.ndarray) -> float:
    """np.median of a 1-D array of finite values (the middle value, or the mean of the two
    middle ones), without np.median's checks, which cost more than the selection itself
    on the short stretches that detection takes thousands of medians of."""
    n = len(values)
    if n == 0:
        return math.nan
    middle = n // 2
    # summed from 0.0 as np.median's mean of the middle values is (so -0.0 becomes 0.0)
    if n % 2:
        return float(0.0 + np.partition(values, middle)[middle])
    ordered = np.partition(values, (middle - 1, middle))
    return float((0.0 + ordered[middle - 1] + ordered[middle]) / 2)


def robust_sigma(values: np.ndarray) -> float:
    """Noise level from first differences: insensitive to steps and slow level changes."""
    if len(values) < 3:
        return 0.0
    diffs = np.diff(values)
    return float(MAD_TO_SIGMA * _median(np.abs(diffs - _median(diffs))) / np.sqrt(2))


# np.pad's names for how a series is extended past its ends, as scipy.ndimage calls them
_NDIMAGE_EDGES = {"edge": "nearest", "reflect": "mirror"}


def _rolling_median(values: np.ndarray, window: int, *, edges: str = "edge") -> np.ndarray:
    """Centred rolling median of finite values; `edges` is how np.pad would extend the
    series at its ends ("edge": repeat the end value; "reflect": mirror it, the end value
    once). The window is odd, so each median is one of the values: scipy's median filter
    gives exactly np.median of the padded windows, in a fifth (window of 11 points) to a
    fiftieth (97 points) of the time. Removing a cycle takes one over two cycles' points; on
    the M benchmark's window, where node samples have a daily cycle, NumPy's rolling medians
    were a sixth of detection."""
    window = max(3, min(window, len(values)) | 1)
    return ndimage.median_filter(values, size=window, mode=_NDIMAGE_EDGES[edges])


def _spread(values: np.ndarray) -> float:
    """Mean absolute deviation from the median: robust to outliers, but unlike the median
    absolute deviation it does not jump between the modes of a bimodal series."""
    return float(np.mean(np.abs(values - _median(values))))


def _lag_spreads(values: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """`_spread` of the lag-l differences for every lag l, a block of lags at a time."""
    n = len(values)
    block = max(1, 2_000_000 // n)  # lags per block: about 2 million differences at once
    spreads = np.empty(len(lags))
    for first in range(0, len(lags), block):
        # rows padded to the block's longest; a few rows at a time, as arrays that stay in
        # the cache are several times faster to fill, select from and sum
        width = n - int(lags[first:first + block].min())
        for low in range(first, min(first + block, len(lags)), _LAG_ROWS):
            chunk = lags[low:min(low + _LAG_ROWS, first + block)]
            lengths = n - chunk
            valid = np.arange(width) < lengths[:, None]
            diffs = np.full(valid.shape, np.inf)
            for row, lag in enumerate(chunk.tolist()):
                diffs[row, :n - lag] = values[lag:] - values[:n - lag]
            deviations = np.where(valid, np.abs(diffs - _row_medians(diffs, lengths)[:, None]), 0.0)
            spreads[low:low + len(chunk)] = deviations.sum(axis=1) / lengths
    return spreads


def _row_medians(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The median of the first `lengths[i]` values of each row i (the rest of it +inf).

    A selection at one position is several times faster than sorting the rows: each row's
    values are laid between as many -inf as +inf, so that in every row of a parity its
    middle lies at the same column; of an even count, the lower middle value is then the
    largest value left of that column."""
    width = rows.shape[1]
    if width < _SELECTION_WIDTH:  # short rows: one sort costs less than laying them out
        ordered = np.sort(rows, axis=1)
        every = np.arange(len(rows))
        return (ordered[every, (lengths - 1) // 2] + ordered[every, lengths // 2]) / 2
    medians = np.empty(len(rows))
    for parity in (0, 1):
        members = np.flatnonzero((width - lengths) % 2 == parity)
        if not len(members):
            continue
        span = width + parity
        balanced = np.full((len(members), span), np.inf)
        for row, member in enumerate(members.tolist()):
            pad = (span - lengths[member]) // 2
            balanced[row, :pad] = -np.inf
            balanced[row, pad:pad + lengths[member]] = rows[member, :lengths[member]]
        middle = span // 2
        selected = np.partition(balanced, middle, axis=1)
        if span % 2:
            medians[members] = selected[:, middle]
        else:
            medians[members] = (selected[:, :middle].max(axis=1) + selected[:, middle]) / 2
    return medians


def find_period(values: np.ndarray, *, max_period: int | None = None) -> int | None:
    """The cycle length of a clear periodic pattern (at least three cycles), or None.

    For a cycle of length p, differences at lag p cancel it while differences at lag p/2
    double it; on noise, steps or AR(1) load both spread alike. The period is the shortest
    lag whose spread ratio is well below one (and near the best): robust to a step in the
    middle, which defeats the plain autocorrelation of a short series.
    """
    n = len(values)
    max_period = min(max_period or n // 3, n // 3)
    lags = np.arange(4, max_period + 1, 2)
    if len(lags) == 0:
        return None
    # the half lags 2, 3, ..., and the full lags 4, 6, ... share the even lags up to
    # max_period / 2: each spread is computed once (a quarter fewer of them)
    needed = np.union1d(lags // 2, lags)
    spreads = _lag_spreads(values, needed)
    half = spreads[np.searchsorted(needed, lags // 2)]
    full = spreads[np.searchsorted(needed, lags)]
    usable = half > 0
    ratios = dict(zip(lags[usable].tolist(), (full[usable] / half[usable]).tolist()))
    if not ratios or min(ratios.values()) > _PERIOD_RATIO:
        return None
    # The shortest lag that cancels the cycle about as well as the best (multiples of the
    # period do too); then, around it and odd lags included, the one whose phase profile
    # leaves the least behind. A multiple of the period is harmless: it holds whole cycles.
    best = min(ratios.values())
    shortest = min(lag for lag, ratio in ratios.items() if ratio <= best * 1.1)
    around = range(max(4, shortest - 2), min(max_period, shortest + 2) + 1)
    return min(around, key=lambda lag: _cycle_leftover(values, lag))


def _cycle_leftover(values: np.ndarray, period: int) -> float:
    """Spread of what a cycle of this length leaves around the rolling level, per degree of
    freedom (a longer cycle has more phases to absorb noise with). Unlike the spread of
    first differences it sees a slow drift in phase, the mark of a slightly wrong length."""
    deviations = values - _rolling_median(values, 2 * period + 1)
    leftover = deviations - _cycle_profile(deviations, period)
    return _spread(leftover) * math.sqrt(len(values) / (len(values) - period))


def _cycle_profile(deviations: np.ndarray, period: int) -> np.ndarray:
    """Each phase's median deviation, centred: the cycle to subtract."""
    n = len(deviations)
    cycles = -(-n // period)
    # one column per phase, NaN past the end (sorted last): each column's middle values
    by_phase = np.sort(np.r_[deviations, np.full(cycles * period - n, np.nan)].reshape(cycles, period), axis=0)
    counts = np.where(np.arange(period) < n - (cycles - 1) * period, cycles, cycles - 1)
    phase = np.arange(period)
    profile = (0.0 + by_phase[(counts - 1) // 2, phase] + by_phase[counts // 2, phase]) / 2
    return (profile - profile.mean())[np.arange(n) % period]


def remove_cycle(values: np.ndarray, period: int) -> np.ndarray:
    """Values minus the median of their phase of the cycle (around the rolling level)."""
    return values - _cycle_profile(values - _rolling_median(values, 2 * period + 1), period)


def cusum_statistic(values: np.ndarray, sigma: float, *, min_size: int = 1) -> float:
    """Largest standardized deviation of the cumulative sum from its bridge: the z of the
    best single split (at least `min_size` points each side) for noise level `sigma`."""
    n = len(values)
    if n < 2 * min_size or n < 4 or sigma <= 0:
        return 0.0
    return float(np.max(np.abs(_split_z(values, min_size))) / sigma)


def _screen_statistic(values: np.ndarray, sigma: float, min_size: int) -> float:
    """The larger of `cusum_statistic` and the largest standardized difference between
    adjacent windows of min_size, 2·min_size, 4·min_size... points (a MOSUM): a short
    excursion in a long series hardly moves the cumulative sum, but stands out locally."""
    best = cusum_statistic(values, sigma, min_size=min_size)
    total = np.r_[0.0, np.cumsum(values)]
    width = min_size
    while 2 * width <= len(values) and sigma > 0:
        k = np.arange(width, len(values) - width + 1)
        difference = total[k + width] - 2 * total[k] + total[k - width]
        best = max(best, float(np.max(np.abs(difference))) / (sigma * math.sqrt(2 * width)))
        width *= 2
    return best


def _split_z(values: np.ndarray, min_size: int) -> np.ndarray:
    """Mean difference of each split (first `min_size`..n-`min_size` values on the left) in
    units of its standard error for unit noise."""
    n = len(values)
    k = np.arange(min_size, n - min_size + 1)
    bridge = np.cumsum(values - values.mean())[k - 1]
    return bridge / np.sqrt(k * (n - k) / n)


def _crossing_factor(x: np.ndarray) -> np.ndarray:
    """Siegmund's ν: the discrete-time correction to a Brownian boundary crossing."""
    half = np.maximum(x, 1e-9) / 2
    cdf = ndtr(half)
    pdf = np.exp(-half**2 / 2) / math.sqrt(2 * math.pi)
    return (cdf - 0.5) / half**2 / (cdf + pdf / half)


def _normal_density(z: float, scale_error: float) -> float:
    """The standard normal density at z, averaged over a noise scale that is estimated
    with log-scale standard error `scale_error` (which fattens the tail)."""
    widening = 1 + (z * scale_error) ** 2
    return math.exp(-z * z / (2 * widening)) / math.sqrt(2 * math.pi * widening)


def max_split_tail(z: float, length: int, min_size: int, scale_error: float = 0.0) -> float:
    """P(the largest |standardized split statistic| of `length` white-noise values exceeds
    z), splits leaving at least `min_size` values on each side (Siegmund–Yakir)."""
    k = np.arange(min_size, length - min_size + 1, dtype=float)
    if len(k) == 0 or z <= 0:
        return 1.0
    if math.isinf(z):
        return 0.0
    spacing = length / (k * (length - k))
    density = z * _normal_density(z, scale_error)
    return float(min(1.0, density * np.sum(_crossing_factor(z * np.sqrt(spacing)) * spacing)))


def max_excursion_tail(z: float, length: int, min_size: int, scale_error: float = 0.0) -> float:
    """P(the largest |standardized statistic| of a stretch inside `length` white-noise
    values, against the rest, exceeds z), every part at least `min_size` long: the
    two-parameter version of `max_split_tail` (Siegmund's approximation for a random field,
    checked against simulation). A short excursion can start and end anywhere, so it needs
    a larger z than one split."""
    inside = np.arange(min_size, length - 2 * min_size + 1, dtype=float)
    if len(inside) == 0 or z <= 0:
        return 1.0
    if math.isinf(z):
        return 0.0
    placements = length - inside - 2 * min_size + 1
    spacing = length / (2 * inside * (length - inside))
    density = z**3 * _normal_density(z, scale_error)
    crossing = _crossing_factor(z * np.sqrt(2 * spacing))
    return float(min(1.0, 2 * density * np.sum(placements * spacing**2 * crossing**2)))


def _stretch_alpha(length: int, alpha: float) -> float:
    return min(_MAX_STRETCH_ALPHA, alpha * length)


@lru_cache(maxsize=4096)
def critical_z(length: int, min_size: int, alpha: float) -> float:
    """The z that the largest split statistic of `length` noise values passes with
    probability `alpha` per value."""
    target = _stretch_alpha(length, alpha)
    return float(optimize.brentq(lambda z: max_split_tail(z, length, min_size) - target, 0.5, 12.0))


def _studentized(gain: float, total: float, length: int) -> float:
    """A mean difference's z from the fall `gain` it brings to the total sum of squares,
    in units of the noise left around the two levels (a two-sample t)."""
    within = (total - gain) / max(length - 2, 1)
    return math.sqrt(gain / within) if within > 0 else (math.inf if gain > 0 else 0.0)


def _max_split_t(window: np.ndarray, min_size: int) -> float:
    """The largest two-sample t over all splits of the window."""
    gain = _split_z(window, min_size) ** 2
    centred = window - window.mean()
    return _studentized(float(gain.max()), float(np.dot(centred, centred)), len(window))


def _excursion_t(window: np.ndarray, start: int, stop: int) -> float:
    """Two-sample t of window[start:stop] against the rest of the window."""
    m, inside = len(window), stop - start
    centred = window - window.mean()
    gain = centred[start:stop].sum() ** 2 * m / (inside * (m - inside))
    return _studentized(float(gain), float(np.dot(centred, centred)), m)


def _rank_z(window: np.ndarray, start: int, stop: int) -> float:
    """Mann–Whitney z of window[start:stop] against the rest of the window (ties averaged)."""
    m, inside = len(window), stop - start
    order = np.argsort(window, kind="stable")
    ordered = window[order]
    ranks = np.empty(m)
    ranks[order] = np.arange(1, m + 1, dtype=float)
    tie_term = 0.0
    ties = np.flatnonzero(np.diff(ordered) == 0)
    if len(ties):
        for group in np.split(ties, np.flatnonzero(np.diff(ties) > 1) + 1):
            members = order[group[0]:group[-1] + 2]
            ranks[members] = ranks[members].mean()
            tie_term += len(members) ** 3 - len(members)
    variance = inside * (m - inside) / 12 * ((m + 1) - tie_term / (m * (m - 1)))
    if variance <= 0:
        return 0.0
    rank_sum = ranks[start:stop].sum()
    z = float((rank_sum - inside * (m + 1) / 2) / math.sqrt(variance))
    if tie_term:
        return z
    # The normal approximation understates the far tail, which is where a step tens of
    # sigmas high puts the statistic: two sides wholly apart give at most z = 5.3 for 14
    # points against 31, which the noise's autocorrelation allowance then brought below
    # the critical value (a 12σ step 14 points from the end of 45 was missed 3 times in
    # 10). Near complete separation the exact tail is counted instead.
    u = rank_sum - inside * (inside + 1) / 2
    fewest = min(u, inside * (m - inside) - u)
    if fewest <= min(inside, m - inside, len(_PARTITIONS) - 1):
        tail = math.exp(math.log(float(_PARTITIONS[:int(fewest) + 1].sum()))
                        - (math.lgamma(m + 1) - math.lgamma(inside + 1) - math.lgamma(m - inside + 1)))
        z = math.copysign(max(abs(z), -float(ndtri(min(tail, 0.5)))), z)
    return z


def _partition_counts(limit: int) -> np.ndarray:
    """p(k), the number of partitions of k, for k < limit: the number of orderings of two
    samples with k pairs out of order (Mann–Whitney U = k), while k is at most either
    sample's size."""
    counts = np.zeros(limit)
    counts[0] = 1.0
    for part in range(1, limit):
        for k in range(part, limit):
            counts[k] += counts[k - part]
    return counts


_PARTITIONS = _partition_counts(64)


def _locate(x: np.ndarray, start: int, end: int, min_size: int) -> int:
    """The most probable position of a single step in x[start:end]: the mode of its
    posterior with flat priors on both levels and Gaussian noise (the least-squares split,
    nudged off the ends of the stretch, where a split leaves few points)."""
    segment = x[start:end]
    m = len(segment)
    if m < 2 * min_size + 1:
        return start + m // 2
    k = np.arange(min_size, m - min_size + 1)
    bridge = np.cumsum(segment - segment.mean())[k - 1]
    leverage = k * (m - k) / m
    gain = bridge**2 / leverage  # fall of the residual sum of squares at each split
    residual = (np.sum((segment - segment.mean()) ** 2) - gain.max()) / max(m - 2, 1)
    if residual <= 0:
        return start + int(k[np.argmax(gain)])
    return start + int(k[np.argmax(gain / (2 * residual) - 0.5 * np.log(leverage))])


def _segment_residuals(x: np.ndarray, bounds: list[int],
                       median: Callable[[int, int], float] | None = None) -> np.ndarray:
    """x minus the median of its segment; `median(a, b)` (of x[a:b]) may be a cached one."""
    median = median or (lambda a, b: _median(x[a:b]))
    edges = [0, *bounds, len(x)]
    return np.concatenate([x[a:b] - median(a, b) for a, b in zip(edges[:-1], edges[1:])])


def _residual_lag1(residuals: np.ndarray, segments: int) -> tuple[float, float]:
    """Lag-1 autocorrelation of the noise from residuals around `segments` fitted levels,
    clipped to [0, 0.9], and its standard error. Each fitted level pulls the raw estimate
    down by about (1 + 4ρ)/n (Marriott–Pope, once per level)."""
    n = len(residuals)
    centred = residuals - residuals.mean()
    total = float(np.dot(centred, centred))
    if n < 4 or total == 0:
        return 0.0, 0.0
    raw = float(np.dot(centred[1:], centred[:-1]) / total)
    rho = float(np.clip(raw + (1 + 4 * raw) * segments / n, 0.0, 0.9))
    return rho, math.sqrt((1 - rho**2) / n)  # Bartlett's standard error for AR(1)


@dataclass(frozen=True)
class _Noise:
    """What a set of boundaries leaves: the long-run noise scale of the residuals (relative
    to their own spread), its log-scale error, and their spread for effect sizes."""
    inflation: float
    log_error: float
    spread: float


def _lag1_from_differences(squares: tuple[np.ndarray, np.ndarray, np.ndarray],
                           bounds: tuple[int, ...] = ()) -> tuple[float, float]:
    """AR(1) coefficient from the mean squares of lag-1 and lag-2 differences (their ratio
    is 1 + φ), clipped to [0, 0.9], and its standard error (~1.4 √((1 + φ)/n) by
    simulation): noisier than residual autocorrelation, but it fits no levels, so no
    boundary can lower it, and a step moves it little. `squares`: `_difference_squares` of
    the series.

    A step is in one lag-1 and the two lag-2 differences around it, and of a step tens of
    sigmas high their squares swamp both mean squares, whose ratio then tends to 2 (φ =
    0.9: a +50% step on 1% noise hid itself in 187 series of 200). So a lag-1 difference
    of more than _STEP_DIFFERENCE first-difference sigmas is left out, with both lag-2
    differences that span it: detection clips the series to its rolling level ±
    `clip_sigmas` of those sigmas, so at the default 3 noise differs by at most 6 and the
    level's drift, while a step differs by its height. The differences across the
    `bounds` being judged are left out too, as their steps' (a smaller step, of a few
    sigmas, read as autocorrelation hid itself in a short series). Leaving out lag-1 and
    lag-2 differences each by its own size would drop one and keep the other of a step
    near the limit, which skews the ratio all the more."""
    one, two, jumps = squares
    n = len(one) + 1
    if n < 4:
        return 0.0, 0.0
    inside = [k - 1 for k in bounds if 0 < k < n]
    if inside:
        jumps = jumps.copy()
        jumps[inside] = True
    if jumps.any():
        one, two = one[~jumps], two[~(jumps[:-1] | jumps[1:])]
    mean_square = float(np.mean(one)) if len(one) else 0.0
    if mean_square == 0 or not len(two):
        return 0.0, 0.0
    rho = float(np.clip(np.mean(two) / mean_square - 1, 0.0, 0.9))
    return rho, 1.4 * math.sqrt((1 + rho) / n)


def _difference_squares(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(squared lag-1 differences, squared lag-2 differences, which lag-1 differences are
    a step's by their size) of a series."""
    lag1 = x[1:] - x[:-1]
    sigma = robust_sigma(x)
    jumps = np.abs(lag1) > _STEP_DIFFERENCE * sigma if sigma > 0 else np.zeros(len(lag1), dtype=bool)
    return lag1**2, (x[2:] - x[:-2]) ** 2, jumps


class _Stretches:
    """Statistics of x[a:b] that depend on the stretch alone, each computed once:
    confirmation judges most stretches again in every round of merging."""

    def __init__(self, x: np.ndarray, min_size: int):
        self.x, self.min_size = x, min_size
        self._known: dict[tuple, object] = {}

    def _once(self, key: tuple, compute: Callable[[], object]):
        if key not in self._known:
            self._known[key] = compute()
        return self._known[key]

    def median(self, a: int, b: int) -> float:
        return self._once(("median", a, b), lambda: _median(self.x[a:b]))

    def locate(self, a: int, b: int) -> int:
        return self._once(("locate", a, b), lambda: _locate(self.x, a, b, self.min_size))

    def max_split_t(self, a: int, b: int) -> float:
        return self._once(("split", a, b), lambda: _max_split_t(self.x[a:b], self.min_size))

    def rank_z(self, a: int, b: int, start: int, stop: int) -> float:
        return self._once(("rank", a, b, start, stop), lambda: _rank_z(self.x[a:b], start, stop))

    def excursion_t(self, a: int, b: int, start: int, stop: int) -> float:
        return self._once(("excursion", a, b, start, stop), lambda: _excursion_t(self.x[a:b], start, stop))

    def lag1_from_differences(self, bounds: tuple[int, ...]) -> tuple[float, float]:
        squares = self._once(("squares",), lambda: _difference_squares(self.x))
        return self._once(("differences", bounds), lambda: _lag1_from_differences(squares, bounds))


def _noise(x: np.ndarray, bounds: list[int], sigma: float, cycle: int | None,
           stretches: _Stretches | None = None) -> _Noise:
    stretches = stretches or _Stretches(x, 1)
    residuals = _segment_residuals(x, bounds, stretches.median)
    rho, rho_error = _residual_lag1(residuals, len(bounds) + 1)
    # Boundaries that follow the wander of autocorrelated noise take its autocorrelation
    # with them, and so help each other pass: where the residuals' estimate falls clearly
    # below the one from differences, the differences are believed.
    differenced, differenced_error = stretches.lag1_from_differences(tuple(bounds))
    if rho < differenced - 2 * differenced_error:
        rho, rho_error = differenced, differenced_error
    # AR(1) inflation, and the degrees of freedom a removed cycle took (one per phase),
    # which leave the residuals too small; the inflation's own error (1/(1 - ρ²) times
    # that of ρ, in log terms) fattens the tail, most for short series. Effects are in units
    # of the residuals' own spread: the difference-based sigma understates the noise of
    # autocorrelated series and would overstate their shifts.
    return _Noise(inflation=math.sqrt(ar1_variance_inflation(rho) * len(x) / (len(x) - (cycle or 0))),
                  log_error=rho_error / (1 - rho**2),
                  spread=max(sigma, MAD_TO_SIGMA * _median(np.abs(residuals))))


def _assess(x: np.ndarray, bounds: list[int], i: int, noise: _Noise, settings: DetectorSettings,
            stretches: _Stretches) -> tuple[tuple[int, float, float], float, float]:
    """Boundary i between its neighbours: ((index, p, effect), shortfall, direction), the
    shortfall being how far it is from passing (at most 1 passes)."""
    h = settings.min_size
    a = bounds[i - 1] if i else 0
    b = bounds[i + 1] if i + 1 < len(bounds) else len(x)
    k = bounds[i]
    p_value = max_split_tail(stretches.max_split_t(a, b) / noise.inflation, b - a, h, noise.log_error)
    if min(k - a, b - k) < _SHORT_SIDE:
        rank_z = abs(stretches.rank_z(a, b, 0, k - a)) / noise.inflation
        p_value = max(p_value, max_split_tail(rank_z, b - a, h, noise.log_error))
    shift = stretches.median(k, b) - stretches.median(a, k)
    shortfall = max(p_value / _stretch_alpha(b - a, settings.alpha),
                    settings.min_effect * noise.spread / max(abs(shift), 1e-300))
    return (k, p_value, abs(shift) / noise.spread), shortfall, float(np.sign(shift))


def _excursion_shortfall(x: np.ndarray, bounds: list[int], i: int, noise: _Noise,
                         settings: DetectorSettings, stretches: _Stretches) -> float:
    """How far boundaries i and i + 1, an excursion that reverts, are from passing as the
    most pronounced stretch of the span between their outer neighbours."""
    a = bounds[i - 1] if i else 0
    b = bounds[i + 2] if i + 2 < len(bounds) else len(x)
    start, stop = bounds[i] - a, bounds[i + 1] - a
    z = stretches.excursion_t(a, b, start, stop)
    if min(stop - start, b - a - (stop - start)) < _SHORT_SIDE:
        z = min(z, abs(stretches.rank_z(a, b, start, stop)))
    return (max_excursion_tail(z / noise.inflation, b - a, settings.min_size, noise.log_error)
            / _stretch_alpha(b - a, settings.alpha))


def _confirm(x: np.ndarray, candidates: list[int], sigma: float, settings: DetectorSettings,
             cycle: int | None) -> list[tuple[int, float, float]]:
    """The candidates that stand, located; (index, p, effect) each.

    Each boundary is tested between its neighbours as the best split of that stretch; two
    neighbouring boundaries of opposite direction (an excursion that reverts) are also
    tested together as the best stretch of the span around them, since both of its ends
    were picked to make it stand out. Candidates are located, judged, and the failing
    ones merged away until all that are left stand."""
    bounds = sorted(candidates)
    stretches = _Stretches(x, settings.min_size)
    while bounds:
        for i in range(len(bounds)):  # left to right, so boundaries keep their order
            bounds[i] = stretches.locate(bounds[i - 1] if i else 0,
                                         bounds[i + 1] if i + 1 < len(bounds) else len(x))
        noise = _noise(x, bounds, sigma, cycle, stretches)
        results, shortfalls, signs = [], [], []
        for i in range(len(bounds)):
            result, shortfall, sign = _assess(x, bounds, i, noise, settings, stretches)
            results.append(result)
            shortfalls.append(shortfall)
            signs.append(sign)
        for i in range(len(bounds) - 1):
            if signs[i] != signs[i + 1]:
                weaker = i if shortfalls[i] > shortfalls[i + 1] else i + 1
                shortfalls[weaker] = max(shortfalls[weaker],
                                         _excursion_shortfall(x, bounds, i, noise, settings, stretches))
        if max(shortfalls) <= 1:
            return results
        # Merge away every failing boundary that is weaker than its failing neighbours:
        # boundaries apart do not share a stretch, so this is one-at-a-time elimination
        # done in parallel.
        failing = [shortfall > 1 for shortfall in shortfalls]
        bounds = [k for i, k in enumerate(bounds) if not failing[i] or any(
            failing[j] and shortfalls[j] > shortfalls[i] for j in (i - 1, i + 1) if 0 <= j < len(bounds))]
    return []


def _best_ramp(segment: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[float, float, float]:
    """(residual sum of squares, start, end) of the best ramp (flat, a straight line from a
    start to an end, flat) over all the given starts and ends."""
    start, end = (grid.ravel() for grid in np.meshgrid(starts, ends, indexing="ij"))
    share = np.clip((np.arange(len(segment)) - start[:, None]) / np.maximum(end - start, 1.0)[:, None], 0.0, 1.0)
    share -= share.mean(axis=1, keepdims=True)
    centred = segment - segment.mean()
    sse = np.dot(centred, centred) - (share @ centred) ** 2 / np.maximum(np.sum(share**2, axis=1), 1e-300)
    best = int(np.argmin(sse))
    return float(sse[best]), float(start[best]), float(end[best])


def _fitted_ramp(x: np.ndarray, start: int, end: int, bounds: list[int],
                 inflation: float = 1.0) -> tuple[int, int] | None:
    """Where a ramp (flat, then a straight line, then flat) starts and ends, if it
    describes x[start:end], with a run of same-direction changes at `bounds`, better than
    the staircase of those changes or a single step does, by BIC; else None.

    The ramp's ends are fitted, up to the gap between the first and last change beyond
    each (a drift chopped into steps has them inside it). The ramp has two levels and two
    ends, the staircase a level and a position per step and one level more. Steps with
    flat stretches between them fit the ramp badly; so does one sharp step that noise
    split in two. A single change is offered a ramp too (a drift is often confirmed as
    one step), but only one at least `_MIN_RAMP` long: a sharp step must not be moved to
    the start of a short ramp. `inflation` (the noise's long-run variance over its
    variance) divides the likelihood ratios: autocorrelated noise fits smooth shapes."""
    segment = x[start:end]
    m, first, last = len(segment), bounds[0] - start, bounds[-1] - start
    gap = last - first
    if len(bounds) == 1:
        # a single change: ends up to the neighbouring changes, on a grid that is finest
        # near the change
        starts = np.unique(np.r_[first, first - np.geomspace(1, max(first, 1), 14).round()])
        ends = np.unique(np.r_[last, last + np.geomspace(1, max(m - 1 - last, 1), 14).round()])
        starts, ends = starts[starts >= 0], ends[ends <= m - 1]
    else:
        starts = np.unique(np.linspace(max(first - gap, 0), first, 12).round())
        ends = np.unique(np.linspace(last, min(last + gap, m - 1), 12).round())
    ramp_sse, ramp_start, ramp_end = _best_ramp(segment, starts, ends)
    # then to the point, around the best of the grid
    near = np.arange(-8, 9)
    starts = np.unique(np.clip(ramp_start + near, 0, first))
    ends = np.unique(np.clip(ramp_end + near, last, m - 1))
    ramp_sse, ramp_start, ramp_end = _best_ramp(segment, starts, ends)
    if len(bounds) == 1 and ramp_end - ramp_start < _MIN_RAMP:
        return None
    stair_edges = [0, *[k - start for k in bounds], m]
    stair_sse = sum(float(np.sum((part - part.mean()) ** 2))
                    for part in (segment[a:b] for a, b in zip(stair_edges[:-1], stair_edges[1:])))
    single_sse = float(np.dot(segment - segment.mean(), segment - segment.mean())
                       - np.max(_split_z(segment, 1) ** 2))

    def bic(sse: float, parameters: int) -> float:
        return m / inflation * math.log(max(sse, 1e-300) / m) + parameters * math.log(m)

    extra = _RAMP_MARGIN if len(bounds) == 1 else 0.0
    if bic(ramp_sse, 4 + extra) >= min(bic(stair_sse, 2 * len(bounds) + 1), bic(single_sse, 3)):
        return None
    # the first value off the old level (the start itself is still on it), and the first
    # on the new one
    return start + min(int(ramp_start) + 1, first), start + max(int(ramp_end), last)


def _log_if_skewed(values: np.ndarray) -> np.ndarray:
    if not (np.all(values > 0) and np.ptp(values) > 1e-9 * np.max(values)):
        return values.astype(float)
    logged = np.log(values)
    return logged if abs(_skewness(logged)) < abs(_skewness(values)) else values.astype(float)


def _skewness(values: np.ndarray) -> float:
    centred = values - values.mean()
    variance = float(np.mean(centred**2))
    return float(np.mean(centred**3) / variance**1.5) if variance > 0 else 0.0


def _clipped(x: np.ndarray, settings: DetectorSettings) -> np.ndarray:
    sigma = robust_sigma(x)
    if sigma <= 0:
        return x
    # Mirrored ends: repeating an edge value would let an outlier there set its own level.
    level = _rolling_median(x, 2 * settings.min_size + 1, edges="reflect")
    return np.clip(x, level - settings.clip_sigmas * sigma, level + settings.clip_sigmas * sigma)


def _piecewise_median(x: np.ndarray, bounds: list[int]) -> np.ndarray:
    edges = [0, *bounds, len(x)]
    return np.concatenate([np.full(b - a, _median(x[a:b])) for a, b in zip(edges[:-1], edges[1:])])


def _changes(x: np.ndarray, settings: DetectorSettings, cycle: int | None) -> list[tuple[int, float, float]]:
    """Confirmed changes of a prepared series: (index, p-value, effect)."""
    n, h = len(x), settings.min_size
    sigma = robust_sigma(x)
    if sigma == 0:
        sigma = float(np.std(x))
        if sigma == 0:
            return []
    if _screen_statistic(x, sigma, h) < settings.screen_threshold:
        return []
    critical = critical_z(n, h, settings.alpha)
    segmentation = rpt.KernelCPD(kernel="linear", min_size=h).fit(x.reshape(-1, 1))
    bounds = [int(b) for b in segmentation.predict(pen=settings.penalty_factor * sigma**2 * critical**2)[:-1]]
    if bounds:
        # The first-difference sigma understates autocorrelated noise, whose wander then
        # splits into many segments: segment again at the long-run noise level those
        # segments leave (itself understated, so no real change is lost).
        residuals = _segment_residuals(x, bounds)
        long_run = float(np.mean(residuals**2)) * ar1_variance_inflation(_residual_lag1(residuals, 1)[0])
        if long_run > sigma**2:
            bounds = [int(b) for b in segmentation.predict(pen=settings.penalty_factor * long_run * critical**2)[:-1]]
    return _confirm(x, bounds, sigma, settings, cycle)


def _max_split_z_rows(rows: np.ndarray, min_size: int) -> np.ndarray:
    """`max |_split_z|` of every row (unit noise: the rows share their values, so their
    spreads are equal and need not be divided out)."""
    n = rows.shape[1]
    k = np.arange(min_size, n - min_size + 1)
    bridge = np.cumsum(rows - rows.mean(axis=1, keepdims=True), axis=1)[:, k - 1]
    return np.max(np.abs(bridge) / np.sqrt(k * (n - k) / n), axis=1)


def _mode(values: np.ndarray) -> float:
    distinct, counts = np.unique(values, return_counts=True)
    return float(distinct[np.argmax(counts)])


def _permutation_changes(y: np.ndarray, settings: DetectorSettings) -> list[tuple[int, float, float]]:
    """Changes of a series whose values are mostly one value: (index, p-value, effect).

    Robust scales are zero there and the normal tail of a mean of rare events is wrong, so
    each stretch's best split is judged against the best splits of random orders of the
    same values (exact for independent values, whatever their distribution: a count of
    rare retries, a pass rate that sits at 100% and then drops), at the same per-point
    false-alarm rate as other series; a change found splits the stretch, and each side is
    judged again (binary segmentation)."""
    # Each side must be long enough to expect one of the values off the usual one: else a
    # handful of rare events that happen to sit at an end of the window pass for a change.
    rare = float(np.mean(y != _mode(y)))
    h = max(settings.min_size, math.ceil(_MIN_RARE_PER_SIDE / rare) if rare > 0 else 0)
    rng = np.random.default_rng(0)  # the same series always gets the same answer
    found: list[tuple[int, float, float]] = []

    def scan(a: int, b: int) -> None:
        x = y[a:b]
        m = len(x)
        if m < 2 * h or np.ptp(x) == 0:
            return
        z = np.abs(_split_z(x, h))
        k, observed = int(np.argmax(z)) + h, float(np.max(z))
        threshold = _stretch_alpha(m, settings.alpha)
        draws = int(min(_MAX_PERMUTATIONS, math.ceil(_PERMUTATION_RESOLUTION / threshold)))
        exceed = 0
        for first in range(0, draws, 2_000):
            rows = rng.permuted(np.tile(x, (min(2_000, draws - first), 1)), axis=1)
            exceed += int(np.sum(_max_split_z_rows(rows, h) >= observed * (1 - 1e-9)))
        # the share of random orders that split as well, the observed one counted among
        # them: never 0 (an alert read "p 0"), at least 1 / (draws + 1)
        p_value = (exceed + 1) / (draws + 1)
        spread = float(np.std(x))
        effect = abs(float(np.mean(x[k:]) - np.mean(x[:k]))) / spread if spread > 0 else 0.0
        if p_value > threshold or effect < settings.min_effect:
            return
        scan(a, a + k)
        found.append((a + k, p_value, effect))
        scan(a + k, b)

    scan(0, len(y))
    return sorted(found)


def detect_change_points(values: Sequence[float], *, timestamps: Sequence | None = None,
                         direction: str = LOWER_IS_BETTER, period: int | None = None,
                         settings: DetectorSettings = DEFAULT_SETTINGS) -> list[ChangePoint]:
    """Confirmed lasting level changes in `values` (time order), oldest first."""
    if direction not in (LOWER_IS_BETTER, HIGHER_IS_BETTER):
        raise ValueError(f"direction must be {LOWER_IS_BETTER!r} or {HIGHER_IS_BETTER!r}")
    if period is not None and period < 2:
        raise ValueError(f"period must be at least 2 points, got {period}")
    raw = np.asarray(values, dtype=float)
    keep = np.flatnonzero(np.isfinite(raw))
    y = raw[keep]
    if len(y) < 2 * settings.min_size:
        return []
    if mostly_one_value(y):
        return _changes_of_mostly_one_value(y, keep, timestamps, direction, settings)
    logged = _log_if_skewed(y)
    if period is not None and len(y) < 3 * period:
        period = None  # fewer than three cycles cannot be told from level changes
    cycle = period if period is not None else find_period(logged)
    x = _clipped(remove_cycle(logged, cycle) if cycle else logged, settings)
    confirmed = _changes(x, settings, cycle)
    if not confirmed and cycle is None and period is None and _HIDDEN_CYCLE:
        # A step can hide a cycle from the lag differences, and the cycle then hides the
        # step: look for a cycle around the best single split.
        deviations = logged - _piecewise_median(x, [_locate(x, 0, len(x), settings.min_size)])
        cycle = find_period(deviations)
        if cycle:
            x = _clipped(logged - _cycle_profile(deviations, cycle), settings)
            confirmed = _changes(x, settings, cycle)
    if confirmed:
        # A step loads the lag differences that reveal a cycle, and the rolling level lags it
        # and bends the phase profile: look for the cycle again around the found levels.
        deviations = logged - _piecewise_median(x, [k for k, _, _ in confirmed])
        cycle_around_levels = period if period is not None else find_period(deviations)
        if cycle or cycle_around_levels:
            x = _clipped(logged - _cycle_profile(deviations, cycle_around_levels)
                         if cycle_around_levels else logged, settings)
            confirmed = _changes(x, settings, cycle_around_levels)
    if not confirmed:
        return []

    sign = 1 if direction == LOWER_IS_BETTER else -1
    edges = [0, *[k for k, _, _ in confirmed], len(y)]

    def step_sign(m: int) -> float:  # direction of the m-th confirmed change
        return np.sign(_median(y[edges[m + 1]:edges[m + 2]]) - _median(y[edges[m]:edges[m + 1]]))

    # Autocorrelated noise fits a smooth shape better than white noise of the same spread:
    # its likelihood ratios count for 1/inflation as much when a ramp is weighed.
    inflation = _noise(x, edges[1:-1], robust_sigma(x), None).inflation ** 2
    changes: list[ChangePoint] = []
    i = 0
    while i < len(confirmed):
        # the longest run of same-direction changes from here that a ramp explains is one
        # ramp (judged whole: a few points of a drift hardly show a slope)
        last = i
        while last + 1 < len(confirmed) and step_sign(last + 1) == step_sign(i):
            last += 1
        j, ramp = i, None
        for candidate in range(last, i - 1, -1):
            ramp = _fitted_ramp(x, edges[i], edges[candidate + 2], edges[i + 1:candidate + 2], inflation)
            if ramp:
                j = candidate
                break
        k, p_value, effect = confirmed[i]
        shape, end = "step", None
        if ramp:
            (k, end), shape = ramp, "ramp"
            p_value = min(r[1] for r in confirmed[i:j + 1])
            effect = sum(r[2] for r in confirmed[i:j + 1])
        before = _median(y[edges[i]:k])
        after = _median(y[edges[j + 1]:edges[j + 2]])
        magnitude = (after - before) / abs(before) * 100 if abs(before) > 1e-9 else None
        worse = np.sign(after - before) * sign > 0
        changes.append(ChangePoint(
            index=int(keep[k]), before=before, after=after, magnitude_percent=magnitude,
            p_value=p_value, kind="regression" if worse else "improvement", shape=shape,
            effect_size=effect, end_index=int(keep[end]) if end is not None else None,
            timestamp=timestamps[int(keep[k])] if timestamps is not None else None))
        i = j + 1
    return changes


def _changes_of_mostly_one_value(y: np.ndarray, keep: np.ndarray, timestamps: Sequence | None,
                                 direction: str, settings: DetectorSettings) -> list[ChangePoint]:
    """`_permutation_changes` as ChangePoints: levels are means (the median of a rare-event
    count is 0 on both sides), and every change is a step."""
    confirmed = _permutation_changes(y, settings)
    edges = [0, *[k for k, _, _ in confirmed], len(y)]
    sign = 1 if direction == LOWER_IS_BETTER else -1
    changes = []
    for m, (k, p_value, effect) in enumerate(confirmed):
        before, after = float(np.mean(y[edges[m]:k])), float(np.mean(y[k:edges[m + 2]]))
        magnitude = (after - before) / abs(before) * 100 if abs(before) > 1e-9 else None
        changes.append(ChangePoint(
            index=int(keep[k]), before=before, after=after, magnitude_percent=magnitude,
            p_value=p_value, kind="regression" if np.sign(after - before) * sign > 0 else "improvement",
            effect_size=effect, timestamp=timestamps[int(keep[k])] if timestamps is not None else None))
    return changes

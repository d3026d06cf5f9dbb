"""Anomalies: single odd values in a series, and odd nodes among their peers.

`detect_point_anomalies(values)` scores every point by its robust z-score: its distance from
the centred rolling median in units of the rolling median absolute deviation (MAD) on its
own side of the median (a double MAD, so skewed noise is judged by its long side), never
below the whole series' MAD. Points at `threshold` robust σ or more are anomalies; up to
`max_burst` consecutive ones are one burst. A longer run is a lasting change of level,
which change-point detection reports, so it is not listed here. Multiplicative metrics
(durations) are scored on a log scale (`log_scale=True`), series whose noise may be either
both ways (`log_scale=None`), and series with a cycle (hourly samples with a daily one)
lose the cycle first (`period`).

`fleet_anomalies(series)` runs it over every series of the window: per-test series net of
where each run's node stood at the time (a node that turned slow and stays slow is a change
point, not a spike in every test it runs) and against the larger of the test's spread and
the node's own noise, node series with their daily cycle removed, per-run CI metrics as
they are.

`node_health_outliers(frame, features=...)` looks for nodes (or node-days, from
`node_day_features`) whose combination of health metrics is unusual, with an isolation
forest on robustly standardized features, and names the features that set each apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.ensemble import IsolationForest

from perf_pipeline.analysis.change_points import remove_cycle
from perf_pipeline.analysis.regressions import points_per_day
from perf_pipeline.analysis.robust import MAD_TO_SIGMA, mostly_one_value
from perf_pipeline.parallel import MIN_POINTS, cores, process_map

# The spread is taken over this many times the level's window: spread changes more slowly
# than level, and a MAD of 25 points varies by a third, which alone let about 1.5 in 10,000
# Gaussian points past 6 σ (measured); over 75 points it is below 0.1 in 10,000.
_SCALE_WINDOW_FACTOR = 3
# The MAD is never taken below 1% of the level (or 1% on a log scale): a flat or coarsely
# quantized stretch has a MAD of zero, and a 1-unit step in a series stuck at 50 should not
# be a 10^9 σ event. A single value must then differ by ~9% from a flat level to be flagged.
# The absolute 1e-9 only keeps a series flat at zero from dividing by zero.
_MAD_FLOOR_RELATIVE = 0.01
_MAD_FLOOR_ABSOLUTE = 1e-9
# A cycle is removed only when the series holds this many of them, as change-point detection
# requires to find one.
_MIN_CYCLES = 3

ANOMALY_COLUMNS = ["scope", "metric_name", "test_name", "node_id", "timestamp", "end_timestamp",
                   "test_run_id", "kind", "score", "value", "expected", "reason"]

# Fewer nodes than this cannot say what is normal.
_MIN_NODES = 5
# An isolation forest flags the most isolated rows of any sample, healthy or not. A node
# is an outlier only if some feature is also this far out: daily medians of skewed metrics
# (error rates near zero) reach 5 robust σ on a healthy node about once in 240 node-days
# (measured), and a fleet has thirty features. Features past _REASON_Z are its reason.
_OUTLIER_Z = 6.0
_REASON_Z = 3.0
_REASON_FEATURES = 4
# IQR of a normal distribution in σ.
_IQR_TO_SIGMA = 1.349


@dataclass(frozen=True)
class Anomaly:
    start_index: int
    end_index: int  # inclusive: equal to start_index for a single point
    kind: str  # "spike" | "dip" | "burst"
    score: float  # largest |robust z| in the run
    value: float  # the most extreme value of the run ...
    expected: float  # ... and the rolling median at the same point, in the caller's units
    reason: str
    peak_index: int = -1  # the most extreme point of the run
    start_timestamp: object | None = None
    end_timestamp: object | None = None


def _sorted_windows(x: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Every centred window of `x`, sorted (NaN last), and how many values each holds."""
    before = window // 2
    padded = np.pad(x, (before, window - 1 - before), constant_values=np.nan)
    windows = np.sort(sliding_window_view(padded, window), axis=-1)
    return windows, np.count_nonzero(~np.isnan(windows), axis=-1)


def _window_median(windows: np.ndarray, first: np.ndarray, count: np.ndarray,
                   min_periods: int) -> np.ndarray:
    """Median of each sorted window's `count` values from position `first` on."""
    last = windows.shape[1] - 1  # an empty stretch may start past the end: its median is NaN
    low = np.take_along_axis(windows, np.minimum(first + np.maximum(count - 1, 0) // 2, last)[:, None],
                             axis=-1)[:, 0]
    high = np.take_along_axis(windows, np.minimum(first + count // 2, last)[:, None], axis=-1)[:, 0]
    return np.where(count >= max(min_periods, 1), (low + high) / 2, np.nan)


def _rolling_median(x: np.ndarray, window: int, min_periods: int) -> np.ndarray:
    """Centred rolling median ignoring NaN: the same as pandas'
    `rolling(window, center=True, min_periods=min_periods).median()`, but one sort of a
    strided view, because pandas' ~0.5 ms per call would dominate 10,000 short series."""
    windows, count = _sorted_windows(x, window)
    return _window_median(windows, np.zeros_like(count), count, min_periods)


def _rolling_side_medians(deviation: np.ndarray, window: int,
                          min_periods: int) -> tuple[np.ndarray, np.ndarray]:
    """Centred rolling medians of the deviations ≥ 0 and of minus those ≤ 0, ignoring NaN,
    from one sort: in a sorted window the deviations ≤ 0 come first and those ≥ 0 last."""
    windows, count = _sorted_windows(deviation, window)
    negative = np.count_nonzero(windows < 0, axis=-1)
    positive = np.count_nonzero(windows > 0, axis=-1)
    upper = _window_median(windows, negative, count - negative, min_periods)
    lower = -_window_median(windows, np.zeros_like(count), count - positive, min_periods)
    return upper, lower


def _level_and_scale(x: np.ndarray, window: int, min_periods: int, *,
                     log_scale: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Rolling median and each point's robust σ on its own side of it (floored).

    The spread is a double MAD: the rolling median distance of the points above their
    rolling median (for points above) and of those below (for points below), × 1.4826. On
    symmetric noise both equal the MAD; on skewed noise (error rates near zero, waits with
    a long tail) the long side gets the larger scale, so its ordinary tail is not flagged
    while a dip on the short side still is. Distances are from each point's own rolling
    median, not from the median of the scale window: it keeps the spread small on both
    sides of a step instead of counting the step as spread."""
    level = _rolling_median(x, window, min_periods)
    deviation = x - level
    half_periods = max(min_periods // 2, 1)
    scale_window = _SCALE_WINDOW_FACTOR * window
    upper, lower = _rolling_side_medians(deviation, scale_window, half_periods)
    floor = _MAD_FLOOR_ABSOLUTE + _MAD_FLOOR_RELATIVE * (1.0 if log_scale else np.abs(level))
    # Never below the whole series' spread on that side: a MAD from a few dozen points is
    # itself noisy, and a window that happens to be calm would turn ordinary values into
    # 6 σ events (measured: 20 false spikes in 170,000 simulated node samples without it).
    upper = np.fmax(upper, np.nanmedian(np.where(deviation >= 0, deviation, np.nan)))
    lower = np.fmax(lower, np.nanmedian(np.where(deviation <= 0, -deviation, np.nan)))
    mad = np.where(deviation >= 0, upper, lower)
    return level, MAD_TO_SIGMA * np.maximum(mad, floor)  # NaN where the MAD is


def _as_float(values: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    return np.where(np.isfinite(x), x, np.nan)


def _cycle_profile(x: np.ndarray, period: int) -> np.ndarray:
    """Each point's phase offset of a cycle of `period` points (zeros if too few cycles).

    Gaps are interpolated for the estimate only, so that phases stay aligned with time."""
    filled = pd.Series(x).interpolate(limit_direction="both").to_numpy()
    if np.isnan(filled).any() or len(filled) < _MIN_CYCLES * period:
        return np.zeros_like(x)
    return filled - remove_cycle(filled, period)


_UNITS = {"values": "robust σ", "log": "robust σ of the log values",
          "both": "robust σ (the smaller score of the values and of their logs)"}


def _reason(kind: str, length: int, z: float, value: float, expected: float, scale: str) -> str:
    side = "above" if z > 0 else "below"
    if kind == "burst":
        return (f"{length} consecutive values up to {abs(z):.1f} {_UNITS[scale]} away from the "
                f"rolling median (the most extreme, {value:.4g}, is {side} the rolling median "
                f"{expected:.4g})")
    return f"value {value:.4g} is {abs(z):.1f} {_UNITS[scale]} {side} the rolling median {expected:.4g}"


def _scores(raw: np.ndarray, *, log_scale: bool, period: int | None, window: int,
            min_periods: int, min_scale) -> tuple[np.ndarray, np.ndarray]:
    """Robust z of every point and its expected value (the caller's units)."""
    x = np.log(np.where(raw > 0, raw, np.nan)) if log_scale else raw
    profile = _cycle_profile(x, period) if period else np.zeros_like(x)
    x = x - profile
    level, scale = _level_and_scale(x, window, min_periods, log_scale=log_scale)
    if min_scale is not None:
        scale = np.fmax(scale, min_scale)
    expected = level + profile
    return (x - level) / scale, np.exp(expected) if log_scale else expected


def detect_point_anomalies(values: Sequence[float] | np.ndarray, *,
                           timestamps: Sequence | None = None, threshold: float = 6.0,
                           window: int = 25, max_burst: int = 3, period: int | None = None,
                           log_scale: bool | None = False, min_periods: int = 8,
                           min_scale: np.ndarray | float | None = None) -> list[Anomaly]:
    """Spikes, dips and short bursts in `values` (time order), oldest first.

    `period`: length of a known cycle in points (24 for hourly samples with a daily cycle),
    whose phase profile is removed first so that its peaks are neither flagged nor hide
    spikes. `log_scale`: score ratios instead of differences, for positive multiplicative
    metrics such as durations, whose long right tail would otherwise pass for spikes;
    values ≤ 0 are then left out. `None`, for series whose noise may be either: a point
    must be extreme both as a value and as a logarithm (the smaller score counts), so that
    neither the long right tail of multiplicative noise nor the long left tail that
    logarithms give additive noise near zero is flagged, while a spike several times the
    level is extreme both ways. (The geometric mean of the two scores instead found one
    more of 47 injected spikes and raised 10 false ones, measured on three simulated fleets.) Missing values are skipped and keep their positions.
    `min_scale`: a lower bound on each point's robust σ (in the scored units), for series
    whose points come from sources of different noise (a test's runs on a noisy node).
    """
    raw = _as_float(values)
    options = {"period": period, "window": window, "min_periods": min_periods, "min_scale": min_scale}
    scale_name = "log" if log_scale else "values"
    z, expected = _scores(raw, log_scale=bool(log_scale), **options)
    if log_scale is None and np.all(raw[np.isfinite(raw)] > 0):
        z_log, _ = _scores(raw, log_scale=True, **options)
        z = np.where(np.sign(z) == np.sign(z_log), np.sign(z) * np.fmin(np.abs(z), np.abs(z_log)), 0.0)
        scale_name = "both"

    flagged = np.abs(z) >= threshold  # NaN compares False
    edges = np.diff(np.concatenate([[0], flagged.astype(np.int8), [0]]))
    anomalies = []
    for start, stop in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
        length = int(stop - start)
        if length > max_burst:
            continue  # a lasting change of level, not a point anomaly
        peak = int(start + np.argmax(np.abs(z[start:stop])))
        kind = "burst" if length > 1 else ("spike" if z[peak] > 0 else "dip")
        anomalies.append(Anomaly(
            start_index=int(start), end_index=int(stop - 1), kind=kind,
            score=float(abs(z[peak])), value=float(raw[peak]), expected=float(expected[peak]),
            reason=_reason(kind, length, float(z[peak]), float(raw[peak]),
                           float(expected[peak]), scale_name),
            peak_index=peak, start_timestamp=timestamps[int(start)] if timestamps is not None else None,
            end_timestamp=timestamps[int(stop - 1)] if timestamps is not None else None))
    return anomalies


def _robust_standardized(features: pd.DataFrame) -> pd.DataFrame:
    """(x − median) / (IQR / 1.349) per column, with the IQR floored as the MAD is above."""
    median = features.median()
    iqr = features.quantile(0.75) - features.quantile(0.25)
    floor = _MAD_FLOOR_ABSOLUTE + _MAD_FLOOR_RELATIVE * median.abs()
    scale = np.fmax(iqr, floor).fillna(1.0) / _IQR_TO_SIGMA
    return (features - median) / scale


def _outlier_reason(z: pd.Series) -> str:
    ranked = z.abs().sort_values(ascending=False)
    named = ranked[ranked >= _REASON_Z].index[:_REASON_FEATURES].tolist() or ranked.index[:1].tolist()
    return ", ".join(f"{name} {z[name]:+.1f} robust σ" for name in named)


def node_day_features(series: pd.DataFrame) -> pd.DataFrame:
    """One row per node and day: every node metric's daily median and every per-test
    metric's daily median ratio to the test's level (the node's speed on the tests it ran),
    each minus that day's median over the fleet, so that a quiet weekend or a fleet-wide
    change is nobody's outlier. `series` is `regressions.build_series` output."""
    per_node = series[series["scope"] == "node"]
    if per_node.empty:
        return pd.DataFrame({"node_id": pd.Series(dtype=object), "day": pd.Series(dtype="datetime64[ns]")})
    day = per_node["timestamp"].dt.floor("D").rename("day")
    daily = (per_node.groupby([per_node["node_id"], day, per_node["metric_name"]])["level"].median()
             .unstack("metric_name"))
    return (daily - daily.groupby(level="day").transform("median")).reset_index()


def node_health_outliers(frame: pd.DataFrame, *, features: Sequence[str],
                         contamination: float | str = "auto", random_state: int = 0) -> pd.DataFrame:
    """`frame` (one row per node, or node-day) with `outlier_score` (higher is more anomalous),
    `is_outlier` and, for outliers, a `reason` naming the features that deviate most.

    Features are standardized by median and IQR, so that one outlier does not set the scale
    it is judged by, and missing values are imputed with the feature's median. A row is an
    outlier when the isolation forest isolates it and one feature is 6 robust σ out. With
    fewer than five rows nothing is an outlier and scores stay empty.
    """
    features = list(features)
    out = frame.copy()
    out["outlier_score"] = np.nan
    out["is_outlier"] = False
    out["reason"] = None
    if len(frame) < _MIN_NODES:
        return out
    z = _robust_standardized(frame[features].astype(float)).fillna(0.0)
    forest = IsolationForest(contamination=contamination, random_state=random_state)
    forest.fit(z.to_numpy())
    # score_samples is the negated anomaly score of the original paper (0.5 ~ ordinary).
    out["outlier_score"] = -forest.score_samples(z.to_numpy())
    flagged = (forest.predict(z.to_numpy()) == -1) & (z.abs().max(axis=1) >= _OUTLIER_Z).to_numpy()
    out["is_outlier"] = flagged
    reasons = np.full(len(out), None, dtype=object)
    reasons[flagged] = [_outlier_reason(z.iloc[i]) for i in np.flatnonzero(flagged)]
    out["reason"] = reasons
    return out


def _node_offsets_and_noise(tests: pd.DataFrame, window: int,
                            min_periods: int) -> tuple[np.ndarray, np.ndarray]:
    """Each per-test point's node offset and lower bound on its robust σ (log units).

    A point's residual is its log level less its test's rolling median. The offset is
    where its node's runs stood around that time: the rolling median, over the node's runs
    in time order, of each run's median residual. A node that turns slow and stays slow
    (a failing disk) is a lasting change, which change points report as a node problem;
    net of the offset its runs are ordinary in every test's series, where they would
    otherwise each look like a spike among the other nodes' runs, while a run or two of
    a hiccup moves a median of `window` runs hardly at all. The bound is the typical
    deviation of the node's points from their tests' levels, net of the offset: a noisy
    node's runs scatter three times as far as a quiet node's, which a test's own rolling
    spread, pooled over all nodes, does not know."""
    levels = tests["level"].to_numpy(dtype=float)
    logs = np.log(np.where(levels > 0, levels, np.nan))
    residuals = np.full(len(tests), np.nan)
    for positions in tests.groupby(["metric_name", "test_name"], sort=False).indices.values():
        residuals[positions] = logs[positions] - _rolling_median(logs[positions], window, min_periods)
    # a point without a run id is a run of its own
    runs = pd.factorize(tests["test_run_id"])[0]
    runs = np.where(runs >= 0, runs, runs.max(initial=-1) + 1 + np.arange(len(tests)))
    # names as integer codes: as text they would be a Python string per point
    by_run = pd.DataFrame({"metric": pd.factorize(tests["metric_name"])[0],
                           "node": pd.factorize(tests["run_node_id"])[0], "run": runs,
                           "time": tests["timestamp"].to_numpy(), "residual": residuals})
    grouped = by_run.groupby(["metric", "node", "run"], sort=False)
    run_of_point = grouped.ngroup().to_numpy()
    per_run = grouped.agg(time=("time", "min"), residual=("residual", "median"))
    run_offsets = np.zeros(len(per_run))
    run_residuals = per_run["residual"].to_numpy(dtype=float)
    for positions in per_run.groupby(level=["metric", "node"], sort=False).indices.values():
        positions = positions[np.argsort(per_run["time"].to_numpy()[positions], kind="stable")]
        run_offsets[positions] = _rolling_median(run_residuals[positions], window, min_periods)
    offsets = np.nan_to_num(run_offsets[run_of_point])
    spread = (pd.Series(np.abs(residuals - offsets), index=tests.index)
              .groupby([tests["metric_name"], tests["run_node_id"]], observed=True).transform("median"))
    return offsets, MAD_TO_SIGMA * spread.to_numpy(dtype=float)


def _detect(task: tuple) -> list:
    values, options = task
    return detect_point_anomalies(values, **options)


def fleet_anomalies(series: pd.DataFrame, *, threshold: float = 6.0, window: int = 25,
                    max_burst: int = 3) -> tuple[pd.DataFrame, int]:
    """Spikes, dips and short bursts of every series, and how many series were skipped.

    `series` is `regressions.build_series` output: per-test series (each test's runs, their
    levels adjusted for each node's speed, and net of where the node stood at the time; see
    _node_offsets_and_noise) are scored on a log scale against the larger of the test's
    rolling spread and the node's own noise; node metric series (samples per
    node) with their daily cycle removed; per-run CI metrics as they come. A node's
    per-test ratios are not scored again: their points are the tests' points. Series where
    half the values are one value (rare-event counts, rates stuck at 100%) are skipped.
    """
    keys = ["scope", "metric_name", "test_name", "node_id"]
    # only the columns used: the window's series are the step's largest frame, and a filter
    # of all their columns copies every one of them
    series = series.loc[~((series["scope"] == "node") & (series["metric_scope"] == "test")),
                        [*keys, "timestamp", "level", "value", "run_node_id", "test_run_id"]]
    tests = series[series["scope"] == "test"]
    offset, floor = (pd.Series(values, index=tests.index, dtype=float) for values in (
        _node_offsets_and_noise(tests, window, min_periods=8) if len(tests) else ([], [])))
    del tests
    rows, skipped = [], 0
    grouped = series.groupby(keys, dropna=False, sort=True)
    names, group = grouped.size().index, grouped.ngroup().to_numpy()
    del grouped  # it keeps every key's codes
    # every series' rows, in time order (ties as they came), series after series
    timestamps = series["timestamp"].to_numpy()
    order = np.lexsort((timestamps, group))
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    del group
    raws = series["value"].to_numpy(dtype=float)
    # per-test levels net of where their node stood at the time (see _node_offsets_and_noise)
    levels = series["level"].to_numpy(dtype=float) / np.exp(offset.reindex(series.index).fillna(0.0).to_numpy())
    floors = floor.reindex(series.index).to_numpy(dtype=float)
    del offset, floor
    judged, tasks = [], []
    for (scope, metric, test, _node), positions in zip(names, np.split(order, bounds)):
        values = levels[positions]
        if mostly_one_value(values):
            skipped += 1
            continue
        per_test = scope == "test" and bool(np.all(values > 0))
        options: dict = {"log_scale": None}
        if per_test:
            options = {"log_scale": True, "min_scale": floors[positions]}
        elif scope == "node":
            per_day = points_per_day(pd.Series(timestamps[positions]))
            if per_day >= 4 and len(positions) >= _MIN_CYCLES * per_day:
                options["period"] = per_day
        judged.append((scope, metric, test, positions, values, per_test))
        tasks.append((values, {"threshold": threshold, "window": window, "max_burst": max_burst,
                               **options}))
    detected = process_map(_detect, tasks, workers=cores() if len(series) >= MIN_POINTS else 1)
    for (scope, metric, test, positions, values, per_test), found in zip(judged, detected):
        raw = raws[positions]
        for anomaly in found:
            first, last = positions[anomaly.start_index], positions[anomaly.end_index]
            value, expected, reason = raw[anomaly.peak_index], anomaly.expected, anomaly.reason
            if per_test:  # levels are node-adjusted ratios: report in the metric's own units
                expected *= value / values[anomaly.peak_index]
                signed = anomaly.score if value >= expected else -anomaly.score
                reason = _reason(anomaly.kind, anomaly.end_index - anomaly.start_index + 1, signed,
                                 value, expected, "log")
            rows.append({
                "scope": scope, "metric_name": metric, "test_name": None if pd.isna(test) else test,
                # names as text only for the few rows found: the whole column as text is a
                # Python string per row (at L about 0.6 GB for these two)
                "node_id": series["run_node_id"].iloc[first],
                "timestamp": series["timestamp"].iloc[first], "end_timestamp": series["timestamp"].iloc[last],
                "test_run_id": series["test_run_id"].iloc[first], "kind": anomaly.kind, "score": anomaly.score,
                "value": value, "expected": expected, "reason": reason})
    return pd.DataFrame(rows, columns=ANOMALY_COLUMNS), skipped

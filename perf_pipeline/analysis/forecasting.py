"""Per-metric forecasts: gradient boosting where it beats naive baselines, the best baseline
where it does not.

One model serves every series of a metric (a node, a test, or the whole run), so that a
series with little history borrows from the others. It is a direct multi-horizon model: each
training example pairs a forecast origin with a later row, and its features are only what was
known at the origin (the series' level, daily profile, same hour last week, last value and
slope over the 7 days before it) plus the lead, the target's hour and weekday, and the
target row's context (node, node type, test, test type). It learns the row's departure from
an anchor: the series' level, moved by how much slower the row's node ran than the nodes
behind that level over the same week (where node_id is known and values are positive). So
trees never have to extrapolate a level they have not seen, and a test that lately ran only
on a slow node is not made slower still for running there again.

Whether to use it is decided in time-ordered cross-validation against three naive baselines
scored on the same rows, with the forecast exactly as `forecast()` makes it: the model is
used only when its mean absolute error is below the best baseline's. Its 80% intervals are
split-conformal: quantiles of the chosen method's out-of-fold errors, per day of lead — relative to
the forecast for positive metrics.

Where a series ran on several contexts lately (a test on several nodes), the forecast is the
model's prediction averaged over its recent context rows: the expected value under the recent
node mix, which is what a run at that hour will cost when nobody chooses the node. Where that
takes many predictions (100 tests on 40 nodes), the context features are fitted without
interactions with the others, so the average takes one prediction per context and one per hour.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingRegressor
from threadpoolctl import ThreadpoolController

from perf_pipeline.parallel import cores, process_map

BASELINES = ("last_value", "seasonal_naive_daily", "seasonal_naive_weekly")
CONTEXT_COLUMNS = ("node_id", "node_type", "test_name", "test_type")
NUMERIC_FEATURES = ("lead_hours", "hour_of_day", "weekday", "level", "profile", "weekly",
                    "last", "slope_per_day", "node_shift")

DAY, WEEK = 24, 168
HISTORY_HOURS = WEEK  # every history feature looks at the week before the origin
# NaN hours ahead of the data, so that the weekly baseline's four-week look-back never
# indexes before the grid.
_PAD_HOURS = 4 * WEEK
ORIGIN_STEP_HOURS = DAY
FOLD_SPACING_HOURS = 3 * DAY
MIN_TARGET_HOURS = DAY
MIN_TRAINING_ROWS = 200
MIN_BUCKET_RESIDUALS = 30
INTERVAL_QUANTILES = (0.1, 0.9)
# HistGradientBoosting takes at most max_bins (255) categories per feature; rarer ones are
# read as missing.
_MAX_CATEGORIES = 250
# HistGradientBoosting's OpenMP threads wait on each other at every tree node: on a busy
# two-core machine (other assets, other tests) two threads made a fit 10-15 times slower than
# one, and one thread is at most a third slower than two on an idle one (measured).
_OPENMP_THREADS = 1
# Cross-validation models are fitted on at most this share of `max_rows`: fit time is most of
# fit_forecaster's, and the CV MAE moved by under 1% on the suites at half the rows (measured),
# while the model shipped, fitted on all `max_rows`, is if anything better than those scored.
_CV_ROWS_SHARE = 0.5
_NODE_SPEED_ROUNDS = 3
# 50 trees at learning rate 0.3 rather than 200 at 0.1: a fit costs about 2 ms a tree however
# few its rows, and this cut performance_models' CPU time at M from ~50 s to ~12 s, with every
# forecast_suite figure and the M metrics' CV MAE within about 1% of the 200 trees (measured;
# drawing another sample of the same rows moves them 1-2%). 30 trees at 0.4 with 63 bins
# saved another 3-4 s but cost dense_20x720 2.4%, more than the noise. Validation-split early
# stopping ran nearly all 200 rounds and saved nothing.
_BOOSTING_ROUNDS = 50
_LEARNING_RATE = 0.3
# Bins per numeric feature (scikit-learn's default; a categorical feature needs a bin per
# category, up to 255).
_NUMERIC_BINS = 255
# Candidate examples kept before each fit's own subsample: enough that every fold's training
# set can still be drawn at full size, without building millions of rows on long histories.
_CANDIDATES_PER_FIT_ROW = 3
# Above this many predictions per forecast (contexts of every series × hours ahead) a model
# is fitted with its context features apart, and forecast once per context and once per hour.
_MAX_CONTEXT_PREDICTIONS = 200_000


@dataclass
class ForecastEvaluation:
    rows: int  # training rows of the final fit (0 when the model is not used)
    folds: int  # CV folds actually evaluated
    model_mae: float | None
    baseline_mae: dict[str, float]  # per baseline, on the same CV rows as the model
    best_baseline: str
    method: str  # "model" or the chosen baseline's name
    reason: str
    interval_coverage: float | None  # share of CV targets inside the 80% interval, out of fold


@dataclass
class _Rows:
    """The points of one metric on an hour grid: arrays sorted by hour."""
    hour: np.ndarray  # hour index on the grid
    series: np.ndarray  # index into `series_names`
    value: np.ndarray
    codes: np.ndarray  # (rows, context columns) category codes, -1 where missing
    series_names: pd.Index
    start: pd.Timestamp  # the grid's hour 0, a midnight
    node_column: int | None  # column of node_id in `codes`, None when it is not a feature
    n_nodes: int
    # A positive metric is modelled in ratios to the series' level (features and target),
    # so one model serves a 0.04 s test and a 20 s test alike and never forecasts below zero.
    relative: bool

    @property
    def n_series(self) -> int:
        return len(self.series_names)

    @property
    def start_weekday(self) -> int:
        return int(self.start.day_of_week)

    def timestamps(self, hour_index: np.ndarray) -> pd.DatetimeIndex:
        return self.start + pd.to_timedelta(hour_index, unit="h")


@dataclass
class _History:
    """Hourly means of every series, and the latest mean known at each hour."""
    means: np.ndarray  # (series, hours), NaN where a series has no row
    last: np.ndarray  # (series, hours)


@dataclass
class _Summary:
    """What is known of every series at one origin."""
    level: np.ndarray  # (series,) median of the week before; the last value where that is empty
    last: np.ndarray  # (series,)
    profile: np.ndarray  # (series, 24) mean by hour of day over the week before
    week: np.ndarray  # (series, 168) the week before, position 0 = origin - 167 h
    slope: np.ndarray  # (series,) per day, over the week before
    node_speed: np.ndarray  # (nodes,) log of a node's values relative to their series' levels
    mix_speed: np.ndarray  # (series,) median node_speed of the series' rows in the week before


@functools.cache
def _threadpools() -> ThreadpoolController:
    # threadpool_limits() looks up the loaded libraries again on every call, 10 ms each, and
    # a metric's fit makes a dozen calls.
    return ThreadpoolController()


def _openmp_limit():
    return _threadpools().limit(limits=_OPENMP_THREADS, user_api="openmp")


def _clean_context(values: pd.Series) -> pd.Series:
    return values.where(values.isna(), values.astype(str))


def _context_categories(points: pd.DataFrame) -> dict[str, list[str]]:
    """Categories per context column, most frequent first; a column with fewer than two
    values says nothing and is left out."""
    categories = {}
    for column in CONTEXT_COLUMNS:
        if column not in points:
            continue
        counts = _clean_context(points[column]).value_counts()
        if len(counts) >= 2:
            # ties by name, so that the codes do not depend on the order of the points
            ranked = sorted(zip(counts.to_numpy(), counts.index.astype(str)),
                            key=lambda count_name: (-count_name[0], count_name[1]))
            categories[column] = [name for _, name in ranked[:_MAX_CATEGORIES]]
    return categories


def _rows(points: pd.DataFrame, categories: dict[str, list[str]],
          origin: pd.Timestamp | None = None, relative: bool | None = None) -> _Rows:
    frame = points.loc[points["value"].notna() & points["hour"].notna()]
    hours = pd.to_datetime(frame["hour"]).dt.floor("h")
    if origin is not None:
        frame, hours = frame.loc[hours <= origin], hours[hours <= origin]
    start = hours.min().floor("D") - pd.Timedelta(hours=_PAD_HOURS)
    hour = ((hours - start) // pd.Timedelta(hours=1)).to_numpy(dtype=np.int64)
    series_codes, series_names = pd.factorize(frame["series"].astype(str), sort=True)
    codes = np.column_stack(
        [pd.Index(cats).get_indexer(_clean_context(frame[c])).astype(np.int32)  # -1: unseen
         for c, cats in categories.items()]) if categories else np.empty((len(frame), 0), np.int32)
    value = frame["value"].to_numpy(float)
    # By hour, then series, context and value: the sampled training rows, and so the model,
    # then do not depend on the order of the rows within an hour (a query's ORDER BY hour
    # leaves it open).
    order = np.lexsort((value, *codes.T[::-1], series_codes, hour))
    return _Rows(hour=hour[order], series=series_codes[order].astype(np.int64), value=value[order],
                 codes=codes[order], series_names=pd.Index(series_names), start=start,
                 node_column=list(categories).index("node_id") if "node_id" in categories else None,
                 n_nodes=len(categories.get("node_id", [])),
                 relative=bool((frame["value"] > 0).all()) if relative is None else relative)


def _history(rows: _Rows, end: int) -> _History:
    n_hours = end + 1
    flat = rows.series * n_hours + rows.hour
    size = rows.n_series * n_hours
    sums = np.bincount(flat, rows.value, minlength=size).reshape(rows.n_series, n_hours)
    counts = np.bincount(flat, minlength=size).reshape(rows.n_series, n_hours)
    with np.errstate(invalid="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    # Hour 0 is padding and so always empty: the latest filled hour at or before each hour,
    # or 0 for "nothing yet", which reads back as NaN.
    latest = np.maximum.accumulate(np.where(counts > 0, np.arange(n_hours), 0), axis=1)
    last = np.take_along_axis(means, latest, axis=1)
    return _History(means=means, last=last)


def _node_speeds(rows: _Rows, level: np.ndarray, origin: int) -> tuple[np.ndarray, np.ndarray]:
    """How slow each node ran in the week before `origin`, and the mix each series' level was
    taken on: the mean log ratio of a node's values to their series' levels, and the median
    of that over a series' recent rows (the level is a median too). Positive values only; NaN
    where nothing is known.

    A series' level is a median over whatever nodes it ran on lately, so a row's departure
    from it depends on its node relative to those: a test that ran only on a slow node has a
    slow level already, and running there again changes nothing.
    """
    node_speed = np.full(rows.n_nodes, np.nan)
    mix_speed = np.full(rows.n_series, np.nan)
    if rows.node_column is None:
        return node_speed, mix_speed
    low = np.searchsorted(rows.hour, origin - HISTORY_HOURS + 1, side="left")
    high = np.searchsorted(rows.hour, origin, side="right")
    node, series = rows.codes[low:high, rows.node_column], rows.series[low:high]
    value, base = rows.value[low:high], level[series]
    usable = (node >= 0) & (value > 0) & (base > 0)
    node, series = node[usable], series[usable]
    log_ratio = np.log(value[usable] / base[usable])
    counts = np.bincount(node, minlength=rows.n_nodes)
    # Rows of each series on each node: a series' median node speed is a weighted median
    # over at most n_nodes values, found without sorting its rows in every round.
    runs = np.bincount(series * rows.n_nodes + node,
                       minlength=rows.n_series * rows.n_nodes).reshape(rows.n_series, rows.n_nodes)
    n_runs = runs.sum(axis=1)
    mix = np.zeros(rows.n_series)
    # A test that ran only on one slow node has a slow level, so its rows there look normal
    # and would pull that node's speed towards 1: measure each row against its level moved
    # back by the level's own mix, and repeat; three rounds settle it.
    for _ in range(_NODE_SPEED_ROUNDS):
        with np.errstate(invalid="ignore", divide="ignore"):
            node_speed = np.bincount(node, log_ratio + mix[series], rows.n_nodes) / counts
        order = np.argsort(node_speed)  # nodes without runs (NaN) last, with weight 0
        cumulative = np.cumsum(runs[:, order], axis=1)
        low = order[np.argmax(cumulative > ((n_runs - 1) // 2)[:, None], axis=1)]
        high = order[np.argmax(cumulative > (n_runs // 2)[:, None], axis=1)]
        mix_speed = np.where(n_runs > 0, (node_speed[low] + node_speed[high]) / 2, np.nan)
        mix = np.nan_to_num(mix_speed)
    return node_speed, mix_speed


def _summary(history: _History, rows: _Rows, origin: int) -> _Summary:
    window = history.means[:, origin - HISTORY_HOURS + 1: origin + 1]
    finite = np.isfinite(window)
    filled = np.where(finite, window, 0.0)
    last = history.last[:, origin]
    # The median of each row's finite hours (NaN sorts last); np.nanmedian takes masked arrays
    # on rows this short, several times slower, and this runs for every origin.
    n_finite = finite.sum(axis=1)
    ordered = np.sort(window, axis=1)
    middle = np.column_stack([np.maximum(n_finite - 1, 0) // 2, n_finite // 2])
    level = np.take_along_axis(ordered, np.minimum(middle, HISTORY_HOURS - 1), axis=1).mean(axis=1)
    level = np.where(n_finite > 0, level, last)

    n_series = window.shape[0]
    day_sums = filled.reshape(n_series, 7, DAY).sum(axis=1)
    day_counts = finite.reshape(n_series, 7, DAY).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        profile = np.where(day_counts > 0, day_sums / day_counts, np.nan)
    # Column j of the window is hour of day (origin - 167 + j) % 24: roll to absolute hours.
    profile = np.roll(profile, (origin - HISTORY_HOURS + 1) % DAY, axis=1)

    x = np.arange(HISTORY_HOURS) / DAY
    n = finite.sum(axis=1)
    sx, sxx = finite @ x, finite @ (x * x)
    sy, sxy = filled.sum(axis=1), filled @ x
    denominator = n * sxx - sx * sx
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where((n >= 3) & (denominator > 0), (n * sxy - sx * sy) / denominator, np.nan)
    node_speed, mix_speed = _node_speeds(rows, level, origin)
    return _Summary(level=level, last=last, profile=profile, week=window, slope=slope,
                    node_speed=node_speed, mix_speed=mix_speed)


def _features(summary: _Summary, series: np.ndarray, hour: np.ndarray, origin: int,
              rows: _Rows, codes: np.ndarray) -> np.ndarray:
    """Numeric features (NUMERIC_FEATURES) of target rows at `hour` of `series` with context
    `codes`; history values are given relative to the series' level, like the target."""
    hour_of_day = hour % DAY
    level = summary.level[series]
    if rows.node_column is None:
        node_shift = np.zeros(len(series))
    else:
        node = codes[:, rows.node_column]
        speed = np.where(node >= 0, summary.node_speed[np.maximum(node, 0)], np.nan)
        node_shift = level * np.expm1(speed - summary.mix_speed[series])
    week_position = (hour - (origin - HISTORY_HOURS + 1)) % WEEK
    history = np.column_stack([
        summary.profile[series, hour_of_day] - level,
        summary.week[series, week_position] - level,
        summary.last[series] - level,
        summary.slope[series],
        node_shift,
    ])
    if rows.relative:
        history = history / level[:, None]
    return np.column_stack([
        hour - origin,
        hour_of_day,
        (rows.start_weekday + hour // DAY) % 7,
        level,
        history,
    ]).astype(float)


def _anchor(numeric: np.ndarray, rows: _Rows) -> np.ndarray:
    """What the model's target is measured from: the series' level, moved by the row's node
    relative to the nodes that level was taken on, where that is known."""
    level = numeric[:, NUMERIC_FEATURES.index("level")]
    shift = np.nan_to_num(numeric[:, NUMERIC_FEATURES.index("node_shift")])
    return level * (1 + shift) if rows.relative else level + shift


def _target(rows: _Rows, value: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """What the model learns: the log ratio to the anchor, or the plain difference."""
    return np.log(value / anchor) if rows.relative else value - anchor


def _from_target(rows: _Rows, prediction: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    return anchor * np.exp(prediction) if rows.relative else anchor + prediction


def _model_input(numeric: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return np.column_stack([numeric, np.where(codes >= 0, codes, np.nan)])


def _first_finite(candidates: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    chosen = candidates[np.arange(len(candidates)), np.argmax(np.isfinite(candidates), axis=1)]
    return np.where(np.isfinite(chosen), chosen, fallback)


def _baselines(history: _History, series: np.ndarray, hour: np.ndarray,
               origin: int) -> dict[str, np.ndarray]:
    """The three naive forecasts of target rows at origin `origin`."""
    last = history.last[series, origin]
    lead = hour - origin
    daily_steps = (lead + DAY - 1)[:, None] // DAY + np.arange(7)
    daily = _first_finite(history.means[series[:, None], hour[:, None] - DAY * daily_steps], last)
    weekly_steps = (lead + WEEK - 1)[:, None] // WEEK + np.arange(4)
    weekly = _first_finite(history.means[series[:, None], hour[:, None] - WEEK * weekly_steps],
                           daily)
    return {"last_value": last, "seasonal_naive_daily": daily, "seasonal_naive_weekly": weekly}


def _recent_contexts(rows: _Rows, origin: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(series, codes, weight) of each distinct context a series ran on in the week before
    `origin`, weighted by how often; a series idle that week keeps the context of its last row.
    Sorted by series."""
    low = np.searchsorted(rows.hour, origin - HISTORY_HOURS + 1, side="left")
    high = np.searchsorted(rows.hour, origin, side="right")
    recent = np.arange(low, high)
    idle = np.ones(rows.n_series, bool)
    idle[rows.series[recent]] = False
    earlier_series = rows.series[:low][::-1]
    _, last_position = np.unique(earlier_series, return_index=True)
    last_rows = low - 1 - last_position
    last_rows = last_rows[idle[rows.series[last_rows]]]
    chosen = np.concatenate([recent, last_rows])
    # One integer per (series, codes), in that order of significance: a code (-1 to 248)
    # plus one takes 8 bits, so sorting the keys sorts by series, then by codes.
    key = rows.series[chosen].astype(np.int64)
    for column in rows.codes[chosen].T:
        key = key * 256 + column + 1
    _, first, weight = np.unique(key, return_index=True, return_counts=True)
    return (rows.series[chosen][first].astype(np.int64), rows.codes[chosen][first],
            weight.astype(float))


def _context_features(rows: _Rows, horizon_hours: int) -> tuple[int, ...]:
    """Model input columns to fit apart from the others: the context columns that vary within
    a series (a test's node), with node_shift. Empty where every series has one context (a
    node's own metrics), or where predicting every hour on every context is cheap anyway: the
    node's effect then may differ by hour (a busy node at its busy hours), which made
    fleet-wide run metrics (one series on ~40 nodes) 3-8% less accurate when fitted apart,
    while per-test metrics were as accurate (measured)."""
    end = int(rows.hour[-1])
    if len(_recent_contexts(rows, end)[0]) * horizon_hours <= _MAX_CONTEXT_PREDICTIONS:
        return ()
    varying = []
    for column in range(rows.codes.shape[1]):
        pairs = rows.series * (rows.codes[:, column].max() + 2) + rows.codes[:, column] + 1
        if len(np.unique(pairs)) > len(np.unique(rows.series)):
            varying.append(len(NUMERIC_FEATURES) + column)
    return (NUMERIC_FEATURES.index("node_shift"), *varying) if varying else ()


def _predict(model: HistGradientBoostingRegressor, numeric: np.ndarray,
             codes: np.ndarray) -> np.ndarray:
    with _openmp_limit():
        return model.predict(_model_input(numeric, codes))


def _model_forecast(model: HistGradientBoostingRegressor, rows: _Rows, summary: _Summary,
                    series: np.ndarray, hour: np.ndarray, origin: int,
                    context_features: tuple[int, ...] = ()) -> np.ndarray:
    """The model's forecast of each (series, hour), averaged over the series' recent contexts."""
    context_series, context_codes, weight = _recent_contexts(rows, origin)
    per_series = np.bincount(context_series, minlength=rows.n_series)
    first = np.cumsum(per_series) - per_series
    if context_features:
        return _additive_forecast(model, rows, summary, series, hour, origin,
                                  (context_series, context_codes, weight, first))
    repeats = per_series[series]
    pair = np.repeat(np.arange(len(series)), repeats)
    offset = np.arange(len(pair)) - np.repeat(np.cumsum(repeats) - repeats, repeats)
    context = first[series][pair] + offset
    codes = context_codes[context]
    numeric = _features(summary, series[pair], hour[pair], origin, rows, codes)
    prediction = _predict(model, numeric, codes)
    w = weight[context]
    value = _from_target(rows, prediction, _anchor(numeric, rows))
    return np.bincount(pair, w * value, len(series)) / np.bincount(pair, w, len(series))


def _additive_forecast(model: HistGradientBoostingRegressor, rows: _Rows, summary: _Summary,
                       series: np.ndarray, hour: np.ndarray, origin: int,
                       contexts: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """`_model_forecast` of a model whose context features never share a tree with the others:
    its prediction is a part that depends on the hour plus one that depends on the context,
    so each (series, hour) is predicted once, on the series' first context, and each context
    once, at the first hour ahead, instead of every hour on every context (40 nodes times 336
    hours for a test). Equal to the full average up to rounding."""
    context_series, context_codes, weight, first = contexts
    reference = first[series]
    context_numeric = _features(summary, context_series, np.full(len(context_series), origin + 1),
                                origin, rows, context_codes)
    pair_numeric = _features(summary, series, hour, origin, rows, context_codes[reference])
    prediction = _predict(model, np.concatenate([context_numeric, pair_numeric]),
                          np.concatenate([context_codes, context_codes[reference]]))
    context_part, hour_part = prediction[:len(context_series)], prediction[len(context_series):]
    hour_part = hour_part - context_part[reference]
    anchor = _anchor(context_numeric, rows)
    total = np.bincount(context_series, weight, rows.n_series)
    if rows.relative:
        scale = np.bincount(context_series, weight * anchor * np.exp(context_part), rows.n_series)
        return scale[series] / total[series] * np.exp(hour_part)
    shift = np.bincount(context_series, weight * (anchor + context_part), rows.n_series)
    return shift[series] / total[series] + hour_part


def _lead_bucket(lead_hours: np.ndarray, n_buckets: int) -> np.ndarray:
    return np.clip((lead_hours + DAY - 1) // DAY, 1, n_buckets) - 1


def _interval_offsets(residuals: np.ndarray, buckets: np.ndarray, n_buckets: int) -> np.ndarray:
    """(bucket, 2) residual quantiles per day of lead, pooled where a day has too few."""
    offsets = np.tile(np.quantile(residuals, INTERVAL_QUANTILES), (n_buckets, 1))
    for bucket in np.unique(buckets):
        in_bucket = residuals[buckets == bucket]
        if len(in_bucket) >= MIN_BUCKET_RESIDUALS:
            offsets[bucket] = np.quantile(in_bucket, INTERVAL_QUANTILES)
    # An interval must contain its own forecast to be read as that forecast's interval.
    return np.column_stack([np.minimum(offsets[:, 0], 0.0), np.maximum(offsets[:, 1], 0.0)])


def _out_of_fold_coverage(residuals: np.ndarray, buckets: np.ndarray, fold: np.ndarray,
                          n_buckets: int) -> float | None:
    """Share of each fold's residuals inside intervals built from the other folds only."""
    if len(np.unique(fold)) < 2:
        return None
    inside = np.zeros(len(residuals), bool)
    for f in np.unique(fold):
        held = fold == f
        offsets = _interval_offsets(residuals[~held], buckets[~held], n_buckets)
        low, high = offsets[buckets[held]].T
        inside[held] = (residuals[held] >= low) & (residuals[held] <= high)
    return float(inside.mean())


@dataclass
class MetricForecaster:
    """A metric's forecasting method and what it needs: the fitted model (None when a
    baseline was chosen), the context categories it was fitted on, and the interval offsets
    per day of lead (None when there was no cross-validation to take them from), as amounts
    or, for positive metrics, as shares of the forecast."""
    method: str
    model: HistGradientBoostingRegressor | None = None
    categories: dict[str, list[str]] = field(default_factory=dict)
    interval_offsets: np.ndarray | None = None
    relative: bool = False  # a positive metric: modelled in ratios, intervals as shares
    # Model input columns fitted apart from the others (see `_context_features`); empty for
    # models fitted with every interaction, which are then predicted on every context.
    context_features: tuple[int, ...] = ()

    def forecast(self, points: pd.DataFrame, *, origin=None, horizon_hours: int = 336) -> pd.DataFrame:
        """Forecast of every series for each hour in (origin, origin + horizon], from the
        points at or before the origin (by default the last hour in `points`)."""
        columns = ["series", "hour", "forecast", "lower", "upper", "method"]
        origin = pd.Timestamp(points["hour"].max() if origin is None else origin).floor("h")
        if not (points["value"].notna() & (pd.to_datetime(points["hour"]) <= origin)).any():
            return pd.DataFrame(columns=columns)
        rows = _rows(points, self.categories, origin, relative=self.relative)
        end = int((origin - rows.start) // pd.Timedelta(hours=1))
        history = _history(rows, end)
        known = np.flatnonzero(np.isfinite(history.last[:, end]))
        lead = np.arange(1, horizon_hours + 1)
        series = np.repeat(known, horizon_hours)
        hour = end + np.tile(lead, len(known))
        values = self._values(rows, history, series, hour, end)
        if self.interval_offsets is None:
            low = high = np.full(len(values), np.nan)
        else:
            low, high = self.interval_offsets[_lead_bucket(hour - end, len(self.interval_offsets))].T
            if self.relative:
                low, high = low * np.abs(values), high * np.abs(values)
        return pd.DataFrame({
            "series": rows.series_names[series].to_numpy(dtype=object),
            "hour": rows.timestamps(hour),
            "forecast": values,
            "lower": values + low,
            "upper": values + high,
            "method": self.method,
        }, columns=columns)

    def _values(self, rows: _Rows, history: _History, series: np.ndarray, hour: np.ndarray,
                origin: int) -> np.ndarray:
        if self.method == "model":
            return _model_forecast(self.model, rows, _summary(history, rows, origin), series, hour,
                                   origin, self.context_features)
        return _baselines(history, series, hour, origin)[self.method]


@dataclass
class _Examples:
    numeric: np.ndarray
    codes: np.ndarray
    target: np.ndarray  # value minus its anchor at the origin
    hour: np.ndarray  # target hour index


def _examples(rows: _Rows, history: _History, origins: np.ndarray, horizon: int,
              max_rows: int, rng: np.random.Generator) -> _Examples:
    """Training examples: every target row within `horizon` after each origin, thinned at
    random (seeded) where there are far more than any fit will use."""
    bounds = np.searchsorted(rows.hour, np.column_stack([origins, origins + horizon]), side="right")
    total = int((bounds[:, 1] - bounds[:, 0]).sum())
    keep_share = min(1.0, _CANDIDATES_PER_FIT_ROW * max_rows / max(total, 1))
    blocks = []
    for origin, (low, high) in zip(origins, bounds):
        index = np.arange(low, high)
        if keep_share < 1:
            index = index[rng.random(len(index)) < keep_share]
        summary = _summary(history, rows, int(origin))
        index = index[np.isfinite(summary.last[rows.series[index]])]
        series, hour = rows.series[index], rows.hour[index]
        numeric = _features(summary, series, hour, int(origin), rows, rows.codes[index])
        blocks.append((numeric, rows.codes[index],
                       _target(rows, rows.value[index], _anchor(numeric, rows)), hour))
    if not blocks:
        return _Examples(np.empty((0, len(NUMERIC_FEATURES))), rows.codes[:0], np.empty(0),
                         np.empty(0, np.int64))
    numeric, codes, target, hour = (np.concatenate(parts) for parts in zip(*blocks))
    return _Examples(numeric, codes, target, hour)


def _fit_model(examples: _Examples, usable: np.ndarray, *, seed: int, max_rows: int,
               context_features: tuple[int, ...]) -> tuple[HistGradientBoostingRegressor, int]:
    index = np.flatnonzero(usable)
    if len(index) > max_rows:
        index = np.sort(np.random.default_rng(seed).choice(index, max_rows, replace=False))
    n_context = examples.codes.shape[1]
    categorical = [False] * len(NUMERIC_FEATURES) + [True] * n_context
    # Context features split only among themselves: a node's speed then moves every hour's
    # forecast of a test alike, and a forecast needs one prediction per context, not per
    # context and hour (`_additive_forecast`).
    # HistGradientBoosting reads interaction_cst in the order it bins the columns in, the
    # categorical ones first (scikit-learn 1.9), not in the order they are given.
    binned_order = np.argsort(~np.array(categorical), kind="stable")
    position = np.argsort(binned_order)
    context = [int(position[i]) for i in context_features]
    others = [i for i in range(len(categorical)) if i not in context]
    # 15 leaves rather than the default 31: a third faster, with the same CV MAE on the
    # seasonal and sparse suites (forecast_suite; measured).
    n_categories = int(examples.codes[index].max()) + 1 if n_context and len(index) else 0
    model = HistGradientBoostingRegressor(
        max_iter=_BOOSTING_ROUNDS, learning_rate=_LEARNING_RATE, max_leaf_nodes=15,
        max_bins=min(255, max(_NUMERIC_BINS, n_categories)), early_stopping=False,
        random_state=seed,
        categorical_features=categorical if n_context else None,
        interaction_cst=[others, context] if context else None)
    features = _model_input(examples.numeric[index], examples.codes[index])
    # A feature never known in training (no weekly value for any sparse row) cannot be binned;
    # as a constant it is simply never split on.
    features[:, np.isnan(features).all(axis=0)] = 0.0
    with _openmp_limit():
        model.fit(features, examples.target[index])
    return model, len(index)


def _cutoffs(first: int, end: int, folds: int) -> list[int]:
    """Fold cutoffs, oldest first: the latest leaves a day of targets after it, the others
    are spaced three days apart before it, and all have a week of history."""
    latest = end - MIN_TARGET_HOURS
    return [c for c in (latest - FOLD_SPACING_HOURS * k for k in reversed(range(folds)))
            if c >= first + HISTORY_HOURS - 1]


def _number(x: float) -> str:
    return f"{x:.2f}" if 0.1 <= abs(x) < 1e6 else f"{x:.3g}"


def _percent(better: float, worse: float) -> str:
    if worse <= 0:
        return "n/a"
    gain = (1 - better / worse) * 100
    return f"{gain:.0f}%" if gain >= 1 else f"{gain:.1f}%"


def fit_forecaster(points: pd.DataFrame, *, horizon_hours: int = 336, folds: int = 3,
                   seed: int = 0, max_rows: int = 60_000) -> tuple[MetricForecaster, ForecastEvaluation]:
    """Choose and fit a metric's forecasting method by time-ordered cross-validation.

    Each fold's model is trained only on examples whose origin and target precede its cutoff,
    and judged with the baselines on the targets up to `horizon_hours` after it. Folds without
    enough history or training rows are skipped; with none left the method is `last_value`.
    """
    categories = _context_categories(points)
    rows = _rows(points, categories)
    if len(rows.hour) == 0:
        raise ValueError("no points with a value to forecast from")
    first, end = int(rows.hour[0]), int(rows.hour[-1])
    history = _history(rows, end)
    context_features = _context_features(rows, horizon_hours)
    n_buckets = max(1, -(-horizon_hours // DAY))
    rng = np.random.default_rng(seed)
    origins = np.arange(end - ORIGIN_STEP_HOURS, first + HISTORY_HOURS - 2, -ORIGIN_STEP_HOURS)[::-1]
    examples = _examples(rows, history, origins, horizon_hours, max_rows, rng)

    actual, lead, fold_of, forecasts = [], [], [], {name: [] for name in ("model", *BASELINES)}
    for cutoff in _cutoffs(first, end, folds):
        usable = examples.hour <= cutoff
        low, high = np.searchsorted(rows.hour, [cutoff, cutoff + horizon_hours], side="right")
        target = np.arange(low, high)
        target = target[np.isfinite(history.last[rows.series[target], cutoff])]
        if usable.sum() < MIN_TRAINING_ROWS or len(target) == 0:
            continue
        model, _ = _fit_model(examples, usable, seed=seed,
                              max_rows=max(MIN_TRAINING_ROWS, int(max_rows * _CV_ROWS_SHARE)),
                              context_features=context_features)
        series, hour = rows.series[target], rows.hour[target]
        # One forecast per (series, hour): rows of a test at one hour on two nodes share it.
        span = end + horizon_hours + 1
        pairs, inverse = np.unique(series * span + hour, return_inverse=True)
        summary = _summary(history, rows, cutoff)
        forecasts["model"].append(
            _model_forecast(model, rows, summary, pairs // span, pairs % span, cutoff,
                            context_features)[inverse])
        for name, values in _baselines(history, series, hour, cutoff).items():
            forecasts[name].append(values)
        actual.append(rows.value[target])
        lead.append(hour - cutoff)
        fold_of.append(np.full(len(target), len(fold_of)))

    if not actual:
        days = (end - first + 1) / DAY
        reason = (f"too little history for cross-validation ({days:.1f} days, "
                  f"{HISTORY_HOURS // DAY} days before the first fold needed): using last_value")
        return MetricForecaster(method="last_value", categories=categories,
                                relative=rows.relative), ForecastEvaluation(
            rows=0, folds=0, model_mae=None, baseline_mae={}, best_baseline="last_value",
            method="last_value", reason=reason, interval_coverage=None)

    actual_values = np.concatenate(actual)
    errors = {name: actual_values - np.concatenate(values) for name, values in forecasts.items()}
    mae = {name: float(np.mean(np.abs(e))) for name, e in errors.items()}
    best_baseline = min(BASELINES, key=lambda name: mae[name])
    model_mae, baseline_best_mae = mae["model"], mae[best_baseline]
    if model_mae < baseline_best_mae:
        method = "model"
        reason = (f"model MAE {_number(model_mae)} beats {best_baseline} "
                  f"{_number(baseline_best_mae)} by {_percent(model_mae, baseline_best_mae)}")
    else:
        method = best_baseline
        reason = (f"model MAE {_number(model_mae)} does not beat {best_baseline} "
                  f"{_number(baseline_best_mae)}")

    buckets = _lead_bucket(np.concatenate(lead), n_buckets)
    fold = np.concatenate(fold_of)
    predicted = np.concatenate(forecasts[method])
    # A positive metric's errors grow with its level (a 20 s test errs by seconds, a 0.2 s one
    # by milliseconds): its intervals are relative to the forecast, so they fit every series
    # and never reach below zero.
    residuals = errors[method] / predicted if rows.relative else errors[method]
    offsets = _interval_offsets(residuals, buckets, n_buckets)
    coverage = _out_of_fold_coverage(residuals, buckets, fold, n_buckets)
    model, fitted_rows = (None, 0)
    if method == "model":
        model, fitted_rows = _fit_model(examples, np.ones(len(examples.target), bool),
                                        seed=seed, max_rows=max_rows,
                                        context_features=context_features)
    forecaster = MetricForecaster(method=method, model=model, categories=categories,
                                  interval_offsets=offsets, relative=rows.relative,
                                  context_features=context_features if model else ())
    return forecaster, ForecastEvaluation(
        rows=fitted_rows, folds=len(actual), model_mae=model_mae,
        baseline_mae={name: mae[name] for name in BASELINES}, best_baseline=best_baseline,
        method=method, reason=reason, interval_coverage=coverage)


def fit_forecasters(points: Sequence[pd.DataFrame], **options
                    ) -> list[tuple[MetricForecaster, ForecastEvaluation]]:
    """fit_forecaster on each metric's points (`options` are its keywords), the metrics
    spread over the cores: a fit takes its one core for 0.5-2 s whatever the metric's size
    (M's fourteen metrics: 13-14 s in one process, 8.2 s in two, the same results). Forking
    is safe with the OpenMP runtime because every fit and prediction here runs under a one-
    thread limit (_openmp_limit), so the parent never starts OpenMP's thread pool."""
    return process_map(_fit_forecaster, [(frame, options) for frame in points], workers=cores())


def _fit_forecaster(task: tuple[pd.DataFrame, dict]) -> tuple[MetricForecaster, ForecastEvaluation]:
    points, options = task
    return fit_forecaster(points, **options)


def save_forecaster(forecaster: MetricForecaster, path: str | Path) -> None:
    joblib.dump(forecaster, path)


def load_forecaster(path: str | Path) -> MetricForecaster:
    return joblib.load(path)

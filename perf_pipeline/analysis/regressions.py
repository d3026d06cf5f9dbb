"""Change points of every series in the window, and the incidents they form.

Series: each per-test metric per test (all nodes), each metric per node (per-test metrics
as ratios to the test's median, so the node's test mix does not matter), and each per-run
metric overall; per-test metrics are judged net of the load the fleet shares (a test
against its run, a node against its own load), so each also has a series of its run
levels; a step there that load does not explain is a change most tests made, and the tests
are judged net of it (`net_of_run_steps`). A change that many tests share
at the same run is a code change; a change on one node is a node problem: the two call for
different people (bisect the commit, drain the node).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import replace

import numpy as np
import pandas as pd

from perf_pipeline.analysis.change_points import DEFAULT_SETTINGS, DetectorSettings, detect_change_points
from perf_pipeline.catalog import get_metric
from perf_pipeline.frames import sorted_categories
from perf_pipeline.parallel import MIN_POINTS, process_map

# Node samples' cycles are the day and, given three weeks, the week (quiet weekends would
# otherwise read as a drop every Friday and a rise every Monday); a cycle is removed only
# when the series holds at least three of them.
MIN_CYCLES = 3
# Confirmed but tiny shifts (a residue of the weekly cycle, a 2% wobble in memory) are not
# worth a person's attention: a change must reach half the metric's alert threshold.
MIN_SHARE_OF_ALERT_THRESHOLD = 0.5
# A test is judged against its run only where the run holds this many tests of the metric.
MIN_RUN_TESTS = 10
# The node metric that says how busy a node is: tests' node levels are judged net of it.
LOAD_METRIC = "cpu_usage"
# A node's slope of level on load needs this many points.
MIN_LOAD_POINTS = 30
CHANGE_COLUMNS = ["scope", "metric_name", "test_name", "node_id", "timestamp", "first_test_run_id",
                  "first_ci_job_id", "first_commit", "before", "after", "magnitude_percent",
                  "p_value", "effect_size", "kind", "shape", "end_timestamp", "n_points"]
INCIDENT_COLUMNS = ["incident_id", "attribution", "kind", "timestamp", "first_test_run_id",
                    "first_commit", "node_id", "metrics", "tests", "series", "worst_magnitude_percent"]


def build_series(points: pd.DataFrame) -> pd.DataFrame:
    """The series to analyse from normalized points of the window.

    `points` has timestamp, metric_name, test_name, node_id, value, test_run_id, ci_job_id,
    commit_sha, metric_scope ("test" | "node" | "run") and direction. Returns the rows again
    with `scope` ("test" | "node" | "overall"), the value to analyse, `level`, the node
    each point ran on, `run_node_id` (a test's series spans nodes: its `node_id` is empty),
    and for per-test metrics the plain ratio to the test's median, `relative`. Per-test
    metrics' rows also carry `shift_level`, the level change points are judged on (a test's
    level relative to its run's `run_factor`; a node's net of its own load), which
    cancels load that the fleet or the node shares with its peers.
    """
    points = as_categories(points)
    points = points.assign(run_node_id=points["node_id"])
    per_test = points[points["metric_scope"] == "test"]
    # names as integer codes, found once: grouping by text columns factorized them again
    # for every grouping, which cost most of this function
    metric, test, node, run = (_codes(per_test[name])
                               for name in ("metric_name", "test_name", "node_id", "test_run_id"))
    base = per_test["value"].groupby([metric, test]).transform("median")
    relative = per_test["value"] / base.where(base > 0)
    per_test = per_test.assign(relative=relative)
    # A test's runs land on different nodes; dividing by each node's typical speed for the
    # metric keeps a slow node's runs from looking like a change in the test.
    node_speed = relative.groupby([metric, node]).transform("median")
    # A node is judged against the other nodes of the same run: the fleet's daily load
    # cycle and a code change reach every node alike and cancel; a node problem does not.
    run_level = relative.groupby([metric, run]).transform("median")
    speed = node_speed.where(node_speed > 0).fillna(1.0)
    # A test is judged against the other tests of the same run (each at its node's
    # speed): load that the whole fleet shares (busy afternoons, quiet weekends) moves every
    # test of a run alike and cancels, while a code change that touches a few tests hardly
    # moves the run's median. A change that slows most tests moves the median too: it
    # shows in the run's own series (`run_series`: scope "overall", the run's median
    # ratio), whose steps the tests are then judged net of (`net_of_run_steps`).
    # The median stands for the fleet only where a run holds many tests: of two tests, one
    # that drifts would drag the other the opposite way. Smaller runs keep plain levels.
    by_run = (relative / speed).groupby([metric, run])
    run_speed = by_run.transform("median").where(by_run.transform("count") >= MIN_RUN_TESTS)
    node_level = relative / run_level.where(run_level > 0).fillna(1.0)
    # A run on one node has no other node to judge that node against: such runs are judged
    # against the runs on other nodes around them instead, a point per run in the node's
    # series and one per test in that test's series on the node (`_single_node_runs`);
    # their points leave the node's series of ratios to the run.
    alone, lone_runs = _single_node_runs(per_test, relative / speed, metric, node, run, points)
    # the window's series are the largest frame an analysis holds: the intermediates go
    # before the parts are built and concatenated (at L, 0.5 GB of the peak)
    del metric, test, node, run, base, relative, node_speed, run_level, by_run
    per_node = points[points["metric_scope"] == "node"]
    per_run = points[points["metric_scope"] == "run"]
    in_runs = per_test[~alone]
    frames = [
        per_test.assign(scope=_same(SCOPES, "test", per_test), node_id=_missing(points["node_id"], per_test),
                        level=per_test["value"] / speed, run_factor=run_speed,
                        shift_level=per_test["value"] / speed / run_speed.where(run_speed > 0).fillna(1.0)),
        in_runs.assign(scope=_same(SCOPES, "node", in_runs), test_name=_missing(points["test_name"], in_runs),
                       level=node_level[~alone],
                       shift_level=node_level[~alone] / _load_factor(in_runs, node_level[~alone], points))
        .dropna(subset=["level"]),
        lone_runs,
        per_node.assign(scope=_same(SCOPES, "node", per_node), level=per_node["value"]),
        per_run.assign(scope=_same(SCOPES, "overall", per_run), test_name=_missing(points["test_name"], per_run),
                       node_id=_missing(points["node_id"], per_run), level=per_run["value"]),
    ]
    return pd.concat(frames, ignore_index=True)


# A run on one node is judged against this many runs either side of it (in time order, the
# node's own runs left out): enough that one odd run does not set the reference, few enough
# that the reference stays near the run's time.
NEIGHBOUR_RUNS = 4


def _single_node_runs(per_test: pd.DataFrame, ratio: pd.Series, metric: pd.Series, node: pd.Series,
                      run: pd.Series, points: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """(which per-test points ran in a run on one node, the node series' points of such
    runs: one per run in the node's series, and one per test point in the series of that
    test on that node).

    A node is judged against the other nodes of the same run, and a run on one node (a CI
    job on one runner) has none: its median cancels the node's slowdown. Such a run is
    judged instead against the runs on other nodes around it: its level (the median of its
    tests' `ratio`s, their ratios to their own median at the node's usual speed) net of
    its node's load at the time (the load cycle the fleet shares, and the node's own), over
    the median of those of the NEIGHBOUR_RUNS runs either side that ran on other nodes, net
    of theirs. A code change moves a run and its neighbours alike and cancels, but for the
    few runs whose neighbours straddle it: a point per run, and a node series needs at
    least `min_size` of its runs, and a day's, on either side of a change (see
    `_changes_of`), keep those few from reading as a change."""
    alone = np.zeros(len(per_test), dtype=bool)
    if per_test.empty:
        return alone, per_test.iloc[:0]
    known = (run.notna() & node.notna()).to_numpy()
    by_run = node.groupby([metric, run])
    alone = known & (by_run.transform("min") == by_run.transform("max")).to_numpy()
    if not alone.any():
        return alone, per_test.iloc[:0]
    lone = per_test[alone].assign(ratio=ratio[alone])
    lone = lone.assign(run_level=lone["ratio"].groupby([metric[alone], run[alone]]).transform("median"))
    # each run's earliest point stands for it (its names, its time)
    lone = lone.sort_values("timestamp", kind="stable")
    runs = lone[~pd.DataFrame({"m": metric[lone.index], "r": run[lone.index]}).duplicated().to_numpy()]
    level = runs["run_level"].where(runs["run_level"] > 0)
    # against the node's absolute load: the neighbours ran at other hours of the day
    net = np.log(level / _load_factor(runs, level, points, against_fleet=False)).to_numpy()
    reference = _other_nodes_median(net, runs["node_id"], runs.groupby("metric_name", observed=True,
                                                                     sort=False).indices.values())
    judged = pd.Series(np.exp(net - reference), index=runs.index)
    runs = runs.assign(scope=_same(SCOPES, "node", runs), test_name=_missing(points["test_name"], runs),
                       value=runs["run_level"], relative=runs["run_level"], level=judged,
                       shift_level=judged, run_shape=True)
    # Some tests slower on one node only (a slow disk slows the tests that write): each
    # test's ratio to its run, on its node, over the same test's on the other nodes around
    # it; a series per test and node. The run's level cancels what the whole node does (its
    # own series above holds that), the other nodes' runs what a code change does.
    within = np.log((lone["ratio"] / lone["run_level"]).where(lone["run_level"] > 0)).to_numpy()
    elsewhere = _other_nodes_median(within, lone["node_id"], lone.groupby(
        ["metric_name", "test_name"], observed=True, sort=False).indices.values())
    shifted = pd.Series(np.exp(within - elsewhere), index=lone.index)
    lone = lone.assign(scope=_same(SCOPES, "node", lone), level=shifted, shift_level=shifted, run_shape=True)
    return alone, pd.concat([runs.drop(columns=["run_level", "ratio"]), lone.drop(columns=["run_level", "ratio"])],
                            ignore_index=True).dropna(subset=["level"])


def _other_nodes_median(values: np.ndarray, nodes: pd.Series, groups) -> np.ndarray:
    """For each value, in time order within its group (rows' positions), the median of
    those of the NEIGHBOUR_RUNS values either side of it in its group that are not of its
    node (NaN where none is)."""
    codes = pd.factorize(nodes)[0]
    reference = np.full(len(values), np.nan)
    width = 2 * NEIGHBOUR_RUNS + 1
    for positions in groups:
        if len(positions) < width:
            continue
        window = np.lib.stride_tricks.sliding_window_view(
            np.pad(values[positions], NEIGHBOUR_RUNS, constant_values=np.nan), width)
        owners = np.lib.stride_tricks.sliding_window_view(
            np.pad(codes[positions], NEIGHBOUR_RUNS, constant_values=-1), width)
        others = np.where(owners != codes[positions][:, None], window, np.nan)
        counted = np.isfinite(others).sum(axis=1) > 0
        reference[positions[counted]] = np.nanmedian(others[counted], axis=1)
    return reference


# The names of points and series: categories (integer codes into the sorted names) rather
# than text. Every analysis filters and regroups the window's series, and each filter of
# text copied every string: at M the series take 80 MB as categories against 421 MB as
# text, and the analysis steps 112 s against 132 s. Categories sort and group as their
# text does (see perf_pipeline.frames).
NAME_COLUMNS = ("metric_name", "test_name", "test_type", "node_id", "node_type", "test_run_id",
                "ci_job_id", "commit_sha", "metric_scope", "direction")
SCOPES = pd.CategoricalDtype(["node", "overall", "test"])


def as_categories(points: pd.DataFrame) -> pd.DataFrame:
    """`points` with its NAME_COLUMNS as categories of the sorted names."""
    return sorted_categories(points, NAME_COLUMNS)


def _same(dtype: pd.CategoricalDtype, value: str, rows: pd.DataFrame) -> pd.Categorical:
    """`value` for every row of `rows`, as a category of `dtype`."""
    return pd.Categorical.from_codes(np.full(len(rows), dtype.categories.get_loc(value), dtype=np.int8),
                                     dtype=dtype)


def _missing(column: pd.Series, rows: pd.DataFrame) -> pd.Categorical:
    """A missing name for every row of `rows`, of `column`'s categories (so that frames
    concatenated with `column` keep them)."""
    return pd.Categorical.from_codes(np.full(len(rows), -1, dtype=np.int8), dtype=column.dtype)


def _codes(names: pd.Series) -> pd.Series:
    """Each name's integer code (NaN where the name is missing, so grouping drops it as it
    drops a missing name)."""
    codes = pd.factorize(names)[0]
    return pd.Series(np.where(codes < 0, np.nan, codes), index=names.index)


def _load_factor(per_test: pd.DataFrame, node_level: pd.Series, points: pd.DataFrame, *,
                 against_fleet: bool = True) -> pd.Series:
    """How much each per-test point's node level owes to its node running busier or idler
    than the fleet at that hour (its LOAD_METRIC sample against the fleet's median; with
    `against_fleet` false, its sample as it is), as a factor (1 where the node reports no
    load).

    Durations follow the load of the node they ran on. The run's median cancels the load
    the fleet shares, but a node busier than its peers (a larger share of the daily and
    weekly cycle, hours of autocorrelated load) still wanders against them, and the wander
    read as node problems on quiet nodes. Per metric, the log level's slope on the load
    difference is the median of the nodes' least-squares slopes (one odd node cannot set
    it; a metric that does not follow load gets a slope near zero). A node problem that
    shows as load (a runaway process) is then seen in the load metric's own series, not in
    its tests' durations."""
    load = points[(points["metric_scope"] == "node") & (points["metric_name"] == LOAD_METRIC)]
    factor = pd.Series(1.0, index=per_test.index)
    if load.empty or per_test.empty:
        return factor
    hour = load["timestamp"].dt.floor("h")
    fleet = load["value"].groupby(hour).transform("median") if against_fleet else 0.0
    load = (load.assign(excess=load["value"] - fleet)
            [["timestamp", "node_id", "excess"]].dropna().sort_values("timestamp"))
    frame = per_test[["timestamp", "node_id", "metric_name"]].assign(
        log_level=np.log(node_level.where(node_level > 0)), row=per_test.index)
    frame = pd.merge_asof(frame.dropna(subset=["log_level", "node_id"]).sort_values("timestamp"), load,
                          on="timestamp", by="node_id", direction="nearest",
                          tolerance=pd.Timedelta(hours=1)).dropna(subset=["excess"])

    # each (metric, node)'s least-squares slope from grouped sums, not a function per group
    by_node = frame.groupby(["metric_name", "node_id"])
    x = frame["excess"] - by_node["excess"].transform("mean")
    y = frame["log_level"] - by_node["log_level"].transform("mean")
    sums = pd.DataFrame({"xy": x * y, "xx": x * x}).groupby(
        [frame["metric_name"], frame["node_id"]]).agg(["sum", "count"])
    enough = (sums[("xx", "count")] >= MIN_LOAD_POINTS) & (sums[("xx", "sum")] > 0)
    slopes = (sums[("xy", "sum")] / sums[("xx", "sum")])[enough]
    metric_slope = slopes.groupby(level="metric_name").median()
    slope = frame["metric_name"].map(metric_slope).astype(float)
    sloped = slope.notna().to_numpy()
    factor[frame["row"].to_numpy()[sloped]] = np.exp(slope.to_numpy()[sloped] * frame["excess"].to_numpy()[sloped])
    return factor


def points_per_day(timestamps: pd.Series | np.ndarray) -> int:
    """How many samples a day a regularly sampled series has (0 if it cannot tell)."""
    # pandas' Series.diff().median() in NumPy (NaT skipped, the median truncated to the
    # timestamps' unit): called once or twice per series, pandas' overhead was most of it.
    spacings = np.diff(np.asarray(timestamps))
    spacings = spacings[~np.isnat(spacings)]
    if not len(spacings):
        return 0
    spacing = np.trunc(np.median(spacings.astype(np.int64).astype(float)))
    if spacing <= 0:
        return 0
    unit = np.datetime_data(spacings.dtype)[0]
    return int(round(float(np.timedelta64(1, "D") / np.timedelta64(1, unit)) / spacing))


def node_cycle(timestamps: pd.Series | np.ndarray) -> int | None:
    """The cycle, in points, to remove from a node's samples: the week if the series holds
    three of them, else the day, else none."""
    per_day = points_per_day(timestamps)
    if per_day < 4:
        return None
    for period in (7 * per_day, per_day):
        if len(timestamps) >= MIN_CYCLES * period:
            return period
    return None


def _judged(series: pd.DataFrame) -> pd.Series:
    """The value change points are judged on: `shift_level` where build_series gives one
    (a test's level relative to its run), else `level`."""
    if "shift_level" not in series:
        return series["level"]
    return series["shift_level"].where(series["shift_level"].notna(), series["level"])


def run_series(series: pd.DataFrame) -> pd.DataFrame:
    """Each per-test metric's run level (the median over a run's tests of their ratio to
    their own median, at their node's speed) as one overall series, a point per run. Tests
    are judged relative to their run, so a change that moves every test alike (a slower
    compiler) is seen here first, and the tests are judged net of this series' steps
    (`net_of_run_steps`). `judged` is the level net of the fleet's load."""
    tests = series[(series["scope"] == "test")]
    if "run_factor" not in tests or tests.empty:
        return series.iloc[:0]
    tests = tests.dropna(subset=["run_factor"]).sort_values("timestamp", kind="stable")
    runs = tests.groupby(["metric_name", "test_run_id"], sort=False).agg(
        timestamp=("timestamp", "min"), ci_job_id=("ci_job_id", "first"), commit_sha=("commit_sha", "first"),
        direction=("direction", "first"), level=("run_factor", "first")).reset_index()
    runs = runs.assign(scope="overall", test_name=None, node_id=None, metric_scope="run", run_shape=True)
    # The fleet's own load moves every test of a run: judged net of the fleet's median
    # LOAD_METRIC at that hour (a log-linear fit per metric), as a node is net of its own.
    load = series[(series["scope"] == "node") & (series["metric_name"] == LOAD_METRIC)]
    if load.empty:
        return runs.assign(judged=runs["level"])
    fleet = (load["value"].groupby(load["timestamp"].dt.floor("h")).median()
             .rename("fleet_load").rename_axis("load_hour").reset_index())
    runs = runs.assign(load_hour=runs["timestamp"].dt.floor("h")).merge(fleet, on="load_hour", how="left")
    judged = runs["level"].copy()
    for _, group in runs[(runs["level"] > 0) & runs["fleet_load"].notna()].groupby("metric_name"):
        x = group["fleet_load"] - group["fleet_load"].median()
        y = np.log(group["level"])
        centred = x - x.mean()
        if len(group) >= MIN_LOAD_POINTS and float((centred**2).sum()) > 0:
            slope = float((centred * (y - y.mean())).sum() / (centred**2).sum())
            judged[group.index] = group["level"] / np.exp(slope * x)
    return runs.drop(columns=["load_hour", "fleet_load"]).assign(judged=judged)


def net_of_run_steps(series: pd.DataFrame, changes: pd.DataFrame) -> pd.DataFrame:
    """`series` with each per-test metric's tests judged against their run net of the steps
    that metric's run series took (`changes`: confirmed changes, of which the run series'
    steps count).

    A run's median stands for the load its tests share, and a test is judged against it.
    A step in the run series that the fleet's load does not explain is a change most tests
    made at once: one commit slowing 15 of 20 tests by 15% moves the median by as much, and
    judged against it the slowed tests would look unchanged and the others 13% faster. So
    each run's factor is taken relative to the median factor of its runs between two such
    steps: load still cancels, the step does not."""
    steps = changes[(changes["scope"] == "overall") & (changes["shape"] == "step")] \
        if len(changes) else changes
    if steps.empty or "run_factor" not in series:
        return series
    scale = np.ones(len(series))
    tests = (series["scope"] == "test").to_numpy() & series["run_factor"].notna().to_numpy()
    for metric, metric_steps in steps.groupby("metric_name", observed=True):
        rows = np.flatnonzero(tests & (series["metric_name"] == metric).to_numpy())
        if not len(rows):
            continue  # a per-run metric's own change
        runs = series.iloc[rows]
        run_start = runs.groupby("test_run_id", observed=True)["timestamp"].transform("min").to_numpy()
        bounds = np.sort(metric_steps["timestamp"].to_numpy())
        segment = np.searchsorted(bounds, run_start, side="right")
        # the median over runs, not over tests: each run counts once
        first = ~runs["test_run_id"].duplicated().to_numpy()
        level = pd.Series(runs["run_factor"].to_numpy()[first]).groupby(segment[first]).median()
        scale[rows] = level.reindex(segment).to_numpy()
    return series.assign(shift_level=series["shift_level"] * scale)


def series_change_points(series: pd.DataFrame, *, metrics: Collection[str] | None = None,
                         settings: DetectorSettings = DEFAULT_SETTINGS,
                         workers: int = 1) -> pd.DataFrame:
    """Confirmed change points of every series (of `metrics` only, when given; the other
    rows still serve, as the load the run series are judged net of), with the first run,
    job and commit after each.

    Per-test metrics are also judged as one series of their run levels (`run_series`).
    `workers` > 1 detects the series in that many processes when they hold at least
    parallel.MIN_POINTS points (fewer are not worth the processes); the result is the
    same either way."""
    runs = run_series(series)
    if metrics is not None:
        series, runs = (frame[frame["metric_name"].isin(metrics)] for frame in (series, runs))
    # the run series first: a step in them that the fleet's load does not explain is a
    # change most tests made, which the tests are then judged net of (net_of_run_steps)
    run_changes = _changes_of(runs, settings, workers)
    series = net_of_run_steps(series, run_changes)
    changes = _changes_of(series.assign(judged=_judged(series)), settings, workers)
    # in series order, as one detection over all series gives them
    return pd.concat([frame for frame in (changes, run_changes) if len(frame)] or [changes],
                     ignore_index=True).sort_values(["scope", "metric_name", "test_name", "node_id"],
                                                    na_position="last", kind="stable", ignore_index=True)


def _changes_of(series: pd.DataFrame, settings: DetectorSettings, workers: int) -> pd.DataFrame:
    """Confirmed change points of every series in `series` (rows with `judged`)."""
    rows = []
    keys = ["scope", "metric_name", "test_name", "node_id"]
    needed = [*keys, "timestamp", "judged", "direction", "metric_scope", "run_shape", "test_run_id",
              "ci_job_id", "commit_sha"]
    if series.empty:
        return pd.DataFrame(rows, columns=CHANGE_COLUMNS)
    series = series[[c for c in needed if c in series]]
    # One sort into (series, time) order and slices of plain arrays: a pandas group, sort
    # and column lookup per series cost more than most series' detection.
    group = series.groupby(keys, dropna=False, sort=True).ngroup().to_numpy()
    order = np.lexsort((series["timestamp"].to_numpy(), group))
    starts = np.r_[0, np.flatnonzero(np.diff(group[order])) + 1]
    ends = np.r_[starts[1:], len(order)]
    judged = series["judged"].to_numpy(dtype=float)[order]
    stamps = series["timestamp"].to_numpy()[order]
    first_rows = series.iloc[order[starts]]
    run_shaped = (first_rows["run_shape"] == True).to_numpy() if "run_shape" in series \
        else np.zeros(len(starts), dtype=bool)  # noqa: E712 (NaN elsewhere)
    names = list(zip(first_rows["scope"], first_rows["metric_name"], first_rows["test_name"],
                     first_rows["node_id"]))
    tasks = []
    for start, end, metric_scope, scope, direction, run_shape in zip(
            starts.tolist(), ends.tolist(), first_rows["metric_scope"], first_rows["scope"],
            first_rows["direction"], run_shaped.tolist()):
        # a point per run is regular, and the fleet's load cycles are in it
        sampled = (metric_scope == "node" and scope == "node") or run_shape
        period, series_settings = None, settings
        if sampled:
            timestamps = stamps[start:end]
            period = node_cycle(timestamps)
            # A node state that reverts within hours is an excursion, not a lasting change:
            # node samples need a day on either side of a boundary.
            per_day = points_per_day(timestamps)
            series_settings = replace(settings, min_size=max(settings.min_size, per_day))
        tasks.append((judged[start:end], str(direction), period, series_settings))
    found = process_map(_detect, tasks, workers=workers if len(judged) >= MIN_POINTS else 1)
    for (scope, metric, test, node), start, end, changes in zip(
            names, starts.tolist(), ends.tolist(), found):
        floor = MIN_SHARE_OF_ALERT_THRESHOLD * get_metric(metric).alert_threshold_percent
        for change in changes:
            if change.magnitude_percent is not None and abs(change.magnitude_percent) < floor:
                continue
            at = series.iloc[order[start + change.index]]
            end_at = series.iloc[order[start + change.end_index]]["timestamp"] \
                if change.end_index is not None else None
            rows.append({
                "scope": scope, "metric_name": metric,
                "test_name": None if pd.isna(test) else test, "node_id": None if pd.isna(node) else node,
                "timestamp": at["timestamp"], "first_test_run_id": at["test_run_id"],
                "first_ci_job_id": at["ci_job_id"], "first_commit": at["commit_sha"],
                "before": change.before, "after": change.after,
                "magnitude_percent": change.magnitude_percent, "p_value": change.p_value,
                "effect_size": change.effect_size, "kind": change.kind, "shape": change.shape,
                "end_timestamp": end_at, "n_points": end - start})
    return pd.DataFrame(rows, columns=CHANGE_COLUMNS)


def _detect(task: tuple) -> list:
    values, direction, period, settings = task
    return detect_change_points(values, direction=direction, period=period, settings=settings)


# A boundary is plausible while it costs at most this many units of the noise's mean
# absolute deviation more than the best one: a Laplace log-likelihood within 3 of its
# maximum (measured on simulated fleets: the true run inside the range in every case).
PLAUSIBLE_COST = 3.0


def test_rows(series: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """(the per-test series' rows, where each (metric, test)'s rows are among them): found
    once for all incidents, not by comparing every row's names again for each."""
    tests = series[series["scope"] == "test"]
    return tests, tests.groupby(["metric_name", "test_name"], sort=False).indices


def _boundary_costs(members: pd.DataFrame, rows: tuple[pd.DataFrame, dict], reach: int
                    ) -> tuple[pd.DataFrame, pd.Series, float]:
    """(the member series' points, the joint cost of each candidate boundary, the noise's
    mean absolute deviation at the best boundary); `rows` from `test_rows`."""
    tests, positions = rows
    empty = np.array([], dtype=int)
    frames = [tests.iloc[positions.get((metric, test), empty)].sort_values("timestamp")
              for metric, test in zip(members["metric_name"], members["test_name"])]
    return _joint_costs(frames, members, reach)


def _joint_costs(frames: list[pd.DataFrame], members: pd.DataFrame, reach: int
                 ) -> tuple[pd.DataFrame, pd.Series, float]:
    """`_boundary_costs` of the member series' points, each series a frame in time order."""
    times = sorted(set().union(*[set(f["timestamp"]) for f in frames]))
    first = members["timestamp"].min() - pd.Timedelta(hours=reach)
    last = members["timestamp"].max() + pd.Timedelta(hours=reach)
    candidates = [t for t in times if first <= t <= last]
    logs = [(f["timestamp"].to_numpy(), np.log(_judged(f).clip(lower=1e-12).to_numpy())) for f in frames]

    def cost(boundary) -> float:
        total = 0.0
        for stamps, level in logs:
            split = int(np.searchsorted(stamps, np.datetime64(boundary)))
            left, right = level[:split], level[split:]
            if len(left) == 0 or len(right) == 0:
                return np.inf
            total += np.abs(left - np.median(left)).sum() + np.abs(right - np.median(right)).sum()
        return total

    costs = pd.Series({t: cost(t) for t in candidates}, dtype=float)
    points = sum(len(level) for _, level in logs)
    spread = float(costs.min()) / points if len(costs) and np.isfinite(costs.min()) and points else 0.0
    return pd.concat(frames), costs, spread


def common_run(members: pd.DataFrame, series: pd.DataFrame, *, reach: int = 6,
               rows: tuple[pd.DataFrame, dict] | None = None) -> pd.Series:
    """The run where a code change most likely starts for all its tests at once.

    Each test alone can mislocate a step by a run or two when noisy runs sit next to it;
    a code change starts at the same run for all of them, so the boundary is chosen to
    minimise the summed absolute deviations (log levels) of every member series. `rows`:
    `test_rows(series)`, when the caller has it."""
    points, costs, _ = _boundary_costs(members, rows or test_rows(series), reach)
    boundary = costs.idxmin() if len(costs) and np.isfinite(costs.min()) else members["timestamp"].min()
    return points[points["timestamp"] >= boundary].sort_values("timestamp").iloc[0]


def plausible_start(members: pd.DataFrame, series: pd.DataFrame, *, reach: int = 6,
                    rows: tuple[pd.DataFrame, dict] | None = None
                    ) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The earliest and latest first run of a code change that the data cannot tell apart
    from the best one (joint cost within PLAUSIBLE_COST mean absolute deviations). `rows`:
    `test_rows(series)`, when the caller has it."""
    return _plausible(*_boundary_costs(members, rows or test_rows(series), reach)[1:], members)


def plausible_start_of_series(members: pd.DataFrame, points: pd.DataFrame, *, reach: int = 6
                              ) -> tuple[pd.Timestamp, pd.Timestamp]:
    """`plausible_start` of a change in one series of any scope (a CI metric's), whose
    points are `points`."""
    return _plausible(*_joint_costs([points.sort_values("timestamp")], members, reach)[1:], members)


def _plausible(costs: pd.Series, spread: float, members: pd.DataFrame
               ) -> tuple[pd.Timestamp, pd.Timestamp]:
    finite = costs[np.isfinite(costs)]
    if finite.empty:
        at = members["timestamp"].min()
        return at, at
    plausible = finite[finite <= finite.min() + PLAUSIBLE_COST * spread].index
    return plausible.min(), plausible.max()


def rows_of_series(series: pd.DataFrame, changes: pd.DataFrame) -> pd.DataFrame:
    """The rows of `series` that belong to the series of `changes` (by scope, metric, test
    and node; a missing test or node matches a missing one), in their order."""
    keys = ["scope", "metric_name", "test_name", "node_id"]
    candidates = series[series["metric_name"].isin(changes["metric_name"].unique())]
    wanted = pd.MultiIndex.from_frame(changes[keys].astype(object).fillna(""))
    return candidates[pd.MultiIndex.from_frame(candidates[keys].astype(object).fillna("")).isin(wanted)]


def changes_in_effect(changes: pd.DataFrame,
                      threshold_percent: Callable[[str], float] | None = None) -> pd.DataFrame:
    """The regressions no later change of the same series has undone: each series' latest
    change, where that is a regression at least `threshold_percent(metric)` in size (default:
    the metric's alert threshold from the catalog)."""
    if changes.empty:
        return changes
    threshold_percent = threshold_percent or (lambda m: get_metric(m).alert_threshold_percent)
    keys = ["scope", "metric_name", "test_name", "node_id"]
    latest = changes.sort_values("timestamp").groupby(keys, dropna=False).tail(1)
    threshold = latest["metric_name"].map(threshold_percent).astype(float)
    return latest[(latest["kind"] == "regression") & (latest["magnitude_percent"].abs() >= threshold)]


def group_incidents(changes: pd.DataFrame, series: pd.DataFrame | None = None, *,
                    tolerance: pd.Timedelta = pd.Timedelta(hours=6),
                    node_tolerance: pd.Timedelta = pd.Timedelta(days=3)
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(changes with `incident_id`, incidents). Per-test changes of one kind within
    `tolerance` of each other form one code-change incident (located jointly when `series` is given); one
    node's changes of one kind within `node_tolerance` form a node-problem incident (a node
    that degrades for weeks confirms a step every few days: it is one problem); per-run
    metrics' changes stand alone."""
    changes = changes.copy()
    changes["incident_id"] = pd.Series(dtype=object)
    incidents = []
    # the per-test rows once, not a scan of every row per incident (common_run uses no others)
    series = net_of_run_steps(series, changes) if series is not None else None
    rows = test_rows(series) if series is not None else None

    def add(members: pd.DataFrame, attribution: str) -> None:
        first = members.sort_values("timestamp").iloc[0].copy()
        if attribution == "code_change" and rows is not None:
            start = common_run(members, series, rows=rows)
            first["timestamp"], first["first_test_run_id"] = start["timestamp"], start["test_run_id"]
            first["first_commit"] = start["commit_sha"]
        magnitudes = members["magnitude_percent"].dropna()
        worst = float(magnitudes.loc[magnitudes.abs().idxmax()]) if len(magnitudes) else None
        kinds = set(members["kind"])
        identifier = f"{attribution}-{first['timestamp']:%Y%m%dT%H%M}-{len(incidents) + 1}"
        changes.loc[members.index, "incident_id"] = identifier
        incidents.append({
            "incident_id": identifier, "attribution": attribution,
            "kind": kinds.pop() if len(kinds) == 1 else "mixed",
            "timestamp": first["timestamp"], "first_test_run_id": first["first_test_run_id"],
            "first_commit": first["first_commit"],
            "node_id": first["node_id"] if attribution == "node_problem" else None,
            "metrics": sorted(set(members["metric_name"])),
            "tests": sorted(t for t in set(members["test_name"]) if isinstance(t, str)),
            "series": len(members), "worst_magnitude_percent": worst})

    def clusters(frame: pd.DataFrame, gap: pd.Timedelta):
        frame = frame.sort_values("timestamp")
        return frame.groupby((frame["timestamp"].diff() > gap).cumsum())

    # Per kind, as for nodes: a regression next to an improvement (two commits a run
    # apart) must not hide in a "mixed" incident.
    for _, test_changes in changes[changes["scope"] == "test"].groupby("kind"):
        for _, members in clusters(test_changes, tolerance):
            add(members, "code_change")
    for _, node_changes in changes[changes["scope"] == "node"].groupby(["node_id", "kind"]):
        for _, members in clusters(node_changes, node_tolerance):
            add(members, "node_problem")
    for index in changes.index[changes["scope"] == "overall"]:
        add(changes.loc[[index]], "ci_metric")
    return changes, pd.DataFrame(incidents, columns=INCIDENT_COLUMNS)


def attribution_share(incidents: pd.DataFrame, truth: dict, *,
                      tolerance: pd.Timedelta = pd.Timedelta(hours=6)) -> tuple[int, int]:
    """(correctly attributed, injected) for a simulator truth: each code step must be a
    code-change incident holding its tests near its time, each node step a node-problem
    incident of its node near its time."""
    correct = total = 0
    for injection in truth["injections"]:
        if injection["kind"] not in ("step", "node_step"):
            continue
        total += 1
        at = pd.Timestamp(injection["timestamp"]).tz_localize(None)
        near = incidents[(incidents["timestamp"] - at).abs() <= tolerance]
        if injection["kind"] == "step":
            hit = near[(near["attribution"] == "code_change")
                       & near["tests"].map(lambda tests: bool(set(tests) & set(injection["test_names"]))).astype(bool)]
        else:
            hit = near[(near["attribution"] == "node_problem") & (near["node_id"] == injection["node_id"])]
        correct += int(len(hit) > 0)
    return correct, total


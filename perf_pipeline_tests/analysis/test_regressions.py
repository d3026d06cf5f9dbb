"""Series, change points and incidents of a small fleet built by hand: load the fleet shares
is not a change, kinds stay apart, rare-event counts are judged as counts."""

import numpy as np
import pandas as pd
import pytest

from perf_pipeline import parallel
from perf_pipeline.analysis import regressions
from perf_pipeline.analysis.causes import CAUSE_COLUMNS, suspected_causes
from perf_pipeline.analysis.change_points import HIGHER_IS_BETTER, detect_change_points
from perf_pipeline.analysis.regressions import build_series, group_incidents, points_per_day, series_change_points
from perf_pipeline.ingest.simulator import LOAD_SENSITIVITY, _ar1, _load_shape

START = pd.Timestamp("2026-10-01")
RUNS_PER_DAY, DAYS, NODES, TESTS = 12, 30, 8, 30


def _fleet(seed: int, *, slowdown_at: int | None = None, slowed: int = TESTS, retries: bool = False,
           commits: bool = True, build_step_at: int | None = None, one_node_runs: bool = False,
           node_slowdown_at: int | None = None, node_slowed: int = TESTS) -> pd.DataFrame:
    """Normalized points of a fleet whose test durations follow their node's CPU, which
    follows the fleet's daily and weekly load cycle (as in the simulator): nothing changes
    unless the first `slowed` tests (all by default) slow by 25% from run `slowdown_at`.
    Each run records its commit unless `commits` is false; with `build_step_at`, each run
    also reports a build time, which grows by 30% from that run. A run's tests spread over
    the nodes, or with `one_node_runs` all run on one node (run r on node r % NODES, as a
    CI job takes one runner); with `node_slowdown_at`, node-03 runs the first `node_slowed`
    tests (all by default) 30% slower from that run on."""
    rng = np.random.default_rng(seed)
    hours = DAYS * 24
    hour_times = START + pd.to_timedelta(np.arange(hours) + 0.5, unit="h")
    cpu = np.clip(rng.uniform(35, 55, NODES)[:, None] * _load_shape(pd.DatetimeIndex(hour_times))[None, :]
                  + 4 * _ar1(rng, (NODES, hours), 0.7), 1, 99)
    nodes = [f"node-{i:02d}" for i in range(NODES)]
    rows = [{"timestamp": t, "metric_name": "cpu_usage", "test_name": None, "node_id": nodes[n],
             "value": cpu[n, h], "test_run_id": None, "ci_job_id": None, "commit_sha": None,
             "metric_scope": "node", "direction": "lower_is_better"}
            for n in range(NODES) for h, t in enumerate(hour_times)]
    n_runs = DAYS * RUNS_PER_DAY
    run_times = START + pd.to_timedelta((np.arange(n_runs) + 0.5) / RUNS_PER_DAY, unit="D")
    base = rng.lognormal(0, 0.6, TESTS)
    assignment = rng.integers(0, NODES, (n_runs, TESTS))
    if one_node_runs:
        assignment = np.repeat((np.arange(n_runs) % NODES)[:, None], TESTS, axis=1)
    run_hour = ((run_times - START) / pd.Timedelta(hours=1)).astype(int).to_numpy()
    duration = (base[None, :] * (1 + LOAD_SENSITIVITY * (cpu[assignment, run_hour[:, None]] - 45))
                * np.exp(rng.normal(0, 0.08, (n_runs, TESTS))))
    if slowdown_at is not None:
        duration[slowdown_at:, :slowed] *= 1.25
    if node_slowdown_at is not None:
        duration[node_slowdown_at:, :node_slowed] *= np.where(
            assignment[node_slowdown_at:, :node_slowed] == 3, 1.3, 1.0)
    metrics = {"test_execution_time": duration}
    if retries:
        metrics["test_retry_count"] = rng.poisson(0.02, (n_runs, TESTS)).astype(float)
    for metric, values in metrics.items():
        rows += [{"timestamp": run_times[r], "metric_name": metric, "test_name": f"test_{t:02d}",
                  "node_id": nodes[assignment[r, t]], "value": values[r, t],
                  "test_run_id": f"run-{r:04d}", "ci_job_id": f"job-{r:04d}",
                  "commit_sha": f"c{r:04d}" if commits else None,
                  "metric_scope": "test", "direction": "lower_is_better"}
                 for r in range(n_runs) for t in range(TESTS)]
    if build_step_at is not None:
        build = 300 * np.exp(rng.normal(0, 0.02, n_runs)) * np.where(np.arange(n_runs) >= build_step_at, 1.3, 1)
        rows += [{"timestamp": run_times[r], "metric_name": "build_time", "test_name": None,
                  "node_id": nodes[assignment[r, 0]], "value": build[r], "test_run_id": f"run-{r:04d}",
                  "ci_job_id": f"job-{r:04d}", "commit_sha": f"c{r:04d}" if commits else None,
                  "metric_scope": "run", "direction": "lower_is_better"} for r in range(n_runs)]
    return pd.DataFrame(rows)


def test_a_fleet_wide_load_cycle_raises_no_more_than_noise_does():
    series = build_series(_fleet(2, retries=True))
    durations = series[series["metric_name"] == "test_execution_time"]
    budget = len(durations) * 2 / 10_000  # each point is in a test's and a node's series
    changes = series_change_points(series)
    retried = changes[changes["metric_name"] == "test_retry_count"]
    assert retried.empty, retried
    found = changes[changes["metric_name"] == "test_execution_time"]
    assert len(found) <= budget, found[["scope", "test_name", "node_id", "magnitude_percent"]]
    assert (found["scope"] != "overall").all()  # the run series is judged net of the fleet's load
    # the cycle is strong enough to matter: judged on the plain levels, tests and nodes
    # read it as level shifts
    plain = series_change_points(series.drop(columns=["shift_level"]))
    assert len(plain[plain["metric_name"] == "test_execution_time"]) > 3 * budget


def test_a_slowdown_of_every_test_is_found_in_the_run_series():
    changes = series_change_points(build_series(_fleet(2, slowdown_at=200)))
    overall = changes[(changes["scope"] == "overall") & (changes["metric_name"] == "test_execution_time")]
    assert len(overall) == 1
    assert overall["kind"].iloc[0] == "regression"
    assert abs(int(overall["first_test_run_id"].iloc[0][-4:]) - 200) <= 1



@pytest.mark.parametrize("load_reported", [True, False])
def test_a_node_that_turns_slow_is_found_where_each_run_executes_on_one_node(load_reported):
    """A CI job takes one runner: its run's median is that node's, and judged against it the
    node's slowdown cancels. Such runs are judged against the runs on other nodes around
    them, net of each node's load where the nodes report it."""
    def points(**change) -> pd.DataFrame:
        fleet = _fleet(2, one_node_runs=True, retries=True, **change)
        return fleet if load_reported else fleet[fleet["metric_name"] != "cpu_usage"]

    series = build_series(points(node_slowdown_at=200))
    changes, incidents = group_incidents(series_change_points(series), series)
    assert changes[["scope", "node_id"]].astype(object).values.tolist() == [["node", "node-03"]]
    # node-03 runs every eighth run: run 203 is its first slow one
    assert changes["first_test_run_id"].iloc[0] in {"run-0203", "run-0211"}
    assert changes["magnitude_percent"].iloc[0] == pytest.approx(30, abs=8)
    assert incidents["attribution"].tolist() == ["node_problem"]
    contexts = pd.DataFrame(columns=["test_run_id", "node_id", "field", "value"])
    correlations = pd.DataFrame(columns=["metric_a", "metric_b", "pearson_r", "flagged"])
    causes = suspected_causes(incidents, changes, series, contexts, correlations)
    assert causes.iloc[0][["cause_type", "cause"]].tolist() == ["node", "node-03"]
    # the fleet's daily load cycle and a change every test made are no node's problem
    assert series_change_points(build_series(points())).empty
    code = series_change_points(build_series(points(slowdown_at=200)))
    assert not (code["scope"] == "node").any(), code[["scope", "node_id", "first_test_run_id"]]
    assert (code["scope"] == "test").sum() == TESTS


@pytest.mark.parametrize("load_reported", [True, False])
def test_some_tests_slower_on_one_node_are_found_where_each_run_executes_on_one_node(load_reported):
    """5 of 30 tests 30% slower on node-03 only (a slow disk slows the tests that write):
    the run's median hardly moves, and each test's series sees one run in eight. Each test
    on a node is judged against the same test on the other nodes around it."""
    def points(**change) -> pd.DataFrame:
        fleet = _fleet(2, one_node_runs=True, **change)
        return fleet if load_reported else fleet[fleet["metric_name"] != "cpu_usage"]

    series = build_series(points(node_slowdown_at=200, node_slowed=5))
    changes, incidents = group_incidents(series_change_points(series), series)
    on_node = changes[changes["scope"] == "node"]
    assert set(on_node["node_id"]) == {"node-03"}
    assert set(on_node["test_name"]) <= {f"test_{t:02d}" for t in range(5)} and len(on_node) >= 4
    assert set(on_node["first_test_run_id"]) <= {"run-0203", "run-0211"}
    assert (changes["scope"] == "node").all(), changes[["scope", "test_name", "first_test_run_id"]]
    (incident,) = incidents.itertuples(index=False)
    assert incident.attribution == "node_problem" and set(incident.tests) == set(on_node["test_name"])
    contexts = pd.DataFrame(columns=["test_run_id", "node_id", "field", "value"])
    correlations = pd.DataFrame(columns=["metric_a", "metric_b", "pearson_r", "flagged"])
    causes = suspected_causes(incidents, changes, series, contexts, correlations)
    assert causes.iloc[0][["cause_type", "cause"]].tolist() == ["node", "node-03"]
    # the same 5 tests slower on every node are a code change, not five nodes' problems
    code = series_change_points(build_series(points(slowdown_at=200, slowed=5)))
    assert not (code["scope"] == "node").any(), code[["scope", "node_id", "test_name"]]


def test_a_change_most_tests_share_is_found_in_those_tests_and_the_others_stay_quiet():
    """22 of 30 tests slow by 25% at one run: the run's median moves with them, and judged
    against it the slowed tests would look unchanged and the other 8 faster."""
    series = build_series(_fleet(2, slowdown_at=200, slowed=22))
    changes, incidents = group_incidents(series_change_points(series), series)
    tests = changes[(changes["scope"] == "test") & (changes["metric_name"] == "test_execution_time")]
    assert (tests["kind"] == "regression").all(), tests[["test_name", "kind", "magnitude_percent"]]
    assert set(tests["test_name"]) <= {f"test_{t:02d}" for t in range(22)}
    assert len(tests) >= 20
    (incident,) = incidents[incidents["attribution"] == "code_change"].itertuples(index=False)
    assert abs(int(incident.first_test_run_id[-4:]) - 200) <= 1
    assert tests["magnitude_percent"].between(15, 35).all()


def _commit_cause(points: pd.DataFrame, attribution: str = "code_change"):
    """The commit cause of the code-change incident that most series share (or of the one
    incident of `attribution`)."""
    series = build_series(points)
    changes, incidents = group_incidents(series_change_points(series), series)
    contexts = pd.DataFrame(columns=["test_run_id", "node_id", "field", "value"])
    correlations = pd.DataFrame(columns=["metric_a", "metric_b", "pearson_r", "flagged"])
    causes = suspected_causes(incidents, changes, series, contexts, correlations)
    assert list(causes.columns) == CAUSE_COLUMNS
    if attribution == "code_change":
        chosen = incidents.loc[incidents["series"].idxmax()]
        assert chosen["attribution"] == "code_change" and chosen["series"] >= 3
    else:
        (chosen,) = (row for _, row in incidents[incidents["attribution"] == attribution].iterrows())
    (cause,) = causes[(causes["incident_id"] == chosen["incident_id"])
                      & (causes["cause_type"] == "commit")].itertuples(index=False)
    return cause


def test_a_code_change_names_the_commits_to_bisect_or_the_runs_where_none_was_recorded():
    with_commits = _commit_cause(_fleet(2, slowdown_at=200, slowed=5))
    good, last = (int(c[1:]) for c in with_commits.cause.split(".."))
    assert good < 200 <= last and last - good <= 3
    without = _commit_cause(_fleet(2, slowdown_at=200, slowed=5, commits=False))
    assert without.cause == f"runs run-{good:04d}..run-{last:04d}"
    assert "?" not in without.cause + without.evidence and "context_data.commit" in without.evidence


@pytest.mark.parametrize("drifting", [["test_00"], [f"test_{t:02d}" for t in range(TESTS)]])
def test_a_drift_that_opens_the_window_has_no_commit_range_made_up_for_it(drifting):
    """One test, or every test (seen in the run series), whose duration grows by half over
    the window, steadily: a ramp from the window's start has no first run, so there is
    nothing to bisect."""
    points = _fleet(2)
    rows = points["test_name"].isin(drifting).to_numpy()
    runs = points.loc[rows, "test_run_id"].str[-4:].astype(int).to_numpy()
    points.loc[rows, "value"] *= 1 + 0.5 * runs / runs.max()
    series = build_series(points)
    changes, incidents = group_incidents(series_change_points(series), series)
    where = (changes["test_name"] == drifting[0]) if len(drifting) == 1 else (changes["scope"] == "overall")
    (change,) = changes[where].itertuples(index=False)
    assert change.shape == "ramp" and change.kind == "regression"
    contexts = pd.DataFrame(columns=["test_run_id", "node_id", "field", "value"])
    correlations = pd.DataFrame(columns=["metric_a", "metric_b", "pearson_r", "flagged"])
    causes = suspected_causes(incidents, changes, series, contexts, correlations)
    mine = causes[causes["incident_id"] == change.incident_id]
    assert list(mine["cause_type"]) == ["gradual"], mine
    assert mine["cause"].iloc[0] == f"a ramp since {START:%Y-%m-%d} or before"


def test_a_ci_metric_that_changed_names_the_commits_to_bisect_too():
    cause = _commit_cause(_fleet(2, build_step_at=150), attribution="ci_metric")
    good, last = (int(c[1:]) for c in cause.cause.split(".."))
    assert good < 150 <= last and last - good <= 3
    assert cause.score == 1.0 and "of 8 nodes that reported it" in cause.evidence

def _change(test: str, run: int, kind: str, magnitude: float) -> dict:
    return {"scope": "test", "metric_name": "test_execution_time", "test_name": test, "node_id": None,
            "timestamp": START + pd.Timedelta(hours=2 * run), "first_test_run_id": f"run-{run:04d}",
            "first_ci_job_id": f"job-{run:04d}", "first_commit": f"c{run:04d}", "before": 1.0,
            "after": 1 + magnitude / 100, "magnitude_percent": magnitude, "p_value": 0.0,
            "effect_size": 3.0, "kind": kind, "shape": "step", "end_timestamp": None, "n_points": 360}


def test_a_regression_and_an_improvement_a_run_apart_are_separate_incidents():
    changes = pd.DataFrame([_change("test_a", 138, "regression", 39.0),
                            _change("test_b", 136, "improvement", -27.0),
                            _change("test_c", 139, "regression", 20.0)])
    changes, incidents = group_incidents(changes)
    assert sorted(incidents["kind"]) == ["improvement", "regression"]
    regression = incidents[incidents["kind"] == "regression"].iloc[0]
    assert regression["tests"] == ["test_a", "test_c"] and regression["first_test_run_id"] == "run-0138"
    assert incidents.loc[incidents["kind"] == "improvement", "tests"].iloc[0] == ["test_b"]


def test_mostly_zero_counts_raise_nothing_and_a_sustained_pass_rate_drop_is_found():
    rng = np.random.default_rng(3)
    for _ in range(20):
        assert detect_change_points(rng.poisson(0.02, 360).astype(float)) == []
        assert detect_change_points(100 * (1 - rng.binomial(50, 0.01, 360) / 50),
                                    direction=HIGHER_IS_BETTER) == []
    rate = 100 * (1 - rng.binomial(50, 0.01, 360) / 50)
    rate[240:] = 90.0
    (drop,) = detect_change_points(rate, direction=HIGHER_IS_BETTER)
    assert drop.index == 240 and drop.kind == "regression" and drop.after == 90.0
    assert -11 < drop.magnitude_percent < -9
    retries = rng.poisson(0.02, 360).astype(float)
    retries[250:] = rng.poisson(0.4, 110)
    (rise,) = detect_change_points(retries)
    assert abs(rise.index - 250) <= 5 and rise.kind == "regression"


def test_points_per_day_reads_the_median_spacing_as_pandas_does():
    """NumPy arithmetic for speed, pandas' answer: NaT skipped, any timestamp unit, the
    median spacing truncated to the unit, irregular gaps outvoted by the usual one."""
    hourly = pd.Series(pd.date_range("2026-10-01", periods=48, freq="h"))
    assert points_per_day(hourly) == 24
    assert points_per_day(hourly.astype("datetime64[s]")) == 24
    assert points_per_day(hourly.to_numpy()) == 24
    gappy = hourly.drop(index=[5, 6, 7, 30]).reset_index(drop=True)
    gappy[3] = pd.NaT
    expected = int(round(pd.Timedelta(days=1) / gappy.diff().median()))
    assert points_per_day(gappy) == expected == 24
    assert points_per_day(hourly[:1]) == 0
    assert points_per_day(pd.Series([START, START, START])) == 0


def test_series_are_judged_in_time_order_whatever_the_row_order():
    """series_change_points sorts rows into series and time order itself: shuffled rows
    give the same change points, at the same first runs."""
    series = build_series(_fleet(3, slowdown_at=200))
    found = series_change_points(series)
    shuffled = series.sample(frac=1.0, random_state=0)
    assert len(found) > 0
    pd.testing.assert_frame_equal(series_change_points(shuffled), found)


def test_detection_in_worker_processes_finds_the_same_changes(monkeypatch):
    """workers > 1 hands the series to a process pool (here for any number of points):
    the same change points, in the same order, as detecting them in this process."""
    monkeypatch.setattr(regressions, "MIN_POINTS", 1)
    pools = []
    real_pool = parallel.ProcessPoolExecutor

    def counted_pool(*args, **kwargs):
        pools.append(kwargs.get("max_workers"))
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(parallel, "ProcessPoolExecutor", counted_pool)
    series = build_series(_fleet(3, slowdown_at=200))
    here = series_change_points(series)
    assert pools == []
    in_workers = series_change_points(series, workers=2)
    assert pools == [2]
    assert len(here) > 0
    pd.testing.assert_frame_equal(in_workers, here)


def test_series_names_are_categories_that_keep_the_text_and_its_order():
    """build_series gives names as categories (sorted, as text sorts) and, whether the
    points come as text or as categories, the same values, with missing names missing."""
    points = _fleet(4)
    series = build_series(points)
    for column in ("scope", "metric_name", "test_name", "node_id", "run_node_id", "test_run_id"):
        dtype = series[column].dtype
        assert isinstance(dtype, pd.CategoricalDtype), column
        assert list(dtype.categories) == sorted(dtype.categories), column
    as_text = series.astype({c: object for c in series.columns if isinstance(series[c].dtype, pd.CategoricalDtype)})
    assert set(as_text["scope"]) == {"test", "node"}  # this fleet has no per-run metric
    tests = as_text[as_text["scope"] == "test"]
    assert tests["node_id"].isna().all() and tests["test_name"].notna().all()
    assert as_text.loc[as_text["scope"] == "node", "node_id"].notna().all()
    from_categories = build_series(points.astype({"metric_name": "category", "node_id": "category"}))
    pd.testing.assert_frame_equal(from_categories, series)

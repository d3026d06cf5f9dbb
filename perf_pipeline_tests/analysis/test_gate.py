"""The CI gate's statistics against ground truth: runs with a known regression and runs
with none, drawn from the same noise model."""

import numpy as np
import pandas as pd

from perf_pipeline.analysis.gate import (
    IMPROVEMENT,
    NO_BASELINE,
    OK,
    REGRESSION,
    GateSettings,
    compare_run,
    holm,
)


def threshold(metric: str) -> float:
    return 10.0


def history(rng, *, tests=10, runs=30, repeats=5, noise=0.03, run_noise=0.0,
            metric="test_execution_time"):
    """`runs` baseline runs and one more (the run judged), each measuring every test
    `repeats` times with multiplicative noise."""
    rows = []
    levels = {f"tests/test_m.py::test_{i}": rng.uniform(0.2, 8.0) for i in range(tests)}
    for run in range(runs + 1):
        for test, level in levels.items():
            shift = rng.normal(0, run_noise)
            for _ in range(repeats):
                rows.append((metric, test, f"run-{run}", level * np.exp(shift + rng.normal(0, noise))))
    frame = pd.DataFrame(rows, columns=["metric_name", "test_name", "test_run_id", "value"])
    judged = frame["test_run_id"] == f"run-{runs}"
    return frame[~judged], frame[judged].copy()


def test_a_ten_percent_regression_on_a_three_percent_noise_test_fails():
    rng = np.random.default_rng(11)
    caught = 0
    for _ in range(20):
        baseline, run = history(rng)
        slow = run["test_name"] == "tests/test_m.py::test_3"
        run.loc[slow, "value"] *= 1.10
        result = compare_run(run, baseline, threshold_percent=threshold)
        flagged = result[result["verdict"] == REGRESSION]
        assert set(flagged["test_name"]) <= {"tests/test_m.py::test_3"}  # nothing else
        caught += len(flagged) == 1
        if len(flagged):
            assert 5 < flagged["change_percent"].iloc[0] < 15
    assert caught >= 19



def test_a_regression_names_the_nodes_it_was_measured_on():
    rng = np.random.default_rng(12)
    baseline, run = history(rng)
    run["node_id"] = np.where(np.arange(len(run)) % 2, "node-3", "node-1")
    slow = run["test_name"] == "tests/test_m.py::test_3"
    run.loc[slow, "value"] *= 1.3
    run.loc[slow, "node_id"] = "node-3"
    result = compare_run(run, baseline, threshold_percent=threshold)
    (flagged,) = result[result["verdict"] == REGRESSION].itertuples(index=False)
    assert flagged.test_name == "tests/test_m.py::test_3"
    assert flagged.reason.endswith("; measured on node-3")
    run.loc[slow, "node_id"] = [f"node-{i}" for i in range(slow.sum())]
    (flagged,) = compare_run(run, baseline, threshold_percent=threshold).query("verdict == @REGRESSION").itertuples(index=False)
    assert flagged.reason.endswith("; measured on node-0, node-1, node-2 and 2 more")
    assert (result.loc[result["verdict"] == OK, "reason"] == "").all()

def test_runs_without_change_pass_at_least_99_times_in_100():
    rng = np.random.default_rng(5)
    failures = 0
    for _ in range(100):
        baseline, run = history(rng, run_noise=0.01)
        result = compare_run(run, baseline, threshold_percent=threshold)
        failures += bool((result["verdict"] == REGRESSION).any())
    print(f"false failures: {failures} of 100 clean runs")
    assert failures <= 1


def test_direction_decides_what_a_regression_is():
    """A pass rate falling is a regression; one rising is an improvement."""
    rng = np.random.default_rng(2)
    rows = [("test_pass_rate", None, f"run-{r}", 90 + rng.normal(0, 0.5)) for r in range(30)]
    baseline = pd.DataFrame(rows, columns=["metric_name", "test_name", "test_run_id", "value"])
    worse = pd.DataFrame([("test_pass_rate", None, "new", 80.0)], columns=baseline.columns)
    better = worse.assign(value=99.5)
    assert compare_run(worse, baseline, threshold_percent=threshold)["verdict"][0] == REGRESSION
    assert compare_run(better, baseline, threshold_percent=threshold)["verdict"][0] == IMPROVEMENT


def test_small_but_certain_changes_and_missing_baselines_do_not_fail():
    rng = np.random.default_rng(4)
    baseline, run = history(rng, tests=2, noise=0.002)
    run.loc[run["test_name"] == "tests/test_m.py::test_0", "value"] *= 1.02  # certain, but 2%
    new_test = run.iloc[:1].assign(test_name="tests/test_m.py::test_new")
    result = compare_run(pd.concat([run, new_test]), baseline, threshold_percent=threshold)
    verdicts = dict(zip(result["test_name"], result["verdict"]))
    assert verdicts["tests/test_m.py::test_0"] == "small regression"
    assert verdicts["tests/test_m.py::test_1"] == OK
    assert verdicts["tests/test_m.py::test_new"] == NO_BASELINE


def test_repeats_do_not_hide_run_to_run_noise():
    """With 20 repeats per run but a level that wanders 5% from run to run, a run 8% slower
    than the median is within what runs do: no failure."""
    rng = np.random.default_rng(8)
    failures = 0
    for _ in range(20):
        baseline, run = history(rng, tests=3, repeats=20, noise=0.02, run_noise=0.05)
        run["value"] *= 1.08
        result = compare_run(run, baseline, threshold_percent=threshold)
        failures += bool((result["verdict"] == REGRESSION).any())
    assert failures <= 2


def test_holm_adjustment():
    adjusted = holm(np.array([0.01, 0.04, 0.03, 0.2]))
    np.testing.assert_allclose(adjusted, [0.04, 0.09, 0.09, 0.2])


def test_settings_alpha_changes_the_bar():
    rng = np.random.default_rng(3)
    baseline, run = history(rng, tests=1, repeats=1, noise=0.03)
    run["value"] *= 1.09
    strict = compare_run(run, baseline, threshold_percent=threshold, settings=GateSettings(alpha=1e-6))
    loose = compare_run(run, baseline, threshold_percent=threshold, settings=GateSettings(alpha=0.05))
    assert strict["p_adjusted"][0] == loose["p_adjusted"][0]
    assert strict["verdict"][0] != REGRESSION
    assert loose["verdict"][0] == REGRESSION


def test_a_baseline_stuck_at_zero_is_judged_without_error():
    """Failure rates and retry counts sit at 0 run after run; the gate must not divide by
    their zero spread."""
    baseline = pd.DataFrame([("node_failure_rate", None, f"run-{r}", 0.0) for r in range(10)],
                            columns=["metric_name", "test_name", "test_run_id", "value"])
    for value in (0.0, 5.0):
        run = pd.DataFrame([("node_failure_rate", None, "new", value)], columns=baseline.columns)
        result = compare_run(run, baseline, threshold_percent=threshold)
        assert result["verdict"][0] == OK
        assert "baseline level is zero" in result["reason"][0]

"""Forecasting against synthetic histories whose best forecast is known."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from perf_pipeline.analysis.forecasting import (
    BASELINES,
    ForecastEvaluation,
    MetricForecaster,
    fit_forecaster,
    fit_forecasters,
    load_forecaster,
    save_forecaster,
)
from perf_pipeline_tests.benchmarks.forecast_suite import (
    START,
    node_speeds,
    random_walks,
    seasonal_nodes,
    sparse_tests,
    test_base,
)

FITTED_DAYS = 35
CUT = START + pd.Timedelta(days=FITTED_DAYS)


@pytest.fixture(scope="module")
def seasonal() -> tuple[pd.DataFrame, MetricForecaster, ForecastEvaluation]:
    """Ten nodes: 35 days to fit on, and the 14 days after them to check forecasts against."""
    full = seasonal_nodes(10, FITTED_DAYS + 14, seed=3)
    forecaster, evaluation = fit_forecaster(full[full["hour"] < CUT], seed=3)
    return full, forecaster, evaluation


def _chosen_mae_is_the_minimum(evaluation: ForecastEvaluation) -> None:
    candidates = {"model": evaluation.model_mae, **evaluation.baseline_mae}
    assert candidates[evaluation.method] == min(candidates.values())


def test_a_strong_daily_cycle_is_forecast_by_the_model_with_honest_intervals(seasonal):
    full, forecaster, evaluation = seasonal
    assert evaluation.method == "model" and evaluation.folds == 3
    assert evaluation.model_mae < min(evaluation.baseline_mae.values())
    assert set(evaluation.baseline_mae) == set(BASELINES)
    assert evaluation.reason.startswith("model MAE") and evaluation.best_baseline in evaluation.reason
    assert 0 < evaluation.rows <= 60_000
    assert 0.6 <= evaluation.interval_coverage <= 0.95

    history = full[full["hour"] < CUT]
    forecast = forecaster.forecast(history, horizon_hours=14 * 24)
    truth = full[full["hour"] >= CUT].merge(forecast, on=["series", "hour"], validate="1:1")
    assert len(truth) == 10 * 14 * 24
    inside = (truth["value"] >= truth["lower"]) & (truth["value"] <= truth["upper"])
    assert 0.6 <= inside.mean() <= 0.95
    # Worth more than yesterday's value at the same hour, on hours it never saw.
    yesterday = history[history["hour"] >= CUT - pd.Timedelta(days=1)].assign(
        hour=lambda f: f["hour"] + pd.Timedelta(days=1))
    naive = truth.merge(yesterday[["series", "hour", "value"]], on=["series", "hour"],
                        suffixes=("", "_yesterday"))
    assert (truth["value"] - truth["forecast"]).abs().mean() < (
        naive["value"] - naive["value_yesterday"]).abs().mean()


def test_a_random_walk_keeps_the_best_baseline():
    forecaster, evaluation = fit_forecaster(random_walks(6, 28, seed=4), seed=4)
    _chosen_mae_is_the_minimum(evaluation)
    if evaluation.method != "model":
        assert evaluation.method == evaluation.best_baseline
        assert "does not beat" in evaluation.reason
        assert forecaster.model is None and evaluation.rows == 0
    assert evaluation.best_baseline in evaluation.reason
    assert evaluation.baseline_mae["last_value"] < evaluation.baseline_mae["seasonal_naive_weekly"]


def test_too_little_history_falls_back_to_the_last_value():
    points = seasonal_nodes(3, 3, seed=5)
    forecaster, evaluation = fit_forecaster(points)
    assert evaluation.method == "last_value" and evaluation.folds == 0
    assert evaluation.model_mae is None and evaluation.interval_coverage is None
    assert "too little history" in evaluation.reason
    forecast = forecaster.forecast(points, horizon_hours=48)
    last = points.sort_values("hour").groupby("series")["value"].last()
    assert len(forecast) == 3 * 48
    np.testing.assert_allclose(forecast.groupby("series")["forecast"].mean(), last)


def test_a_test_is_forecast_for_the_nodes_it_ran_on_lately():
    speeds = node_speeds()
    slow = [n for n, s in speeds.items() if s >= 2]
    fast = [n for n, s in speeds.items() if s < 2]
    recent = {"test_00": slow[:1], "test_01": fast[:3], "test_02": [slow[0], fast[0], fast[1]]}
    points = sparse_tests(30, 30, seed=6, speeds=speeds, recent_nodes=recent)
    forecaster, evaluation = fit_forecaster(points, seed=6)
    assert evaluation.method == "model"
    _chosen_mae_is_the_minimum(evaluation)

    mean_forecast = forecaster.forecast(points).groupby("series")["forecast"].mean()
    # Only on the slow node lately: twice what it costs on a fast one.
    assert mean_forecast["test_00"] == pytest.approx(2 * test_base(0), rel=0.1)
    assert mean_forecast["test_01"] == pytest.approx(test_base(1), rel=0.1)
    # In general: its base times the mean speed of the nodes it ran on in the last week.
    last_week = points[points["hour"] > points["hour"].max() - pd.Timedelta(days=7)]
    node_mix = last_week.assign(speed=last_week["node_id"].map(speeds)).groupby("series")["speed"].mean()
    for test in ("test_00", "test_01", "test_02", "test_07", "test_20"):
        expected = test_base(int(test.removeprefix("test_"))) * node_mix[test]
        assert mean_forecast[test] == pytest.approx(expected, rel=0.1)


def test_many_tests_on_many_nodes_are_forecast_per_node_once_with_the_same_result(seasonal):
    # 40 tests on 20 nodes over 336 hours: too many predictions to make on every node at
    # every hour, so the node's effect is fitted apart and added once per node.
    points = sparse_tests(40, 21, seed=7)
    forecaster, evaluation = fit_forecaster(points, seed=7)
    assert evaluation.method == "model" and forecaster.context_features
    on_every_node = dataclasses.replace(forecaster, context_features=())
    pd.testing.assert_frame_equal(forecaster.forecast(points), on_every_node.forecast(points),
                                  check_exact=False, rtol=1e-9)
    # A node's own metric has one context per series: every interaction stays in the model.
    assert seasonal[1].context_features == ()


def test_a_saved_forecaster_forecasts_the_same(seasonal, tmp_path):
    full, forecaster, _ = seasonal
    history = full[full["hour"] < CUT]
    save_forecaster(forecaster, tmp_path / "forecaster.joblib")
    loaded = load_forecaster(tmp_path / "forecaster.joblib")
    pd.testing.assert_frame_equal(loaded.forecast(history), forecaster.forecast(history))


def test_metrics_fitted_in_worker_processes_are_fitted_as_in_this_one(monkeypatch):
    """fit_forecasters spreads metrics over forked workers: each metric gets what
    fit_forecaster gives it here, in the order given, the model and its fallbacks alike."""
    import perf_pipeline.analysis.forecasting as forecasting
    monkeypatch.setattr(forecasting, "cores", lambda: 2)  # fork even on a one-core machine
    metrics = [seasonal_nodes(4, 30, seed=8), random_walks(4, 28, seed=9),
               seasonal_nodes(2, 3, seed=10), sparse_tests(12, 21, seed=11)]
    fitted = fit_forecasters(metrics, seed=8, max_rows=20_000)
    alone = [fit_forecaster(points, seed=8, max_rows=20_000) for points in metrics]
    assert [evaluation for _, evaluation in fitted] == [evaluation for _, evaluation in alone]
    assert {evaluation.method for _, evaluation in fitted} >= {"model", "last_value"}
    for points, (forecaster, _), (expected, _) in zip(metrics, fitted, alone, strict=True):
        pd.testing.assert_frame_equal(forecaster.forecast(points), expected.forecast(points))


def test_a_forecast_has_every_series_and_hour_and_only_uses_points_up_to_its_origin(seasonal):
    full, forecaster, _ = seasonal
    origin = CUT - pd.Timedelta(days=2, hours=5)
    forecast = forecaster.forecast(full, origin=origin, horizon_hours=72)
    assert list(forecast.columns) == ["series", "hour", "forecast", "lower", "upper", "method"]
    assert len(forecast) == full["series"].nunique() * 72
    assert forecast.groupby("series")["hour"].agg(["min", "max", "nunique"]).eq(
        pd.Series({"min": origin + pd.Timedelta(hours=1), "max": origin + pd.Timedelta(hours=72),
                   "nunique": 72})).all().all()
    assert (forecast["lower"] <= forecast["forecast"]).all()
    assert (forecast["forecast"] <= forecast["upper"]).all()
    assert (forecast["method"] == "model").all()
    pd.testing.assert_frame_equal(
        forecast, forecaster.forecast(full[full["hour"] <= origin], horizon_hours=72))

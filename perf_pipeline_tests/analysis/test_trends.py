"""Trend statistics against series whose truth is known."""

import numpy as np
import pandas as pd
import pytest

from perf_pipeline.analysis.trends import (
    analyze_trend,
    benjamini_hochberg,
    classify_trends,
    compute_trend_stats,
)

DAYS = np.arange(30.0)
WEEKDAY = (DAYS.astype(int) + 3) % 7  # the window starts on a Thursday


def _noise(kind: str, rng: np.random.Generator, n: int = 30) -> np.ndarray:
    if kind == "gaussian":
        return 100 + rng.normal(0, 5, n)
    if kind == "lognormal":
        return 100 * rng.lognormal(0, 0.15, n)
    if kind == "ar1":
        e = np.zeros(n)
        for i in range(1, n):
            e[i] = 0.5 * e[i - 1] + rng.normal(0, 4)
        return 100 + e
    if kind == "weekly":
        return 100 + 15 * (WEEKDAY[:n] >= 5) + rng.normal(0, 3, n)
    if kind == "outliers":
        values = 100 + rng.normal(0, 4, n)
        values[rng.choice(n, 3, replace=False)] *= 3
        return values
    raise ValueError(kind)


def _table(series: dict[str, np.ndarray], direction_sign: int = 1) -> pd.DataFrame:
    rows = []
    for name, values in series.items():
        result = analyze_trend(DAYS[: len(values)], values, weekday=WEEKDAY[: len(values)])
        rows.append({"name": name, "degrading_sign": direction_sign, **result.__dict__})
    return classify_trends(pd.DataFrame(rows), alpha=0.01, min_change_percent=5.0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pure_noise_of_every_family_raises_nothing(seed):
    rng = np.random.default_rng(seed)
    kinds = ["gaussian", "lognormal", "ar1", "weekly", "outliers"]
    series = {f"{kind}-{i}": _noise(kind, rng) for kind in kinds for i in range(80)}
    table = _table(series)
    assert not table["is_significant"].any(), table[table["is_significant"]]
    assert set(table["trend_direction"]) == {"stable"}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_known_trends_are_found_among_noise_with_the_right_direction(seed):
    rng = np.random.default_rng(seed)
    # Daily medians of a test run a dozen times a day scatter by about 4%.
    series = {f"noise-{i}": 100 * rng.lognormal(0, 0.04, 30) for i in range(300)}
    # +25% and -25% over the 30 days, in the same noise.
    series["rising"] = 100 * (1 + 0.25 * DAYS / 29) * rng.lognormal(0, 0.04, 30)
    series["falling"] = 100 * (1 - 0.25 * DAYS / 29) * rng.lognormal(0, 0.04, 30)
    table = _table(series).set_index("name")
    assert table.loc["rising", "is_significant"] and table.loc["falling", "is_significant"]
    assert table.loc["rising", "trend_direction"] == "degrading"  # lower is better: rising is bad
    assert table.loc["falling", "trend_direction"] == "improving"
    assert table.loc["rising", "change_over_window_percent"] == pytest.approx(25 / 1.125, abs=6)
    assert table.loc["rising", "change_rate_percent"] == pytest.approx(25 / 1.125 / 29 * 7, rel=0.3)
    assert table.drop(index=["rising", "falling"])["is_significant"].sum() == 0


def test_direction_follows_the_metric_not_the_sign_of_the_slope():
    rng = np.random.default_rng(5)
    falling = {"pass_rate": 95 * (1 - 0.2 * DAYS / 29) + rng.normal(0, 0.5, 30)}
    table = _table(falling, direction_sign=-1)  # higher is better: falling is a regression
    assert table.loc[0, "trend_direction"] == "degrading"


def test_weekly_cycle_over_partial_weeks_is_removed_not_read_as_trend():
    values = 100 + 30 * (WEEKDAY >= 5)  # exact weekend bump, no noise, no trend
    result = analyze_trend(DAYS, values, weekday=WEEKDAY)
    assert result.seasonally_adjusted
    assert abs(result.theil_sen_slope_per_day) < 1e-9
    assert result.change_over_window_percent == pytest.approx(0, abs=1e-6)


def test_change_rate_is_not_a_ratio_to_a_mean_near_zero():
    rng = np.random.default_rng(3)
    values = rng.normal(0, 1, 30) + 0.2 * DAYS - 3  # crosses zero; mean ≈ 0
    result = analyze_trend(DAYS, values)
    assert result.change_rate_percent is None and result.change_over_window_percent is None
    assert result.change_over_window == pytest.approx(0.2 * 29, rel=0.2)
    table = classify_trends(pd.DataFrame([{"degrading_sign": 1, **result.__dict__}]),
                            alpha=0.05, min_change_percent=5)
    assert table.loc[0, "is_significant"]  # judged against its noise instead


def test_too_few_days_give_no_trend():
    result = analyze_trend(np.arange(5.0), [1, 2, 3, 4, 5], min_days=7)
    assert result.mann_kendall_p_value is None and result.n_days == 5
    table = classify_trends(pd.DataFrame([{"degrading_sign": 1, **result.__dict__}]),
                            alpha=0.05, min_change_percent=5)
    assert table.loc[0, "trend_direction"] == "stable" and not table.loc[0, "is_significant"]


def test_benjamini_hochberg_matches_the_step_up_rule_and_skips_missing():
    p = [0.01, 0.04, 0.03, None, 0.2]
    adjusted = benjamini_hochberg(p)
    # sorted 0.01, 0.03, 0.04, 0.2 with m = 4: 0.04, 0.0533, 0.0533, 0.2
    assert adjusted[0] == pytest.approx(0.04)
    assert adjusted[1] == pytest.approx(0.04 * 4 / 3)
    assert adjusted[2] == pytest.approx(0.04 * 4 / 3)
    assert np.isnan(adjusted[3])
    assert adjusted[4] == pytest.approx(0.2)


def test_compute_trend_stats_builds_one_row_per_series_with_catalog_direction():
    rng = np.random.default_rng(9)
    days = pd.date_range("2026-10-01", periods=30, freq="D")
    frames = []
    for scope, metric, test, node, values in [
        ("test", "test_execution_time", "t1", None, 2 * (1 + 0.3 * DAYS / 29)),
        ("overall", "code_coverage", None, None, 80 - 0.5 * DAYS),
        ("node", "cpu_usage", None, "n1", 50 + rng.normal(0, 2, 30)),
    ]:
        frames.append(pd.DataFrame({"scope": scope, "metric_name": metric, "test_name": test,
                                    "node_id": node, "relative": False, "day": days,
                                    "value": values, "n": 12}))
    table = compute_trend_stats(pd.concat(frames), window_start=days[0], window_end=days[-1],
                                computed_at=days[-1], alpha=0.05, min_change_percent=5,
                                min_days=7).set_index("metric_name")
    assert table.loc["test_execution_time", "trend_direction"] == "degrading"
    assert table.loc["code_coverage", "trend_direction"] == "degrading"  # coverage falling
    assert table.loc["cpu_usage", "trend_direction"] == "stable"
    assert table.loc["test_execution_time", "n_points"] == 360
    assert table.loc["code_coverage", "unit"] == "percent"

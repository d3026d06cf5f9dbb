"""Seasonal profiles against hourly series with known cycles."""

import numpy as np
import pandas as pd

from perf_pipeline.analysis.seasonality import hourly_grid, seasonal_profiles

HOURS = pd.date_range("2026-10-05", periods=28 * 24, freq="h")  # four weeks from a Monday


def _frame(metric: str, node: str, values: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"hour": HOURS, "metric_name": metric, "node_id": node, "value": values})


def test_daily_and_weekly_cycles_are_found_where_they_are_and_not_in_noise():
    rng = np.random.default_rng(1)
    daily = 50 + 20 * np.sin(2 * np.pi * (HOURS.hour.to_numpy() - 8) / 24)
    weekend = np.where(HOURS.day_of_week.to_numpy() >= 5, -15.0, 0.0)
    frames = [_frame("cpu_usage", f"n{i}", daily + weekend + rng.normal(0, 3, len(HOURS)))
              for i in range(4)]
    frames += [_frame("network_io_sent", f"n{i}", 5 + rng.normal(0, 1, len(HOURS))) for i in range(4)]
    profiles = seasonal_profiles(pd.concat(frames, ignore_index=True))

    node_daily = profiles[(profiles.node_id == "n0") & (profiles.cycle == "daily")].set_index(
        ["metric_name", "phase"])
    cpu = node_daily.loc["cpu_usage"]
    assert cpu["strength"].iloc[0] > 0.8
    assert 13 <= cpu["effect"].idxmax() <= 15  # the sine peaks at 14:00, flat within ±1 h
    assert cpu["effect"].max() - cpu["effect"].min() > 30
    assert node_daily.loc["network_io_sent"]["strength"].iloc[0] < 0.45

    fleet = profiles[profiles.node_id.isna()]
    weekly = fleet[(fleet.metric_name == "cpu_usage") & (fleet.cycle == "weekly")].set_index("phase")
    assert len(weekly) == 168
    weekend_effect = weekly.loc[5 * 24:].effect.mean() - weekly.loc[: 5 * 24 - 1].effect.mean()
    assert weekend_effect < -10


def test_series_with_too_many_gaps_or_too_short_are_skipped():
    rng = np.random.default_rng(2)
    values = 10 + rng.normal(0, 1, len(HOURS))
    gappy = _frame("cpu_usage", "n1", values).iloc[::2]  # half the hours missing
    assert hourly_grid(gappy["hour"], gappy["value"]) is None
    short = _frame("cpu_usage", "n2", values).iloc[:48]
    assert seasonal_profiles(short).empty


def test_exactly_two_weeks_of_hours_gives_a_daily_profile_without_error():
    """MSTL drops the weekly period at exactly two weeks (336 hours); that length used to
    crash the fleet-wide decomposition."""
    hours = pd.date_range("2026-11-01", periods=14 * 24, freq="h")
    values = 50 + 10 * np.sin(2 * np.pi * hours.hour / 24)
    hourly = pd.DataFrame({"hour": hours, "metric_name": "cpu_usage", "node_id": "n1", "value": values})
    profiles = seasonal_profiles(hourly)
    fleet = profiles[profiles["node_id"].isna()]
    assert set(fleet["cycle"]) == {"daily"}

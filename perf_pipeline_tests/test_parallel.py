"""Per-series work in worker processes gives what the calling process gives, in order."""

import numpy as np
import pandas as pd

from perf_pipeline import parallel
from perf_pipeline.analysis import anomalies, seasonality
from perf_pipeline.analysis.regressions import build_series
from perf_pipeline_tests.analysis.test_regressions import _fleet


def _square_root(x: float) -> float:
    return float(np.sqrt(x))


def test_process_map_keeps_the_order_of_its_items():
    items = list(range(1000, 0, -1))
    assert parallel.process_map(_square_root, items, workers=2) == [_square_root(x) for x in items]
    assert parallel.process_map(_square_root, [], workers=2) == []


def _hourly(days: int = 10, nodes: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    hours = pd.date_range("2026-11-01", periods=24 * days, freq="h")
    cycle = np.sin(2 * np.pi * hours.hour.to_numpy() / 24)
    return pd.concat([pd.DataFrame({"hour": hours, "metric_name": metric, "node_id": f"node-{n}",
                                    "value": 50 + 10 * (n + 1) * cycle + rng.normal(0, 1, len(hours))})
                      for metric in ("cpu_usage", "memory_utilization") for n in range(nodes)],
                     ignore_index=True)


def test_anomalies_and_seasonal_profiles_in_workers_match_the_calling_process(monkeypatch):
    points = _fleet(3, slowdown_at=200)
    points.loc[points.index[[500, 1500, 2500]], "value"] *= 8  # spikes to find
    series = build_series(points)
    hourly = _hourly()
    here = anomalies.fleet_anomalies(series), seasonality.seasonal_profiles(hourly)
    monkeypatch.setattr(anomalies, "MIN_POINTS", 1)
    monkeypatch.setattr(seasonality, "MIN_POINTS", 1)
    monkeypatch.setattr(anomalies, "cores", lambda: 2)
    monkeypatch.setattr(seasonality, "cores", lambda: 2)
    pools = []
    real_pool = parallel.ProcessPoolExecutor
    monkeypatch.setattr(parallel, "ProcessPoolExecutor",
                        lambda *a, **k: pools.append(k["max_workers"]) or real_pool(*a, **k))
    (found, skipped), profiles = anomalies.fleet_anomalies(series), seasonality.seasonal_profiles(hourly)
    assert pools == [2, 2]
    assert len(here[0][0]) >= 3
    assert len(here[1]) == 2 * 3 * 24 + 2 * 24  # each node's day, and the fleet's
    pd.testing.assert_frame_equal(found, here[0][0])
    assert skipped == here[0][1]
    pd.testing.assert_frame_equal(profiles, here[1])


def test_off_linux_the_work_stays_in_this_process(monkeypatch):
    pools = []
    monkeypatch.setattr(parallel.sys, "platform", "darwin")
    monkeypatch.setattr(parallel, "ProcessPoolExecutor", lambda *a, **k: pools.append(k))
    assert parallel.process_map(_square_root, [4, 9], workers=2) == [2.0, 3.0]
    assert pools == []

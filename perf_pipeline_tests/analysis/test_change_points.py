"""Change-point detection on small fixed cases with known truth.

The full labelled suite (false alarms per family, detection rates by step size, speed, and
plain PELT side by side) is `python -m perf_pipeline_tests.benchmarks.change_point_suite`.
"""

import numpy as np
import pytest

from perf_pipeline.analysis.change_points import detect_change_points
from perf_pipeline_tests.benchmarks.change_point_suite import FAMILIES, evaluate, noise, ours, suite


@pytest.mark.parametrize("family", FAMILIES)
def test_stationary_noise_of_every_family_raises_nothing(family):
    rng = np.random.default_rng(2)
    found = [detect_change_points(noise(family, n, rng)) for n in (100, 300, 1000) for _ in range(8)]
    assert sum(len(f) for f in found) == 0


def test_a_step_is_located_sized_and_judged_by_direction():
    rng = np.random.default_rng(1)
    values = 10 + rng.normal(0, 1, 150)
    values[60:] += 3
    (change,) = detect_change_points(values)
    assert abs(change.index - 60) <= 2
    assert change.kind == "regression" and change.shape == "step"
    assert change.before == pytest.approx(10, abs=0.5) and change.after == pytest.approx(13, abs=0.5)
    assert change.magnitude_percent == pytest.approx(30, abs=6)
    assert change.p_value < 1e-6
    (improvement,) = detect_change_points(values, direction="higher_is_better")
    assert improvement.kind == "improvement"


def test_a_spike_is_not_a_change_and_does_not_hide_one():
    rng = np.random.default_rng(3)
    values = 10 + rng.normal(0, 1, 150)
    values[40] = 60
    assert detect_change_points(values) == []
    values[90:] -= 3
    (change,) = detect_change_points(values)
    assert abs(change.index - 90) <= 2 and change.kind == "improvement"


def test_several_steps_are_all_found():
    rng = np.random.default_rng(4)
    values = 10 + rng.normal(0, 1, 300)
    for at, shift in ((80, 3), (160, -4), (230, 3)):
        values[at:] += shift
    found = [c.index for c in detect_change_points(values)]
    assert len(found) == 3
    assert all(abs(f - t) <= 3 for f, t in zip(found, (80, 160, 230)))


def test_a_gradual_drift_is_reported_once_as_a_ramp():
    rng = np.random.default_rng(1)
    values = 10 + rng.normal(0, 1, 200)
    values[80:130] += np.linspace(0, 4, 50)
    values[130:] += 4
    (ramp,) = detect_change_points(values)
    assert ramp.shape == "ramp" and ramp.kind == "regression"
    assert 75 <= ramp.index <= 95 and ramp.end_index is not None and 115 <= ramp.end_index <= 140


def test_missing_values_keep_original_positions_and_timestamps():
    rng = np.random.default_rng(5)
    values = np.r_[10 + rng.normal(0, 0.5, 60), np.nan, 14 + rng.normal(0, 0.5, 60)]
    stamps = [f"t{i}" for i in range(len(values))]
    (change,) = detect_change_points(values, timestamps=stamps)
    assert change.index == 61 and change.timestamp == "t61"


def test_short_constant_and_bad_input():
    assert detect_change_points([1.0, 2.0, 3.0]) == []
    assert detect_change_points([5.0] * 50) == []
    with pytest.raises(ValueError, match="direction"):
        detect_change_points([1.0] * 20, direction="up")


def test_the_benchmark_suite_runs_at_a_small_scale():
    cases = list(suite(np.random.default_rng(0), 1))
    figures = evaluate(ours, cases)
    assert set(figures["false_alarms_per_10k_points"]) == set(FAMILIES)
    assert figures["detection_rate"]["step_4sigma"] > 0.8

"""Plots for asset metadata: valid PNGs of the promised size, and on the assets that hold their data."""

import base64
import io
import re
from datetime import date, datetime, timedelta

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from perf_pipeline.defs.analysis import anomalies, change_points, metric_correlations, trend_stats
from perf_pipeline.defs.ingest import raw_metrics
from perf_pipeline.defs.models import node_performance_scores, performance_forecasts, performance_models
from perf_pipeline.defs.normalize import normalized_timeseries
from perf_pipeline.defs.runner import RANGE_END_TAG, RANGE_START_TAG
from perf_pipeline.ingest.landing import ingest_files
from perf_pipeline.report import plots
from perf_pipeline_tests.conftest import write_jsonl
from perf_pipeline_tests.defs.test_pipeline_assets import _fleet_rows, _materialize

START = datetime(2026, 10, 1)
DATA_URI = re.compile(r"!\[([^\]]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def _decoded(png: bytes) -> np.ndarray:
    import matplotlib.image

    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return matplotlib.image.imread(io.BytesIO(png), format="png")


def _assert_plot(png: bytes) -> None:
    """An 800×400 PNG of at most a few tens of KB that is not one flat colour."""
    pixels = _decoded(png)
    assert pixels.shape[:2] == (400, 800)
    assert 2_000 < len(png) < 150_000
    assert len(np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)) > 20
    assert pixels[..., :3].std() > 0.02


def _series(days: int = 20, slope: float = 0.1) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame({"timestamp": [START + timedelta(days=d) for d in range(days)],
                         "value": 5 + slope * np.arange(days) + rng.normal(0, 0.05, days)})


def test_the_markdown_image_round_trips_its_bytes_and_title():
    png = plots.heatmap_plot(pd.DataFrame([[1.0, 2.0], [3.0, np.nan]], index=["a", "b"],
                                          columns=["x", "y"]), title="t", colorbar_label="v")
    markdown = plots.markdown_image(png, "slow [test]")
    (title, payload), = DATA_URI.findall(markdown)
    assert title == "slow (test)" and base64.b64decode(payload) == png


def test_series_plot_draws_points_trend_lines_change_points_and_anomalies():
    points = _series()
    png = plots.series_plot(points, title="a degrading series", ylabel="s",
                            slopes_per_day={"Theil–Sen": 0.1, "OLS": 0.1},
                            change_times=[START + timedelta(days=10)],
                            anomalies=[(START + timedelta(days=5), START + timedelta(days=5))])
    _assert_plot(png)
    pixels = _decoded(png)[..., :3]
    red = (pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)
    assert red.sum() > 50  # the anomaly ring and the change point line


def test_heatmap_correlation_forecast_and_before_after_plots_render():
    matrix = pd.DataFrame({"node-1": [20.0, 80.0], "node-2": [55.0, np.nan]}, index=["unit", "e2e"])
    _assert_plot(plots.heatmap_plot(matrix, title="speed", colorbar_label="score", vmin=0, vmax=100))

    pairs = pd.DataFrame({"metric_a": ["cpu_usage", "cpu_usage", "memory_usage"],
                          "metric_b": ["memory_usage", "test_execution_time", "test_execution_time"],
                          "pearson_r": [0.9, -0.4, 0.1]})
    _assert_plot(plots.correlation_plot(pairs, title="correlations"))

    history = _series(days=10)
    hours = [START + timedelta(days=10, hours=h) for h in range(48)]
    forecast = pd.DataFrame({"timestamp": hours, "forecast": 6.0, "lower": 5.5, "upper": 6.5})
    _assert_plot(plots.forecast_plot(history, forecast, title="forecast", ylabel="s"))

    rng = np.random.default_rng(2)
    groups = [(f"series {i}", rng.normal(1, 0.1, 30), rng.normal(1.5, 0.1, 30)) for i in range(3)]
    _assert_plot(plots.before_after_plot(groups, title="before and after"))


def test_the_markdown_choosers_draw_the_known_regression_and_nothing_without_data():
    level = np.r_[np.full(30, 1.0), np.full(30, 1.4)] + np.random.default_rng(3).normal(0, 0.02, 60)
    times = [START + timedelta(hours=4 * i) for i in range(60)]
    series = pd.DataFrame({"scope": "test", "metric_name": "test_execution_time",
                           "test_name": "t::slow", "node_id": None, "timestamp": times, "level": level})
    changes = pd.DataFrame([{"scope": "test", "metric_name": "test_execution_time",
                             "test_name": "t::slow", "node_id": None, "timestamp": times[30],
                             "end_timestamp": None, "kind": "regression", "shape": "step",
                             "magnitude_percent": 40.0}])
    no_anomalies = pd.DataFrame(columns=["scope", "metric_name", "test_name", "node_id",
                                         "timestamp", "end_timestamp"])
    for markdown in (plots.change_point_markdown(series, changes, no_anomalies),
                     plots.regression_markdown(series, changes)):
        (_, payload), = DATA_URI.findall(markdown)
        _assert_plot(base64.b64decode(payload))
    assert plots.regression_markdown(series, changes.iloc[:0]) is None
    assert plots.speed_heatmap_markdown(pd.DataFrame(columns=["test_type", "node_id", "score"])) is None
    assert plots.forecast_markdown(series.iloc[:0], pd.DataFrame(columns=["metric_name"])) is None


DOLLAR_NAME = "a $x^$ b"  # mathtext would refuse this ("Expected token") and fail the plot


def test_names_with_dollar_signs_are_drawn_as_text_not_mathtext():
    series = _series()
    _assert_plot(plots.series_plot(series, title=f"cpu_usage · {DOLLAR_NAME}", ylabel=DOLLAR_NAME,
                                   slopes_per_day={"Theil–Sen": 0.1}))
    matrix = pd.DataFrame([[50.0, 60.0], [40.0, np.nan]], index=["unit", DOLLAR_NAME],
                          columns=[DOLLAR_NAME, "node-$2$"])
    _assert_plot(plots.heatmap_plot(matrix, title=DOLLAR_NAME, colorbar_label="score"))
    _assert_plot(plots.before_after_plot([(DOLLAR_NAME, [1.0, 1.1, 0.9], [2.0, 2.1, 1.9])],
                                         title="before and after"))
    forecast = pd.DataFrame({"timestamp": [START + timedelta(days=20 + d) for d in range(3)],
                             "forecast": [7.0, 7.1, 7.2], "lower": [6.5, 6.6, 6.7],
                             "upper": [7.5, 7.6, 7.7]})
    _assert_plot(plots.forecast_plot(series, forecast, title=f"cpu_usage · {DOLLAR_NAME}",
                                     ylabel=DOLLAR_NAME))
    # a pair of $ that does parse would be drawn as math (italic x, dropped $): kept as text
    from matplotlib.figure import Figure

    axes = Figure().subplots()
    title = axes.set_title("node $x$", **plots._PLAIN)
    assert title.get_text() == "node $x$" and not title._preprocess_math("node $x$")[1]


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        yield instance


def test_materialized_analysis_carries_plots(paths, tmp_path, instance, monkeypatch):
    from perf_pipeline.storage.warehouse import open_warehouse

    drawn_while = []
    trend_markdown = plots.trend_markdown

    def drawing_trends(*args, **kwargs):
        # trend_stats draws after closing its writer connection: a reader can open the file
        # (DuckDB refuses a read-only connection next to an open read-write one)
        with open_warehouse(paths.database, read_only=True) as wh:
            drawn_while.append(wh.table("trend_stats").shape[0])
        return trend_markdown(*args, **kwargs)

    monkeypatch.setattr(plots, "trend_markdown", drawing_trends)
    rows = _fleet_rows(np.random.default_rng(4))
    ingest_files([write_jsonl(tmp_path / "fleet.jsonl", rows)], paths.landing, today=date(2026, 11, 28))
    tags = {RANGE_START_TAG: "2026-10-01", RANGE_END_TAG: "2026-10-28"}
    assert _materialize([raw_metrics, normalized_timeseries], paths, instance, tags=tags).success
    models = {"ops": {"performance_models": {"config": {
        "metrics": ["cpu_usage", "test_execution_time"], "horizon_days": 2, "folds": 1}},
        "performance_forecasts": {"config": {"horizon_days": 2}}}}
    result = _materialize([anomalies, trend_stats, change_points, metric_correlations,
                           node_performance_scores, performance_models, performance_forecasts],
                          paths, instance, run_config=models)
    assert result.success
    expected = {"trend_stats": ["plot_trends"], "change_points": ["plot_change_points", "plot_regressions"],
                "metric_correlations": ["plot_correlations"], "performance_forecasts": ["plot_forecast"],
                "node_performance_scores": ["plot_heatmap"]}
    for asset, names in expected.items():
        metadata = result.asset_materializations_for_node(asset)[0].metadata
        for name in names:
            images = DATA_URI.findall(metadata[name].value)
            assert images, (asset, name)
            for _, payload in images:
                _assert_plot(base64.b64decode(payload))
    assert drawn_while and drawn_while[0] > 0
    trends = result.asset_materializations_for_node("trend_stats")[0].metadata["plot_trends"].value
    assert "tests/t.py::slow" in trends

"""The scale benchmark runs at its smallest size, so that it cannot rot. It checks that
every figure is printed, never how fast anything was."""

import pytest

from perf_pipeline_tests.benchmarks.scale import run_size


@pytest.mark.slow
def test_scale_benchmark_prints_every_figure_at_size_s(tmp_path):
    figures = []
    result = run_size("S", tmp_path, emit=figures.append)
    names = [figure["figure"] for figure in figures]
    assert names == ["simulated", "ingest_to_landing", "ingest_vs_duckdb_bulk_load",
                     "full_materialization", "incremental_refresh"]
    bulk = figures[2]
    assert bulk["rows"] == result["rows"] > 90_000
    assert bulk["ratio"] > 0
    assert "raw_metrics" in figures[3]["seconds_per_asset"]
    # each step's peak is read from the process's memory while the step ran
    peaks = figures[3]["peak_memory_mb_per_asset"]
    assert set(peaks) == set(figures[3]["seconds_per_asset"])
    assert 0 < peaks["raw_metrics"] <= figures[3]["peak_memory_mb"]

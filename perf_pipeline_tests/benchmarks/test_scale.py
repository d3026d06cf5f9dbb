"""The scale benchmark runs at its smallest size, so that it cannot rot. It checks that
every figure is printed, never how fast anything was."""

import shutil
import sys

import numpy as np
import pytest

from perf_pipeline_tests.benchmarks.scale import check_disk, measured, run_size

# A child that holds 400 MB for a moment, lets it go, and lives on for a second.
_SPIKE = ("import numpy as np, time; a = np.ones(50_000_000); a[::512] += 1; del a; "
          "time.sleep(1.0)")
# A child whose forked worker holds 400 MB for a second.
_WORKER = ("import multiprocessing as mp, numpy as np, time\n"
           "def hold():\n    a = np.ones(50_000_000); a[::512] += 1; time.sleep(1.0)\n"
           "p = mp.get_context('fork').Process(target=hold); p.start(); p.join()")


@pytest.mark.slow
def test_scale_benchmark_prints_every_figure_at_size_s(tmp_path, monkeypatch):
    # a user's own instance must not be where the benchmark looks for its runs' steps
    (tmp_path / "users-instance").mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "users-instance"))
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
    # the outbox is written within each run (figures[4] is the refresh after one new day)
    for figure in figures[3:]:
        assert 0 < figure["alerts_written_after_seconds"] < figure["wall_seconds"]
        # the command's time outside its steps: start-up and Dagster's bookkeeping
        assert 0 < figure["outside_steps_seconds"] < figure["wall_seconds"]
    refresh = figures[4]
    assert refresh["outside_steps_share_of_full"] == pytest.approx(
        refresh["outside_steps_seconds"] / figures[3]["wall_seconds"], abs=0.002)


def test_a_size_that_the_disk_cannot_hold_stops_before_simulating(tmp_path, monkeypatch):
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: free._replace(free=3 * 10**9))
    with pytest.raises(SystemExit, match=r"size L needs about 12 GB free .* 3\.0 GB is"):
        run_size("L", tmp_path, emit=lambda figure: pytest.fail(f"printed {figure}"))
    assert list(tmp_path.iterdir()) == []  # nothing simulated
    check_disk("M", tmp_path)  # 1.2 GB fits in 3


def test_a_command_s_peak_is_its_own_not_its_parent_s():
    """Linux counts a parent's resident memory at spawn in the child's ru_maxrss; the
    benchmark reports the child's own high-water mark, which a spike it released still
    shows in."""
    parent_holds = np.ones(100_000_000)  # 800 MB here, in the test process
    parent_holds[::512] += 1
    _, quiet, _ = measured([sys.executable, "-c", "import time; time.sleep(0.5)"])
    _, spiked, samples = measured([sys.executable, "-c", _SPIKE])
    assert quiet < 200
    assert spiked >= 380
    assert max(mb for _, mb in samples[-2:]) < 300  # released before it ended
    _, with_worker, _ = measured([sys.executable, "-c", _WORKER])
    assert with_worker >= 380  # the worker's memory counts with its parent's
    del parent_holds

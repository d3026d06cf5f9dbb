"""change_points is split by metric: with Dagster's multiprocess executor each group of
metrics' detection is its own step in its own worker process, and the result is the same as
the in-process run's."""

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from perf_pipeline.defs.analysis import metric_steps
from perf_pipeline.defs.runner import instance_settings
from perf_pipeline.storage.warehouse import open_warehouse
from perf_pipeline_tests.conftest import materialized_fleet

REPO_ROOT = Path(__file__).resolve().parents[2]
STORED = ("SELECT * EXCLUDE (computed_at) FROM change_points ORDER BY ALL",
          "SELECT * EXCLUDE (computed_at) FROM change_incidents ORDER BY ALL")


def _stored(database) -> list:
    with open_warehouse(database, read_only=True) as wh:
        return [wh.con.execute(sql).fetchall() for sql in STORED]


@pytest.mark.slow
def test_change_points_run_a_step_per_group_of_metrics_in_worker_processes(tmp_path, monkeypatch):
    paths = materialized_fleet(tmp_path, end=datetime(2026, 11, 20, tzinfo=timezone.utc),
                               days=14, nodes=5, tests=5)
    in_process = _stored(paths.database)
    assert in_process[0], "the simulated fleet has injected changes to find"
    with open_warehouse(paths.database, read_only=True) as wh:
        metrics = {row[0] for row in wh.con.execute(
            "SELECT DISTINCT metric_name FROM normalized_timeseries").fetchall()}
        points = wh.con.execute("SELECT count(*) FROM normalized_timeseries").fetchall()[0][0]

    (paths.dagster_home / "dagster.yaml").write_text(
        yaml.safe_dump(instance_settings(paths), sort_keys=False))
    env = {**os.environ, "PERF_PIPELINE_HOME": str(tmp_path / "home"),
           "DAGSTER_HOME": str(paths.dagster_home)}
    env.pop("PERF_PIPELINE_DATABASE", None)
    # about five groups (a step per metric would be the same code, at a worker start each)
    in_groups = json.dumps({"ops": {"change_points": {"config": {
        "points_per_step": -(-points // 5)}}}})
    done = subprocess.run(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "perf_pipeline.definitions",
         "--select", "change_points", "--config-json", in_groups],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr

    monkeypatch.setenv("DAGSTER_HOME", str(paths.dagster_home))
    with dg.DagsterInstance.get() as instance:
        run = instance.get_runs(limit=1)[0]
        assert run.status == dg.DagsterRunStatus.SUCCESS
        events = [r.dagster_event for r in instance.all_logs(run.run_id) if r.dagster_event]
        run_storage = Path(instance.storage_directory()) / run.run_id
    # the parts handed to the detection steps are deleted once stored; their results are kept
    assert not (run_storage / "change_points.change_point_window").exists()
    started = {event.step_key for event in events
               if event.event_type == dg.DagsterEventType.STEP_START}
    workers = {event.step_key for event in events
               if event.event_type == dg.DagsterEventType.STEP_WORKER_STARTED}
    ends = {"change_points.change_point_window", "change_points.store_change_points"}
    assert ends <= started
    detections = started - ends
    assert len(detections) >= 3 and detections <= workers, \
        "each group of metrics' detection ran in a worker process of its own"
    assert len(list(run_storage.glob("change_points.detect_metric_changes*"))) == len(detections)
    # every metric is in exactly one group: "detect_metric_changes[first_and_N_more]"
    sizes = [re.fullmatch(r"change_points\.detect_metric_changes\[(.+?)(?:_and_(\d+)_more)?\]", key)
             for key in detections]
    assert all(sizes) and sum(1 + int(m.group(2) or 0) for m in sizes) == len(metrics)
    assert _stored(paths.database) == in_process


def test_metrics_are_grouped_into_steps_of_a_least_the_given_size():
    points = pd.DataFrame({"metric_name": ["b"] * 5 + ["a"] * 3 + ["c"] * 4 + ["d"]})
    assert metric_steps(points, 1) == [["a"], ["b"], ["c"], ["d"]]
    assert metric_steps(points, 8) == [["a", "b"], ["c", "d"]]
    assert metric_steps(points, 250_000) == [["a", "b", "c", "d"]]
    assert metric_steps(points.iloc[0:0], 1) == []

"""Jobs without an executor of their own run on perf_pipeline's step executor: Dagster's
multi_or_in_process_executor with its workers forked, on Linux, from a server that has
imported the definitions. Run config still chooses spawn or in-process."""

import json
import os
import sys

import dagster as dg
import pytest

from perf_pipeline.definitions import defs
from perf_pipeline.defs.executor import PRELOAD_MODULES, step_executor, with_start_method
from perf_pipeline_tests.defs.executor_probe import REPORT_ENV, probe_job

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is used on Linux only")


def _probe(tmp_path, monkeypatch, run_config: dict | None = None) -> dict:
    """Run probe_job on a real instance; what its op reported, and whether a worker started."""
    folder = tmp_path / f"probe-{len(list(tmp_path.iterdir()))}"
    (folder / "dagster").mkdir(parents=True)
    report = folder / "report.json"
    monkeypatch.setenv(REPORT_ENV, str(report))
    with dg.instance_for_test(temp_dir=str(folder / "dagster")) as instance:
        with dg.execute_job(dg.reconstructable(probe_job), instance=instance,
                            run_config=run_config or {}) as result:
            assert result.success
            started = [e for e in result.all_events
                       if e.event_type == dg.DagsterEventType.STEP_WORKER_STARTED]
    return {**json.loads(report.read_text()), "worker_started": bool(started)}


@linux_only
def test_a_step_runs_in_a_worker_that_already_imported_the_definitions(tmp_path, monkeypatch):
    ran = _probe(tmp_path, monkeypatch)
    assert ran["worker_started"] and ran["pid"] != os.getpid(), "the step ran in a worker process"
    assert ran["definitions_imported"], "the worker was forked from the server that preloaded them"


@linux_only
def test_run_config_still_chooses_spawn_or_in_process(tmp_path, monkeypatch):
    spawned = _probe(tmp_path, monkeypatch, {"execution": {"config": {"multiprocess": {
        "start_method": {"spawn": {}}}}}})
    assert spawned["worker_started"] and spawned["pid"] != os.getpid()
    assert not spawned["definitions_imported"], "a spawned worker imports only the job's module"
    in_process = _probe(tmp_path, monkeypatch, {"execution": {"config": {"in_process": {}}}})
    assert not in_process["worker_started"] and in_process["pid"] == os.getpid()


def test_only_a_multiprocess_config_without_a_start_method_gets_the_fork_server(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    forked = with_start_method({"multiprocess": {"max_concurrent": 3}})
    assert forked == {"multiprocess": {"max_concurrent": 3, "start_method": {
        "forkserver": {"preload_modules": list(PRELOAD_MODULES)}}}}
    chosen = {"multiprocess": {"start_method": {"spawn": {}}}}
    assert with_start_method(chosen) == chosen
    assert with_start_method({"in_process": {}}) == {"in_process": {}}
    for platform in ("darwin", "win32"):
        monkeypatch.setattr(sys, "platform", platform)
        assert with_start_method({"multiprocess": {}}) == {"multiprocess": {}}


def test_jobs_without_their_own_executor_use_it():
    assert defs.resolve_job_def("analysis_job").executor_def is step_executor
    assert defs.resolve_job_def("daily_ingest_job").executor_def is step_executor
    assert defs.resolve_implicit_global_asset_job_def().executor_def is step_executor
    # the refresh after a landing stays in one process (see defs/automation.py)
    assert defs.resolve_job_def("landing_job").executor_def is dg.in_process_executor

"""A job on perf_pipeline's step executor whose one op says where it ran, for test_executor.

It imports the executor alone, not perf_pipeline.definitions: if the definitions are
imported in the op's process, the process was forked from a server that preloaded them.
"""

import json
import os
import sys
from pathlib import Path

import dagster as dg

from perf_pipeline.defs.executor import step_executor

REPORT_ENV = "PERF_TEST_EXECUTOR_REPORT"


@dg.op
def where_am_i() -> None:
    Path(os.environ[REPORT_ENV]).write_text(json.dumps({
        "pid": os.getpid(),
        "definitions_imported": "perf_pipeline.definitions" in sys.modules,
    }))


@dg.job(executor_def=step_executor)
def probe_job() -> None:
    where_am_i()

"""The executor of every job that does not choose its own: Dagster's default
(`multi_or_in_process_executor`, the same run config), whose worker processes on Linux
start from a fork server that has already imported perf_pipeline.

With Dagster's default start method (spawn) every step's worker is a new interpreter that
imports Dagster, pandas, scipy, scikit-learn and the definitions before its step can begin:
about three seconds a step on this project's 2-core machine. `daily_refresh_job` on the
demo fleet (`dagster job execute -m perf_pipeline.definitions`) took 79–86 s for about 19 s
of steps. A fork server that has imported `perf_pipeline.definitions` once per run hands each
step a process with all of it loaded: 37–48 s for the same run (see docs/architecture.md).
Dagster's `forkserver` start method with its default preload took 79 s there, no better
than spawn, so the module is named in `preload_modules`.

Run config still rules: `multiprocess: start_method: spawn: {}` in the launchpad restores
spawn, and `in_process: {}` runs every step in the run's process. The fork server is used on
Linux only, for the reason perf_pipeline.parallel forks only there: macOS's system libraries
are not safe to fork, and Windows cannot.
"""

import sys
from collections.abc import Mapping

import dagster as dg

# What each step's worker finds imported: the code location, and with it every library the
# assets use. A module that fails to import here is skipped by the fork server, not fatal.
PRELOAD_MODULES = ("perf_pipeline.definitions",)


def with_start_method(executor_config: Mapping[str, object]) -> Mapping[str, object]:
    """`executor_config` (multi_or_in_process_executor's) with the fork server as the
    multiprocess start method, where the config names none and the platform is Linux."""
    multiprocess = executor_config.get("multiprocess")
    if not isinstance(multiprocess, Mapping) or multiprocess.get("start_method") \
            or not sys.platform.startswith("linux"):
        return executor_config
    return {**executor_config, "multiprocess": {
        **multiprocess,
        "start_method": {"forkserver": {"preload_modules": list(PRELOAD_MODULES)}}}}


@dg.executor(
    name="multi_or_in_process_executor",
    config_schema=dg.multi_or_in_process_executor.config_schema,
    requirements=lambda config: (dg.multiple_process_executor_requirements()
                                 if "multiprocess" in config else []),
)
def step_executor(init_context: dg.InitExecutorContext) -> dg.Executor:
    """Dagster's multi_or_in_process_executor, its workers forked from a server that has
    imported perf_pipeline (Linux; see the module's docstring)."""
    return dg.multi_or_in_process_executor.executor_creation_fn(init_context._replace(
        executor_config=with_start_method(init_context.executor_config)))

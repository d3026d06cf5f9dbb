"""Per-series work spread over the machine's cores.

Change points, anomalies and seasonal profiles each run one pure function per series, and
under `perf-pipeline run` (the in-process executor) a step otherwise uses one core. Work
above MIN_POINTS goes to a pool of forked processes (on Linux); the results come
back in the order of the inputs, the same as computing them in the calling process.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

# Work of fewer points stays in the calling process: a forked worker starts in a few
# milliseconds, but pickling the items and results costs about as much as small work.
MIN_POINTS = 100_000

Item = TypeVar("Item")
Result = TypeVar("Result")


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def process_map(function: Callable[[Item], Result], items: Sequence[Item], *,
                workers: int) -> list[Result]:
    """`[function(item) for item in items]`, in `workers` processes (1: in this one).

    `function` must be a module-level function and the items picklable. Workers are forked,
    on Linux only: they start at once with everything imported, where a spawned worker
    would run the caller's main script again (which breaks a script without a `__main__`
    guard), and macOS's system libraries are not safe to fork. Elsewhere the work stays in
    this process. A worker only computes, touching no lock or file of the caller's, and
    NumPy's thread pools reset themselves in a forked child."""
    if workers <= 1 or len(items) < 2 or not sys.platform.startswith("linux"):
        return [function(item) for item in items]
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=context) as pool:
        # chunks of items, so that a pickle carries many small ones; several per worker,
        # so that one slow chunk does not leave the others idle
        return list(pool.map(function, items, chunksize=max(1, len(items) // (8 * workers))))

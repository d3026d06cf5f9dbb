"""A simulated test fleet with known ground truth, written in the landing format.

Every catalog metric is produced in its canonical unit: per-test metrics for each test in
each CI run (on a node picked at random), per-node samples every hour, and per-run CI
metrics. Node load follows a daily and a weekly cycle with AR(1) noise; CPU, load, memory
and disk I/O move together, and test durations follow their node's load. On top of that
the simulator injects, from the seed's random stream: step regressions and an improvement
at chosen runs (code changes), a node whose tests all become slower at a chosen time (a
node problem, when its runner image is upgraded), a slowly degrading node, a noisy node, a node with a slower baseline, and
single-point spikes. `_truth.json` records all of it.

`affected_series` in _truth.json lists the series whose level changes over time (steps,
node step, trend) and every series of the noisy node; any other series is stationary
noise, which analysis must leave quiet. The slow node's series are stationary (slower from
the start) and spikes are single points: both are in `injections`, not in
`affected_series`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from perf_pipeline.catalog import BY_NAME, METRICS, Scope

NODE_TYPES = ("linux-small", "linux-large", "windows", "macos")
TEST_TYPES = ("unit", "integration", "e2e", "performance")
_TEST_TYPE_WEIGHTS = (0.5, 0.3, 0.15, 0.05)
_BASE_DURATION_S = {"unit": 0.2, "integration": 2.0, "e2e": 20.0, "performance": 10.0}
_PEAK_MEMORY_MB = {"unit": 120.0, "integration": 300.0, "e2e": 800.0, "performance": 500.0}
_TEST_NOISE = 0.08  # log-normal sigma of a test's duration on a quiet node
_NOISY_FACTOR = 3.5
# Test durations grow by this share per CPU percentage point of their node's load: a test
# on a node at 65% CPU takes about 20% longer than at 45%, as on a contended CI runner.
LOAD_SENSITIVITY = 0.01
TREND_METRICS = ("memory_usage", "memory_utilization", "node_error_rate", "node_failure_rate",
                 "node_responsiveness")
SPIKE_METRICS = ("memory_usage", "node_responsiveness", "disk_io_read", "load_average",
                 "test_execution_time")
OLD_RUNNER_IMAGE, NEW_RUNNER_IMAGE = "runner-2026.10", "runner-2026.11"
CORRELATED_PAIRS = (("cpu_usage", "load_average"), ("cpu_usage", "memory_utilization"),
                    ("cpu_usage", "disk_io_read"), ("cpu_usage", "test_execution_time"))


@dataclass(frozen=True)
class SimulationSummary:
    out_dir: Path
    rows: int
    files: int
    days: int
    truth_path: Path


def _iso(times: pd.DatetimeIndex | pd.Series) -> np.ndarray:
    return pd.DatetimeIndex(times).strftime("%Y-%m-%dT%H:%M:%S.%fZ").to_numpy()


def _ar1(rng: np.random.Generator, shape: tuple[int, int], phi: float) -> np.ndarray:
    """Unit-variance AR(1) noise along the last axis."""
    shocks = rng.normal(0, np.sqrt(1 - phi**2), shape)
    out = np.empty(shape)
    out[..., 0] = rng.normal(0, 1, shape[:-1])
    for i in range(1, shape[-1]):
        out[..., i] = phi * out[..., i - 1] + shocks[..., i]
    return out


def _load_shape(times: pd.DatetimeIndex) -> np.ndarray:
    """Fleet load through the day (busiest mid-afternoon UTC) and week (weekends lighter)."""
    hour = times.hour.to_numpy() + times.minute.to_numpy() / 60
    daily = np.clip(np.sin(np.pi * (hour - 7) / 14), 0, None)
    weekend = times.day_of_week.to_numpy() >= 5
    return (0.75 + 0.45 * daily) * np.where(weekend, 0.8, 1.0)


def simulate_fleet(out_dir: str | Path, *, days: int = 30, nodes: int = 20, tests: int = 50,
                   seed: int = 0, end: datetime | None = None,
                   runs_per_day: int = 12) -> SimulationSummary:
    if days < 1 or nodes < 5 or tests < 5 or runs_per_day < 1:
        raise ValueError("simulate needs days >= 1, nodes >= 5 (the injected nodes must be "
                         "distinct), tests >= 5 and runs_per_day >= 1")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    end = (end or datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0))
    end = end.astimezone(timezone.utc).replace(tzinfo=None)
    start = end - timedelta(days=days)

    # --- the fleet
    node_ids = [f"node-{i + 1:02d}" for i in range(nodes)]
    node_types = rng.choice(NODE_TYPES, nodes)
    speed = rng.lognormal(0, 0.05, nodes)
    memory_total_mb = rng.choice([16000.0, 32000.0, 64000.0], nodes)
    degrading, noisy, slow, stepped = rng.choice(nodes, 4, replace=False)
    speed[slow] = rng.uniform(1.25, 1.4)
    noise_scale = np.ones(nodes)
    noise_scale[noisy] = _NOISY_FACTOR

    test_types = rng.choice(TEST_TYPES, tests, p=_TEST_TYPE_WEIGHTS)
    modules = [f"tests/{test_types[i]}/test_module_{i // 5:02d}.py" for i in range(tests)]
    test_names = [f"{modules[i]}::test_case_{i:03d}" for i in range(tests)]
    base_duration = np.array([_BASE_DURATION_S[t] for t in test_types]) * rng.lognormal(0, 0.6, tests)

    # --- CI runs
    n_runs = days * runs_per_day
    run_offsets = (np.arange(n_runs) + 0.5 + rng.uniform(-0.3, 0.3, n_runs)) / runs_per_day
    run_times = pd.DatetimeIndex(start + pd.to_timedelta(run_offsets, unit="D"))
    run_ids = [f"run-{seed:03d}{i:06d}" for i in range(n_runs)]
    job_ids = [f"job-{seed:03d}{i:06d}" for i in range(n_runs)]
    commits = [rng.bytes(20).hex() for _ in range(n_runs)]

    # --- node state, hourly
    hours = days * 24
    hour_times = pd.DatetimeIndex(start + pd.to_timedelta(np.arange(hours) + 0.5, unit="h"))
    shape = _load_shape(hour_times)
    load_noise = _ar1(rng, (nodes, hours), 0.7)
    base_cpu = rng.uniform(35, 55, nodes)
    cpu = np.clip(base_cpu[:, None] * shape[None, :] + 4 * noise_scale[:, None] * load_noise, 1, 99)
    progress = np.arange(hours) / (hours - 1)

    injections: list[dict] = []
    affected: set[tuple[str, str | None, str | None]] = set()

    # slowly degrading node
    growth = {"memory_usage": rng.uniform(0.4, 0.8), "memory_utilization": None,
              "node_error_rate": rng.uniform(2.0, 4.0), "node_failure_rate": rng.uniform(1.0, 2.0),
              "node_responsiveness": rng.uniform(0.5, 1.0)}
    growth["memory_utilization"] = growth["memory_usage"]
    drift = np.ones((nodes, hours))
    node_metric_values: dict[str, np.ndarray] = {}

    def noise(sigma: float) -> np.ndarray:
        return rng.normal(0, sigma, (nodes, hours)) * noise_scale[:, None]

    def drifted(name: str, values: np.ndarray) -> np.ndarray:
        factor = drift.copy()
        factor[degrading] = 1 + growth[name] * progress
        return values * factor

    mem_util = np.clip(drifted("memory_utilization", 35 + 0.35 * (cpu - 45) + noise(2.0)), 1, 99.5)
    node_metric_values.update({
        "cpu_usage": cpu,
        "load_average": np.clip(cpu / 100 * 1.2 + noise(0.05), 0.01, None),
        "memory_utilization": mem_util,
        "memory_usage": np.clip(drifted("memory_usage", (35 + 0.35 * (cpu - 45) + noise(2.0)) / 100
                                        * memory_total_mb[:, None]), 1, None),
        "swap_usage": np.clip(50 * np.exp(noise(0.2)), 0, None),
        "disk_io_read": np.clip(20 + 0.5 * cpu + noise(3.0), 0, None),
        "disk_io_write": np.clip(10 + 0.3 * cpu + noise(2.0), 0, None),
        "network_io_received": np.clip(5 * np.exp(noise(0.15)), 0, None),
        "network_io_sent": np.clip(3 * np.exp(noise(0.15)), 0, None),
        "node_responsiveness": drifted("node_responsiveness",
                                       np.clip((20 + 0.1 * cpu) * np.exp(noise(0.1)), 1, None)),
        "node_error_rate": np.clip(drifted("node_error_rate", 0.5 + np.abs(noise(0.1))), 0, 100),
        "node_failure_rate": np.clip(drifted("node_failure_rate", 2.0 + noise(0.25)), 0, 100),
        "node_availability": np.clip(99.5 - np.abs(noise(0.2)), 0, 100),
        "os_overhead": np.clip(5 + 0.05 * cpu + noise(0.5), 0, 100),
        "hardware_overhead": np.clip(2 + noise(0.3), 0, 100),
        "virtualization_overhead": np.clip(np.where(node_types[:, None] == "macos", 0.5, 2.0)
                                           + noise(0.3), 0, 100),
    })
    node_metrics = [m.name for m in METRICS if m.scope is Scope.NODE]
    assert set(node_metrics) == set(node_metric_values), set(node_metrics) ^ set(node_metric_values)
    injections.append({
        "id": "trend-1", "kind": "trend", "direction": "regression",
        "node_id": node_ids[degrading], "metrics": list(TREND_METRICS),
        "start": start.isoformat() + "Z",
        "percent_change_over_window": {m: round(100 * growth[m], 1) for m in TREND_METRICS}})
    affected.update((m, None, node_ids[degrading]) for m in TREND_METRICS)

    # --- per-test metrics
    assignment = rng.integers(0, nodes, (n_runs, tests))
    run_hour = np.clip(((run_times - pd.Timestamp(start)) / pd.Timedelta(hours=1)).astype(int), 0, hours - 1)
    node_cpu = cpu[assignment, run_hour.to_numpy()[:, None]]
    test_noise = rng.normal(0, 1, (n_runs, tests)) * _TEST_NOISE * noise_scale[assignment]
    duration = (base_duration[None, :] * speed[assignment] * (1 + LOAD_SENSITIVITY * (node_cpu - 45))
                * np.exp(test_noise))

    def pick_run(low: float, high: float) -> int:
        return int(rng.integers(int(low * n_runs), int(high * n_runs)))

    step_number = 0
    for direction, (low, high) in (("regression", (0.2, 0.4)), ("regression", (0.2, 0.4)),
                                   ("improvement", (0.25, 0.35))):
        step_number += 1
        module = rng.integers(0, (tests + 4) // 5)
        members = [i for i in range(tests) if i // 5 == module]
        chosen = sorted(rng.choice(members, min(len(members), int(rng.integers(1, 4))),
                                   replace=False).tolist()) if direction == "regression" \
            else [int(rng.integers(0, tests))]
        run = pick_run(0.3, 0.75)
        magnitude = rng.uniform(low, high)
        factor = 1 + magnitude if direction == "regression" else 1 - magnitude
        duration[run:, chosen] *= factor
        injections.append({
            "id": f"step-{step_number}", "kind": "step", "direction": direction,
            "metric_name": "test_execution_time", "test_names": [test_names[i] for i in chosen],
            "node_id": None, "timestamp": run_times[run].isoformat() + "Z",
            "test_run_id": run_ids[run], "ci_job_id": job_ids[run], "commit": commits[run],
            "magnitude_percent": round(100 * (factor - 1), 1)})
        affected.update(("test_execution_time", test_names[i], None) for i in chosen)
        affected.update(("test_execution_time", None, n) for n in node_ids)

    node_step_run = pick_run(0.3, 0.75)
    node_step_factor = rng.uniform(1.3, 1.5)
    on_stepped = assignment == stepped
    on_stepped[:node_step_run] = False
    duration[on_stepped] *= node_step_factor
    injections.append({
        "id": "node-step-1", "kind": "node_step", "direction": "regression",
        "metric_name": "test_execution_time", "node_id": node_ids[stepped],
        "timestamp": run_times[node_step_run].isoformat() + "Z",
        "test_run_id": run_ids[node_step_run], "ci_job_id": job_ids[node_step_run],
        "commit": commits[node_step_run], "magnitude_percent": round(100 * (node_step_factor - 1), 1),
        "context_change": {"runner_image": [OLD_RUNNER_IMAGE, NEW_RUNNER_IMAGE]}})
    affected.add(("test_execution_time", None, node_ids[stepped]))
    affected.update(("test_execution_time", t, None) for t in test_names)
    # a run's throughput follows its test durations, so the steps move it too
    affected.update(("tests_per_hour", None, n) for n in node_ids)

    injections.append({"id": "noisy-1", "kind": "noisy_node", "direction": None,
                       "node_id": node_ids[noisy], "noise_factor": _NOISY_FACTOR})
    affected.update((m.name, None, node_ids[noisy]) for m in METRICS if m.scope is not Scope.RUN)
    injections.append({"id": "slow-1", "kind": "slow_node", "direction": None,
                       "node_id": node_ids[slow], "speed_factor": round(float(speed[slow]), 3)})

    test_metric_values = {
        "test_execution_time": duration,
        "test_setup_time": (0.02 + 0.1 * base_duration[None, :]) * speed[assignment]
        * np.exp(rng.normal(0, _TEST_NOISE, (n_runs, tests)) * noise_scale[assignment]),
        "test_teardown_time": (0.01 + 0.05 * base_duration[None, :]) * speed[assignment]
        * np.exp(rng.normal(0, _TEST_NOISE, (n_runs, tests)) * noise_scale[assignment]),
        "test_cpu_time": base_duration[None, :] * speed[assignment] * 0.6
        * np.exp(rng.normal(0, _TEST_NOISE, (n_runs, tests)) * noise_scale[assignment]),
        "test_peak_memory": np.array([_PEAK_MEMORY_MB[t] for t in test_types])[None, :]
        * np.exp(rng.normal(0, 0.05, (n_runs, tests)) * noise_scale[assignment]),
        "test_retry_count": rng.poisson(0.02, (n_runs, tests)).astype(float),
    }
    assert set(test_metric_values) == {m.name for m in METRICS if m.scope is Scope.TEST}

    # --- spikes: single points far above the level
    spikes = []
    for number in range(int(rng.integers(10, 21))):
        metric = str(rng.choice(SPIKE_METRICS))
        factor = float(rng.uniform(3, 6))
        if metric == "test_execution_time":
            run, test = int(rng.integers(0, n_runs)), int(rng.integers(0, tests))
            duration[run, test] *= factor
            spikes.append({"metric_name": metric, "node_id": node_ids[assignment[run, test]],
                           "test_name": test_names[test], "test_run_id": run_ids[run],
                           "position": ("test", run, test)})
        else:
            node, hour = int(rng.integers(0, nodes)), int(rng.integers(0, hours))
            node_metric_values[metric][node, hour] *= factor
            spikes.append({"metric_name": metric, "node_id": node_ids[node], "test_name": None,
                           "test_run_id": None, "position": ("node", node, hour)})
        spikes[-1].update({"id": f"spike-{number + 1}", "kind": "spike", "direction": None,
                           "factor": round(factor, 2)})

    # --- rows
    frames = []
    run_context = [{"commit": c, "branch": "main", "python_version": "3.11", "workers": 4}
                   for c in commits]
    # The stepped node's runner image is upgraded when its tests slow down: the context
    # change that regression analysis must name as the suspected cause.
    runner_image = np.full((nodes, n_runs), OLD_RUNNER_IMAGE, dtype=object)
    runner_image[stepped, node_step_run:] = NEW_RUNNER_IMAGE
    test_context = [{**run_context[r], "runner_image": runner_image[assignment[r, t], r]}
                    for r in range(n_runs) for t in range(tests)]
    node_run = np.clip(np.searchsorted(run_times, hour_times, side="right") - 1, 0, n_runs - 1)
    node_context = [{"os": node_types[n], "runner_image": runner_image[n, node_run[h]]}
                    for n in range(nodes) for h in range(hours)]
    test_offsets = pd.to_timedelta(np.arange(tests) * 2.0, unit="s")
    test_times = run_times.to_numpy()[:, None] + test_offsets.to_numpy()[None, :]
    test_iso = _iso(pd.DatetimeIndex(test_times.ravel())).reshape(n_runs, tests)
    for name, values in test_metric_values.items():
        frames.append(pd.DataFrame({
            "timestamp": test_iso.ravel(), "metric_name": name, "metric_value": values.ravel(),
            "test_name": np.tile(test_names, n_runs), "test_type": np.tile(test_types, n_runs),
            "node_id": np.array(node_ids)[assignment.ravel()],
            "node_type": node_types[assignment.ravel()],
            "test_run_id": np.repeat(run_ids, tests), "ci_job_id": np.repeat(job_ids, tests),
            "context_data": test_context, "sort_key": test_times.ravel()}))
    sample_times = hour_times + pd.to_timedelta(rng.integers(0, 60, hours), unit="s")
    sample_iso = _iso(sample_times)
    for name, values in node_metric_values.items():
        frames.append(pd.DataFrame({
            "timestamp": np.tile(sample_iso, nodes), "metric_name": name,
            "metric_value": values.ravel(), "test_name": None, "test_type": None,
            "node_id": np.repeat(node_ids, hours), "node_type": np.repeat(node_types, hours),
            "test_run_id": None, "ci_job_id": None,
            "context_data": node_context,
            "sort_key": np.tile(sample_times.to_numpy(), nodes)}))
    build_node = rng.integers(0, nodes, n_runs)
    queue = rng.poisson(3 + 3 * _load_shape(run_times))
    run_values = {
        "tests_per_hour": tests / (duration.sum(axis=1) / 4 / 3600),
        "parallel_tests": np.full(n_runs, 4.0),
        "test_pass_rate": 100 * (1 - rng.binomial(tests, 0.01, n_runs) / tests),
        "queue_depth": queue.astype(float),
        "queue_wait_time": (30 + 10 * queue) * rng.lognormal(0, 0.1, n_runs),
        "scheduling_efficiency": np.clip(80 + rng.normal(0, 3, n_runs), 0, 100),
        "build_time": 300 * rng.lognormal(0, 0.05, n_runs),
        "build_success_rate": 100 * (1 - rng.binomial(20, 0.01, n_runs) / 20),
        "artifact_size": 250 * rng.lognormal(0, 0.01, n_runs),
        "code_coverage": np.clip(82 + rng.normal(0, 0.3, n_runs), 0, 100),
        "test_count": np.full(n_runs, float(tests)),
        "cyclomatic_complexity": 4.2 + rng.normal(0, 0.05, n_runs),
        "container_startup_time": 3 * rng.lognormal(0, 0.1, n_runs),
    }
    assert set(run_values) == {m.name for m in METRICS if m.scope is Scope.RUN}
    run_iso = _iso(run_times)
    for name, values in run_values.items():
        frames.append(pd.DataFrame({
            "timestamp": run_iso, "metric_name": name, "metric_value": values,
            "test_name": None, "test_type": None,
            "node_id": np.array(node_ids)[build_node], "node_type": node_types[build_node],
            "test_run_id": run_ids, "ci_job_id": job_ids,
            "context_data": np.array(run_context, dtype=object), "sort_key": run_times.to_numpy()}))

    rows = pd.concat(frames, ignore_index=True)
    rows = rows[rows["sort_key"] <= np.datetime64(end)]
    rows = rows.sort_values("sort_key", kind="stable")
    for metric in BY_NAME.values():  # the simulator itself must respect the catalog's ranges
        values = rows.loc[rows["metric_name"] == metric.name, "metric_value"]
        assert metric.min_value is None or values.min() >= metric.min_value, metric.name
        assert metric.max_value is None or values.max() <= metric.max_value, metric.name

    for spike in spikes:
        kind, a, b = spike.pop("position")
        spike["timestamp"] = (test_iso[a, b] if kind == "test" else sample_iso[b])
    injections.extend(spikes)
    injections.append({"id": "correlation-1", "kind": "correlation", "direction": None,
                       "pairs": [list(p) for p in CORRELATED_PAIRS]})

    files = 0
    for day, group in rows.groupby(rows["sort_key"].dt.strftime("%Y-%m-%d"), sort=True):
        folder = out_dir / day
        folder.mkdir(parents=True, exist_ok=True)
        group.drop(columns="sort_key").to_json(folder / f"fleet-seed{seed}.jsonl", orient="records",
                                               lines=True, double_precision=10)
        files += 1

    truth = {
        "seed": seed, "start": start.isoformat() + "Z", "end": end.isoformat() + "Z", "days": days,
        "runs_per_day": runs_per_day,
        "nodes": [{"node_id": node_ids[i], "node_type": str(node_types[i]),
                   "speed_factor": round(float(speed[i]), 4)} for i in range(nodes)],
        "tests": [{"test_name": test_names[i], "test_type": str(test_types[i]),
                   "base_duration_s": round(float(base_duration[i]), 4)} for i in range(tests)],
        "injections": injections,
        "affected_series": [{"metric_name": m, "test_name": t, "node_id": n}
                            for m, t, n in sorted(affected, key=lambda k: (k[0], k[1] or "", k[2] or ""))],
    }
    truth_path = out_dir / "_truth.json"  # "_": folder scans of metric files skip it
    out_dir.mkdir(parents=True, exist_ok=True)
    truth_path.write_text(json.dumps(truth, indent=1))
    return SimulationSummary(out_dir=out_dir, rows=len(rows), files=files, days=days,
                             truth_path=truth_path)

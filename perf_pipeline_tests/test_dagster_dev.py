"""`dagster dev` loads the code location, shows the assets in their groups, and the runs
`perf-pipeline run` made, with their plots."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from perf_pipeline_tests.conftest import free_port, stop_process_group
from perf_pipeline_tests.test_definitions import GROUP_OF

ROOT = Path(__file__).resolve().parents[1]
QUERY = ("{ assetNodes { assetKey { path } groupName } workspaceOrError { ... on Workspace "
         "{ locationEntries { name locationOrLoadError { __typename } } } } }")
TREND_PLOTS = ('{ assetNodes(assetKeys: [{path: ["trend_stats"]}]) { assetMaterializations(limit: 1) '
               "{ runId metadataEntries { label ... on MarkdownMetadataEntry { mdStr } } } } }")


def _graphql(port: int, query: str = QUERY) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())["data"]


@pytest.mark.slow
def test_dagster_dev_shows_the_assets_in_groups_and_the_cli_runs_plots(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "PERF_PIPELINE_HOME": str(home)}
    env.pop("DAGSTER_HOME", None)
    env.pop("PERF_PIPELINE_DATABASE", None)
    cli = [sys.executable, "-m", "perf_pipeline.cli"]
    # A small fleet: two weeks keep seasonal_profiles to its daily cycle and the run short.
    # Whole UTC days (--end): ending at the current hour, the first and last days were
    # partial and their daily medians noisy, and at some hours the injected trend (node-03's
    # memory) was not significant, so trend_stats had no plot. Ending at midnight, its
    # Mann–Kendall p was at most 0.006 for each of four end dates tried.
    today = datetime.now(timezone.utc).date().isoformat()
    for arguments in (["simulate", "--days", "14", "--end", today, "--nodes", "5", "--tests", "5",
                       "--runs-per-day", "6", "--seed", "1", "--out", str(tmp_path / "sim")],
                      ["ingest", str(tmp_path / "sim")], ["run"]):
        done = subprocess.run([*cli, *arguments], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-w", str(ROOT / "workspace.yaml"),
         "-h", "127.0.0.1", "-p", str(port)],
        # the CLI's instance (PERF_PIPELINE_HOME/dagster, in the temporary folder), not the checkout's
        cwd=tmp_path, env={**env, "DAGSTER_HOME": str(home / "dagster")},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline, data = time.monotonic() + 180, None
        while time.monotonic() < deadline and data is None:
            assert process.poll() is None, process.stderr.read()[-3000:]
            try:
                data = _graphql(port)
                if not data["workspaceOrError"]["locationEntries"][0]["locationOrLoadError"]:
                    data = None
            except (OSError, KeyError, IndexError, TypeError):
                data = None
            time.sleep(2)
        assert data, "dagster dev did not answer within 180 s"
        (location,) = data["workspaceOrError"]["locationEntries"]
        assert location["name"] == "perf_pipeline"
        assert location["locationOrLoadError"]["__typename"] == "RepositoryLocation"
        groups = {tuple(a["assetKey"]["path"]): a["groupName"] for a in data["assetNodes"]}
        assert groups == {("raw_metrics",): "ingest", ("normalized_timeseries",): "normalize",
                          **{(name,): group for name, group in GROUP_OF.items()}}

        (trend_node,) = _graphql(port, TREND_PLOTS)["assetNodes"]
        (latest,) = trend_node["assetMaterializations"]
        markdown = {e["label"]: e.get("mdStr") for e in latest["metadataEntries"]}
        assert "data:image/png;base64," in markdown["plot_trends"]
    finally:
        stop_process_group(process)

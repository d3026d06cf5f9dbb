"""`dagster dev` loads the code location and shows the assets in their groups."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from perf_pipeline_tests.conftest import free_port, stop_process_group
from perf_pipeline_tests.test_definitions import GROUP_OF

ROOT = Path(__file__).resolve().parents[1]
QUERY = ("{ assetNodes { assetKey { path } groupName } workspaceOrError { ... on Workspace "
         "{ locationEntries { name locationOrLoadError { __typename } } } } }")


def _graphql(port: int) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": QUERY}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())["data"]


@pytest.mark.slow
def test_dagster_dev_loads_the_code_location_with_assets_in_groups(tmp_path):
    port = free_port()
    env = {**os.environ, "PERF_PIPELINE_HOME": str(tmp_path / "home")}
    env.pop("DAGSTER_HOME", None)
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-w", str(ROOT / "workspace.yaml"),
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path,  # its instance lives in a temporary folder there, not in the checkout env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
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
    finally:
        stop_process_group(process)

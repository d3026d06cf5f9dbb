"""The CI examples in docs/ci stay runnable: their YAML parses and every perf-pipeline
command in them is accepted by the real argument parser."""

import re
import shlex
from pathlib import Path

import yaml

from perf_pipeline.cli import build_parser

DOCS = Path(__file__).resolve().parents[1] / "docs" / "ci"
VARIABLES = {"$PERF_TEST_RUN_ID": "run-1", "$PERF_NODE_TYPE": "linux-large"}


def _parse(command: str):
    for name, value in VARIABLES.items():
        command = command.replace(name, value)
    words = shlex.split(command.replace("\\\n", " "))
    return build_parser().parse_args(words[words.index("perf-pipeline") + 1:])


def test_github_actions_example():
    workflow = yaml.safe_load((DOCS / "github-actions.yml").read_text())
    steps = workflow["jobs"]["tests"]["steps"]
    commands = [step["run"] for step in steps if "perf-pipeline gate" in step.get("run", "")]
    assert len(commands) == 1
    args = _parse(commands[0].replace(".venv/bin/", ""))
    assert (args.command, args.run_id, args.ingest) == ("gate", "run-1", ["perf-results"])
    assert any("--perf-collect=perf-results" in step.get("run", "") for step in steps)


def test_jenkinsfile_example():
    text = (DOCS / "Jenkinsfile").read_text()
    command = re.search(r"\.venv/bin/perf-pipeline gate.*?--junit-xml perf-gate\.xml", text, re.S)
    args = _parse(command.group(0).replace(".venv/bin/", ""))
    assert (args.command, args.junit_xml, args.node_type) == ("gate", "perf-gate.xml", "linux-large")
    assert "--perf-collect=perf-results" in text

"""Who made a metric: the test run, CI job, commit and node, read from the CI's own
environment variables (GitHub Actions, Jenkins, GitLab CI) or the local machine.

`PERF_TEST_RUN_ID`, `PERF_CI_JOB_ID`, `PERF_COMMIT`, `PERF_NODE_ID` and `PERF_NODE_TYPE`
override what is detected, for CI systems not listed here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone


@dataclass(frozen=True)
class RunMetadata:
    test_run_id: str
    ci_job_id: str | None
    commit: str | None
    branch: str | None
    node_id: str
    node_type: str | None
    provider: str  # github, jenkins, gitlab or local

    def fields(self) -> dict[str, str]:
        """The metric-row fields this metadata fills (context_data holds commit and branch)."""
        row = {"test_run_id": self.test_run_id, "node_id": self.node_id}
        if self.ci_job_id:
            row["ci_job_id"] = self.ci_job_id
        if self.node_type:
            row["node_type"] = self.node_type
        return row

    def context(self) -> dict[str, str]:
        return {key: value for key, value in (("commit", self.commit), ("branch", self.branch),
                                              ("ci_provider", self.provider)) if value}

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def _get(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def _git_commit(cwd: str | None = None) -> str | None:
    """HEAD of the git checkout we run in, when there is one (local runs)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) >= 7 else None


def detect(env: Mapping[str, str] | None = None, *, cwd: str | None = None,
           now: datetime | None = None) -> RunMetadata:
    env = os.environ if env is None else env
    if env.get("GITHUB_ACTIONS") == "true":
        provider = "github"
        run = _get(env, "GITHUB_RUN_ID")
        attempt = _get(env, "GITHUB_RUN_ATTEMPT") or "1"
        job = _get(env, "GITHUB_JOB")
        test_run_id = f"github-{run}-{attempt}" + (f"-{job}" if job else "") if run else None
        ci_job_id = f"{run}/{job}" if run and job else run
        commit = _get(env, "GITHUB_SHA")
        branch = _get(env, "GITHUB_HEAD_REF", "GITHUB_REF_NAME")
        node = _get(env, "RUNNER_NAME")
    elif _get(env, "JENKINS_URL", "JENKINS_HOME") and _get(env, "BUILD_NUMBER"):
        provider = "jenkins"
        tag = _get(env, "BUILD_TAG")
        test_run_id = tag
        job_name, number = _get(env, "JOB_NAME"), _get(env, "BUILD_NUMBER")
        ci_job_id = f"{job_name}#{number}" if job_name else number
        commit = _get(env, "GIT_COMMIT")
        branch = _get(env, "BRANCH_NAME", "GIT_BRANCH")
        node = _get(env, "NODE_NAME")
    elif env.get("GITLAB_CI") == "true":
        provider = "gitlab"
        pipeline, job = _get(env, "CI_PIPELINE_ID"), _get(env, "CI_JOB_ID")
        test_run_id = f"gitlab-{pipeline}-{job}" if pipeline and job else None
        ci_job_id = job
        commit = _get(env, "CI_COMMIT_SHA")
        branch = _get(env, "CI_COMMIT_REF_NAME")
        node = _get(env, "CI_RUNNER_DESCRIPTION")
    else:
        provider = "local"
        test_run_id = ci_job_id = branch = node = None
        commit = None
    commit = _get(env, "PERF_COMMIT") or commit or (_git_commit(cwd) if provider == "local" else None)
    if test_run_id is None:
        stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
        test_run_id = f"local-{stamp}-{uuid.uuid4().hex[:8]}"
    return RunMetadata(
        test_run_id=_get(env, "PERF_TEST_RUN_ID") or test_run_id,
        ci_job_id=_get(env, "PERF_CI_JOB_ID") or ci_job_id,
        commit=commit,
        branch=branch,
        node_id=_get(env, "PERF_NODE_ID") or node or socket.gethostname() or "unknown-node",
        node_type=_get(env, "PERF_NODE_TYPE"),
        provider=provider,
    )

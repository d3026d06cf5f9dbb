"""Automated actions: off by default, dry run first, once per condition, failures recorded."""

import json
import os
import threading
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from perf_pipeline.actions import (
    DECISION_COLUMNS,
    ActionRule,
    decide,
    load_handler,
    post_webhook,
    write_request_file,
)
from perf_pipeline.analysis.recommendations import COLUMNS
from perf_pipeline.defs.actions import ActionRuleConfig, ActionsResource, optimization_actions
from perf_pipeline.defs.resources import WarehouseResource
from perf_pipeline.storage.warehouse import open_warehouse

NOW = datetime(2026, 11, 20, 6)
CALLS_ENV = "PERF_TEST_ACTION_CALLS"


def record_call(recommendation: dict) -> str:
    """A handler that appends the subject it acted on to the file named by $PERF_TEST_ACTION_CALLS."""
    with open(os.environ[CALLS_ENV], "a") as calls:
        calls.write(recommendation["subject"] + "\n")
    return f"drained {recommendation['subject']}"


def dies_on_n2(recommendation: dict) -> str:
    """Acts like `record_call`, but the process is killed while acting on n2."""
    if recommendation["subject"] == "n2":
        raise KeyboardInterrupt("killed")
    return record_call(recommendation)


def broken_handler(recommendation: dict) -> str:
    raise ConnectionError("scheduler API unreachable")


def _recommendations(*subjects: str, kind: str = "drain_node") -> pd.DataFrame:
    rows = [{"recommendation_id": f"id-{s}", "condition_key": f"{kind}|{s}|", "kind": kind,
             "severity": "high", "subject": s, "title": "t", "action": f"drain {s}", "evidence": "e",
             "evidence_json": "{}", "expected_gain": "g", "expected_gain_percent": None,
             "node_id": s, "metric_name": None, "incident_id": None} for s in subjects]
    return pd.DataFrame(rows, columns=COLUMNS)


def _run(recs, history, rules, when=NOW, **kwargs) -> pd.DataFrame:
    new = decide(recs, history, rules, now=when, **kwargs)
    return pd.concat([history, new], ignore_index=True) if len(history) else new


@pytest.fixture
def calls(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "calls.txt"
    path.touch()
    monkeypatch.setenv(CALLS_ENV, str(path))
    return path


EMPTY = pd.DataFrame(columns=DECISION_COLUMNS)
LIVE = [ActionRule("drain_node", f"{__name__}:record_call", enabled=True, dry_run=False)]


def test_without_rules_everything_is_skipped_once(calls):
    history = _run(_recommendations("n1"), EMPTY, [])
    assert list(history["decision"]) == ["skipped"]
    assert history["reason"].iloc[0] == "no action configured for drain_node"
    history = _run(_recommendations("n1"), history, [], NOW + timedelta(days=1))
    assert len(history) == 1  # the same decision again is not a new decision
    disabled = [ActionRule("drain_node", f"{__name__}:record_call")]
    history = _run(_recommendations("n1"), history, disabled, NOW + timedelta(days=2))
    assert list(history["reason"])[-1] == "the drain_node action is disabled"
    assert calls.read_text() == ""


def test_a_dry_run_records_what_it_would_do_and_calls_nothing(calls):
    dry = [ActionRule("drain_node", f"{__name__}:record_call", enabled=True)]
    history = _run(_recommendations("n1", "n2"), EMPTY, dry)
    assert list(history["decision"]) == ["dry_run", "dry_run"]
    assert history["reason"].iloc[0] == f"would call {__name__}:record_call (dry run)"
    assert calls.read_text() == ""


def test_an_enabled_action_runs_once_per_condition_not_once_per_run(calls):
    history = EMPTY
    for day in range(3):
        history = _run(_recommendations("n1"), history, LIVE, NOW + timedelta(days=day))
    assert calls.read_text().splitlines() == ["n1"]
    assert list(history["decision"]) == ["applied"] and history["detail"].iloc[0] == "drained n1"
    # the condition ends, then comes back: that is a new occurrence, acted on again
    history = _run(_recommendations(), history, LIVE, NOW + timedelta(days=4))
    assert list(history["decision"])[-1] == "cleared"
    history = _run(_recommendations("n1"), history, LIVE, NOW + timedelta(days=5))
    assert calls.read_text().splitlines() == ["n1", "n1"]


def test_a_run_killed_half_way_has_stored_the_actions_it_took(calls):
    stored = []
    dying = [ActionRule("drain_node", f"{__name__}:dies_on_n2", enabled=True, dry_run=False)]
    with pytest.raises(KeyboardInterrupt):
        decide(_recommendations("n1", "n2"), EMPTY, dying, now=NOW, on_decision=stored.append)
    assert [(row["subject"], row["decision"]) for row in stored] == [("n1", "applied")]
    history = _run(_recommendations("n1", "n2"), pd.DataFrame(stored), LIVE, NOW + timedelta(hours=1))
    assert calls.read_text().splitlines() == ["n1", "n2"]
    assert list(zip(history["subject"], history["decision"])) == [("n1", "applied"), ("n2", "applied")]


def test_a_failing_handler_is_recorded_retried_and_given_up_on():
    broken = [ActionRule("drain_node", f"{__name__}:broken_handler", enabled=True, dry_run=False)]
    history = EMPTY
    for day in range(5):
        history = _run(_recommendations("n1"), history, broken, NOW + timedelta(days=day), max_attempts=3)
    assert list(history["decision"]) == ["failed", "failed", "failed", "skipped"]
    assert history["detail"].iloc[0] == "ConnectionError: scheduler API unreachable"
    assert history["reason"].iloc[-1] == "gave up after 3 failed attempts"


def test_handler_specs_are_checked():
    with pytest.raises(ValueError, match="must look like 'package.module:function'"):
        load_handler("no_colon")
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_handler("perf_pipeline.actions:missing")
    assert load_handler("perf_pipeline.actions:post_webhook") is post_webhook


def test_the_webhook_handler_posts_the_recommendation_with_its_token(monkeypatch):
    received = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.headers["Authorization"], json.loads(body)))
            self.send_response(200 if self.headers["Authorization"] == "Bearer s3cret" else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("PERF_ACTIONS_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/drain")
        monkeypatch.setenv("PERF_ACTIONS_WEBHOOK_TOKEN", "s3cret")
        recommendation = _recommendations("n9").iloc[0].to_dict()
        assert post_webhook(recommendation) == "HTTP 200"
        assert received[0] == ("Bearer s3cret", json.loads(json.dumps(recommendation)))
        monkeypatch.setenv("PERF_ACTIONS_WEBHOOK_TOKEN", "wrong")
        history = _run(_recommendations("n9"), EMPTY, [ActionRule(
            "drain_node", "perf_pipeline.actions:post_webhook", enabled=True, dry_run=False)])
        assert history["decision"].iloc[0] == "failed" and "401" in history["detail"].iloc[0]
    finally:
        server.shutdown()
        server.server_close()


def test_the_file_handler_writes_one_request_per_condition(tmp_path, monkeypatch):
    monkeypatch.setenv("PERF_ACTIONS_DIR", str(tmp_path / "requests"))
    recommendation = _recommendations("n4").iloc[0].to_dict()
    path = Path(write_request_file(recommendation))
    assert path == tmp_path / "requests" / "id-n4.json"
    assert json.loads(path.read_text())["subject"] == "n4"
    assert [p.name for p in path.parent.iterdir()] == ["id-n4.json"]


def test_the_actions_asset_applies_once_and_survives_a_failing_handler(tmp_path, calls):
    warehouse = WarehouseResource(database=str(tmp_path / "perf.duckdb"), landing_dir=str(tmp_path))
    with open_warehouse(tmp_path / "perf.duckdb") as wh:
        recs = pd.concat([_recommendations("n1"), _recommendations("run-5", kind="bisect_regression")])
        wh.replace_table("optimization_recommendations", recs.assign(computed_at=NOW))
    actions = ActionsResource(rules=[
        ActionRuleConfig(kind="drain_node", handler=f"{__name__}:record_call", enabled=True, dry_run=False),
        ActionRuleConfig(kind="bisect_regression", handler=f"{__name__}:broken_handler", enabled=True,
                         dry_run=False)])
    for _ in range(2):
        result = dg.materialize([optimization_actions],
                                resources={"warehouse": warehouse, "actions": actions})
        assert result.success
    assert calls.read_text().splitlines() == ["n1"]
    with open_warehouse(tmp_path / "perf.duckdb", read_only=True) as wh:
        log = wh.table("optimization_actions")
    assert sorted(zip(log["kind"], log["decision"])) == [
        ("bisect_regression", "failed"), ("bisect_regression", "failed"), ("drain_node", "applied")]
    metadata = result.asset_materializations_for_node("optimization_actions")[0].metadata
    assert metadata["failed"].value == 1 and metadata["applied"].value == 0

"""Automated optimization actions: operator-configured handlers for recommendations.

An operator maps a recommendation kind (`drain_node`, `bisect_regression`, …) to a handler,
an importable callable named "package.module:function" that takes the recommendation as a
dict and returns a short detail string (a ticket number, "drained"). Actions are off by
default: a kind without a rule is skipped, a rule is disabled until `enabled`, and an
enabled rule only records what it would do (`dry_run`) until `dry_run` is turned off.

Idempotent: a recommendation's `condition_key` stays the same for as long as its condition
lasts, and a condition is acted on once — later runs that see it again decide nothing new.
When a condition that was acted on (or tried, or dry-run) disappears from the
recommendations, it is `cleared`, so a recurrence is acted on again. A handler that raises is recorded as `failed` and retried on the next run,
up to `max_attempts`; it never stops the pipeline. Every decision is one row of
`optimization_actions` with its reason and time, stored as soon as it is made. Between a
handler's return and that row lies a moment where a killed process forgets an action, so
handlers receive the `recommendation_id` and `condition_key` to recognise a repeat.
"""

from __future__ import annotations

import importlib
import json
import os
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd

DECISIONS = ("applied", "dry_run", "skipped", "failed", "cleared")
DECISION_COLUMNS = ["decided_at", "condition_key", "recommendation_id", "kind", "subject", "handler",
                    "decision", "reason", "detail"]


@dataclass(frozen=True)
class ActionRule:
    kind: str  # the recommendation kind this rule acts on
    handler: str  # "package.module:function"
    enabled: bool = False
    dry_run: bool = True


def load_handler(spec: str) -> Callable[[dict], object]:
    """The callable a "package.module:function" spec names; ValueError says what is wrong."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"action handler {spec!r} must look like 'package.module:function'")
    try:
        handler = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"action handler {spec!r} cannot be loaded: {error}") from None
    if not callable(handler):
        raise ValueError(f"action handler {spec!r} is not callable")
    return handler


def _last_decisions(history: pd.DataFrame) -> dict[str, dict]:
    if history.empty:
        return {}
    ordered = history.sort_values("decided_at", kind="stable")
    return {row["condition_key"]: row for row in ordered.to_dict("records")}


def _failures_since_clear(history: pd.DataFrame, condition: str) -> int:
    rows = history[history["condition_key"] == condition].sort_values("decided_at", kind="stable")
    count = 0
    for decision in rows["decision"]:
        count = count + 1 if decision == "failed" else 0 if decision == "cleared" else count
    return count


def decide(recommendations: pd.DataFrame, history: pd.DataFrame, rules: Sequence[ActionRule], *,
           now: datetime, max_attempts: int = 3,
           loader: Callable[[str], Callable[[dict], object]] = load_handler,
           on_decision: Callable[[dict], None] | None = None) -> pd.DataFrame:
    """The new decisions for this run's recommendations, given every earlier decision.

    Only changes are recorded: a condition already applied, dry-run or skipped for the same
    reason is not recorded again. Handlers are called here, one at a time, and their
    exceptions become `failed` rows. `on_decision` receives each decision as soon as it is
    made, so that the caller can store it before the next handler runs: a run that dies
    half-way then remembers every action it took.
    """
    by_kind = {rule.kind: rule for rule in rules}
    last = _last_decisions(history)
    rows: list[dict] = []

    def record(rec: dict, handler: str | None, decision: str, reason: str, detail: str = "") -> None:
        rows.append({"decided_at": now, "condition_key": rec["condition_key"],
                     "recommendation_id": rec["recommendation_id"], "kind": rec["kind"],
                     "subject": rec["subject"], "handler": handler, "decision": decision,
                     "reason": reason, "detail": detail})
        if on_decision is not None:
            on_decision(rows[-1])

    current = set()
    for rec in recommendations.to_dict("records"):
        current.add(rec["condition_key"])
        previous = last.get(rec["condition_key"])
        rule = by_kind.get(rec["kind"])
        if previous is not None and previous["decision"] == "applied":
            continue
        if rule is None:
            decision, reason = "skipped", f"no action configured for {rec['kind']}"
        elif not rule.enabled:
            decision, reason = "skipped", f"the {rec['kind']} action is disabled"
        elif rule.dry_run:
            decision, reason = "dry_run", f"would call {rule.handler} (dry run)"
        else:
            failures = _failures_since_clear(history, rec["condition_key"])
            if failures >= max_attempts:
                decision, reason = "skipped", f"gave up after {failures} failed attempts"
            else:
                try:
                    detail = loader(rule.handler)(dict(rec))
                except Exception as error:  # a handler's failure must not stop the pipeline
                    record(rec, rule.handler, "failed", f"attempt {failures + 1} of {max_attempts}",
                           f"{type(error).__name__}: {error}")
                    continue
                record(rec, rule.handler, "applied", f"called {rule.handler}",
                       "" if detail is None else str(detail))
                continue
        if previous is not None and (previous["decision"], previous["reason"]) == (decision, reason):
            continue
        record(rec, rule.handler if rule else None, decision, reason)
    for condition, previous in last.items():
        if condition not in current and previous["decision"] in ("applied", "dry_run", "failed"):
            record(previous, previous["handler"], "cleared", "the condition is no longer recommended")
    return pd.DataFrame(rows, columns=DECISION_COLUMNS)


# ----------------------------------------------------------------- built-in handlers

ACTIONS_DIR_ENV = "PERF_ACTIONS_DIR"
WEBHOOK_URL_ENV = "PERF_ACTIONS_WEBHOOK_URL"
WEBHOOK_TOKEN_ENV = "PERF_ACTIONS_WEBHOOK_TOKEN"


def write_request_file(recommendation: dict) -> str:
    """Write the recommendation as a JSON request file for another system to pick up, in
    $PERF_ACTIONS_DIR (default: `actions/` under PERF_PIPELINE_HOME); atomic rename."""
    from perf_pipeline.config import paths_from_env

    folder = Path(os.environ.get(ACTIONS_DIR_ENV) or paths_from_env().home / "actions")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{recommendation['recommendation_id']}.json"
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps(recommendation, default=str, indent=1))
    temporary.replace(target)
    return str(target)


def post_webhook(recommendation: dict) -> str:
    """POST the recommendation as JSON to $PERF_ACTIONS_WEBHOOK_URL, with a bearer token from
    $PERF_ACTIONS_WEBHOOK_TOKEN when set; raises on a non-2xx answer."""
    url = os.environ.get(WEBHOOK_URL_ENV)
    if not url:
        raise RuntimeError(f"{WEBHOOK_URL_ENV} is not set")
    headers = {"Content-Type": "application/json"}
    if os.environ.get(WEBHOOK_TOKEN_ENV):
        headers["Authorization"] = f"Bearer {os.environ[WEBHOOK_TOKEN_ENV]}"
    request = urllib.request.Request(url, data=json.dumps(recommendation, default=str).encode(),
                                     headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:  # raises HTTPError on 4xx/5xx
        return f"HTTP {response.status}"

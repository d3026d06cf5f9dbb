"""`perf-pipeline gate`: did this CI run regress? Exit 1 if so, 0 if not, 2 when it cannot say.

Reads the run's measurements and their baseline from the warehouse, judges them with
`analysis.gate.compare_run`, and reports where CI systems look: a table on stdout, a
markdown table in `$GITHUB_STEP_SUMMARY`, `::error` / `::warning` annotations in GitHub
Actions, and a JUnit XML file for Jenkins and GitLab.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from perf_pipeline.analysis import gate as statistics
from perf_pipeline.storage.warehouse import Warehouse

PASSED, FAILED, ERROR = 0, 1, 2


class GateDataError(ValueError):
    """The gate cannot judge the run (no such run in the database)."""


@dataclass(frozen=True)
class GateOptions:
    run_id: str | None = None
    ci_job_id: str | None = None
    baseline_days: int = 14
    baseline_runs: int = 50
    node_type: str | None = None
    metrics: tuple[str, ...] = ()
    threshold_percent: float | None = None  # None: each metric's threshold from the config
    settings: statistics.GateSettings = field(default_factory=statistics.GateSettings)

    @property
    def subject(self) -> str:
        return f"run {self.run_id}" if self.run_id is not None else f"CI job {self.ci_job_id}"


@dataclass
class GateOutcome:
    exit_code: int
    comparisons: pd.DataFrame
    subject: str

    def count(self, verdict: str) -> int:
        return int((self.comparisons["verdict"] == verdict).sum())

    @property
    def headline(self) -> str:
        regressions = self.count(statistics.REGRESSION)
        judged = len(self.comparisons) - self.count(statistics.NO_BASELINE)
        if regressions:
            return f"{self.subject}: {regressions} significant regression(s) in {judged} comparisons"
        if judged == 0:
            return f"{self.subject}: nothing to compare yet (no test has enough baseline runs)"
        return f"{self.subject}: no significant regression in {judged} comparisons"


def judge(warehouse: Warehouse, options: GateOptions,
          threshold_percent: Callable[[str], float]) -> GateOutcome:
    run, baseline = warehouse.gate_measurements(
        run_id=options.run_id, ci_job_id=options.ci_job_id, baseline_days=options.baseline_days,
        baseline_runs=options.baseline_runs, node_type=options.node_type,
        metrics=options.metrics or None)
    if not options.metrics:
        run = run[~run["metric_name"].isin(statistics.NOT_JUDGED_BY_DEFAULT)]
    if run.empty:
        raise GateDataError(
            f"no measurements of {options.subject} in the database"
            + (f" on node type {options.node_type}" if options.node_type else "")
            + (f" for {', '.join(options.metrics)}" if options.metrics else "")
            + "; ingest its results first (perf-pipeline gate --ingest PATH, or perf-pipeline "
              "ingest then perf-pipeline run)")
    thresholds = ((lambda metric: options.threshold_percent)
                  if options.threshold_percent is not None else threshold_percent)
    comparisons = statistics.compare_run(run, baseline, threshold_percent=thresholds,
                                         settings=options.settings)
    failed = (comparisons["verdict"] == statistics.REGRESSION).any()
    return GateOutcome(exit_code=FAILED if failed else PASSED, comparisons=comparisons,
                       subject=options.subject)


# ---------------------------------------------------------------------- reports

def _number(value, digits: int = 4) -> str:
    if value is None or pd.isna(value):
        return "—"
    return f"{float(value):.{digits}g}"


def _percent(value) -> str:
    return "—" if value is None or pd.isna(value) else f"{float(value):+.1f}%"


_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _test(row) -> str:
    """The test's name on one line: a name with a line break must not start a line of its
    own (in GitHub Actions, a line starting with :: is a workflow command)."""
    name = row["test_name"] if isinstance(row["test_name"], str) else "(run)"
    return name.replace("\r", "\\r").replace("\n", "\\n")


def _xml_safe(text: str) -> str:
    return _XML_ILLEGAL.sub("?", text)


def markdown(outcome: GateOutcome, *, limit: int = 50) -> str:
    """The step summary: headline, then the comparisons that matter (regressions first)."""
    rows = outcome.comparisons
    shown = rows[rows["verdict"] != statistics.OK].head(limit)
    lines = [f"### Performance gate: {'❌' if outcome.exit_code == FAILED else '✅'} "
             f"{outcome.headline}", ""]
    if shown.empty:
        lines.append(f"All {len(rows)} comparisons are within noise of the baseline.")
        return "\n".join(lines) + "\n"
    lines += ["| verdict | metric | test | baseline | this run | change | p (Holm) | detectable | runs |",
              "|---|---|---|---|---|---|---|---|---|"]
    for _, row in shown.iterrows():
        test = _test(row).replace("|", "\\|").replace("`", "'")
        lines.append(
            f"| {row['verdict']} | {row['metric_name']} | `{test}` | {_number(row['baseline_value'])} "
            f"| {_number(row['run_value'])} | {_percent(row['change_percent'])} "
            f"| {_number(row['p_adjusted'], 2)} | {_percent(row['detectable_percent'])} "
            f"| {row['baseline_runs'] if pd.notna(row['baseline_runs']) else 0} |")
    hidden = len(rows) - len(shown)
    if hidden:
        lines += ["", f"{hidden} more comparison(s) not shown (within noise, or past the first {limit})."]
    return "\n".join(lines) + "\n"


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def github_annotations(outcome: GateOutcome) -> list[str]:
    """`::error` for each regression and `::warning` for each possible one (GitHub Actions)."""
    lines = []
    for _, row in outcome.comparisons.iterrows():
        level = {statistics.REGRESSION: "error", statistics.POSSIBLE: "warning"}.get(row["verdict"])
        if level is None:
            continue
        title = _escape_property(f"Performance {row['verdict']}: {row['metric_name']}")
        message = _escape_data(f"{_test(row)}: {_number(row['baseline_value'])} → "
                               f"{_number(row['run_value'])} ({_percent(row['change_percent'])}); "
                               f"{row['reason']}")
        lines.append(f"::{level} title={title}::{message}")
    return lines


def junit_xml(outcome: GateOutcome) -> bytes:
    """One testcase per comparison; regressions are failures, missing baselines are skipped."""
    rows = outcome.comparisons
    suite = ElementTree.Element("testsuite", {
        "name": "perf-pipeline gate", "tests": str(len(rows)),
        "failures": str(outcome.count(statistics.REGRESSION)),
        "skipped": str(outcome.count(statistics.NO_BASELINE)), "errors": "0"})
    for _, row in rows.iterrows():
        case = ElementTree.SubElement(suite, "testcase", {
            "classname": f"perf.{row['metric_name']}", "name": _xml_safe(_test(row))})
        detail = _xml_safe(f"baseline {_number(row['baseline_value'])}, this run {_number(row['run_value'])}, "
                  f"change {_percent(row['change_percent'])}, p {_number(row['p_adjusted'], 2)}; "
                  f"{row['reason'] or ''}")
        if row["verdict"] == statistics.REGRESSION:
            ElementTree.SubElement(case, "failure", {"message": _xml_safe(row["reason"] or "regression"),
                                                     "type": "PerformanceRegression"}).text = detail
        elif row["verdict"] == statistics.NO_BASELINE:
            ElementTree.SubElement(case, "skipped", {"message": row["reason"] or "no baseline"})
        else:
            ElementTree.SubElement(case, "system-out").text = f"{row['verdict']}: {detail}"
    return ElementTree.tostring(suite, encoding="utf-8", xml_declaration=True)


def console_table(outcome: GateOutcome, *, limit: int = 20) -> str:
    rows = outcome.comparisons.head(limit)
    counts = outcome.comparisons["verdict"].value_counts()
    lines = [outcome.headline,
             "  verdicts: " + ", ".join(f"{int(counts[v])} {v}" for v in statistics.VERDICT_ORDER
                                        if v in counts)]
    for _, row in rows.iterrows():
        lines.append(f"  {row['verdict']:<19} {row['metric_name']:<22} {_test(row)[:70]:<70} "
                     f"{_number(row['baseline_value']):>9} → {_number(row['run_value']):<9} "
                     f"{_percent(row['change_percent']):>8}  {row['reason'] or ''}")
    if len(outcome.comparisons) > limit:
        lines.append(f"  … {len(outcome.comparisons) - limit} more")
    return "\n".join(lines)


def publish(outcome: GateOutcome, *, junit_path: Path | None = None,
            environ: Mapping[str, str] = os.environ, echo: Callable[[str], None] = print) -> None:
    """Print the verdicts and write them where the CI system looks."""
    echo(console_table(outcome))
    if environ.get("GITHUB_ACTIONS") == "true":
        for line in github_annotations(outcome):
            echo(line)
    summary = environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(markdown(outcome))
    if junit_path is not None:
        Path(junit_path).parent.mkdir(parents=True, exist_ok=True)
        Path(junit_path).write_bytes(junit_xml(outcome))

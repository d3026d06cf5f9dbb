"""`perf-pipeline`: simulate a fleet, ingest metric files, run the pipeline, or all three (demo);
pick nodes for a kind of test (select-nodes)."""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from datetime import date, datetime, timezone
from pathlib import Path
from typing import NoReturn

from perf_pipeline.config import paths_from_env
from perf_pipeline.ingest.formats import PARSERS, is_supported
from perf_pipeline.report.markdown import (
    alert_table,
    anomaly_table,
    cause_table,
    configuration_table,
    correlation_table,
    incident_table,
    outlier_node_table,
    ranking_table,
    recommendation_table,
    risk_table,
    trend_table,
)


class UsageError(ValueError):
    pass


# Upper bounds past which DuckDB cannot represent the value (LIMIT is a BIGINT, a baseline
# of more days than this leaves the timestamp range) or the number means nothing.
MAX_ROWS = 1_000_000
MAX_BASELINE_DAYS = 36_500


def _text(value: str) -> str:
    """An option's text: argv bytes that are not UTF-8 arrive as lone surrogates, which
    DuckDB, JSON and YAML cannot store; refused here rather than deep in a query."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"not valid UTF-8: {value!r}") from None
    return value


def _one_line(message: str) -> str:
    """Newlines, control characters and bidi overrides escaped: an error is one line on the
    terminal, whatever text of the user's (or of DuckDB's) it quotes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class _Parser(argparse.ArgumentParser):
    """argparse quotes unknown arguments as typed: its error is made one line too."""

    def error(self, message: str) -> NoReturn:
        super().error(_one_line(message))


def _error(message: str) -> None:
    print(f"perf-pipeline: error: {_one_line(message)}", file=sys.stderr)


def _until(value: str) -> datetime:
    """--until as a time (the mute itself converts an offset to UTC)."""
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--until must be a date like 2026-12-31 or an ISO time, got {value!r}") from None


def _input_files(arguments: list[str]) -> list[Path]:
    files: list[Path] = []
    for argument in arguments:
        if not argument:  # Path("") is the working directory: never ingest that by accident
            raise UsageError(f"{argument!r}: an empty path names no file or folder")
        path = Path(argument)
        if path.is_dir():
            # Names starting with "." or "_" are not data (temporary files, the simulator's
            # _truth.json), as in the landing archive.
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_supported(p)
                           and not p.name.startswith((".", "_")))
            if not found:
                raise UsageError(f"{path}: no metric files ({', '.join(sorted(PARSERS))}) "
                                 "in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{path}: no such file or folder")
    return files


def _end_of(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--end must be a date like 2026-11-28, got {value!r}") from None
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


def cmd_simulate(args: argparse.Namespace) -> int:
    from perf_pipeline.ingest.simulator import simulate_fleet

    started = time.perf_counter()
    summary = simulate_fleet(Path(args.out), days=args.days, nodes=args.nodes, tests=args.tests,
                             seed=args.seed, end=_end_of(args.end), runs_per_day=args.runs_per_day)
    print(f"simulated {summary.rows} rows for {args.nodes} nodes and {args.tests} tests over "
          f"{args.days} days in {time.perf_counter() - started:.1f}s → {args.out} "
          f"(ground truth: {summary.truth_path})")
    return 0


def _ingest(files: list[Path], landing: Path, defaults: dict | None = None) -> None:
    from perf_pipeline.ingest.landing import ingest_files

    report = ingest_files(files, landing, defaults=defaults)
    days = sorted(report.records_by_day)
    span = f"{days[0]} … {days[-1]}" if days else "no days"
    print(f"ingested {report.records_read} records from {report.files_read} files into "
          f"{len(days)} landing days ({span}); {len(report.files_written)} new landing files")
    if report.undated_records or report.unreadable_records or report.out_of_range_records:
        print(f"  {report.undated_records} records without a usable timestamp, "
              f"{report.out_of_range_records} dated outside the daily partitions and "
              f"{report.unreadable_records} unreadable records were kept under today's day; "
              "they will be quarantined with a reason when it loads")
    if report.records_already_landed:
        print(f"  {report.records_already_landed} records were already in the archive "
              "(the same content ingested before) and were not written again")


def _ingest_defaults(args: argparse.Namespace) -> dict | None:
    """Row fields the ingest options give (explicit options over --from-ci-env's)."""
    defaults: dict = {}
    context: dict = {}
    if args.from_ci_env:
        from perf_pipeline.collect.run_metadata import detect

        detected = detect()
        if detected.provider == "local":
            # A run id made up here would differ on every ingest of the same file.
            raise UsageError("--from-ci-env: no CI environment found (GitHub Actions, Jenkins, "
                             "GitLab CI); give --test-run-id and --node-id instead")
        defaults.update(detected.fields())
        context.update(detected.context())
    if args.timestamp is not None:
        try:
            moment = datetime.fromisoformat(args.timestamp)
        except ValueError:
            raise UsageError(f"--timestamp must be an ISO time like 2026-11-28T10:00:00Z, "
                             f"got {args.timestamp!r}") from None
        defaults["timestamp"] = (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).isoformat()
    defaults.update({name: getattr(args, name) for name in
                     ("node_id", "node_type", "test_type", "test_run_id", "ci_job_id")
                     if getattr(args, name)})
    context.update({name: getattr(args, name) for name in ("commit", "branch") if getattr(args, name)})
    if context:
        defaults["context_data"] = context
    return defaults or None


def cmd_ingest(args: argparse.Namespace) -> int:
    defaults = _ingest_defaults(args)
    files = _input_files(args.files)
    paths = paths_from_env().ensure()
    _ingest(files, paths.landing, defaults)
    return 0


def _run(window_days: int | None, days: list[date] | None = None, *, retrain: bool = False) -> None:
    from perf_pipeline.defs.runner import run_pipeline

    paths = paths_from_env()
    started = time.perf_counter()
    trend_config = {"window_days": window_days} if window_days else None
    report = run_pipeline(paths, days=days, trend_config=trend_config, retrain=retrain or None)
    for day, reason in report.days_skipped:
        print(f"  skipped {day}: {reason}")
    print(f"pipeline done in {time.perf_counter() - started:.1f}s: {len(report.days_loaded)} "
          f"days loaded, {len(report.run_ids)} Dagster runs (see them with `dagster dev`)")


def cmd_run(args: argparse.Namespace) -> int:
    days = None
    if args.day:
        try:
            days = sorted({date.fromisoformat(d) for d in args.day})
        except ValueError as error:
            raise UsageError(f"--day: {error}") from None
    _run(args.window_days, days, retrain=args.retrain)
    return 0


def _summary() -> None:
    from perf_pipeline.storage.warehouse import open_warehouse

    paths = paths_from_env()
    with open_warehouse(paths.database, read_only=True) as wh:
        counts = wh.table_counts()
        sections = [
            ("What is getting worse (significant degrading trends, change over the window):",
             wh.top_trends(direction="degrading", limit=10), trend_table,
             "No significant degrading trend."),
            ("What changed for the worse, and where it started (change-point incidents):",
             wh.top_incidents(limit=10), incident_table, "No regression incident."),
            ("Why, most likely (the top suspected cause of each regression, with evidence):",
             wh.top_causes(limit=10), cause_table, "No regression to explain."),
            ("Odd single values (spikes, dips, short bursts):",
             wh.top_anomalies(limit=10), anomaly_table, "No anomaly."),
            ("Nodes that stand out from the fleet (node-days whose health metrics are outliers):",
             wh.outlier_nodes(limit=10), outlier_node_table, "No outlier node."),
            ("Metrics that move together (strong, significant correlations):",
             wh.flagged_correlations(limit=10), correlation_table, "No strong correlation."),
            ("Configurations that shift a metric (large, significant effects):",
             wh.flagged_configuration_effects(limit=10), configuration_table,
             "No large configuration effect."),
            ("Nodes heading for a limit (predicted crossings, risk 0–100):",
             wh.top_risks(limit=5), risk_table, "No node at risk."),
            ("Node ranking, worst five (overall score 0–100, 50 = fleet median):",
             wh.node_ranking("overall").tail(5), ranking_table, "No node scores."),
            ("What to do (top recommendations):",
             wh.top_recommendations(limit=8), recommendation_table, "Nothing to recommend."),
            ("Alerts raised (what Slack and email receive once channels are configured):",
             wh.alerts(status="new", limit=10), alert_table, "No alert."),
        ]
    print()
    print(f"rows stored: {counts['performance_metrics']:,}   quarantined: "
          f"{counts['quarantined_metrics']:,}   normalized points: "
          f"{counts['normalized_timeseries']:,}   series analysed: {counts['trend_stats']:,}")
    for title, rows, table, empty in sections:
        print()
        print(f"{title}\n{table(rows)}" if len(rows) else empty)
    print()
    print(f"database:  {paths.database}")
    dashboard = paths.reports / "performance_dashboard.html"
    if dashboard.exists():
        print(f"dashboard: {dashboard}  (a self-contained file: open it in a browser, or serve it "
              "with: perf-pipeline dashboard --no-auth  →  http://127.0.0.1:8080/)")
    print("explore:   dagster dev   (then open http://127.0.0.1:3000, asset groups ingest → "
          "normalize → analysis → models → actions → alerts → reports; plots in the assets' metadata)")


def cmd_demo(args: argparse.Namespace) -> int:
    from perf_pipeline.ingest.simulator import simulate_fleet

    paths = paths_from_env().ensure()
    out = paths.home / "simulated" / f"seed{args.seed}"
    print(f"1/3 simulating {args.nodes} nodes × {args.tests} tests × {args.days} days (seed {args.seed})")
    summary = simulate_fleet(out, days=args.days, nodes=args.nodes, tests=args.tests,
                             seed=args.seed, runs_per_day=args.runs_per_day)
    print(f"    {summary.rows:,} rows, ground truth in {summary.truth_path}")
    print("2/3 ingesting into the landing archive")
    _ingest(_input_files([str(out)]), paths.landing)
    print("3/3 materializing every asset through Dagster")
    _run(args.window_days)
    _summary()
    return 0


def _fleet_arguments(parser: argparse.ArgumentParser, *, seed: int) -> None:
    parser.add_argument("--days", type=int, default=30, help="days of history (default 30)")
    parser.add_argument("--nodes", type=int, default=20, help="test nodes (default 20)")
    parser.add_argument("--tests", type=int, default=50, help="tests in the suite (default 50)")
    parser.add_argument("--seed", type=int, default=seed, help=f"random seed (default {seed})")
    parser.add_argument("--runs-per-day", type=int, default=12, help="CI runs a day (default 12)")


def cmd_select_nodes(args: argparse.Namespace) -> int:
    from perf_pipeline.client import PerformanceTrends

    if not (math.isfinite(args.max_risk) and 0 <= args.max_risk <= 100):
        raise UsageError("--max-risk must be a number from 0 to 100")
    client = PerformanceTrends(database=paths_from_env().database)
    try:
        chosen = client.select_nodes_detail(test_type=args.test_type, k=args.k, max_risk=args.max_risk)
    except LookupError as error:
        raise UsageError(str(error)) from None
    if args.json:
        print(chosen.to_json(orient="records"))
    else:
        for row in chosen.itertuples():
            print(f"{row.node_id}\t{row.score:.1f}\t{row.reason}")
    return 0


_STATUS_OF_ACTION = {"ack": "acknowledged", "resolve": "resolved", "invalid": "invalid"}


def cmd_alerts(args: argparse.Namespace) -> int:
    from perf_pipeline.config import MONITORING_FILE, configure_performance_monitoring, load_monitoring
    from perf_pipeline.storage.warehouse import open_warehouse

    paths = paths_from_env()
    if args.action == "mute":
        if not (args.test or args.node or args.metric):
            raise UsageError("alerts mute needs --test, --node or --metric")
        path = paths.home / MONITORING_FILE
        mute = {"test": args.test, "node": args.node, "metric": args.metric,
                "until": _until(args.until), "reason": args.reason or ""}
        mutes = [m.model_dump() for m in load_monitoring(path).mutes]
        settings = configure_performance_monitoring(path, mutes=[*mutes, mute])
        print(f"muted until {settings.mutes[-1].until:%Y-%m-%d %H:%M}: " + _one_line(
            ", ".join(f"{k}={v}" for k, v in mute.items() if k in ("test", "node", "metric") and v)))
        return 0
    if args.action == "list":
        if not 1 <= args.limit <= MAX_ROWS:
            raise UsageError(f"--limit must be from 1 to {MAX_ROWS:,}")
        with open_warehouse(paths.database, read_only=True) as wh:
            alerts = wh.alerts(status=args.status, limit=args.limit)
        if args.json:
            print(alerts.to_json(orient="records", date_format="iso"))
        else:
            print(alert_table(alerts) if len(alerts) else "no alert")
        return 0
    from perf_pipeline.defs.analysis import utc_now

    status = _STATUS_OF_ACTION[args.action]
    with open_warehouse(paths.database) as wh:
        if not wh.set_alert_status(args.alert_id, status, args.note or f"marked {status} by hand", utc_now()):
            raise UsageError(f"no alert {args.alert_id!r} (see `perf-pipeline alerts list`)")
    print(f"alert {args.alert_id}: {status}")
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    """Exit 1 on a significant regression, 0 otherwise, 2 when the gate cannot judge."""
    from perf_pipeline.analysis.gate import GateSettings
    from perf_pipeline.config import load_monitoring
    from perf_pipeline.defs.runner import PipelineRunError, run_pipeline
    from perf_pipeline.gate import GateOptions, judge, publish
    from perf_pipeline.storage.warehouse import WarehouseLockedError, open_warehouse

    import duckdb

    if (args.run_id is None) == (args.ci_job_id is None):
        raise UsageError("give exactly one of --run-id or --ci-job-id")
    for name, most in (("baseline_days", MAX_BASELINE_DAYS), ("baseline_runs", MAX_ROWS)):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if getattr(args, name) > most:
            raise UsageError(f"--{name.replace('_', '-')} must be at most {most:,}")
    if args.threshold_percent is not None and not (math.isfinite(args.threshold_percent)
                                                   and args.threshold_percent > 0):
        raise UsageError("--threshold-percent must be a positive number")
    if not 0 < args.alpha < 0.5:
        raise UsageError("--alpha must be between 0 and 0.5")
    if args.min_baseline_runs < 2:
        raise UsageError("--min-baseline-runs must be at least 2 (a test's noise needs two runs)")
    paths = paths_from_env().ensure()
    monitoring = load_monitoring(paths.home / "perf_pipeline.yaml")
    options = GateOptions(run_id=args.run_id, ci_job_id=args.ci_job_id,
                          baseline_days=args.baseline_days, baseline_runs=args.baseline_runs,
                          node_type=args.node_type, metrics=tuple(args.metric or ()),
                          threshold_percent=args.threshold_percent,
                          settings=GateSettings(alpha=args.alpha,
                                                min_baseline_runs=args.min_baseline_runs))
    # Every failure to judge exits 2: 1 means "regressed", and a gate that cannot read its
    # data must not say so.
    try:
        if args.ingest:
            _ingest(_input_files(args.ingest), paths.landing)
            run_pipeline(paths, analyse=False, progress=lambda line: print(line, file=sys.stderr))
        with open_warehouse(paths.database, read_only=True) as warehouse:
            outcome = judge(warehouse, options, monitoring.threshold_percent)
    except (PipelineRunError, WarehouseLockedError, duckdb.Error) as error:
        _error(str(error))
        return 2
    try:
        publish(outcome, junit_path=Path(args.junit_xml) if args.junit_xml else None)
    except OSError as error:  # the verdict stands even when a report cannot be written
        print(f"perf-pipeline: warning: could not write a gate report: {error}", file=sys.stderr)
    return outcome.exit_code


def _serve(args: argparse.Namespace, *, dashboard: bool) -> int:
    from perf_pipeline.server.app import serve, settings_from_env

    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be from 1 to 65535, got {args.port}")
    if not (math.isfinite(args.max_body_mb) and args.max_body_mb > 0):
        raise UsageError("--max-body-mb must be a positive number")
    paths = paths_from_env().ensure()
    settings = settings_from_env(paths.landing, host=args.host, port=args.port,
                                 no_auth=args.no_auth, serve_dashboard=dashboard,
                                 max_body_bytes=int(args.max_body_mb * 1024 * 1024))
    base = f"http://{settings.host}:{settings.port}"
    auth = "off" if settings.token is None else "bearer token"
    if dashboard:
        print(f"dashboard on {base}/ (file: {settings.dashboard}); JSON API under /api/v1/; "
              f"auth: {auth}", flush=True)
    else:
        print(f"metrics gateway on {base}/api/v1/metrics (landing: {paths.landing}); JSON API "
              f"under /api/v1/; auth: {auth}", flush=True)
    serve(settings)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    return _serve(args, dashboard=False)


def cmd_dashboard(args: argparse.Namespace) -> int:
    return _serve(args, dashboard=True)


def cmd_agent(args: argparse.Namespace) -> int:
    from perf_pipeline.collect.agent import run_from_args

    return run_from_args(args)


def _server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; anything else needs a token)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--no-auth", action="store_true",
                        help="accept requests without a token (loopback addresses only)")
    parser.add_argument("--max-body-mb", type=float, default=16.0,
                        help="largest metrics batch accepted, in MiB (default 16)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="perf-pipeline",
        description="Performance trends of a test fleet on Dagster and DuckDB. State lives "
                    "under $PERF_PIPELINE_HOME (default ./var).")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="simulate a fleet, ingest it, run every asset, summarize")
    _fleet_arguments(demo, seed=7)
    demo.add_argument("--window-days", type=int, default=None, help="trend window (default 30)")
    demo.set_defaults(handler=cmd_demo)

    simulate = commands.add_parser("simulate", help="write a simulated fleet in landing format")
    _fleet_arguments(simulate, seed=0)
    simulate.add_argument("--out", required=True, help="output folder (<day>/*.jsonl, _truth.json)")
    simulate.add_argument("--end", help="last day simulated, YYYY-MM-DD (default: now)")
    simulate.set_defaults(handler=cmd_simulate)

    ingest = commands.add_parser(
        "ingest", help="copy metric files (JSON Lines, CSV, JSON, pytest-benchmark JSON, "
                       "JUnit XML) into landing/",
        description="Copy metric files into landing/<day>/, each record under its own UTC day. "
                    f"Formats by suffix: {', '.join(sorted(PARSERS))} (.json: metric rows or "
                    "pytest-benchmark output; .xml: JUnit reports). The options fill fields a "
                    "record lacks; a file's own values (a JUnit suite's hostname and timestamp) "
                    "win.")
    ingest.add_argument("files", nargs="+", help="files or folders of metric files")
    ingest.add_argument("--node-id", type=_text, help="node the metrics came from")
    ingest.add_argument("--node-type", type=_text, help="kind of node, e.g. linux-large")
    ingest.add_argument("--test-type", type=_text, help="e.g. unit, integration, e2e")
    ingest.add_argument("--test-run-id", type=_text, help="the test run (default for JUnit and "
                                              "pytest-benchmark: derived from host and time)")
    ingest.add_argument("--ci-job-id", type=_text, help="the CI job")
    ingest.add_argument("--commit", type=_text, help="commit under test (into context_data)")
    ingest.add_argument("--branch", type=_text, help="branch under test (into context_data)")
    ingest.add_argument("--timestamp", help="ISO time for records without one (no offset: UTC)")
    ingest.add_argument("--from-ci-env", action="store_true",
                        help="fill run, CI job, commit, branch and node from the CI's environment "
                             "(GitHub Actions, Jenkins, GitLab, PERF_* overrides); explicit "
                             "options win")
    ingest.set_defaults(handler=cmd_ingest)

    run = commands.add_parser("run", help="materialize new or changed days and all analysis")
    run.add_argument("--day", action="append", help="re-run this day (repeatable); default: "
                                                    "every new or changed landing day")
    run.add_argument("--window-days", type=int, default=None, help="trend window (default 30)")
    run.add_argument("--retrain", action="store_true",
                     help="retrain the forecasting models (default: only when missing or a week old)")
    run.set_defaults(handler=cmd_run)

    select = commands.add_parser("select-nodes", help="the best nodes for a kind of test: healthy, "
                                                      "then fast on that test type, then stable")
    select.add_argument("--test-type", type=_text, help="e.g. unit, integration, e2e (default: all tests)")
    select.add_argument("-k", type=int, default=5, help="how many nodes (default 5)")
    select.add_argument("--max-risk", type=float, default=50.0,
                        help="nodes at or above this risk (0–100) come last (default 50)")
    select.add_argument("--json", action="store_true", help="print JSON records")
    select.set_defaults(handler=cmd_select_nodes)

    gate = commands.add_parser(
        "gate", help="CI gate: exit 1 if this run significantly regressed against the same "
                     "tests' recent history, 0 if not, 2 if it cannot tell")
    which = gate.add_mutually_exclusive_group()
    which.add_argument("--run-id", type=_text, help="the test_run_id to judge")
    which.add_argument("--ci-job-id", type=_text, help="judge every run of this CI job together")
    gate.add_argument("--ingest", action="append", metavar="PATH",
                      help="ingest these metric files or folders and load their days first "
                           "(repeatable)")
    gate.add_argument("--baseline-days", type=int, default=14,
                      help="baseline: runs from this many days before the run (default 14)")
    gate.add_argument("--baseline-runs", type=int, default=50,
                      help="baseline: at most this many most recent runs per test (default 50)")
    gate.add_argument("--min-baseline-runs", type=int, default=5,
                      help="tests with fewer baseline runs get no verdict (default 5)")
    gate.add_argument("--node-type", type=_text, help="compare only measurements on this node type")
    gate.add_argument("--metric", action="append", metavar="NAME", type=_text,
                      help="judge only this metric (repeatable; default: every metric of the run)")
    gate.add_argument("--threshold-percent", type=float, default=None,
                      help="regressions of this size fail the build when the noise allows; "
                           "changes under half of it never do (default: each metric's "
                           "threshold from perf_pipeline.yaml)")
    gate.add_argument("--alpha", type=float, default=0.001,
                      help="chance that a run without any change fails (default 0.001)")
    gate.add_argument("--junit-xml", metavar="PATH", help="also write the verdicts as JUnit XML")
    gate.set_defaults(handler=cmd_gate)

    server = commands.add_parser(
        "serve", help="the metrics gateway (POST /api/v1/metrics) and the JSON API (/api/v1/...)")
    _server_arguments(server)
    server.set_defaults(handler=cmd_serve)

    dashboard = commands.add_parser(
        "dashboard", help="serve the latest dashboard at / with the JSON API and the gateway")
    _server_arguments(dashboard)
    dashboard.set_defaults(handler=cmd_dashboard)

    from perf_pipeline.collect.agent import add_arguments as add_agent_arguments

    agent = commands.add_parser("agent", help="sample this node every interval and push to the "
                                              "gateway, through a local spool")
    add_agent_arguments(agent)
    agent.set_defaults(handler=cmd_agent)

    alerts = commands.add_parser("alerts", help="list regression alerts, change their status, mute")
    actions = alerts.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="alerts, newest first")
    listing.add_argument("--status", choices=["new", "acknowledged", "invalid", "resolved"])
    listing.add_argument("--limit", type=int, default=50,
                         help=f"at most this many (1 to {MAX_ROWS:,}, default 50)")
    listing.add_argument("--json", action="store_true", help="print JSON records")
    for action, meaning in (("ack", "acknowledge: someone is on it (no more deliveries)"),
                            ("resolve", "resolved by hand"),
                            ("invalid", "not a real regression: never raised again")):
        change = actions.add_parser(action, help=meaning)
        change.add_argument("alert_id", type=_text)
        change.add_argument("--note", type=_text, help="why, for the record")
    mute = actions.add_parser("mute", help="silence a test, node or metric until a time")
    mute.add_argument("--test", type=_text, help="test name, * wildcards allowed")
    mute.add_argument("--node", type=_text)
    mute.add_argument("--metric", type=_text)
    mute.add_argument("--until", required=True, help="YYYY-MM-DD or an ISO time (UTC)")
    mute.add_argument("--reason", type=_text)
    alerts.set_defaults(handler=cmd_alerts)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Dagster marks backfill policies as beta; users of the CLI cannot act on that warning.
    warnings.filterwarnings("ignore", message=".*currently in beta")
    # OverflowError: a number too large for where it goes (--spool-max-mb inf) is a usage error.
    if args.command == "agent":  # a long-lived process on test nodes: keep Dagster out of it
        try:
            return args.handler(args)
        except (ValueError, OSError, OverflowError) as error:
            _error(str(error))
            return 2
    import duckdb

    from perf_pipeline.defs.runner import PipelineRunError
    from perf_pipeline.storage.warehouse import WarehouseLockedError

    try:
        return args.handler(args)
    except (PipelineRunError, WarehouseLockedError, duckdb.Error) as error:
        _error(str(error))
        return 1
    except (ValueError, OSError, LookupError, OverflowError) as error:
        _error(str(error))
        return 2
    except KeyboardInterrupt:
        print("perf-pipeline: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

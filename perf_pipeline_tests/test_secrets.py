"""Secrets never leak: with a Slack webhook, a Slack bot token, an SMTP password and an API
token in the environment, the real pipeline raises alerts, the alert sensor delivers them
(first to receivers that fail, then to one that works), a run fails and is posted, and then
no secret (nor its URL-encoded or base64 form) is anywhere Dagster or the pipeline keeps
text: event logs, run configs and tags, sensor ticks and results, captured output and logs,
every file under PERF_PIPELINE_HOME and DAGSTER_HOME, every row of every DuckDB table, and
what the receivers were sent."""

import base64
import json
import logging
import ssl
import urllib.parse
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import duckdb
import pytest
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from perf_pipeline.config import configure_performance_monitoring, paths_from_env
from perf_pipeline.defs.alerts import regression_alert_sensor, run_failure_alert_sensor
from perf_pipeline.defs.runner import instance_settings, run_pipeline
from perf_pipeline.ingest.landing import ingest_files
from perf_pipeline.ingest.simulator import simulate_fleet
from perf_pipeline_tests.conftest import Mailbox, free_port

END = datetime(2026, 11, 20, tzinfo=timezone.utc)
WEBHOOK_SECRET = "T0SECRET/B0SECRET/hook+S3cr3t=path"
SMTP_USER = "perf-bot"
SECRETS = {
    "webhook path": WEBHOOK_SECRET,
    "SLACK_BOT_TOKEN": "xoxb-1111-2222-B0tT0kenS3cr3t",
    "PERF_SMTP_PASSWORD": "smtp pass/w0rd+S3cr3t&=",
    "PERF_API_TOKEN": "api-T0ken-S3cr3t-0123456789abcdef",
}


def leak_forms(secret: str) -> set[str]:
    """The forms a secret takes when stored by something that encodes it."""
    return {secret, urllib.parse.quote(secret), urllib.parse.quote(secret, safe=""),
            urllib.parse.quote_plus(secret), base64.b64encode(secret.encode()).decode(),
            json.dumps(secret)[1:-1]}


FORMS = {form: name for name, secret in SECRETS.items() for form in leak_forms(secret)}


class Search:
    """Every place searched, and what was found where."""

    def __init__(self) -> None:
        self.places = 0
        self.found: list[tuple[str, str]] = []

    def text(self, place: str, text: str) -> None:
        self.places += 1
        self.found += [(place, name) for form, name in FORMS.items() if form in text]

    def data(self, place: str, data: bytes) -> None:
        self.places += 1
        self.found += [(place, name) for form, name in FORMS.items() if form.encode() in data]

    def files(self, root: Path) -> None:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            self.data(str(path), path.read_bytes())

    def duckdb_rows(self, database: Path) -> None:
        """All text of every row of every table: strings in a DuckDB file may be compressed,
        so its bytes alone prove nothing."""
        with duckdb.connect(str(database), read_only=True) as con:
            tables = [name for (name,) in con.execute(
                "SELECT table_name FROM duckdb_tables() ORDER BY table_name").fetchall()]
            for name in tables:
                rows = con.table(name).query("t", "SELECT CAST(t AS VARCHAR) FROM t").fetchall()
                self.text(f"{database.name}:{name}", "\n".join(row for (row,) in rows))

    def instance(self, instance: dg.DagsterInstance) -> None:
        for run in instance.get_runs():
            self.text(f"run {run.run_id} config and tags",
                      json.dumps([run.run_config, run.tags], default=str))
            for record in instance.all_logs(run.run_id):
                event = record.dagster_event
                self.text(f"run {run.run_id} event", "\n".join([
                    record.message, record.user_message, dg.serialize_value(record),
                    repr(event.event_specific_data) if event else ""]))
        for state in instance.all_instigator_state():
            for tick in instance.get_ticks(state.instigator_origin_id, state.selector_id):
                self.text(f"tick of {state.instigator_name}", dg.serialize_value(tick))


@pytest.fixture
def smtp_login_server(certificate):
    """STARTTLS with login on loopback; refuses the password until `accept` is set."""
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    mailbox = Mailbox()
    mailbox.accept = False

    def authenticate(server, session, envelope, mechanism, auth_data) -> AuthResult:
        return AuthResult(success=mailbox.accept, handled=False)

    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port(), tls_context=context,
                            require_starttls=True, authenticator=authenticate, auth_require_tls=True)
    controller.start()
    yield mailbox, controller.port
    controller.stop()


def test_the_search_finds_a_planted_secret_wherever_it_looks(tmp_path):
    """Self-check: each kind of place the leak test reads, with a secret planted in it."""
    planted = tmp_path / "planted"
    (planted / "deep").mkdir(parents=True)
    (planted / "deep" / "compute.log").write_text(
        "POST " + urllib.parse.quote(WEBHOOK_SECRET, safe="") + " failed")
    search = Search()
    search.files(planted)
    assert search.found == [(str(planted / "deep" / "compute.log"), "webhook path")]

    database = tmp_path / "planted.duckdb"
    with duckdb.connect(str(database)) as con:
        con.execute("CREATE TABLE alert_deliveries (last_error VARCHAR, notes VARCHAR[])")
        con.execute("INSERT INTO alert_deliveries VALUES ('ok', ['x', ?])",
                    ["login refused for " + SECRETS["PERF_SMTP_PASSWORD"]])
    search = Search()
    search.duckdb_rows(database)
    assert search.found == [("planted.duckdb:alert_deliveries", "PERF_SMTP_PASSWORD")]

    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        @dg.op
        def chatty(context: dg.OpExecutionContext) -> None:
            context.log.info("token " + base64.b64encode(SECRETS["SLACK_BOT_TOKEN"].encode()).decode())

        dg.GraphDefinition("planted", node_defs=[chatty]).to_job().execute_in_process(
            instance=instance, tags={"note": SECRETS["PERF_API_TOKEN"]})
        search = Search()
        search.instance(instance)
    assert {name for _, name in search.found} == {"SLACK_BOT_TOKEN", "PERF_API_TOKEN"}


def _environment(monkeypatch, tmp_path, receiver, smtp_port: int, certificate) -> Path:
    """The channels' variables, PERF_PIPELINE_HOME and DAGSTER_HOME; returns DAGSTER_HOME."""
    monkeypatch.setenv("PERF_PIPELINE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PERF_PIPELINE_DATABASE", raising=False)
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    monkeypatch.setenv("PERF_SLACK_WEBHOOK_URL",
                       f"http://127.0.0.1:{receiver.port}/services/{WEBHOOK_SECRET}")
    monkeypatch.setenv("SLACK_BOT_TOKEN", SECRETS["SLACK_BOT_TOKEN"])
    monkeypatch.setenv("PERF_SLACK_CHANNEL", "#perf-alerts")
    # The bot's HTTPS goes through a "proxy" on loopback that cannot tunnel: the token never
    # leaves the machine, and the bot channel's failure path runs.
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{receiver.port}")
    monkeypatch.setenv("PERF_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("PERF_SMTP_PORT", str(smtp_port))
    monkeypatch.setenv("PERF_SMTP_SECURITY", "starttls")
    monkeypatch.setenv("PERF_SMTP_USER", SMTP_USER)
    monkeypatch.setenv("PERF_SMTP_PASSWORD", SECRETS["PERF_SMTP_PASSWORD"])
    monkeypatch.setenv("PERF_ALERT_EMAIL_TO", "fleet-owners@example.test")
    monkeypatch.setenv("PERF_DAGSTER_URL", "http://127.0.0.1:3000")
    monkeypatch.setenv("PERF_API_TOKEN", SECRETS["PERF_API_TOKEN"])
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # trust the loopback SMTP server
    return dagster_home


def test_no_secret_is_kept_anywhere_after_alerts_deliveries_and_a_failed_run(
        tmp_path, monkeypatch, receiver, smtp_login_server, certificate, capfd, caplog, fault_tally):
    from perf_pipeline.definitions import build_defs
    from perf_pipeline.storage.warehouse import open_warehouse

    caplog.set_level(logging.DEBUG)
    mailbox, smtp_port = smtp_login_server
    dagster_home = _environment(monkeypatch, tmp_path, receiver, smtp_port, certificate)
    paths = paths_from_env().ensure()
    settings = instance_settings(paths)
    settings["storage"]["sqlite"]["base_dir"] = str(dagster_home / "storage")
    settings["local_artifact_storage"]["config"]["base_dir"] = str(dagster_home)
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(settings))
    configure_performance_monitoring(paths.home / "perf_pipeline.yaml",
                                     notification_channels=["slack", "email"])

    # the real pipeline, on a fleet whose simulation injects regressions
    simulate_fleet(tmp_path / "sim", days=6, nodes=5, tests=5, seed=1, end=END, runs_per_day=3)
    ingest_files(sorted((tmp_path / "sim").rglob("*.jsonl")), paths.landing, today=END.date())
    run_pipeline(paths, progress=lambda _: None)
    with open_warehouse(paths.database, read_only=True) as wh:
        alerts = wh.table("regression_alerts")
    assert len(alerts) > 0, "the injected regressions raise alerts"

    defs = build_defs(paths)
    evaluations = []
    with dg.DagsterInstance.get() as instance:
        def tick() -> None:
            context = dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs)
            evaluations.append(regression_alert_sensor.evaluate_tick(context))

        # every channel fails: the webhook answers 500, the bot cannot tunnel, the login is refused
        for _ in range(len(alerts)):
            receiver.reply(500, b"internal_error")
        tick()
        with open_warehouse(paths.database, read_only=True) as wh:
            failed = wh.table("alert_deliveries")
        assert set(failed.channel) == {"slack_webhook", "slack_bot", "email"}
        assert failed.last_error.notna().all() and not (failed.state == "sent").any()
        assert failed[failed.channel == "email"].last_error.str.contains("535").all()
        assert receiver.requests and not mailbox.envelopes

        # an hour later the webhook and the mail server work
        mailbox.accept = True
        later = datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(hours=1)
        monkeypatch.setattr("perf_pipeline.defs.alerts.utc_now", lambda: later)
        tick()
        with open_warehouse(paths.database, read_only=True) as wh:
            delivered = wh.table("alert_deliveries")
        assert (delivered[delivered.channel == "slack_webhook"].state == "sent").all()
        assert len(mailbox.envelopes) == 0  # a refused login is permanent: no retry

        # a run that fails, posted by the run-failure sensor to every channel (the webhook fails)
        receiver.reply(500, b"internal_error")
        bad = {"ops": {"performance_models": {"config": {"metrics": ["cpu_usgae"]}}}}
        result = defs.resolve_job_def("model_training_job").execute_in_process(
            instance=instance, run_config=bad, raise_on_error=False)
        assert not result.success
        context = dg.build_run_status_sensor_context(
            sensor_name="run_failure_alert_sensor", dagster_instance=instance,
            dagster_run=result.dagster_run, dagster_event=result.get_run_failure_event(),
            resources=defs.resources).for_run_failure()
        posted_before = len(receiver.requests)
        run_failure_alert_sensor(context)
        assert len(receiver.requests) == posted_before + 1 and len(mailbox.envelopes) == 1

        search = Search()
        search.instance(instance)
        runs = instance.get_runs()
    assert len(runs) >= 3 and any(r.status == dg.DagsterRunStatus.FAILURE for r in runs)
    for number, evaluation in enumerate(evaluations):
        search.text(f"sensor evaluation {number}", dg.serialize_value(evaluation))
    output = capfd.readouterr()
    search.text("captured stdout", output.out)
    search.text("captured stderr", output.err)
    # the test's own SMTP server (aiosmtpd, "mail.log") sees the password: it is the receiver
    search.text("log records", "\n".join(
        f"{r.name}: {r.getMessage()}" for r in caplog.records if not r.name.startswith("mail.")))
    search.duckdb_rows(paths.database)
    search.files(paths.home)
    search.files(dagster_home)
    for number, request in enumerate(receiver.requests):
        search.data(f"HTTP request {number} received", request["body"])
    for number, envelope in enumerate(mailbox.envelopes):
        search.data(f"email {number} received", envelope.content)
    fault_tally.add("places searched for secrets", search.places)
    assert not search.found, "\n".join(f"{name} in {place}" for place, name in search.found)
    assert search.places > 100

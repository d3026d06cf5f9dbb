"""The pipeline with a real PostgreSQL server as its Dagster instance storage (dagster-postgres).

The test starts its own server from Debian's postgresql binaries: a fresh cluster in a
temporary folder, listening only on 127.0.0.1 on a free port, stopped in teardown. Without
the binaries it skips, except in CI (`CI=true`), where `.ci/run` installs them and their
absence is a failure.
"""

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest
import yaml

from perf_pipeline.defs.runner import run_pipeline
from perf_pipeline.ingest.landing import ingest_files
from perf_pipeline.ingest.simulator import simulate_fleet
from perf_pipeline_tests.conftest import free_port

PASSWORD_ENV = "PERF_TEST_PG_PASSWORD"
USER = "perf_test"
DATABASE = "dagster"
END = datetime(2026, 11, 1, tzinfo=timezone.utc)
DAYS = 10
ANALYSIS_ASSETS = ("trend_stats", "change_points", "anomalies", "metric_correlations",
                   "performance_models", "regression_alerts", "performance_dashboard")


def _postgres_bin() -> Path | None:
    """The newest Debian postgresql's bin folder (/usr/lib/postgresql/<major>/bin)."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        return None
    return Path(max(found, key=lambda p: int(Path(p).parent.parent.name)
                    if Path(p).parent.parent.name.isdigit() else 0)).parent


def _server_account() -> pwd.struct_passwd | None:
    """Postgres refuses to run as root: as root the server runs as the `postgres` account
    Debian's package creates, else as `nobody`; otherwise as ourselves (None)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.skip("running as root and neither a postgres nor a nobody account exists")


@dataclass(frozen=True)
class PostgresServer:
    port: int
    password: str

    def connect(self):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=USER,
                                password=self.password, dbname=DATABASE)


@pytest.fixture
def postgres_server():
    bin_dir = _postgres_bin()
    if bin_dir is None:
        reason = "no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb); apt-get install postgresql"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI installs them in .ci/run)")
        pytest.skip(reason)
    account = _server_account()
    as_account = ({"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
                  if account else {})
    # Not under tmp_path: pytest's base folder is private to its owner, and as root the
    # server's account must be able to reach the cluster folder.
    folder = Path(tempfile.mkdtemp(prefix="perf-pg-"))
    data, sockets = folder / "data", folder / "sockets"
    sockets.mkdir()
    password = secrets.token_urlsafe(16)
    password_file = folder / "password"
    password_file.write_text(password + "\n")
    if account:
        for path in (folder, sockets, password_file):
            os.chown(path, account.pw_uid, account.pw_gid)

    def run(*command: str) -> None:
        result = subprocess.run([str(bin_dir / command[0]), *command[1:]], capture_output=True,
                                text=True, timeout=120, **as_account)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}"

    port = free_port()
    # The local socket trusts the test user (to create the database); TCP, the way Dagster
    # connects, asks for the password, so the test proves dagster.yaml's `env:` reaches it.
    run("initdb", "-D", str(data), "-U", USER, f"--pwfile={password_file}",
        "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-sync")
    started = False
    try:
        run("pg_ctl", "start", "-D", str(data), "-w", "-t", "60", "-l", str(folder / "server.log"),
            "-o", f"-h 127.0.0.1 -p {port} -k {sockets} -c fsync=off")
        started = True
        run("createdb", "-h", str(sockets), "-p", str(port), "-U", USER, DATABASE)
        yield PostgresServer(port=port, password=password)
    finally:
        if started:
            subprocess.run([str(bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"],
                           capture_output=True, timeout=120, **as_account)
        shutil.rmtree(folder, ignore_errors=True)


def postgres_instance_home(folder: Path, server: PostgresServer) -> Path:
    """A DAGSTER_HOME whose dagster.yaml keeps runs, event logs and schedules in Postgres."""
    folder.mkdir(parents=True)
    # `scheme` names the driver: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3,
    # while dagster-postgres installs psycopg2.
    settings = {
        "telemetry": {"enabled": False},
        "storage": {"postgres": {"postgres_db": {
            "username": USER, "password": {"env": PASSWORD_ENV}, "hostname": "127.0.0.1",
            "db_name": DATABASE, "port": server.port, "scheme": "postgresql+psycopg2"}}},
        "local_artifact_storage": {"module": "dagster._core.storage.root",
                                   "class": "LocalArtifactStorage",
                                   "config": {"base_dir": str(folder / "artifacts")}},
        "concurrency": {"pools": {"default_limit": 1}},
    }
    (folder / "dagster.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return folder


@pytest.mark.slow
def test_the_pipeline_records_its_runs_and_materializations_in_postgres(
        postgres_server, paths, tmp_path, monkeypatch):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    dagster_home = postgres_instance_home(tmp_path / "dagster_home", postgres_server)
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    monkeypatch.setenv(PASSWORD_ENV, postgres_server.password)
    simulate_fleet(tmp_path / "sim", days=DAYS, nodes=5, tests=5, seed=2, end=END, runs_per_day=4)
    ingest_files(sorted((tmp_path / "sim").rglob("*.jsonl")), paths.landing, today=END.date())

    report = run_pipeline(paths, progress=lambda _: None)

    days = {day.isoformat() for day in report.days_loaded}
    assert len(days) == DAYS and min(days) == "2026-10-22" and max(days) == "2026-10-31"
    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        runs = instance.get_runs()
        assert sorted(run.run_id for run in runs) == sorted(report.run_ids)
        assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
        for partitioned in ("raw_metrics", "normalized_timeseries"):
            assert instance.get_materialized_partitions(dg.AssetKey(partitioned)) == days
        for asset in ANALYSIS_ASSETS:
            event = instance.get_latest_materialization_event(dg.AssetKey(asset))
            assert event is not None and event.run_id == report.run_ids[-1], asset
        assert instance.get_latest_materialization_event(
            dg.AssetKey("raw_metrics")).asset_materialization.metadata["rows_loaded"].value > 0

    # The same facts, read from the server's own tables rather than through Dagster.
    with postgres_server.connect() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT status, count(*) FROM runs GROUP BY status")
        assert dict(cursor.fetchall()) == {"SUCCESS": len(report.run_ids)}
        cursor.execute("SELECT count(DISTINCT partition) FROM event_logs "
                       "WHERE dagster_event_type = 'ASSET_MATERIALIZATION' AND asset_key = %s",
                       ['["raw_metrics"]'])
        assert cursor.fetchone()[0] == DAYS
    connection.close()

    # Nothing went to SQLite: neither the project's default instance nor files in DAGSTER_HOME.
    assert not (paths.dagster_home / "dagster.yaml").exists()
    assert not list(paths.dagster_home.rglob("*.db"))
    assert not list(dagster_home.rglob("*.db"))

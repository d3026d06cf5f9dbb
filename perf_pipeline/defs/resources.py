"""The resources assets share: the one DuckDB writer, the landing archive, the model store,
the monitoring settings."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource
from pydantic import Field

from perf_pipeline.config import MONITORING_FILE, ConfigError, MonitoringSettings, Paths, load_monitoring, paths_from_env
from perf_pipeline.storage.warehouse import Warehouse, writer_lock

# Debug lines around each write session, which the event log keeps with their times.
WRITER_LOCK_HELD = "holding the writer lock of"
WRITER_LOCK_RELEASED = "released the writer lock of"


class WarehouseResource(DuckDBResource):
    """DuckDB through dagster-duckdb, opened as a migrated perf_pipeline warehouse.

    DuckDB allows a single writing process. Assets that write use the `duckdb` pool, which
    dagster.yaml limits to one step at a time, so waiting steps do not hold a worker. The pool
    is not enough on its own: Dagster's slot claim is not atomic (SQLite or Postgres), and two
    runs that start together can both get the slot. So every writer also holds the
    database's writer lock, and a step that finds it taken waits for it and says so."""

    landing_dir: str = Field(description="Root of the landing archive (landing/<YYYY-MM-DD>/).")
    lock_timeout_seconds: float = Field(
        default=6 * 3600.0,
        description="How long a step waits for another process to finish writing the "
                    "database before it fails (negative: without limit).")

    @property
    def landing(self) -> Path:
        return Path(self.landing_dir)

    @contextmanager
    def open(self) -> Iterator[Warehouse]:
        log = dg.get_dagster_logger()

        def waiting() -> None:
            log.info(f"another process is writing {self.database}; waiting for it to finish")

        with writer_lock(self.database, timeout=self.lock_timeout_seconds, on_wait=waiting) as waited:
            if waited >= 1:
                log.info(f"waited {waited:.1f} s for the database's writer lock")
            log.debug(f"{WRITER_LOCK_HELD} {self.database}")
            try:
                with self.get_connection() as con:
                    # dagster-duckdb closes the connection only when the body succeeds; close
                    # it here too, or a failed asset leaves the file open for the process.
                    try:
                        yield Warehouse.for_writing(con)
                    finally:
                        con.close()
            finally:
                log.debug(f"{WRITER_LOCK_RELEASED} {self.database}")


def warehouse_resource(paths: Paths | None = None) -> WarehouseResource:
    paths = paths or paths_from_env()
    return WarehouseResource(database=str(paths.database), landing_dir=str(paths.landing))


class ModelStoreResource(dg.ConfigurableResource):
    """The folder trained models are saved in (`models/` under PERF_PIPELINE_HOME)."""

    directory: str = Field(description="Folder of saved models, one sub-folder per metric.")

    def folder(self, metric_name: str) -> Path:
        folder = Path(self.directory) / metric_name
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def model_store_resource(paths: Paths | None = None) -> ModelStoreResource:
    return ModelStoreResource(directory=str((paths or paths_from_env()).models))


class MonitoringResource(dg.ConfigurableResource):
    """perf_pipeline.yaml, read afresh on every use so that an edit applies on the next run."""

    path: str = Field(description="The monitoring settings file (perf_pipeline.yaml).")

    def settings(self) -> MonitoringSettings:
        try:
            return load_monitoring(self.path)
        except ConfigError as error:
            raise dg.Failure(str(error)) from None


def monitoring_resource(home: Path) -> MonitoringResource:
    return MonitoringResource(path=str(home / MONITORING_FILE))

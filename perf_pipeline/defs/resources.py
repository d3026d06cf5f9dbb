"""The resources assets share: the one DuckDB writer, the landing archive, the model store,
the monitoring settings."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource
from pydantic import Field

from perf_pipeline.config import MONITORING_FILE, ConfigError, MonitoringSettings, Paths, load_monitoring, paths_from_env
from perf_pipeline.storage.warehouse import Warehouse


class WarehouseResource(DuckDBResource):
    """DuckDB through dagster-duckdb (which retries while another process holds the lock),
    opened as a migrated perf_pipeline warehouse. Assets that write use the `duckdb` pool,
    which dagster.yaml limits to one at a time: DuckDB allows a single writing process."""

    landing_dir: str = Field(description="Root of the landing archive (landing/<YYYY-MM-DD>/).")

    @property
    def landing(self) -> Path:
        return Path(self.landing_dir)

    @contextmanager
    def open(self) -> Iterator[Warehouse]:
        Path(self.database).parent.mkdir(parents=True, exist_ok=True)
        with self.get_connection() as con:
            # dagster-duckdb closes the connection only when the body succeeds; close it
            # here too, or a failed asset leaves the file open for the rest of the process.
            try:
                yield Warehouse.for_writing(con)
            finally:
                con.close()


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

"""The one Definitions object of perf_pipeline: assets, checks, jobs and resources."""

import dagster as dg

from perf_pipeline.config import Paths
from perf_pipeline.defs import actions, analysis, ingest, models, normalize
from perf_pipeline.defs.actions import ActionsResource
from perf_pipeline.defs.automation import analysis_job, daily_ingest_job
from perf_pipeline.defs.resources import model_store_resource, warehouse_resource


def build_defs(paths: Paths | None = None) -> dg.Definitions:
    """Definitions over the state folder `paths` (default: from PERF_PIPELINE_HOME)."""
    return dg.Definitions(
        assets=dg.load_assets_from_modules([ingest, normalize, analysis, models, actions]),
        asset_checks=dg.load_asset_checks_from_modules([ingest, normalize, analysis, models, actions]),
        jobs=[daily_ingest_job, analysis_job],
        resources={"warehouse": warehouse_resource(paths), "model_store": model_store_resource(paths),
                   "actions": ActionsResource()},
    )


defs = build_defs()

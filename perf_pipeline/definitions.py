"""The one Definitions object of perf_pipeline: assets, checks, jobs and resources."""

import dagster as dg

from perf_pipeline.config import Paths
from perf_pipeline.defs import analysis, ingest, normalize
from perf_pipeline.defs.automation import analysis_job, daily_ingest_job
from perf_pipeline.defs.resources import warehouse_resource


def build_defs(paths: Paths | None = None) -> dg.Definitions:
    """Definitions over the state folder `paths` (default: from PERF_PIPELINE_HOME)."""
    return dg.Definitions(
        assets=dg.load_assets_from_modules([ingest, normalize, analysis]),
        asset_checks=dg.load_asset_checks_from_modules([ingest, normalize, analysis]),
        jobs=[daily_ingest_job, analysis_job],
        resources={"warehouse": warehouse_resource(paths)},
    )


defs = build_defs()

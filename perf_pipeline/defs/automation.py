"""Jobs over the asset graph (schedules and sensors join them in later stages)."""

import dagster as dg

daily_ingest_job = dg.define_asset_job(
    "daily_ingest_job",
    selection=dg.AssetSelection.assets("raw_metrics", "normalized_timeseries"),
    description="Load and normalize landing days (one run may cover a range of days).",
)

analysis_job = dg.define_asset_job(
    "analysis_job",
    selection=dg.AssetSelection.assets("raw_metrics", "normalized_timeseries").downstream()
    - dg.AssetSelection.assets("raw_metrics", "normalized_timeseries"),
    description="Refresh every analysis asset over the rolling window.",
)

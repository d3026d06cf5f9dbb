"""HTTP side of perf_pipeline: the metrics gateway (and, later, the dashboard and JSON API)
as one Starlette app served by uvicorn. No Dagster imports here."""

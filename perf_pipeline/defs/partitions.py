"""Daily partitions by the metric's own UTC day; today is included (end_offset=1)."""

import dagster as dg

from perf_pipeline.config import partitions_start_date

daily_partitions = dg.DailyPartitionsDefinition(start_date=partitions_start_date(), end_offset=1)

"""The Python client: what the pipeline found, asked from code.

`PerformanceTrends(database=PATH)` reads a perf_pipeline DuckDB file read-only, so it can
run next to a pipeline that is writing (DuckDB serves readers from the last checkpoint).

    >>> trends = PerformanceTrends(database="var/perf.duckdb")
    >>> trends.get_node_performance_comparison("test_execution_time")
    [('node-07', 91.2), ('node-03', 88.0), ...]            # best first
    >>> trends.get_node_performance_comparison("test_execution_time",
    ...                                        test_filter={"test_type": "e2e"})
    >>> trends.select_nodes(test_type="e2e", k=3)
    ['node-07', 'node-11', 'node-03']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path

import pandas as pd

from perf_pipeline.analysis import nodes
from perf_pipeline.catalog import BY_NAME
from perf_pipeline.config import TrendSettings
from perf_pipeline.storage.warehouse import Warehouse, filter_clauses, open_warehouse

_SCORE_NAMES = (nodes.OVERALL, nodes.STABILITY)


class PerformanceTrends:
    def __init__(self, database: str | Path, *, window_days: int = TrendSettings.window_days):
        self.database = Path(database)
        if not self.database.exists():
            raise FileNotFoundError(f"no perf_pipeline database at {self.database}; "
                                    "run the pipeline first (perf-pipeline run)")
        self.window_days = window_days

    def _read(self):
        return open_warehouse(self.database, read_only=True)

    def get_node_performance_comparison(self, metric_name: str,
                                        test_filter: Mapping[str, str | Sequence[str]] | None = None
                                        ) -> list[tuple[str, float]]:
        """`[(node_id, score), ...]`, best first; score 0–100, 50 = the fleet's median node.

        `metric_name` is a metric of the catalog, "overall" or "stability". Without a filter
        the scores of the last node_performance_scores run are returned; with `test_filter`
        ({"test_type": "e2e"}, {"test_name": "tests/api/*"}, {"node_type": [...]}) they are
        computed on the matching points of the window, on the same tests for every node.
        """
        if metric_name not in BY_NAME and metric_name not in _SCORE_NAMES:
            raise ValueError(f"unknown metric {metric_name!r}; use a catalog metric, "
                             f"{' or '.join(repr(n) for n in _SCORE_NAMES)}")
        if test_filter:
            filter_clauses(test_filter)  # validates keys and values before touching the data
            if metric_name in _SCORE_NAMES:
                raise ValueError("test_filter applies to one metric, not to the overall or "
                                 "stability score")
            with self._read() as wh:
                scores = self._filtered_scores(wh, metric_name, test_filter)
        else:
            with self._read() as wh:
                scores = wh.node_ranking(metric_name)
        return [(str(row.node_id), round(float(row.score), 2))
                for row in scores.sort_values(["score", "node_id"], ascending=[False, True])
                .itertuples()]

    def _filtered_scores(self, wh: Warehouse, metric_name: str,
                         test_filter: Mapping[str, str | Sequence[str]]) -> pd.DataFrame:
        end = wh.latest_timestamp()
        if end is None:
            return pd.DataFrame(columns=["node_id", "score"])
        points = wh.window_points(end - timedelta(days=self.window_days), end,
                                  metric_name=metric_name, filters=test_filter)
        scores = nodes.node_scores(points)
        return scores[scores["metric_name"] == metric_name]

    def select_nodes(self, test_type: str | None = None, k: int = 5, *,
                     max_risk: float = 50.0) -> list[str]:
        """The k nodes to run tests of `test_type` on: healthy ones first, then by speed on
        that kind of test and stability (`select_nodes_detail` gives the reasons)."""
        return self.select_nodes_detail(test_type=test_type, k=k, max_risk=max_risk)["node_id"].tolist()

    def select_nodes_detail(self, test_type: str | None = None, k: int = 5, *,
                            max_risk: float = 50.0) -> pd.DataFrame:
        with self._read() as wh:
            scores = wh.table("node_performance_scores")
            risk = wh.table("node_health_risk")
        if scores.empty:
            raise LookupError("no node scores yet: materialize node_performance_scores first")
        speed = scores[scores["metric_name"] == nodes.SPEED_METRIC]
        speed = speed[speed["test_type"].notna()] if test_type is not None else speed[speed["test_type"].isna()]
        return nodes.select_nodes(speed, scores[scores["metric_name"] == nodes.STABILITY], risk,
                                  test_type=test_type, k=k, max_risk=max_risk)

"""Small markdown tables for asset metadata and CLI summaries."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


INCIDENT_HEADERS = ["attribution", "kind", "first run", "commit", "node", "metrics", "tests", "worst %"]


def incident_table(incidents) -> str:
    """The change_incidents rows people read first, as markdown."""
    def text(value: object) -> str:
        return value if isinstance(value, str) else ""

    return markdown_table(INCIDENT_HEADERS, [
        (r.attribution, r.kind, text(r.first_test_run_id), text(r.first_commit)[:10],
         text(r.node_id), ", ".join(r.metrics), len(r.tests), r.worst_magnitude_percent)
        for r in incidents.itertuples(index=False)])

"""The performance dashboard: one self-contained HTML file that works offline.

plotly.js is inlined once and the data travels as JSON inside the page, so the file opens
from disk, from a mail attachment or behind a proxy with no network at all. Test and node
names are user data: they reach the page only inside that JSON (with `<`, `>` and `&`
escaped, so nothing can close the script element), and the page's own JavaScript puts them
into the document as text, never as HTML.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from perf_pipeline.storage.reports import DURATION_METRIC, DashboardData

TITLE = "perf_pipeline — performance dashboard"
CHARTS = ("trend", "forecast", "node-ranking", "durations")
TABLES = ("alerts", "recommendations")
_SIGNIFICANT_DIGITS = 4


def _number(value) -> float | None:
    if value is None or value is pd.NaT:
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else float(f"{value:.{_SIGNIFICANT_DIGITS}g}")


def _text(value) -> str | None:
    if value is None or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (datetime, pd.Timestamp)):
        return pd.Timestamp(value).strftime("%Y-%m-%d %H:%M")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _day(value) -> str:
    return pd.Timestamp(value).strftime("%Y-%m-%d")


class _Index:
    """Names to small integers, so each name is written once however many points it has."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._position: dict[str, int] = {}

    def __call__(self, name) -> int:
        name = _text(name)
        if name is None:
            return -1
        if name not in self._position:
            self._position[name] = len(self.names)
            self.names.append(name)
        return self._position[name]


def _records(frame: pd.DataFrame, columns: dict[str, str]) -> list[dict]:
    """Rows as JSON-ready dicts: numbers rounded, times as text, lists joined."""
    rows = []
    for row in frame.to_dict("records"):
        record = {}
        for column, kind in columns.items():
            value = row.get(column)
            if kind == "number":
                record[column] = _number(value)
            elif kind == "list":
                record[column] = [str(v) for v in value] if value is not None and not isinstance(value, float) else []
            else:
                record[column] = _text(value)
        rows.append(record)
    return rows


def _codes(index: _Index, values: pd.Series) -> list[int]:
    """`index(value)` of every value, asked once per distinct value in order of first
    appearance (which is the order `index` numbers them in); -1 for a missing value."""
    codes, distinct = pd.factorize(values, use_na_sentinel=True)
    return np.array([index(value) for value in distinct] + [-1], dtype=int)[codes].tolist()


def _numbers(values: pd.Series) -> list[float | None]:
    """`_number` of every value, without its per-value checks."""
    finite = np.isfinite(values.to_numpy(dtype=float, na_value=np.nan))
    return [float(f"{value:.{_SIGNIFICANT_DIGITS}g}") if ok else None
            for value, ok in zip(values.to_numpy(dtype=float, na_value=np.nan).tolist(), finite.tolist())]


def _indexed(record: dict, metrics: _Index, tests: _Index, nodes: _Index) -> dict:
    """A record whose metric, test and node names are replaced by their indexes."""
    return {**{k: v for k, v in record.items() if k not in ("metric_name", "test_name", "node_id")},
            "metric": metrics(record["metric_name"]), "test": tests(record["test_name"]),
            "node": nodes(record["node_id"])}


def build_payload(data: DashboardData, *, generated_at: datetime) -> dict:
    """Everything the page draws, as compact JSON-ready values (columns of small integers
    indexing `metrics`, `tests`, `nodes` and `days`)."""
    metrics, tests, nodes, types = _Index(), _Index(), _Index(), _Index()
    series = data.series.sort_values(["metric_name", "test_name", "node_id", "day"], na_position="first")
    test_type_of: dict[int, int] = {}
    for test, test_type in series.dropna(subset=["test_name"]).groupby("test_name")["test_type"].first().items():
        test_type_of[tests(test)] = types(test_type)
    day_codes, day_values = pd.factorize(series["day"])
    day_texts = [_day(d) for d in day_values]
    days = sorted(set(day_texts))
    columns = {
        "metric": _codes(metrics, series["metric_name"]),
        "test": _codes(tests, series["test_name"]),
        "node": _codes(nodes, series["node_id"]),
        "day": np.array([days.index(d) for d in day_texts], dtype=int)[day_codes].tolist(),
        "value": _numbers(series["value"]),
        "n": series["n"].astype("int64").tolist(),
    }
    catalog = data.catalog.set_index("metric_name")
    metric_info = [{"name": name, "unit": _text(catalog["unit"].get(name)) or "",
                    "scope": _text(catalog["scope"].get(name)) or "",
                    "direction": _text(catalog["direction"].get(name)) or ""}
                   for name in metrics.names]

    anomalies = data.anomalies[data.anomalies["metric_name"].isin(metrics.names)]
    forecasts = data.forecasts[data.forecasts["metric_name"].isin(metrics.names)]
    series_of = {"node": nodes, "test": tests}
    payload = {
        "title": TITLE,
        "generated_at": _text(generated_at),
        "window": {"start": _text(data.window_start), "end": _text(data.window_end)},
        "duration_metric": DURATION_METRIC,
        "metrics": metric_info,
        "tests": tests.names,
        "test_types": types.names,
        "test_type_of": [test_type_of.get(i, -1) for i in range(len(tests.names))],
        "nodes": nodes.names,
        "days": days,
        "series": columns,
        "trends": [_indexed(record, metrics, tests, nodes) for record in _records(data.trends[data.trends["metric_name"].isin(metrics.names)], {
                       "scope": "text", "metric_name": "text", "test_name": "text", "node_id": "text",
                       "level_basis": "text", "window_start": "text", "window_end": "text",
                       "window_mean": "number", "theil_sen_slope_per_day": "number",
                       "change_over_window_percent": "number", "p_value_adjusted": "number",
                       "trend_direction": "text"})],
        "anomalies": {
            "metric": [metrics(m) for m in anomalies["metric_name"]],
            "scope": [str(s) for s in anomalies["scope"]],
            "test": [tests(t) for t in anomalies["test_name"]],
            "node": [nodes(n) for n in anomalies["node_id"]],
            "time": [_text(t) for t in anomalies["timestamp"]],
            "day": [_day(t) for t in anomalies["timestamp"]],
            "value": [_number(v) for v in anomalies["value"]],
            "kind": [str(k) for k in anomalies["kind"]],
            "reason": [str(r) for r in anomalies["reason"]],
        },
        "forecasts": {
            "metric": [metrics(m) for m in forecasts["metric_name"]],
            "scope": [str(s) for s in forecasts["scope"]],
            "series": [series_of[s](name) if s in series_of else -1
                       for s, name in zip(forecasts["scope"], forecasts["series"])],
            "day": [_day(d) for d in forecasts["day"]],
            "forecast": [_number(v) for v in forecasts["forecast"]],
            "lower": [_number(v) for v in forecasts["lower"]],
            "upper": [_number(v) for v in forecasts["upper"]],
        },
        "ranking": _records(data.node_ranking, {"node_id": "text", "score": "number", "rank": "number",
                                                "evidence": "text"}),
        "durations": _records(data.durations, {"test_type": "text", "n": "number", "low": "number",
                                               "q1": "number", "median": "number", "q3": "number",
                                               "high": "number", "mean": "number"}),
        "alerts": _records(data.alerts, {"status": "text", "severity": "text", "title": "text",
                                         "metric_name": "text", "node_id": "text", "tests": "list",
                                         "magnitude_percent": "number", "started_at": "text",
                                         "suspected_cause": "text", "updated_at": "text"}),
        "recommendations": _records(data.recommendations, {
            "severity": "text", "kind": "text", "subject": "text", "action": "text",
            "evidence": "text", "expected_gain": "text"}),
    }
    # Names met first in anomalies or forecasts were added after the series were indexed.
    payload["tests"], payload["nodes"], payload["metrics"] = tests.names, nodes.names, metric_info
    payload["test_type_of"] = [test_type_of.get(i, -1) for i in range(len(tests.names))]
    return payload


def payload_counts(payload: dict) -> dict[str, int]:
    """How much the page shows, for the asset's metadata."""
    return {"metrics": len(payload["metrics"]), "tests": len(payload["tests"]),
            "nodes": len(payload["nodes"]), "days": len(payload["days"]),
            "series_points": len(payload["series"]["value"]),
            "significant_trends": len(payload["trends"]),
            "anomalies": len(payload["anomalies"]["time"]),
            "forecast_points": len(payload["forecasts"]["day"]),
            "ranked_nodes": len(payload["ranking"]),
            "test_types": len(payload["durations"]),
            "open_alerts": len(payload["alerts"]),
            "recommendations": len(payload["recommendations"])}


def script_json(value) -> str:
    """JSON safe inside a <script> element: `<`, `>` and `&` only ever occur inside JSON
    strings, where their \\u escapes mean the same, so no `</script>` or `<!--` survives."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    source = get_plotlyjs()
    if "</script" in source.lower():  # would end the inline script element early
        raise RuntimeError("this plotly.js bundle cannot be inlined: it contains '</script'")
    return source


def _section(key: str, title: str, note: str, empty: bool, *, kind: str = "chart") -> str:
    attribute = "data-chart" if kind == "chart" else "data-table"
    return f"""
<section id="section-{key}">
  <h2>{html.escape(title)}</h2>
  <p class="note">{html.escape(note)}</p>
  <p class="empty" id="empty-{key}"{"" if empty else " hidden"}>No data yet.</p>
  <div class="{kind}" id="{kind}-{key}" {attribute}="{key}"{" hidden" if empty else ""}></div>
</section>"""


def render_dashboard(payload: dict) -> str:
    """The whole page: plotly.js, the data, and the script that draws it."""
    has_series = bool(payload["series"]["value"])
    sections = "".join([
        _section("trend", "Trends", "Daily medians over the window for the selected metric, test "
                 "type, test and node; across several tests, each test's values are taken as a "
                 "percentage of its own median first. The dashed line is the significant trend "
                 "from trend_stats; red markers are anomalies.", not has_series),
        _section("forecast", "Forecast", "Daily medians of the hourly forecasts "
                 "(performance_forecasts) with their 80% interval, after the last week of history.",
                 not payload["forecasts"]["day"]),
        _section("node-ranking", "Node ranking", "Overall score of each node "
                 "(node_performance_scores, 100 is best), best first.", not payload["ranking"]),
        _section("durations", "Test duration by test type", f"{payload['duration_metric']} over "
                 "the window: box from the 25th to the 75th percentile, line at the median, "
                 "whiskers at the 5th and 95th.", not payload["durations"]),
        _section("alerts", "Open regression alerts", "Alerts still new or acknowledged "
                 "(regression_alerts), most severe first.", not payload["alerts"], kind="table"),
        _section("recommendations", "Recommendations", "What to do, most severe first "
                 "(optimization_recommendations).", not payload["recommendations"], kind="table"),
    ])
    window = payload["window"]
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; img-src data: blob:; font-src data:">
<title>{html.escape(payload["title"])}</title>
<style>{_STYLE}</style>
</head>
<body>
<header>
  <h1>{html.escape(payload["title"])}</h1>
  <p>Window {html.escape(window["start"] or "?")} – {html.escape(window["end"] or "?")} UTC ·
     generated {html.escape(payload["generated_at"] or "?")} UTC</p>
</header>
<form id="filters" onsubmit="return false">
  <label>Metric <select id="filter-metric"></select></label>
  <label>Test type <select id="filter-test-type"></select></label>
  <label>Test <select id="filter-test"></select></label>
  <label>Node <select id="filter-node"></select></label>
</form>
<main>{sections}
</main>
<script type="application/json" id="dashboard-data">{script_json(payload)}</script>
<script>{_plotly_js()}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def write_dashboard(path: str | Path, page: str) -> int:
    """Write the page atomically (a reader never sees half a file); returns its size in bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = page.encode("utf-8")
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp creates the file 0600; the dashboard is a report for whoever may read the
        # directory, so it gets the mode an ordinary open() would give it (0666 & ~umask)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return len(data)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 1rem; color: #222; }
header h1 { font-size: 1.4rem; margin-bottom: 0.2rem; }
header p, .note { color: #555; font-size: 0.9rem; margin-top: 0.2rem; }
#filters { position: sticky; top: 0; background: #fff; padding: 0.5rem 0; border-bottom: 1px solid #ddd;
           display: flex; flex-wrap: wrap; gap: 1rem; z-index: 10; }
#filters select { max-width: 22rem; }
section { margin: 1.5rem 0; }
h2 { font-size: 1.15rem; margin-bottom: 0.2rem; }
.chart { width: 100%; height: 420px; }
.empty { padding: 1rem; background: #f6f6f6; border: 1px dashed #bbb; color: #444; }
table { border-collapse: collapse; width: 100%; font-size: 0.85rem; }
th, td { border-bottom: 1px solid #e2e2e2; padding: 0.3rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.critical, td.high { color: #b00020; font-weight: 600; }
"""

_SCRIPT = r"""
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("dashboard-data").textContent);
  const S = D.series;
  const ALL = "";
  const el = (id) => document.getElementById(id);
  // Plotly reads a little HTML in names and labels; user data must show as text.
  const esc = (s) => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  const median = (values) => {
    const v = values.filter((x) => x !== null).sort((a, b) => a - b);
    if (!v.length) return null;
    const m = Math.floor(v.length / 2);
    return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
  };
  const config = { displaylogo: false, responsive: true };

  function fill(select, options, keep) {
    const previous = keep ? select.value : null;
    select.replaceChildren();
    for (const [value, label] of options) {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = label;
      select.appendChild(option);
    }
    if (previous !== null && options.some(([v]) => v === previous)) select.value = previous;
  }

  const metricSelect = el("filter-metric"), typeSelect = el("filter-test-type");
  const testSelect = el("filter-test"), nodeSelect = el("filter-node");
  const metricsWithData = D.metrics.map((m, i) => i).filter((i) => S.metric.includes(i));
  fill(metricSelect, metricsWithData.map((i) => [String(i),
    D.metrics[i].name + (D.metrics[i].unit ? " (" + D.metrics[i].unit + ")" : "")]));
  const preferred = D.metrics.findIndex((m) => m.name === D.duration_metric);
  if (metricsWithData.includes(preferred)) metricSelect.value = String(preferred);

  function current() {
    return { metric: Number(metricSelect.value),
             type: typeSelect.value === ALL ? null : Number(typeSelect.value),
             test: testSelect.value === ALL ? null : Number(testSelect.value),
             node: nodeSelect.value === ALL ? null : Number(nodeSelect.value) };
  }

  function refreshOptions() {
    const metric = Number(metricSelect.value);
    const tests = new Set(), nodes = new Set();
    for (let i = 0; i < S.metric.length; i++) {
      if (S.metric[i] !== metric) continue;
      if (S.test[i] >= 0) tests.add(S.test[i]);
      if (S.node[i] >= 0) nodes.add(S.node[i]);
    }
    const types = new Set([...tests].map((t) => D.test_type_of[t]).filter((t) => t >= 0));
    fill(typeSelect, [[ALL, "All test types"], ...[...types].sort((a, b) => D.test_types[a].localeCompare(D.test_types[b]))
      .map((t) => [String(t), D.test_types[t]])], true);
    const type = typeSelect.value === ALL ? null : Number(typeSelect.value);
    fill(testSelect, [[ALL, "All tests"], ...[...tests].filter((t) => type === null || D.test_type_of[t] === type)
      .sort((a, b) => D.tests[a].localeCompare(D.tests[b])).map((t) => [String(t), D.tests[t]])], true);
    fill(nodeSelect, [[ALL, "All nodes"], ...[...nodes].sort((a, b) => D.nodes[a].localeCompare(D.nodes[b]))
      .map((n) => [String(n), D.nodes[n]])], true);
    typeSelect.disabled = testSelect.disabled = tests.size === 0;
  }

  function matches(sel, metric, test, node) {
    if (metric !== sel.metric) return false;
    if (sel.test !== null && test !== sel.test) return false;
    if (sel.type !== null && (test < 0 || D.test_type_of[test] !== sel.type)) return false;
    if (sel.node !== null && node !== sel.node) return false;
    return true;
  }

  function label(sel) {
    const parts = [D.metrics[sel.metric].name];
    if (sel.type !== null) parts.push(D.test_types[sel.type]);
    if (sel.test !== null) parts.push(D.tests[sel.test]);
    if (sel.node !== null) parts.push(D.nodes[sel.node]);
    return parts.join(" · ");
  }

  // Each test's median over the window, per metric: across several tests a per-test metric
  // is shown as a ratio to each test's own median (as trend_stats compares them), or the mix
  // of short and long tests run on a day would move the line more than any change does.
  const testMedian = new Map();
  {
    const values = new Map();
    for (let i = 0; i < S.metric.length; i++) {
      if (S.test[i] < 0) continue;
      const key = S.metric[i] + ":" + S.test[i];
      if (!values.has(key)) values.set(key, []);
      values.get(key).push(S.value[i]);
    }
    for (const [key, v] of values) testMedian.set(key, median(v));
  }

  function relativeView(sel) {
    if (sel.test !== null) return false;
    for (let i = 0; i < S.metric.length; i++) {
      if (S.metric[i] === sel.metric) return S.test[i] >= 0;
    }
    return false;
  }

  function dailyMedians(sel, absolute) {
    const byDay = new Map(), relative = !absolute && relativeView(sel);
    for (let i = 0; i < S.metric.length; i++) {
      if (!matches(sel, S.metric[i], S.test[i], S.node[i])) continue;
      let value = S.value[i];
      if (relative) {
        const typical = testMedian.get(S.metric[i] + ":" + S.test[i]);
        if (!typical) continue;  // a test whose median is 0 has no ratio
        value = 100 * value / typical;
      }
      const day = D.days[S.day[i]];
      if (!byDay.has(day)) byDay.set(day, []);
      byDay.get(day).push(value);
    }
    const days = [...byDay.keys()].sort();
    return { x: days, y: days.map((d) => median(byDay.get(d))), n: days.map((d) => byDay.get(d).length),
             relative };
  }

  function trendFor(sel) {
    if (sel.type !== null && sel.test === null) return null;
    if (sel.test !== null && sel.node !== null) return null;
    const scope = sel.test !== null ? "test" : sel.node !== null ? "node" : "overall";
    return D.trends.find((t) => t.metric === sel.metric && t.scope === scope &&
      (scope !== "test" || t.test === sel.test) && (scope !== "node" || t.node === sel.node)) || null;
  }

  function trendLine(trend, drawn) {
    const slope = trend.theil_sen_slope_per_day, mean = trend.window_mean;
    if (slope === null || mean === null || !Number.isFinite(slope) || !Number.isFinite(mean)) return null;
    const start = Date.parse(trend.window_start.replace(" ", "T") + "Z");
    const end = Date.parse(trend.window_end.replace(" ", "T") + "Z");
    const middle = (start + end) / 2, day = 86400000;
    const percent = trend.change_over_window_percent;
    // trend_stats leaves the percentages empty when the mean is too close to zero for a ratio
    // to it to mean anything: such a series is drawn as mean + slope·(t − middle), in its unit.
    let at = (t) => mean + slope * (t - middle) / day;
    if (percent !== null && mean !== 0 && String(trend.level_basis || "").startsWith("relative")) {
      // A relative trend (tests compared as ratios to their own median) is drawn through the
      // median of what is shown, with the same rate of change per day.
      const anchor = median(drawn.y);
      if (anchor === null) return null;
      const relative = slope / mean;
      at = (t) => anchor * (1 + relative * (t - middle) / day);
    }
    const iso = (t) => new Date(t).toISOString().slice(0, 16).replace("T", " ");
    const change = percent === null ? "" :
      (percent >= 0 ? "+" : "") + Number(percent.toFixed(1)) + "% over the window ";
    return { x: [iso(start), iso(end)], y: [at(start), at(end)], mode: "lines", type: "scatter",
             name: esc("trend " + change + "(" + trend.trend_direction + ")"),
             line: { dash: "dash", color: trend.trend_direction === "degrading" ? "#d62728" : "#2ca02c" } };
  }

  function anomalyTrace(sel, drawn) {
    const A = D.anomalies, x = [], y = [], text = [];
    const onDay = new Map(drawn.x.map((d, i) => [d, drawn.y[i]]));
    for (let i = 0; i < A.metric.length; i++) {
      if (!matches(sel, A.metric[i], A.test[i], A.node[i])) continue;
      // On its own series an anomaly sits at its value; on an aggregate, on its day's median.
      const own = (sel.test !== null && A.test[i] === sel.test) ||
                  (sel.node !== null && A.scope[i] === "node" && A.node[i] === sel.node);
      // A ratio view has no place for an absolute value off its own days.
      if (!own && drawn.relative && !onDay.has(A.day[i])) continue;
      const value = own || !onDay.has(A.day[i]) ? A.value[i] : onDay.get(A.day[i]);
      x.push(own ? A.time[i] : A.day[i]);
      y.push(value);
      const where = [A.test[i] >= 0 ? D.tests[A.test[i]] : null, A.node[i] >= 0 ? D.nodes[A.node[i]] : null]
        .filter(Boolean).join(" on ");
      text.push(esc(A.kind[i] + " " + A.time[i] + (where ? " — " + where : "") + ": " + A.reason[i]));
    }
    if (!x.length) return null;
    return { x, y, text, mode: "markers", type: "scatter", name: "anomalies (" + x.length + ")",
             hovertemplate: "%{text}<extra></extra>",
             marker: { color: "#d62728", size: 10, symbol: "circle-open", line: { width: 2 } } };
  }

  function showChart(key, traces, layout, emptyText) {
    const div = el("chart-" + key), empty = el("empty-" + key);
    const hasData = traces.some((t) => (t.x || []).length > 0);
    if (!hasData) {
      empty.textContent = emptyText;
      empty.hidden = false;
      div.hidden = true;
      if (div.data) Plotly.purge(div);
      return;
    }
    empty.hidden = true;
    div.hidden = false;
    if (layout.height) div.style.height = layout.height + "px";
    Plotly.react(div, traces, Object.assign({ margin: { t: 30, r: 20 }, legend: { orientation: "h" } }, layout), config);
  }

  function drawTrend(sel) {
    if (!S.value.length) return;
    const drawn = dailyMedians(sel);
    const unit = drawn.relative ? "% of each test's median" : D.metrics[sel.metric].unit;
    const traces = [{ x: drawn.x, y: drawn.y, text: drawn.n.map((n) => n + " series"),
                      mode: "lines+markers", type: "scatter", name: esc("daily median — " + label(sel)),
                      hovertemplate: "%{x}: %{y}<br>%{text}<extra></extra>" }];
    const trend = trendFor(sel);
    const line = trend && trendLine(trend, drawn);
    if (line) traces.push(line);
    const anomalies = anomalyTrace(sel, drawn);
    if (anomalies) traces.push(anomalies);
    showChart("trend", drawn.x.length ? traces : [], { yaxis: { title: { text: esc(unit) } } },
              "No data for this selection.");
  }

  function drawForecast(sel) {
    const F = D.forecasts;
    if (!F.day.length) return;
    const byDay = new Map();
    for (let i = 0; i < F.metric.length; i++) {
      if (F.metric[i] !== sel.metric) continue;
      const test = F.scope[i] === "test" ? F.series[i] : -1, node = F.scope[i] === "node" ? F.series[i] : -1;
      // Per-test forecasts have no node and per-node forecasts no test: a selection of both has none.
      if (!matches(sel, F.metric[i], test, node)) continue;
      if (!byDay.has(F.day[i])) byDay.set(F.day[i], { f: [], l: [], u: [] });
      const cell = byDay.get(F.day[i]);
      cell.f.push(F.forecast[i]); cell.l.push(F.lower[i]); cell.u.push(F.upper[i]);
    }
    const days = [...byDay.keys()].sort();
    const history = dailyMedians(sel, true);  // forecasts are in the metric's unit
    const tail = Math.max(0, history.x.length - 7);
    const traces = days.length ? [
      { x: history.x.slice(tail), y: history.y.slice(tail), mode: "lines+markers", type: "scatter",
        name: esc("last week — " + label(sel)), line: { color: "#1f77b4" } },
      { x: days, y: days.map((d) => median(byDay.get(d).u)), mode: "lines", type: "scatter",
        line: { width: 0 }, name: "upper (80%)", showlegend: false, hoverinfo: "skip" },
      { x: days, y: days.map((d) => median(byDay.get(d).l)), mode: "lines", type: "scatter",
        line: { width: 0 }, fill: "tonexty", fillcolor: "rgba(255,127,14,0.2)", name: "80% interval" },
      { x: days, y: days.map((d) => median(byDay.get(d).f)), mode: "lines+markers", type: "scatter",
        name: esc("forecast — " + label(sel)), line: { color: "#ff7f0e" } },
    ] : [];
    showChart("forecast", traces, { yaxis: { title: { text: esc(D.metrics[sel.metric].unit) } } },
              "No forecast for this selection.");
  }

  function drawRanking() {
    const rows = D.ranking.slice().sort((a, b) => a.rank - b.rank).reverse();
    showChart("node-ranking", rows.length ? [{
      type: "bar", orientation: "h", y: rows.map((r) => esc(r.node_id)), x: rows.map((r) => r.score),
      hovertext: rows.map((r) => esc(r.evidence || "")), name: "overall score",
      hovertemplate: "%{y}: %{x}<br>%{hovertext}<extra></extra>", marker: { color: "#1f77b4" } }] : [],
      { height: Math.max(300, 22 * rows.length + 80), xaxis: { title: { text: "score (0–100)" }, range: [0, 100] },
        margin: { l: 140, t: 30, r: 20 } }, "No data yet.");
  }

  function drawDurations() {
    const rows = D.durations;
    const unit = (D.metrics.find((m) => m.name === D.duration_metric) || {}).unit || "s";
    showChart("durations", rows.length ? [{
      type: "box", name: "test duration", x: rows.map((r) => esc(r.test_type)),
      q1: rows.map((r) => r.q1), median: rows.map((r) => r.median), q3: rows.map((r) => r.q3),
      lowerfence: rows.map((r) => r.low), upperfence: rows.map((r) => r.high),
      mean: rows.map((r) => r.mean), boxmean: true }] : [],
      { yaxis: { title: { text: unit }, type: "log" }, showlegend: false }, "No data yet.");
  }

  function table(key, headers, rows) {
    const holder = el("table-" + key);
    if (!rows.length) return;
    const t = document.createElement("table"), head = t.createTHead().insertRow();
    for (const [, title] of headers) {
      const th = document.createElement("th");
      th.textContent = title;
      head.appendChild(th);
    }
    const body = t.createTBody();
    for (const row of rows) {
      const tr = body.insertRow();
      for (const [field] of headers) {
        const cell = tr.insertCell(), value = row[field];
        cell.textContent = Array.isArray(value) ? value.join(", ") : value === null ? "" : String(value);
        if (field === "severity") cell.className = String(value);
      }
    }
    holder.replaceChildren(t);
  }

  function redraw() {
    const sel = current();
    drawTrend(sel);
    drawForecast(sel);
  }

  metricSelect.addEventListener("change", () => { refreshOptions(); redraw(); });
  typeSelect.addEventListener("change", () => { refreshOptions(); redraw(); });
  testSelect.addEventListener("change", redraw);
  nodeSelect.addEventListener("change", redraw);
  if (metricsWithData.length) refreshOptions();
  else for (const s of [metricSelect, typeSelect, testSelect, nodeSelect]) s.disabled = true;
  if (metricsWithData.length) redraw();
  drawRanking();
  drawDurations();
  table("alerts", [["status", "state"], ["severity", "severity"], ["title", "alert"], ["metric_name", "metric"],
                   ["node_id", "node"], ["tests", "tests"], ["magnitude_percent", "change %"],
                   ["started_at", "since"], ["suspected_cause", "suspected cause"]], D.alerts);
  table("recommendations", [["severity", "severity"], ["kind", "kind"], ["subject", "subject"],
                            ["action", "action"], ["evidence", "evidence"], ["expected_gain", "expected gain"]],
        D.recommendations);
  document.body.dataset.rendered = "true";
})();
"""

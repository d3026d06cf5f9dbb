"""The performance dashboard: names stay text, the asset writes the file on a simulated
fleet, and a real browser draws every chart with the network cut off."""

import json
import os
import shutil
import subprocess
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from perf_pipeline.defs.reports import DASHBOARD_FILE
from perf_pipeline.defs.runner import open_instance
from perf_pipeline.report.dashboard import CHARTS, TABLES, build_payload, render_dashboard, write_dashboard
from perf_pipeline.storage.reports import DashboardData
from perf_pipeline_tests.conftest import materialized_fleet, serving

HOSTILE = "</script><img src=x onerror=alert(1)>"
HOSTILE_NODE = "<b onmouseover=alert(2)>node-x</b>"
END = datetime(2026, 11, 1)
WINDOW = (datetime(2026, 10, 1), datetime(2026, 10, 4))


def _data(*, empty: bool = False) -> DashboardData:
    """Small frames shaped like the warehouse's answers, with hostile test and node names."""
    days = pd.to_datetime(["2026-10-01", "2026-10-02", "2026-10-03"])
    series = pd.DataFrame({
        "metric_name": ["test_execution_time"] * 3 + ["cpu_usage"] * 3,
        "test_name": [HOSTILE] * 3 + [None] * 3, "test_type": ["unit"] * 3 + [None] * 3,
        "node_id": [HOSTILE_NODE] * 6, "day": list(days) * 2,
        "value": [1.0, 1.1, 1.2, 40.0, 41.0, 90.0], "n": [4] * 6})
    catalog = pd.DataFrame({"metric_name": ["test_execution_time", "cpu_usage"], "scope": ["test", "node"],
                            "unit": ["s", "percent"], "direction": ["lower_is_better"] * 2,
                            "category": ["test", "resource"]})
    trends = pd.DataFrame([{
        "scope": "test", "metric_name": "test_execution_time", "test_name": HOSTILE, "node_id": None,
        "level_basis": "absolute", "window_start": WINDOW[0], "window_end": WINDOW[1], "window_mean": 1.1,
        "theil_sen_slope_per_day": 0.1, "change_over_window_percent": 27.0, "p_value_adjusted": 0.001,
        "trend_direction": "degrading"}])
    anomalies = pd.DataFrame([{
        "scope": "node", "metric_name": "cpu_usage", "test_name": None, "node_id": HOSTILE_NODE,
        "timestamp": datetime(2026, 10, 3, 5), "kind": "spike", "score": 9.0, "value": 90.0,
        "expected": 41.0, "reason": f"spike on {HOSTILE_NODE}"}])
    forecasts = pd.DataFrame({
        "metric_name": ["test_execution_time"] * 2, "scope": ["test"] * 2, "series": [HOSTILE] * 2,
        "day": pd.to_datetime(["2026-10-04", "2026-10-05"]), "forecast": [1.3, 1.4],
        "lower": [1.1, 1.1], "upper": [1.5, 1.7], "method": ["gbm"] * 2})
    ranking = pd.DataFrame([{"node_id": HOSTILE_NODE, "score": 80.0, "rank": 1, "effect": 0.0,
                             "evidence": HOSTILE}])
    durations = pd.DataFrame([{"test_type": HOSTILE, "n": 3, "low": 1.0, "q1": 1.05, "median": 1.1,
                               "q3": 1.15, "high": 1.2, "mean": 1.1}])
    alerts = pd.DataFrame([{"status": "new", "severity": "high", "title": f"{HOSTILE} slower",
                            "metric_name": "test_execution_time", "node_id": None, "tests": [HOSTILE],
                            "magnitude_percent": 27.0, "started_at": datetime(2026, 10, 2),
                            "suspected_cause": HOSTILE, "updated_at": datetime(2026, 10, 3)}])
    recommendations = pd.DataFrame([{"severity": "high", "kind": "bisect_regression", "subject": HOSTILE,
                                     "action": HOSTILE, "evidence": HOSTILE, "expected_gain": "27%"}])
    frames = dict(catalog=catalog, series=series, trends=trends, anomalies=anomalies, forecasts=forecasts,
                  node_ranking=ranking, durations=durations, alerts=alerts, recommendations=recommendations)
    if empty:
        frames = {name: frame.iloc[0:0] for name, frame in frames.items()}
        frames["catalog"] = catalog
    return DashboardData(window_start=WINDOW[0], window_end=WINDOW[1], **frames)


class _Tags(HTMLParser):
    """Elements as a browser's tokenizer sees them (script content is not markup)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def _parse(page: str) -> _Tags:
    parser = _Tags()
    parser.feed(page)
    return parser


def test_hostile_names_stay_data_and_never_become_markup():
    page = render_dashboard(build_payload(_data(), generated_at=END))
    parsed = _parse(page)
    # exactly our three scripts: data, plotly.js, the page's code; no element from a name
    assert [attrs.get("type") for tag, attrs in parsed.tags if tag == "script"] == [
        "application/json", None, None]
    assert not {"img", "b"} & {tag for tag, _ in parsed.tags}
    data_json = parsed.scripts[0]
    assert "<" not in data_json and ">" not in data_json
    payload = json.loads(data_json)
    assert HOSTILE in payload["tests"] and HOSTILE_NODE in payload["nodes"]
    assert payload["recommendations"][0]["action"] == HOSTILE
    # nothing loaded from elsewhere: no src or href anywhere, plotly.js inlined once
    assert not [attrs for _, attrs in parsed.tags if "src" in attrs or "href" in attrs]
    assert page.count("plotly.js v") == 1
    # every chart and table has its container and a no-data message (hidden: there is data)
    ids = {attrs.get("id"): attrs for _, attrs in parsed.tags if attrs.get("id")}
    for key in CHARTS:
        assert ids[f"chart-{key}"]["data-chart"] == key and "hidden" not in ids[f"chart-{key}"]
        assert "hidden" in ids[f"empty-{key}"]
    for key in TABLES:
        assert ids[f"table-{key}"]["data-table"] == key


def test_an_empty_warehouse_shows_no_data_yet_everywhere():
    page = render_dashboard(build_payload(_data(empty=True), generated_at=END))
    ids = {attrs.get("id"): attrs for _, attrs in _parse(page).tags if attrs.get("id")}
    for key in (*CHARTS, *TABLES):
        assert "hidden" not in ids[f"empty-{key}"], key
    markup = page.split('<script type="application/json"')[0]
    assert markup.count("No data yet.") == len(CHARTS) + len(TABLES)


def test_the_file_is_replaced_atomically(tmp_path):
    target = tmp_path / "reports" / DASHBOARD_FILE
    assert write_dashboard(target, "first") == 5
    assert write_dashboard(target, "second ✓") == len("second ✓".encode())
    assert target.read_text() == "second ✓"
    assert [p.name for p in target.parent.iterdir()] == [DASHBOARD_FILE]


def test_the_file_gets_the_umask_mode_not_mkstemps_0600(tmp_path):
    target = tmp_path / DASHBOARD_FILE
    previous = os.umask(0o027)
    try:
        write_dashboard(target, "page")
        assert target.stat().st_mode & 0o777 == 0o640
        os.umask(0o022)
        write_dashboard(target, "page again")
        assert target.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(previous)


def _trend_line(trend: dict, shown: list) -> dict | None:
    """The dashboard's own trendLine (with esc and median), run by node on `trend`."""
    from perf_pipeline.report import dashboard

    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("no node.js on this machine")
    script = dashboard._SCRIPT
    pieces = [script[script.index("  const esc = "):script.index("\n", script.index("  const esc = "))],
              script[script.index("  const median = "):script.index("  };", script.index("  const median = ")) + 4],
              script[script.index("  function trendLine("):script.index("  function anomalyTrace(")]]
    program = "\n".join(pieces) + (f"\nconsole.log(JSON.stringify(trendLine({json.dumps(trend)}, "
                                    f"{{y: {json.dumps(shown)}}})));")
    result = subprocess.run([node, "-e", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


TREND = {"theil_sen_slope_per_day": 0.5, "window_mean": 10.0, "change_over_window_percent": 20.0,
         "window_start": "2026-10-01 00:00", "window_end": "2026-10-05 00:00",
         "level_basis": "absolute", "trend_direction": "degrading"}


def test_the_trend_line_of_a_near_zero_mean_series_is_mean_plus_slope_without_a_percentage():
    line = _trend_line(TREND, [9.0, 11.0])
    assert line["name"] == "trend +20% over the window (degrading)"
    assert line["y"] == pytest.approx([9.0, 11.0])  # 10 ± 0.5/day × 2 days
    # near-zero mean: trend_stats leaves the percentage empty and judged the absolute change
    near_zero = {**TREND, "window_mean": 1e-9, "change_over_window_percent": None}
    line = _trend_line(near_zero, [-1.0, 1.0])
    assert "null" not in line["name"] and "%" not in line["name"]
    assert line["name"] == "trend (degrading)"
    assert line["y"] == pytest.approx([-1.0, 1.0], abs=1e-6)
    exact_zero = {**near_zero, "window_mean": 0.0, "level_basis": "relative_to_test_median"}
    assert _trend_line(exact_zero, [0.0])["y"] == pytest.approx([-1.0, 1.0])
    # a relative series is drawn through the median of what is shown, at the same rate
    relative = {**TREND, "window_mean": 1.0, "theil_sen_slope_per_day": 0.05,
                "level_basis": "relative_to_test_median"}
    assert _trend_line(relative, [4.0, 6.0])["y"] == pytest.approx([4.5, 5.5])


# ------------------------------------------------------------ on a small simulated fleet

@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A small fleet through the real pipeline: ingest runs, then analysis_job (which ends
    with performance_dashboard)."""
    paths = materialized_fleet(tmp_path_factory.mktemp("dashboard-fleet"), end=END, days=10,
                               nodes=5, tests=6)
    with open_instance(paths) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("performance_dashboard"))
    return paths, event.asset_materialization.metadata


@pytest.mark.slow
def test_the_asset_writes_the_dashboard_with_its_path_size_and_counts(fleet):
    paths, metadata = fleet
    file = paths.reports / DASHBOARD_FILE
    size = file.stat().st_size
    print(f"dashboard of a 10-day, 5-node, 6-test fleet: {size / 1e6:.2f} MB")
    assert metadata["path"].value == str(file)
    assert metadata["size_bytes"].value == size
    assert size < 8_000_000  # plotly.js is about 4.7 MB of it
    for count in ("metrics", "tests", "nodes", "series_points", "ranked_nodes", "test_types",
                  "forecast_points", "anomalies"):
        assert metadata[count].value > 0, count
    assert metadata["days"].value <= 11  # one point per series and day, whatever the runs
    assert [p.name for p in paths.reports.iterdir()] == [DASHBOARD_FILE]


def _chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


_DRAWN = """() => Object.fromEntries([...document.querySelectorAll('[data-chart]')].map((div) => [
    div.dataset.chart,
    { hidden: div.hidden,
      traces: (div.data || []).map((t) => ({ name: t.name, type: t.type,
                                            points: (t.x || t.q1 || []).length })) }]))"""


@pytest.mark.slow
def test_a_real_browser_draws_every_chart_offline_and_the_filters_redraw(fleet, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium on this machine (apt-get install chromium); CI installs it")
    paths, _ = fleet
    env = {**os.environ, "PERF_PIPELINE_HOME": str(paths.home)}
    env.pop("PERF_API_TOKEN", None)
    artifacts = Path(os.environ.get("PERF_TEST_ARTIFACTS", "var/test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    hostile = tmp_path / "hostile.html"
    write_dashboard(hostile, render_dashboard(build_payload(_data(), generated_at=END)))
    with serving(env, secrets=(), command="dashboard", arguments=("--no-auth",)) as url:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems, blocked, dialogs = [], [], []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

            def offline(route):
                host = route.request.url.split("/")[2].split(":")[0] if "://" in route.request.url else ""
                if route.request.url.startswith(("data:", "blob:", "file:")) or host in ("127.0.0.1", "localhost"):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            page.route("**/*", offline)
            page.goto(url + "/")
            page.wait_for_selector("body[data-rendered=true]", timeout=30_000)
            drawn = page.evaluate(_DRAWN)
            assert set(drawn) == {"trend", "forecast", "node-ranking", "durations"}
            for key, chart in drawn.items():
                assert not chart["hidden"] and chart["traces"], key
                assert any(t["points"] > 0 for t in chart["traces"]), key
            assert page.locator("#table-recommendations table tbody tr").count() > 0
            screenshot = artifacts / "dashboard.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"dashboard screenshot: {screenshot.resolve()}")

            def trend_names() -> list[str]:
                return [t["name"] for t in page.evaluate(_DRAWN)["trend"]["traces"]]

            def trend_points() -> int:
                return page.evaluate(_DRAWN)["trend"]["traces"][0]["points"]

            first = trend_names()
            assert page.locator("#filter-metric").input_value() != ""
            page.select_option("#filter-metric", label="cpu_usage (percent)")
            assert trend_names() != first and "cpu_usage" in trend_names()[0]
            assert page.locator("#filter-test").is_disabled()  # a node metric has no tests
            nodes = page.locator("#filter-node option").all_inner_texts()
            page.select_option("#filter-node", label=nodes[1])
            assert nodes[1] in trend_names()[0]
            page.select_option("#filter-metric", label="test_execution_time (s)")
            page.select_option("#filter-node", index=0)
            all_tests = trend_names()
            tests = page.locator("#filter-test option").all_inner_texts()
            assert tests[0] == "All tests" and len(tests) > 2
            page.select_option("#filter-test", label=tests[1])
            assert trend_names() != all_tests and tests[1] in trend_names()[0]
            types = page.locator("#filter-test-type option").all_inner_texts()
            page.select_option("#filter-test", index=0)
            page.select_option("#filter-test-type", label=types[-1])
            assert all(t in ("All tests", *tests) for t in page.locator("#filter-test option").all_inner_texts())
            assert types[-1] in trend_names()[0] and trend_points() > 0

            # a page full of hostile names: shown as text, nothing executes
            page.goto(hostile.as_uri())
            page.wait_for_selector("body[data-rendered=true]", timeout=30_000)
            assert page.locator("#filter-test option").all_inner_texts() == ["All tests", HOSTILE]
            assert page.locator("img").count() == 0
            assert HOSTILE in page.locator("#table-recommendations").inner_text()
            browser.close()
        assert not problems, problems
        assert not blocked, blocked
        assert not dialogs, dialogs

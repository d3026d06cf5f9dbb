"""Small PNG plots for asset metadata and reports.

Each `*_plot` function draws one figure from plain DataFrames and returns PNG bytes
(800×400 at 100 dpi); `markdown_image` turns them into markdown with a data URI, which the
Dagster UI renders in a markdown metadata entry. The `*_markdown` functions choose what to
draw from the analysis tables and return markdown with one or more images, or None when
there is nothing to draw.

matplotlib is imported inside the functions (importing it costs about a second, which
loading the definitions should not pay) and only through its object API with the Agg
canvas: no pyplot, so no global figure registry, no GUI backend and no state shared
between the threads of a run.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from datetime import datetime

import numpy as np
import pandas as pd

from perf_pipeline.catalog import IMPORTANCE_LEVELS, get_metric

WIDTH_INCHES, HEIGHT_INCHES, DPI = 8.0, 4.0, 100
_KEYS = ["scope", "metric_name", "test_name", "node_id"]
_MAX_MATRIX_METRICS = 12  # more labels than this do not fit 800 px
_MAX_HEATMAP_LABELS = 40
_PALETTE_COLOURS = 64
_MAX_MARKED_POINTS = 150
# Titles, labels and tick labels carry test and node names: a `$` in one must be drawn as a
# dollar sign, not start matplotlib mathtext (which fails on "a $x^$ b" and mislabels others).
_PLAIN = {"parse_math": False}


def _figure(nrows: int = 1, ncols: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_INCHES, HEIGHT_INCHES), dpi=DPI, layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False)
    return figure, axes


def _png(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from PIL import Image

    canvas = FigureCanvasAgg(figure)
    try:
        canvas.draw()
        image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba())
    finally:
        figure.clear()
    # A plot has few colours: a 64-colour palette keeps it sharp at about a third of the bytes.
    buffer = io.BytesIO()
    image.convert("RGB").quantize(colors=_PALETTE_COLOURS, dither=Image.Dither.NONE).save(buffer, format="png", optimize=True)
    return buffer.getvalue()


def markdown_image(png: bytes, title: str) -> str:
    """`png` as a markdown image with a base64 data URI."""
    alt = title.replace("[", "(").replace("]", ")").replace("\n", " ")
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def _days_since(times: pd.Series, origin: pd.Timestamp) -> np.ndarray:
    return ((pd.to_datetime(times) - origin) / pd.Timedelta(days=1)).to_numpy(dtype=float)


def series_plot(points: pd.DataFrame, *, title: str, ylabel: str = "",
                slopes_per_day: dict[str, float] | None = None,
                change_times: Sequence[datetime] = (),
                anomalies: Sequence[tuple[datetime, datetime]] = ()) -> bytes:
    """A series (`points`: timestamp, value) with a straight trend line per entry of
    `slopes_per_day` (label -> slope; Theil–Sen lines go through the median residual, others
    through the mean), a dashed vertical line at each change point, and the points falling
    in an anomaly's (start, end) circled in red."""
    points = points.dropna(subset=["value"]).sort_values("timestamp")
    times = pd.to_datetime(points["timestamp"])
    values = points["value"].to_numpy(dtype=float)
    figure, axes = _figure()
    ax = axes[0, 0]
    dense = len(points) > _MAX_MARKED_POINTS  # markers on dense series only add bytes
    ax.plot(times, values, marker=None if dense else "o", markersize=2.5,
            linewidth=0.6 if dense else 0.8, color="tab:blue", label="value")
    if len(points) >= 2:
        x = _days_since(times, times.iloc[0])
        for (label, slope), color in zip((slopes_per_day or {}).items(), ("tab:orange", "tab:green")):
            if slope is None or not np.isfinite(slope):
                continue
            residual = values - slope * x
            intercept = np.median(residual) if "theil" in label.lower() else residual.mean()
            ax.plot(times.iloc[[0, -1]], intercept + slope * x[[0, -1]], color=color,
                    linewidth=2, label=f"{label} {slope:+.3g}/day")
    for index, at in enumerate(change_times):
        ax.axvline(pd.Timestamp(at), color="tab:red", linestyle="--", linewidth=1.2,
                   label="change point" if index == 0 else None)
    odd = np.zeros(len(points), dtype=bool)
    for start, end in anomalies:
        odd |= ((times >= pd.Timestamp(start)) & (times <= pd.Timestamp(end))).to_numpy()
    if odd.any():
        ax.scatter(times[odd], values[odd], s=60, facecolors="none", edgecolors="red",
                   linewidths=1.5, zorder=3, label="anomaly")
    ax.set_title(title, fontsize=10, **_PLAIN)
    ax.set_ylabel(ylabel, **_PLAIN)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    figure.autofmt_xdate()
    return _png(figure)


def heatmap_plot(matrix: pd.DataFrame, *, title: str, colorbar_label: str,
                 vmin: float | None = None, vmax: float | None = None, cmap: str = "RdYlGn") -> bytes:
    """`matrix` (rows × columns, NaN for no data) as a heatmap, with the values written in
    the cells while they fit."""
    figure, axes = _figure()
    ax = axes[0, 0]
    values = matrix.to_numpy(dtype=float)
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns], rotation=45,
                  ha="right", fontsize=7, **_PLAIN)
    ax.set_yticks(range(matrix.shape[0]), [str(i) for i in matrix.index], fontsize=7, **_PLAIN)
    if values.size <= 120:
        for (row, column), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(column, row, f"{value:.2g}" if abs(value) < 10 else f"{value:.0f}",
                        ha="center", va="center", fontsize=7)
    figure.colorbar(image, ax=ax, label=colorbar_label)
    ax.set_title(title, fontsize=10, **_PLAIN)
    return _png(figure)


def correlation_plot(pairs: pd.DataFrame, *, title: str) -> bytes:
    """The correlation matrix of metric pairs (`pairs`: metric_a, metric_b, pearson_r)."""
    metrics = sorted(set(pairs["metric_a"]) | set(pairs["metric_b"]))
    matrix = pd.DataFrame(np.nan, index=metrics, columns=metrics)
    for a, b, r in pairs[["metric_a", "metric_b", "pearson_r"]].itertuples(index=False):
        matrix.loc[a, b] = matrix.loc[b, a] = r
    for metric in metrics:
        matrix.loc[metric, metric] = 1.0
    return heatmap_plot(matrix, title=title, colorbar_label="Pearson r", vmin=-1, vmax=1,
                        cmap="RdBu_r")


def forecast_plot(history: pd.DataFrame, forecast: pd.DataFrame, *, title: str,
                  ylabel: str = "", interval_label: str = "80% interval") -> bytes:
    """History (`history`: timestamp, value) then the forecast (`forecast`: timestamp,
    forecast, lower, upper) with its interval shaded."""
    figure, axes = _figure()
    ax = axes[0, 0]
    history = history.sort_values("timestamp")
    forecast = forecast.sort_values("timestamp")
    ax.plot(pd.to_datetime(history["timestamp"]), history["value"], linewidth=0.8,
            color="tab:blue", label="history")
    times = pd.to_datetime(forecast["timestamp"])
    banded = forecast[["lower", "upper"]].notna().all(axis=1)
    if banded.any():
        ax.fill_between(times[banded], forecast.loc[banded, "lower"].astype(float),
                        forecast.loc[banded, "upper"].astype(float), color="tab:orange",
                        alpha=0.25, label=interval_label)
    ax.plot(times, forecast["forecast"], color="tab:orange", linewidth=1.5, label="forecast")
    if len(forecast):
        ax.axvline(times.iloc[0], color="grey", linestyle=":", linewidth=1)
    ax.set_title(title, fontsize=10, **_PLAIN)
    ax.set_ylabel(ylabel, **_PLAIN)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    figure.autofmt_xdate()
    return _png(figure)


def before_after_plot(groups: Sequence[tuple[str, Sequence[float], Sequence[float]]], *,
                      title: str) -> bytes:
    """One panel per (label, values before, values after): box plots of both sides with the
    points over them."""
    figure, axes = _figure(1, max(1, len(groups)))
    rng = np.random.default_rng(0)  # the jitter only spreads points; fixed so images are stable
    for ax, (label, before, after) in zip(axes[0], groups):
        sides = [np.asarray(before, dtype=float), np.asarray(after, dtype=float)]
        sides = [side[np.isfinite(side)] for side in sides]
        ax.boxplot(sides, showfliers=False, widths=0.5)
        for position, (side, color) in enumerate(zip(sides, ("tab:blue", "tab:red")), start=1):
            ax.scatter(position + rng.uniform(-0.15, 0.15, len(side)), side, s=6, alpha=0.5,
                       color=color)
        ax.set_xticks([1, 2], [f"before\n(n={len(sides[0])})", f"after\n(n={len(sides[1])})"],
                      fontsize=8)
        ax.set_title(label, fontsize=8, **_PLAIN)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    figure.suptitle(title, fontsize=10, **_PLAIN)
    return _png(figure)


# ------------------------------------------------------------- what to draw for an asset

def _label(row) -> str:
    parts = [row.metric_name]
    parts += [str(v) for v in (row.test_name, row.node_id) if isinstance(v, str) and v]
    return f"{' · '.join(parts)} ({row.scope})"


def _of_series(frame: pd.DataFrame, row) -> pd.DataFrame:
    """The rows of `frame` that belong to the series of `row` (empty test or node match)."""
    if frame.empty:
        return frame
    mask = pd.Series(True, index=frame.index)
    for key in _KEYS:
        wanted = getattr(row, key)
        wanted = wanted if isinstance(wanted, str) else ""
        mask &= frame[key].astype(object).fillna("") == wanted  # names may be categories
    return frame[mask]


def _anomaly_spans(anomalies: pd.DataFrame, row, *, whole_days: bool = False) -> list:
    spans = []
    for start, end in _of_series(anomalies, row)[["timestamp", "end_timestamp"]].itertuples(index=False):
        start, end = pd.Timestamp(start), pd.Timestamp(end)
        spans.append((start.floor("D"), end.floor("D")) if whole_days else (start, end))
    return spans


def trend_markdown(daily: pd.DataFrame, trends: pd.DataFrame, top: pd.DataFrame,
                   changes: pd.DataFrame, anomalies: pd.DataFrame, *, limit: int = 3) -> str | None:
    """The `limit` first series of `top` (Warehouse.top_trends rows): their daily values
    (`daily`, as Warehouse.daily_series), Theil–Sen and OLS lines (`trends`, the trend_stats
    rows), change points (`changes`) and the days holding an anomaly (`anomalies`)."""
    images = []
    for row in top.head(limit).itertuples(index=False):
        points = _of_series(daily, row).rename(columns={"day": "timestamp"})
        stats = _of_series(trends, row)
        if len(points) < 2 or stats.empty:
            continue
        stat = stats.iloc[0]
        title = f"{_label(row)}: {row.change_over_window_percent:+.1f}% over the window"
        images.append(markdown_image(series_plot(
            points[["timestamp", "value"]], title=title,
            ylabel=f"daily median ({stat['level_basis']}, {stat['unit']})",
            slopes_per_day={"Theil–Sen": stat["theil_sen_slope_per_day"],
                            "OLS": stat["ols_slope_per_day"]},
            change_times=list(_of_series(changes, row)["timestamp"]),
            anomalies=_anomaly_spans(anomalies, row, whole_days=True)), title))
    return "\n\n".join(images) or None


def _worst_regressions(changes: pd.DataFrame, series: pd.DataFrame, limit: int) -> pd.DataFrame:
    regressions = changes[changes["kind"] == "regression"]
    if regressions.empty or series.empty:
        return regressions
    present = set(series[_KEYS].drop_duplicates().astype(object).fillna("")
                  .itertuples(index=False, name=None))
    keys = regressions[_KEYS].astype(object).fillna("").itertuples(index=False, name=None)
    drawable = regressions[[key in present for key in keys]]
    order = drawable["magnitude_percent"].abs().fillna(0).sort_values(ascending=False).index
    return drawable.loc[order[:limit]]


def change_point_markdown(series: pd.DataFrame, changes: pd.DataFrame, anomalies: pd.DataFrame,
                          *, limit: int = 3) -> str | None:
    """The `limit` largest regressions in `changes` drawn on their series (`series`, as
    regressions.build_series: the `level` each point was judged on), with every change point
    of that series and its anomalies."""
    images = []
    for row in _worst_regressions(changes, series, limit).itertuples(index=False):
        points = _of_series(series, row)[["timestamp", "level"]].rename(columns={"level": "value"})
        magnitude = f"{row.magnitude_percent:+.1f}%" if pd.notna(row.magnitude_percent) else ""
        title = f"{_label(row)}: {row.shape} {magnitude} at {pd.Timestamp(row.timestamp):%Y-%m-%d %H:%M}"
        images.append(markdown_image(series_plot(
            points, title=title, ylabel="level",
            change_times=list(_of_series(changes, row)["timestamp"]),
            anomalies=_anomaly_spans(anomalies, row)), title))
    return "\n\n".join(images) or None


def regression_markdown(series: pd.DataFrame, changes: pd.DataFrame, *, limit: int = 4) -> str | None:
    """Values before and after each of the `limit` largest regressions: before the change,
    and after it (after its ramp ends, for a ramp) up to the series' next change point."""
    groups = []
    for row in _worst_regressions(changes, series, limit).itertuples(index=False):
        points = _of_series(series, row)
        times = pd.to_datetime(points["timestamp"])
        at = pd.Timestamp(row.timestamp)
        settled = pd.Timestamp(row.end_timestamp) if pd.notna(row.end_timestamp) else at
        others = pd.to_datetime(_of_series(changes, row)["timestamp"])
        previous, following = others[others < at], others[others > settled]
        start = previous.max() if len(previous) else times.min()
        stop = following.min() if len(following) else times.max() + pd.Timedelta(seconds=1)
        before = points.loc[(times >= start) & (times < at), "level"]
        after = points.loc[(times >= settled) & (times < stop), "level"]
        if len(before) and len(after):
            magnitude = f" {row.magnitude_percent:+.0f}%" if pd.notna(row.magnitude_percent) else ""
            groups.append((f"{_label(row)}{magnitude}", before, after))
    if not groups:
        return None
    title = "Before and after the largest regressions (level each point was judged on)"
    return markdown_image(before_after_plot(groups, title=title), title)


def correlation_markdown(pairs: pd.DataFrame) -> str | None:
    """One correlation matrix per grain of `pairs` (metric_correlations rows), of the metrics
    in the strongest pairs."""
    images = []
    for grain, group in pairs.groupby("grain", sort=True):
        strongest = group.reindex(group["pearson_r"].abs().sort_values(ascending=False).index)
        metrics: list[str] = []
        for a, b in strongest[["metric_a", "metric_b"]].itertuples(index=False):
            metrics += [m for m in (a, b) if m not in metrics]
            if len(metrics) >= _MAX_MATRIX_METRICS:
                break
        metrics = metrics[:_MAX_MATRIX_METRICS]
        shown = group[group["metric_a"].isin(metrics) & group["metric_b"].isin(metrics)]
        if len(shown):
            title = f"Metric correlations per {grain}"
            images.append(markdown_image(correlation_plot(shown, title=title), title))
    return "\n\n".join(images) or None


def speed_heatmap_markdown(speed: pd.DataFrame) -> str | None:
    """Node × test type speed scores (`speed`, as nodes.speed_by_test_type)."""
    if speed.empty:
        return None
    matrix = speed.pivot_table(index="test_type", columns="node_id", values="score", aggfunc="first")
    matrix = matrix.iloc[:_MAX_HEATMAP_LABELS, :_MAX_HEATMAP_LABELS]
    title = "Speed score per node and test type (50 = fleet median, higher is faster)"
    return markdown_image(heatmap_plot(matrix, title=title, colorbar_label="score", vmin=0, vmax=100),
                          title)


def _importance_rank(metric_name: str) -> int:
    return IMPORTANCE_LEVELS.index(get_metric(metric_name).importance)


def forecast_markdown(history: pd.DataFrame, forecasts: pd.DataFrame, *, limit: int = 3) -> str | None:
    """Forecasts of the `limit` most important metrics in `forecasts` (performance_forecasts
    rows), each for its best-observed series in `history` (metric_name, series, hour, value),
    with the hourly median of that series' history before it."""
    if forecasts.empty or history.empty:
        return None
    images = []
    metrics = sorted(forecasts["metric_name"].unique(), key=lambda m: (_importance_rank(m), m))
    for metric_name in metrics:
        seen = history[history["metric_name"] == metric_name]
        predicted = forecasts[forecasts["metric_name"] == metric_name]
        counts = seen[seen["series"].isin(set(predicted["series"]))]["series"].value_counts()
        if counts.empty:
            continue
        series = sorted(counts[counts == counts.max()].index)[0]
        past = (seen[seen["series"] == series].groupby("hour", as_index=False)["value"].median()
                .rename(columns={"hour": "timestamp"}))
        title = f"{metric_name} · {series}: forecast with 80% interval"
        images.append(markdown_image(forecast_plot(
            past, predicted[predicted["series"] == series], title=title,
            ylabel=get_metric(metric_name).unit), title))
        if len(images) >= limit:
            break
    return "\n\n".join(images) or None

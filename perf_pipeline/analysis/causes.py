"""Suspected causes of each regression, ranked, with the evidence for each.

For every incident that made something worse, the points of its series are split at the
incident's first run and compared before and after:

- **context** — a context field (runner image, Python version, dependency lock, worker
  count, any key the runs report in `context_data`) whose value after the change was rare
  before. Score: the share of runs after carrying the new value minus its share before
  (1.0: every run switched at the change).
- **commit** — for a code change or a CI metric's change, the range of commits to bisect:
  from the last run before the earliest plausible start of the change to the latest
  plausible first changed run (`regressions.plausible_start`). Score: the share of nodes
  that show the shift (a code change slows its tests wherever they run).
- **node** — for a node problem, the share of the node's tests that slowed minus the
  share of those tests that slowed on other nodes (a sick node slows everything it runs)
  — or, for a code change seen on only one of several nodes, that node.
- **gradual** — instead of a commit range, for a change that is a ramp starting with the
  window: it has no first run, so no range is made up for it (a node problem keeps its
  node).
- **co-moving metric** — another metric's change point at the same time on the same node
  (for a node problem) or fleet-wide (per test or per run, for a code change or a CI
  metric), weighted by how strongly the two metrics correlate.

Scores are in [0, 1] and comparable within an incident; causes are ranked by score.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from perf_pipeline.analysis.regressions import (
    net_of_run_steps,
    plausible_start,
    plausible_start_of_series,
    test_rows,
)

CAUSE_COLUMNS = ["incident_id", "rank", "cause_type", "cause", "score", "evidence"]
# A context value is new when it was on at most this share of the runs before the change.
_RARE_BEFORE = 0.1
_MIN_CONTEXT_SCORE = 0.5
# Changes of other metrics within this time of the incident moved with it.
_SAME_TIME = pd.Timedelta(hours=12)
# A metric that moved at the same time is as often a consequence (throughput falls when
# tests slow down) as a cause: it ranks below a clean context switch or a commit range
# seen on most nodes, and rises with how strongly the two metrics correlate.
_CO_MOVING_BASE = 0.25
_MIN_POINTS = 2
_MAX_CAUSES = 5
# A ramp with fewer than this share of its series' points before it starts with the
# window: when it began is not known, so there is no commit range to bisect.
_OPENING_SHARE = 0.1


class _SeriesIndex:
    """The series' rows of each scope, and where each test's and each node's rows are: found
    once, not by comparing every row's names again for every incident."""

    def __init__(self, series: pd.DataFrame):
        scopes = {scope: frame for scope, frame in series.groupby("scope", sort=False)}
        self.nodes, self.overall = (scopes.get(scope, series.iloc[:0]) for scope in ("node", "overall"))
        self.tests, self.test_rows = test_rows(series)
        self.node_rows = self.nodes.groupby("node_id", sort=False).indices

    def points(self, incident, members: pd.DataFrame) -> pd.DataFrame:
        """The points of the incident's series."""
        if incident.attribution == "code_change":
            keys = set(zip(members["metric_name"], members["test_name"]))
            return self.tests.iloc[_positions([self.test_rows[k] for k in keys if k in self.test_rows])]
        if incident.attribution == "node_problem":
            on_node = self.nodes.iloc[self.node_rows.get(incident.node_id, np.array([], dtype=int))]
            return on_node[on_node["metric_name"].isin(incident.metrics)]
        return self.overall[self.overall["metric_name"].isin(incident.metrics)]


def _positions(groups: list[np.ndarray]) -> np.ndarray:
    """The rows of all the groups, in the frame's order."""
    return np.sort(np.concatenate(groups)) if groups else np.array([], dtype=int)


def _shifted(before: np.ndarray, after: np.ndarray, magnitude: float) -> bool:
    """Whether a group's median moved at least half the incident's way, in its direction."""
    if len(before) < _MIN_POINTS or len(after) < _MIN_POINTS:
        return False
    low, high = np.median(before), np.median(after)
    if low <= 0 or high <= 0:
        return False
    expected = np.log1p(magnitude / 100)
    return bool(np.sign(np.log(high / low)) == np.sign(expected)
                and abs(np.log(high / low)) >= 0.5 * abs(expected))


def _spread(points: pd.DataFrame, at: pd.Timestamp, by: str, magnitude: float) -> tuple[list, list]:
    """(groups that shifted, groups with enough points on both sides), grouping by `by`."""
    shifted, judged = [], []
    # groups as sorted codes and plain arrays: a pandas group and two lookups per group
    # cost more than the medians
    codes, keys = pd.factorize(points[by], sort=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    stamps = points["timestamp"].to_numpy()
    earlier, later = stamps < np.datetime64(at), stamps >= np.datetime64(at)
    levels = points["level"].to_numpy()
    for positions in np.split(order, bounds):
        if not len(positions) or codes[positions[0]] < 0:
            continue  # rows without a group, as groupby drops them
        key = keys[codes[positions[0]]]
        before = levels[positions[earlier[positions]]]
        after = levels[positions[later[positions]]]
        if len(before) >= _MIN_POINTS and len(after) >= _MIN_POINTS:
            judged.append(key)
            if _shifted(before, after, magnitude):
                shifted.append(key)
    return shifted, judged


def _named_as(contexts: pd.DataFrame, series: pd.DataFrame) -> pd.DataFrame:
    """`contexts` with its run and node names of the same categories as `series`' where
    those are categories, so that each incident's join matches integer codes instead of
    factorizing every context row's names again (at L, suspected_causes took 9.4 s so, and
    takes 3.8 s). A row whose run or node the series do not hold could not join anyway and
    is left out."""
    named = {}
    for column, like in (("test_run_id", "test_run_id"), ("node_id", "run_node_id")):
        if like in series and isinstance(series[like].dtype, pd.CategoricalDtype):
            named[column] = pd.Categorical(contexts[column], dtype=series[like].dtype)
    if not named:
        return contexts
    contexts = contexts.assign(**named)
    return contexts.dropna(subset=list(named))


def _context_causes(points: pd.DataFrame, at: pd.Timestamp, contexts: pd.DataFrame) -> list[dict]:
    runs = points.dropna(subset=["test_run_id"])[["test_run_id", "run_node_id", "timestamp"]]
    runs = runs.drop_duplicates(["test_run_id", "run_node_id"])
    labelled = runs.merge(contexts, left_on=["test_run_id", "run_node_id"],
                          right_on=["test_run_id", "node_id"])
    causes = []
    for field, rows in labelled.groupby("field"):
        before, after = rows[rows["timestamp"] < at], rows[rows["timestamp"] >= at]
        if len(before) < _MIN_POINTS or len(after) < _MIN_POINTS:
            continue
        if rows["value"].nunique() > 0.5 * len(rows):
            continue  # an identifier (commit, run id): not a configuration
        share_before = before["value"].value_counts(normalize=True)
        share_after = after["value"].value_counts(normalize=True)
        new = share_after.index[[share_before.get(v, 0.0) <= _RARE_BEFORE for v in share_after.index]]
        if not len(new):
            continue
        value = max(new, key=lambda v: share_after[v])
        score = float(share_after[value] - share_before.get(value, 0.0))
        if score < _MIN_CONTEXT_SCORE:
            continue
        old = share_before.idxmax()
        causes.append({
            "cause_type": "context", "cause": f"{field} = {value}", "score": score,
            "evidence": (f"{field} was {old} on {share_before[old]:.0%} of {len(before)} runs before "
                         f"and {value} on {share_after[value]:.0%} of {len(after)} runs after")})
    return causes


def _commit_cause(points: pd.DataFrame, members: pd.DataFrame, index: _SeriesIndex,
                  node_spread: tuple[list, list], *, per_test: bool = True) -> dict | None:
    """The commits to bisect: from the last run before the earliest plausible start of the
    change to the latest plausible first changed run. `per_test`: the change is in
    per-test series (a code change), else in one CI metric's series (`points`)."""
    earliest, latest = (plausible_start(members, index.tests, rows=(index.tests, index.test_rows))
                        if per_test else plausible_start_of_series(members, points))
    runs = points.dropna(subset=["test_run_id"]).sort_values("timestamp").drop_duplicates("test_run_id")
    before, after = runs[runs["timestamp"] < earliest], runs[runs["timestamp"] >= latest]
    if before.empty or after.empty:
        return None
    good, last = before.iloc[-1], after.iloc[0]
    shifted, judged = node_spread
    score = len(shifted) / len(judged) if judged else 0.0
    spread = (f"shifted on {len(shifted)} of {len(judged)} nodes that "
              f"{'ran these tests' if per_test else 'reported it'} on both sides")
    if not isinstance(good["commit_sha"], str) and not isinstance(last["commit_sha"], str):
        # runs that recorded no commit: the range to bisect is of runs ("?..?" says nothing)
        return {"cause_type": "commit",
                "cause": f"runs {good['test_run_id']}..{last['test_run_id']}", "score": float(score),
                "evidence": (f"the first changed run lies after {good['test_run_id']} up to "
                             f"{last['test_run_id']}; these runs recorded no commit (send it as "
                             f"context_data.commit to get a commit range to bisect); {spread}")}
    return {"cause_type": "commit",
            "cause": f"{_short(good['commit_sha'])}..{_short(last['commit_sha'])}",
            "score": float(score),
            "evidence": (f"bisect after {_short(good['commit_sha'])} ({good['test_run_id']}) up to "
                         f"{_short(last['commit_sha'])} ({last['test_run_id']}): the first "
                         f"changed run lies in that range; {spread}")}


def _gradual_cause(stamps: pd.Series, members: pd.DataFrame) -> dict | None:
    """A change that is a ramp the window opens with (`stamps`: the times of its series'
    points): it began at or before the window's start, so no run or commit can be named
    where it began."""
    if members.empty or not (members["shape"] == "ramp").all() or stamps.empty:
        return None
    start = members["timestamp"].min()
    if (stamps < start).sum() >= _OPENING_SHARE * len(stamps):
        return None
    end = members["end_timestamp"].max()
    until = f" until {pd.Timestamp(end):%Y-%m-%d %H:%M}" if pd.notna(end) else ""
    return {"cause_type": "gradual", "cause": f"a ramp since {stamps.min():%Y-%m-%d} or before",
            "score": 1.0,
            "evidence": (f"the series changes gradually from the window's start ({stamps.min():%Y-%m-%d}){until}: "
                         f"a ramp, not a step, with no run where it began; look for what grew over "
                         f"that time (data, caches, dependencies) rather than one commit")}


def _short(commit: object) -> str:
    return commit[:12] if isinstance(commit, str) else "?"


def _node_problem_cause(incident, tests: pd.DataFrame, at: pd.Timestamp,
                        magnitude: float) -> dict | None:
    """A sick node slows most of what it runs, and the same tests elsewhere do not
    (`tests`: the per-test series' rows)."""
    runs = tests[tests["metric_name"].isin(incident.metrics)]
    runs = runs.assign(level=runs["relative"])
    on_node = runs["run_node_id"] == incident.node_id
    shifted, judged = _spread(runs[on_node], at, "test_name", magnitude)
    if not judged:
        return None
    elsewhere, _ = _spread(runs[~on_node & runs["test_name"].isin(judged)], at, "test_name", magnitude)
    return {"cause_type": "node", "cause": incident.node_id,
            "score": max(0.0, (len(shifted) - len(elsewhere)) / len(judged)),
            "evidence": (f"{len(shifted)} of {len(judged)} tests run on {incident.node_id} on "
                         f"both sides of the change shifted; on the other nodes, "
                         f"{len(elsewhere)} of them did")}


def _single_node_cause(node_spread: tuple[list, list]) -> dict | None:
    """A "code change" that only one of several nodes shows is that node's problem."""
    shifted, judged = node_spread
    if len(shifted) == 1 and len(judged) >= 3:
        return {"cause_type": "node", "cause": shifted[0], "score": 1 - 1 / len(judged),
                "evidence": f"only {shifted[0]} of {len(judged)} nodes shows the shift"}
    return None


def _co_moving(incident, members: pd.DataFrame, changes: pd.DataFrame,
               correlations: pd.DataFrame) -> list[dict]:
    near = changes[((changes["timestamp"] - incident.timestamp).abs() <= _SAME_TIME)
                   & ~changes.index.isin(members.index)
                   & ~changes["metric_name"].isin(incident.metrics)]
    if incident.attribution == "node_problem":
        near = near[near["node_id"] == incident.node_id]
    else:  # a fleet-wide change is not explained by one node's wobble
        near = near[near["scope"] != "node"]
    flagged = correlations[correlations["flagged"]] if len(correlations) else correlations
    causes = []
    for metric, rows in near.groupby("metric_name"):
        strongest = 0.0
        for own in incident.metrics:
            pair = flagged[((flagged["metric_a"] == own) & (flagged["metric_b"] == metric))
                           | ((flagged["metric_a"] == metric) & (flagged["metric_b"] == own))]
            if len(pair):
                strongest = max(strongest, float(pair["pearson_r"].abs().max()))
        change = rows.iloc[int(np.argmax(rows["magnitude_percent"].abs().fillna(0).to_numpy()))]
        where = f" on {change['node_id']}" if isinstance(change["node_id"], str) else ""
        magnitude = change["magnitude_percent"]
        moved = f"{magnitude:+.1f}%" if pd.notna(magnitude) else "changed"
        correlation = f"; the two correlate (|r| = {strongest:.2f})" if strongest else ""
        causes.append({"cause_type": "co_moving_metric", "cause": metric,
                       "score": _CO_MOVING_BASE + 0.5 * strongest,
                       "evidence": f"{metric}{where} {moved} at {change['timestamp']:%Y-%m-%d %H:%M}"
                                   f"{correlation}"})
    return causes


def suspected_causes(incidents: pd.DataFrame, changes: pd.DataFrame, series: pd.DataFrame,
                     contexts: pd.DataFrame, correlations: pd.DataFrame) -> pd.DataFrame:
    """Ranked suspected causes of every regression incident.

    `changes` and `incidents` come from `group_incidents`, `series` from `build_series`,
    `contexts` from `correlations.flatten_contexts`, `correlations` from
    `correlations.metric_correlations`."""
    rows = []
    index = _SeriesIndex(net_of_run_steps(series, changes))
    contexts = _named_as(contexts, series)
    for incident in incidents[incidents["kind"] != "improvement"].itertuples(index=False):
        members = changes[changes["incident_id"] == incident.incident_id]
        at = pd.Timestamp(incident.timestamp)
        magnitude = float(incident.worst_magnitude_percent) if pd.notna(incident.worst_magnitude_percent) else 0.0
        points = index.points(incident, members)
        causes = _context_causes(points, at, contexts)
        # a ramp the window opens with instead of a commit range, which would be made up (a
        # per-test metric's run series is not among the points: its tests' times serve)
        stamps = points["timestamp"] if len(points) else \
            index.tests.loc[index.tests["metric_name"].isin(incident.metrics), "timestamp"]
        gradual = _gradual_cause(stamps, members) if incident.attribution != "node_problem" else None
        if incident.attribution == "code_change":
            node_spread = _spread(points, at, "run_node_id", magnitude)
            causes += [gradual or _commit_cause(points, members, index, node_spread),
                       _single_node_cause(node_spread)]
        elif incident.attribution == "node_problem":
            causes.append(_node_problem_cause(incident, index.tests, at, magnitude))
        elif gradual is not None:
            causes.append(gradual)
        elif len(points):  # a CI metric: its runs' commits, as for a code change
            causes.append(_commit_cause(points, members, index,
                                        _spread(points, at, "run_node_id", magnitude), per_test=False))
        causes += _co_moving(incident, members, changes, correlations)
        ranked = sorted((c for c in causes if c is not None), key=lambda c: -c["score"])[:_MAX_CAUSES]
        rows += [{"incident_id": incident.incident_id, "rank": rank, **cause}
                 for rank, cause in enumerate(ranked, start=1)]
    return pd.DataFrame(rows, columns=CAUSE_COLUMNS)

"""The monitoring job: profile and drift metrics of the latest windows, written to the
`monitor_profile` and `monitor_drift` Iceberg tables.

Each run recomputes `monitor.recompute_windows` windows of every granularity (the open one
included) and replaces their rows in one overwrite per table, keyed by `window_id`: re-running
a window never duplicates it, and late audit rows are counted on the next run.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from ragstream.infra.audit.query import read_between
from ragstream.infra.audit.tables import (
    ALERTS,
    INFERENCE_LOG,
    MONITOR_DRIFT,
    MONITOR_PROFILE,
)
from ragstream.infra.embedder import Embedder
from ragstream.infra.monitor.alerts import AlertStatus, Measured, transitions
from ragstream.infra.monitor.drift import centroid_cosine_distance, population_stability_index
from ragstream.infra.monitor.profile import PROFILE_SOURCES, ProfileValue, profile_values
from ragstream.infra.monitor.windows import Window, latest_windows, window_containing
from ragstream.infra.settings import AlertRule, Settings
from ragstream.schemas.alerts import AlertChanged
from ragstream.schemas.errors import DependencyUnavailable, RagstreamError

__all__ = ["MonitorReport", "firing_alerts", "run_monitor", "windows_to_compute"]

log = logging.getLogger(__name__)


@dataclass
class MonitorReport:
    """What one run computed."""

    windows: list[str] = field(default_factory=list)
    profile_rows: int = 0
    drift_rows: int = 0
    requests_read: int = 0
    questions_embedded: int = 0
    alerts: list[str] = field(default_factory=list)
    """The alert changes of this run, `<rule>: firing|resolved`."""
    elapsed_s: float = 0.0


def windows_to_compute(settings: Settings, now: datetime) -> list[Window]:
    """The windows one run recomputes: the latest `recompute_windows` of each granularity."""
    out: list[Window] = []
    for length_s in settings.monitor.granularities_s:
        out += latest_windows(length_s, now, settings.monitor.recompute_windows)
    return out


def _baseline(settings: Settings) -> tuple[datetime, datetime] | None:
    m = settings.monitor
    if m.baseline_start_at is None or m.baseline_end_at is None:
        return None
    return datetime.fromisoformat(m.baseline_start_at), datetime.fromisoformat(m.baseline_end_at)


def _read(catalog: Any, settings: Settings, name: str, start: datetime, end: datetime) -> Any:
    """The source table's monitoring columns for rows in [start, end) (by its event time)."""
    return read_between(catalog, settings, name, PROFILE_SOURCES[name], start, end)


def _values(column: Any) -> npt.NDArray[np.float64]:
    """A fetched numeric column without its nulls (fetched as NaN)."""
    values: npt.NDArray[np.float64] = np.asarray(column, dtype=np.float64)
    return values[~np.isnan(values)]


def _sample(request_ids: Sequence[str], limit: int) -> list[int]:
    """Indices of a stable sample of at most `limit` requests: the smallest hashes of their ids."""
    if len(request_ids) <= limit:
        return list(range(len(request_ids)))
    keyed = sorted(
        range(len(request_ids)),
        key=lambda i: hashlib.blake2b(request_ids[i].encode(), digest_size=8).digest(),
    )
    return sorted(keyed[:limit])


class _Sides:
    """Per-window values of one slice, looked up by window bounds, with embeddings cached."""

    def __init__(self, con: Any, embedder: Embedder | None, limit: int) -> None:
        self._con = con
        self._embedder = embedder
        self._limit = limit
        self._vectors: dict[str, npt.NDArray[np.float32]] = {}
        self.embedded = 0

    def rows(self, start: datetime, end: datetime, tenant: str) -> dict[str, Any]:
        tenant_filter = "" if tenant == "*" else "AND coalesce(tenant, 'unknown') = ?"
        params: list[Any] = [start, end] + ([] if tenant == "*" else [tenant])
        where = f"FROM inference_log WHERE submitted_at >= ? AND submitted_at < ? {tenant_filter}"
        # Numbers as arrays, never as a Python tuple per row (a window can hold millions).
        numbers = self._con.execute(
            f"""SELECT coalesce(CASE WHEN status = 'ok' THEN length(coalesce(answer, '')) END::DOUBLE,
                                'NaN'::DOUBLE) AS chars,
                       coalesce(list_extract(retrieved_scores, 1)::DOUBLE, 'NaN'::DOUBLE) AS top,
                       (question IS NOT NULL AND question <> '') AS asked
                {where}""",
            params,
        ).fetchnumpy()
        chars, top = _values(numbers["chars"]), _values(numbers["top"])
        asked = int(np.asarray(numbers["asked"], dtype=bool).sum()) if len(numbers["asked"]) else 0
        # Only the questions query drift embeds: a stable sample by request id, in SQL.
        requests: list[tuple[str, str]] = []
        if self._embedder is not None and asked:
            requests = self._con.execute(
                f"""SELECT request_id, question {where} AND question IS NOT NULL AND question <> ''
                    ORDER BY md5(request_id), request_id LIMIT {int(self._limit)}""",
                params,
            ).fetchall()
        judged = self._con.execute(
            f"""SELECT avg(CASE WHEN rating = 'yes' THEN 1.0 WHEN rating = 'no' THEN 0.0 END), count(rating)
                FROM judgements WHERE source = 'stream' AND judge = 'overall'
                AND judged_at >= ? AND judged_at < ? {tenant_filter}""",
            params,
        ).fetchone()
        return {
            "asked": asked,
            "requests": requests,
            "answer_chars": chars,
            "top_scores": top,
            "pass_rate": judged[0] if judged else None,
            "judged": int(judged[1]) if judged else 0,
        }

    async def vectors(self, requests: list[tuple[str, str]]) -> npt.NDArray[np.float32]:
        if self._embedder is None or not requests:
            return np.zeros((0, 1), dtype=np.float32)
        chosen = [requests[i] for i in _sample([r[0] for r in requests], self._limit)]
        missing = [(rid, q) for rid, q in chosen if rid not in self._vectors]
        if missing:
            try:
                embedded = await self._embedder.embed([q for _, q in missing])
            except RagstreamError as exc:
                # Query drift is null for the rest of this run; the other metrics go on.
                log.warning("query drift skipped: embedding failed (%s)", exc)
                self._embedder = None
                return np.zeros((0, 1), dtype=np.float32)
            self.embedded += len(missing)
            for (rid, _), vector in zip(missing, embedded, strict=True):
                self._vectors[rid] = vector
        return np.stack([self._vectors[rid] for rid, _ in chosen])


async def _drift_rows(
    con: Any,
    windows: Sequence[Window],
    baseline: tuple[datetime, datetime] | None,
    embedder: Embedder | None,
    settings: Settings,
    computed_at: datetime,
    now: datetime,
) -> tuple[list[dict[str, Any]], int]:
    sides = _Sides(con, embedder, settings.monitor.max_drift_questions)
    tenants = ["*"] + [
        r[0]
        for r in con.execute(
            "SELECT DISTINCT coalesce(tenant, 'unknown') FROM inference_log ORDER BY 1"
        ).fetchall()
    ]
    model = embedder.model_id if embedder is not None else None
    bins = settings.monitor.psi_bins
    out: list[dict[str, Any]] = []
    for window in windows:
        comparisons = [("previous", window.previous().start, window.start)]
        if baseline is not None:
            comparisons.append(("baseline", *baseline))
        for tenant in tenants:
            cur = sides.rows(window.start, window.end, tenant)
            if not cur["asked"] and tenant != "*":
                continue
            for comparison, b_start, b_end in comparisons:
                base = sides.rows(b_start, b_end, tenant)
                key = {
                    **_key(window, tenant, "*", computed_at, now),
                    "comparison": comparison,
                    "baseline_start": b_start,
                    "baseline_end": b_end,
                }
                cur_v = await sides.vectors(cur["requests"])
                base_v = await sides.vectors(base["requests"])
                values: list[tuple[str, str, float | None, int, int, str | None]] = [
                    (
                        "query_embedding",
                        "centroid_cosine_distance",
                        centroid_cosine_distance(cur_v, base_v) if embedder is not None else None,
                        len(cur_v),
                        len(base_v),
                        model,
                    ),
                    (
                        "answer_chars",
                        "psi",
                        population_stability_index(cur["answer_chars"], base["answer_chars"], bins),
                        len(cur["answer_chars"]),
                        len(base["answer_chars"]),
                        None,
                    ),
                    (
                        "retrieval_top_score",
                        "psi",
                        population_stability_index(cur["top_scores"], base["top_scores"], bins),
                        len(cur["top_scores"]),
                        len(base["top_scores"]),
                        None,
                    ),
                    (
                        "judge_pass",
                        "delta",
                        None
                        if cur["pass_rate"] is None or base["pass_rate"] is None
                        else float(cur["pass_rate"]) - float(base["pass_rate"]),
                        cur["judged"],
                        base["judged"],
                        None,
                    ),
                ]
                for metric, stat, value, n, n_base, m in values:
                    out.append(
                        {
                            **key,
                            "metric": metric,
                            "label": "overall" if metric == "judge_pass" else "",
                            "stat": stat,
                            "value": value,
                            "sample_count": n,
                            "baseline_count": n_base,
                            "model": m,
                        }
                    )
    return out, sides.embedded


def _key(window: Window, tenant: str, route: str, computed_at: datetime, now: datetime) -> dict[str, Any]:
    return {
        "window_id": window.window_id,
        "granularity": window.granularity,
        "window_start": window.start,
        "window_end": window.end,
        "complete": window.complete_at(now),
        "tenant": tenant,
        "route": route,
        "computed_at": computed_at,
        "event_date": window.start.date(),
    }


def _committed(fn: Callable[[], None]) -> None:
    """Run a commit, again on a conflict (a second writer, e.g. `ragstream monitor run` beside
    the stack's monitor, committed first): each attempt reloads the table."""
    from pyiceberg.exceptions import CommitFailedException
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random

    for attempt in Retrying(
        stop=stop_after_attempt(5),
        wait=wait_random(0.05, 0.5),
        retry=retry_if_exception_type(CommitFailedException),
        reraise=True,
    ):
        with attempt:
            fn()


def _overwrite(
    catalog: Any, settings: Settings, name: str, rows: list[dict[str, Any]], window_ids: list[str]
) -> None:
    from ragstream.infra.audit.buffer import rows_to_arrow

    def commit() -> None:
        table = catalog.load_table((settings.iceberg.namespace, name))
        data = rows_to_arrow(rows, table.schema().as_arrow())
        with warnings.catch_warnings():
            # A window computed for the first time has nothing to replace: not worth a warning.
            warnings.filterwarnings("ignore", message="Delete operation did not match any records")
            # Window ids are made here (`granularity:ISO time`), never from input: safe to quote.
            table.overwrite(
                data, overwrite_filter="window_id IN (" + ", ".join(f"'{w}'" for w in window_ids) + ")"
            )

    _committed(commit)


async def run_monitor(
    settings: Settings,
    *,
    now: datetime | None = None,
    windows: Sequence[Window] | None = None,
    embedder: Embedder | None = None,
    on_alerts: Callable[[list[AlertChanged]], Awaitable[None]] | None = None,
) -> MonitorReport:
    """Compute and write the profile and drift rows of `windows` (default: `windows_to_compute`),
    then evaluate `monitor.alerts` (only for a run of the latest windows, not for a given range).

    `embedder` embeds questions for query drift (None: that drift is null). It must be started.
    `on_alerts` gets the alert changes first (to publish them); only when it returns are they
    written to the `alerts` table, which holds each alert's state. If it raises, the next run
    finds the same changes again, with the same event ids.

    Raises:
        DependencyUnavailable: the catalog or a table cannot be read or written.
    """
    import duckdb

    from ragstream.infra.audit.creation import ensure_tables
    from ragstream.infra.iceberg import open_catalog

    started = time.monotonic()
    now = now or datetime.now(UTC)
    latest = windows is None
    windows = list(windows) if windows is not None else windows_to_compute(settings, now)
    if not windows:
        return MonitorReport()
    baseline = _baseline(settings)
    rules = settings.monitor.alerts if latest else {}
    # Profile rules look at the last window_s seconds, and relative ones at the window_s before.
    sliding = sorted({r.window_s for r in rules.values() if r.table == "profile"})
    # Drift compares each window with the one before it, so that one is read too.
    lo = min([w.previous().start for w in windows] + [now - timedelta(seconds=2 * s) for s in sliding])
    hi = max(w.end for w in windows)
    if baseline is not None:
        lo, hi = min(lo, baseline[0]), max(hi, baseline[1])
    catalog = open_catalog(settings)
    try:
        ensure_tables(settings, catalog, names=[MONITOR_PROFILE, MONITOR_DRIFT, ALERTS])
        sources = {name: _read(catalog, settings, name, lo, hi) for name in PROFILE_SOURCES}
    except DependencyUnavailable:
        raise
    except Exception as exc:  # catalog transport, missing files
        raise DependencyUnavailable(f"monitoring cannot read the audit tables: {exc}") from exc

    computed_at = datetime.now(UTC)
    con = duckdb.connect()
    try:
        for name, arrow in sources.items():
            con.register(name, arrow)
        values = profile_values(con, windows, now)
        drift, embedded = await _drift_rows(con, windows, baseline, embedder, settings, computed_at, now)
        slide_windows = [Window(s, now - timedelta(seconds=s)) for s in sliding]
        slide_windows += [w.previous() for w in slide_windows]
        slide_values = profile_values(con, slide_windows, now) if slide_windows else []
    finally:
        con.close()
    by_id = {w.window_id: w for w in windows}
    profile = [
        {
            **_key(by_id[wid], tenant, route, computed_at, now),
            "metric": metric,
            "stat": stat,
            "label": label,
            "value": value,
            "sample_count": count,
        }
        for wid, tenant, route, metric, stat, label, value, count in values
    ]
    ids = [w.window_id for w in windows]
    try:
        _overwrite(catalog, settings, MONITOR_PROFILE, profile, ids)
        _overwrite(catalog, settings, MONITOR_DRIFT, drift, ids)
    except Exception as exc:  # commit conflicts, catalog transport
        raise DependencyUnavailable(f"monitoring cannot write its tables: {exc}") from exc
    changes: list[AlertChanged] = []
    if rules:
        measured = _measure(rules, slide_values, drift, now)
        changes = transitions(rules, measured, _alert_states(catalog, settings), now)
        if changes:
            if on_alerts is not None:
                await on_alerts(changes)
            _append_alerts(catalog, settings, changes, measured)
    report = MonitorReport(
        windows=ids,
        profile_rows=len(profile),
        drift_rows=len(drift),
        requests_read=sources[INFERENCE_LOG].num_rows,
        questions_embedded=embedded,
        alerts=[f"{c.rule}: {c.state}" for c in changes],
        elapsed_s=time.monotonic() - started,
    )
    log.info(
        "monitoring: %d windows, %d profile and %d drift rows from %d requests in %.2f s",
        len(ids),
        report.profile_rows,
        report.drift_rows,
        report.requests_read,
        report.elapsed_s,
    )
    return report


def _measure(
    rules: Mapping[str, AlertRule],
    slide_values: list[ProfileValue],
    drift: list[dict[str, Any]],
    now: datetime,
) -> dict[str, Measured]:
    """Each rule's value: profile rules on the last `window_s` seconds (divided by the window
    before for relative rules), drift rules on the latest window of `window_s`."""
    profile = {(v[0], v[1], v[2], v[3], v[4], v[5]): (v[6], v[7]) for v in slide_values}
    drifts = {
        (d["window_id"], d["tenant"], d["route"], d["metric"], d["stat"], d["label"], d["comparison"]): d
        for d in drift
    }
    out: dict[str, Measured] = {}
    for name, rule in rules.items():
        if rule.table == "drift":
            wid = window_containing(rule.window_s, now).window_id
            row = drifts.get(
                (wid, rule.tenant, rule.route, rule.metric, rule.stat, rule.label, rule.comparison)
            )
            out[name] = Measured(
                None if row is None else row["value"],
                0 if row is None else int(row["sample_count"] or 0),
                wid,
            )
            continue
        current = Window(rule.window_s, now - timedelta(seconds=rule.window_s))
        key = (rule.tenant, rule.route, rule.metric, rule.stat, rule.label)
        value, count = profile.get((current.window_id, *key), (None, 0))
        if rule.relative_to_previous:
            before, _ = profile.get((current.previous().window_id, *key), (None, 0))
            value = None if value is None or not before else value / before
        out[name] = Measured(value, count, f"last {rule.window_s}s to {now.strftime('%Y-%m-%dT%H:%M:%SZ')}")
    return out


def firing_alerts(settings: Settings) -> set[str]:
    """The configured rules whose alert is firing, by the alerts table (which holds each
    alert's state across restarts).

    Raises:
        DependencyUnavailable: the catalog cannot be read.
    """
    from ragstream.infra.audit.creation import ensure_tables
    from ragstream.infra.iceberg import open_catalog
    from ragstream.infra.monitor.alerts import alert_id

    ensure_tables(settings, names=[ALERTS])
    states = _alert_states(open_catalog(settings), settings)
    return {
        name
        for name, rule in settings.monitor.alerts.items()
        if (status := states.get(alert_id(name, rule))) is not None and status.state == "firing"
    }


def _alert_states(catalog: Any, settings: Settings) -> dict[str, AlertStatus]:
    """Each alert's latest state, from the alerts table."""
    table = catalog.load_table((settings.iceberg.namespace, ALERTS))
    rows = table.scan(selected_fields=("alert_id", "state", "since", "changed_at")).to_arrow().to_pylist()
    latest: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["changed_at"]):
        latest[row["alert_id"]] = row
    return {aid: AlertStatus(r["state"], r["since"]) for aid, r in latest.items()}


def _append_alerts(
    catalog: Any, settings: Settings, changes: list[AlertChanged], measured: Mapping[str, Measured]
) -> None:
    from ragstream.infra.audit.buffer import rows_to_arrow

    rows = [
        {
            "changed_at": c.produced_at,
            "alert_id": c.alert_id,
            "rule": c.rule,
            "state": c.state,
            "severity": c.severity,
            "slice_tenant": c.slice_tenant,
            "slice_route": c.slice_route,
            "metric": c.metric,
            "stat": c.stat,
            "label": c.label,
            "window_id": c.window_id,
            "value": c.value,
            "sample_count": measured[c.rule].sample_count if c.rule in measured else None,
            "threshold": c.threshold,
            "condition": c.condition,
            "message": c.message,
            "since": c.since,
            "event_id": c.event_id,
            "event_date": c.produced_at.date(),
        }
        for c in changes
    ]
    try:

        def commit() -> None:
            table = catalog.load_table((settings.iceberg.namespace, ALERTS))
            table.append(rows_to_arrow(rows, table.schema().as_arrow()))

        _committed(commit)
    except Exception as exc:  # commit conflicts, catalog transport
        raise DependencyUnavailable(f"monitoring cannot write the alerts table: {exc}") from exc

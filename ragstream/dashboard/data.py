"""What each dashboard page shows, read from the Iceberg audit and metric tables.

There is no second store: each page reads the columns it needs from the day partitions its
time range touches (`read_between`), and aggregates them with DuckDB. A read is reused while
the table's current snapshot is unchanged, so reloading a page costs only the aggregation.

Every read is scoped to what the viewer may see (`Scope`): an admin sees every tenant, any
other viewer only their own tenant, and only their own requests in the request explorer.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ragstream.dashboard.params import TimeRange
from ragstream.infra.audit.query import TIME_COLUMNS, read_between
from ragstream.infra.audit.tables import (
    ALERTS,
    DEAD_LETTERS,
    GUARDRAIL_VERDICTS,
    INFERENCE_LOG,
    JUDGEMENTS,
)
from ragstream.infra.settings import Settings
from ragstream.schemas.errors import DependencyUnavailable, Forbidden, InvalidParameter, NotFound
from ragstream.schemas.ids import IDENTIFIER_RE

__all__ = ["PageData", "Scope", "Warehouse"]

_CACHE_ENTRIES = 32
_CACHE_BYTES = 512 * 2**20
"""Reads kept at most (Arrow bytes), oldest dropped first: a few full-day reads of a busy
stack, not every range anyone ever opened."""


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose data a viewer may see."""

    viewer: str
    tenant: str | None
    """None: every tenant (admin); otherwise the viewer's own tenant only."""
    user: str | None = None
    """Set for non-admin viewers: the request explorer shows only their own requests."""

    @property
    def admin(self) -> bool:
        return self.tenant is None


@dataclass
class PageData:
    """Numbers, series and rows for one page; the template lays them out."""

    kpis: dict[str, Any] = field(default_factory=dict)
    series: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class Warehouse:
    """Reads for the pages. Thread-safe: pages run their reads in worker threads."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._catalog: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[Any, ...], tuple[float, Any, Any]] = OrderedDict()

    # -- reading -----------------------------------------------------------------------
    def _catalog_or_raise(self) -> Any:
        from ragstream.infra.iceberg import open_catalog

        with self._lock:
            if self._catalog is None:
                self._catalog = open_catalog(self._settings)
            return self._catalog

    def _snapshot_id(self, name: str) -> int | None:
        catalog = self._catalog_or_raise()
        ident = (self._settings.iceberg.namespace, name)
        try:
            if not catalog.table_exists(ident):
                return None
            snapshot = catalog.load_table(ident).current_snapshot()
        except Exception as exc:  # catalog transport errors
            raise DependencyUnavailable(f"cannot load audit table {name}: {exc}") from exc
        return None if snapshot is None else int(snapshot.snapshot_id)

    def read(self, name: str, columns: Sequence[str], rng: TimeRange, tenant: str | None) -> Any:
        """Arrow rows of `name` in the range (one tenant's, when given), cached per snapshot."""
        key = (name, tuple(columns), rng.start, rng.end, tenant)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self._settings.dashboard.cache_s:
            return hit[2]
        snapshot = self._snapshot_id(name)
        if hit is not None and hit[1] == snapshot:
            with self._lock:
                self._cache[key] = (now, snapshot, hit[2])
                self._cache.move_to_end(key)
            return hit[2]
        table = read_between(
            self._catalog_or_raise(), self._settings, name, tuple(columns), rng.start, rng.end, tenant=tenant
        )
        with self._lock:
            self._cache[key] = (now, snapshot, table)
            self._cache.move_to_end(key)
            while len(self._cache) > 1 and (
                len(self._cache) > _CACHE_ENTRIES
                or sum(int(entry[2].nbytes) for entry in self._cache.values()) > _CACHE_BYTES
            ):
                self._cache.popitem(last=False)
        return table

    @contextmanager
    def _con(
        self, rng: TimeRange, scope: Scope, tenant: str | None, **tables: Sequence[str]
    ) -> Iterator[Any]:
        """A DuckDB connection with each named table registered (in range and scope), closed
        on leaving."""
        import duckdb

        if scope.tenant is not None and tenant not in (None, "", scope.tenant):
            raise Forbidden(f"tenant={tenant!r}: this token sees only tenant {scope.tenant!r}")
        wanted = scope.tenant or (tenant or None)
        con = duckdb.connect()
        try:
            con.execute("SET TimeZone = 'UTC'")
            for name, columns in tables.items():
                arrow = self.read(name, columns, rng, wanted if name != ALERTS else None)
                con.register(name, arrow)
            yield con
        finally:
            con.close()

    @staticmethod
    def _rows(con: Any, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = con.execute(sql, list(params))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    # -- pages -------------------------------------------------------------------------
    def overview(self, rng: TimeRange, scope: Scope, tenant: str | None = None) -> PageData:
        with self._con(
            rng,
            scope,
            tenant,
            inference_log=(
                "submitted_at",
                "status",
                "total_tokens",
                "latency_total_ms",
                "latency_time_to_first_token_ms",
            ),
            usage=("event_time", "estimated_cost"),
            dead_letters=("event_time", "stage"),
        ) as con:
            page = PageData()
            kpi = self._rows(
                con,
                """SELECT count(*) AS requests,
                          count(*) FILTER (WHERE status = 'ok') AS ok,
                          count(*) FILTER (WHERE status = 'blocked') AS blocked,
                          count(*) FILTER (WHERE status = 'error') AS error,
                          count(*) FILTER (WHERE status = 'no_response') AS no_response,
                          quantile_cont(latency_total_ms, 0.5) AS latency_p50_ms,
                          quantile_cont(latency_total_ms, 0.95) AS latency_p95_ms,
                          quantile_cont(latency_time_to_first_token_ms, 0.5) AS ttft_p50_ms,
                          coalesce(sum(total_tokens), 0) AS total_tokens
                   FROM inference_log""",
            )[0]
            kpi["estimated_cost"] = con.execute(
                "SELECT coalesce(sum(estimated_cost), 0) FROM usage"
            ).fetchone()[0]
            kpi["dead_letters"] = con.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
            page.kpis = kpi
            b = rng.bucket_s
            # One pass over the rows for every per-bucket series.
            buckets = self._rows(
                con,
                f"""SELECT time_bucket(INTERVAL {b} SECOND, submitted_at) AS t,
                           count(*) FILTER (WHERE status = 'ok') AS ok,
                           count(*) FILTER (WHERE status = 'blocked') AS blocked,
                           count(*) FILTER (WHERE status = 'error') AS error,
                           count(*) FILTER (WHERE status = 'no_response') AS no_response,
                           quantile_cont(latency_total_ms, [0.5, 0.95]) AS total_q,
                           quantile_cont(latency_time_to_first_token_ms, 0.5) AS ttft_p50,
                           coalesce(sum(total_tokens), 0) AS tokens
                    FROM inference_log GROUP BY ALL ORDER BY t""",
            )
            page.series["by_status"] = [
                {"t": r["t"], "status": status, "n": r[status]}
                for r in buckets
                for status in ("ok", "blocked", "error", "no_response")
                if r[status]
            ]
            page.series["latency"] = [
                {
                    "t": r["t"],
                    "p50": (r["total_q"] or [None, None])[0],
                    "p95": (r["total_q"] or [None, None])[1],
                    "ttft_p50": r["ttft_p50"],
                }
                for r in buckets
            ]
            page.series["tokens"] = [{"t": r["t"], "tokens": r["tokens"]} for r in buckets]
            page.series["cost"] = self._rows(
                con,
                f"""SELECT time_bucket(INTERVAL {b} SECOND, event_time) AS t, sum(estimated_cost) AS cost
                    FROM usage GROUP BY ALL ORDER BY t""",
            )
            page.series["dead_letters"] = self._rows(
                con,
                f"""SELECT time_bucket(INTERVAL {b} SECOND, event_time) AS t, stage, count(*) AS n
                    FROM dead_letters GROUP BY ALL ORDER BY t, stage""",
            )
            return page

    def guardrails(self, rng: TimeRange, scope: Scope, tenant: str | None = None) -> PageData:
        with self._con(
            rng,
            scope,
            tenant,
            guardrail_verdicts=(
                "event_time",
                "request_id",
                "tenant",
                "direction",
                "rail",
                "action",
                "category",
                "score",
                "detector",
                "latency_ms",
            ),
        ) as con:
            page = PageData()
            page.kpis = self._rows(
                con,
                """SELECT count(*) AS verdicts,
                          count(*) FILTER (WHERE action = 'block') AS blocks,
                          count(*) FILTER (WHERE action = 'mask') AS masks,
                          count(*) FILTER (WHERE action = 'flag') AS flags,
                          count(DISTINCT request_id) FILTER (WHERE action = 'block') AS blocked_requests,
                          quantile_cont(latency_ms, 0.95) AS latency_p95_ms
                   FROM guardrail_verdicts""",
            )[0]
            page.series["actions"] = self._rows(
                con,
                f"""SELECT time_bucket(INTERVAL {rng.bucket_s} SECOND, event_time) AS t, action, count(*) AS n
                    FROM guardrail_verdicts WHERE action <> 'allow' GROUP BY ALL ORDER BY t, action""",
            )
            page.series["categories"] = self._rows(
                con,
                """SELECT coalesce(category, rail) AS category, action, count(*) AS n
                   FROM guardrail_verdicts WHERE action <> 'allow' GROUP BY ALL ORDER BY n DESC LIMIT 40""",
            )
            page.tables["rails"] = self._rows(
                con,
                """SELECT direction, rail, count(*) AS verdicts,
                          count(*) FILTER (WHERE action = 'block') AS blocks,
                          count(*) FILTER (WHERE action = 'mask') AS masks,
                          count(*) FILTER (WHERE action = 'flag') AS flags,
                          round(quantile_cont(latency_ms, 0.5), 1) AS p50_ms
                   FROM guardrail_verdicts GROUP BY ALL ORDER BY direction, rail""",
            )
            page.tables["recent"] = self._rows(
                con,
                """SELECT event_time, request_id, tenant, direction, rail, action, category,
                          round(score, 3) AS score, detector
                   FROM guardrail_verdicts WHERE action <> 'allow'
                   ORDER BY event_time DESC LIMIT 25""",
            )
            return page

    def judges(self, rng: TimeRange, scope: Scope, tenant: str | None = None) -> PageData:
        with self._con(
            rng,
            scope,
            tenant,
            judgements=(
                "judged_at",
                "request_id",
                "judge",
                "rating",
                "error",
                "root_cause",
                "rationale",
                "source",
                "route",
            ),
        ) as con:
            page = PageData()
            live = "source = 'stream'"
            page.kpis = self._rows(
                con,
                f"""SELECT count(*) AS judgements,
                           count(DISTINCT request_id) AS judged_requests,
                           avg(CASE WHEN rating = 'yes' THEN 1.0 WHEN rating = 'no' THEN 0.0 END)
                               FILTER (WHERE judge = 'overall') AS overall_pass_rate,
                           count(error) AS errors
                    FROM judgements WHERE {live}""",
            )[0]
            page.series["pass_rate"] = self._rows(
                con,
                f"""SELECT time_bucket(INTERVAL {rng.bucket_s} SECOND, judged_at) AS t, judge,
                           avg(CASE WHEN rating = 'yes' THEN 1.0 WHEN rating = 'no' THEN 0.0 END) AS pass_rate,
                           count(rating) AS n
                    FROM judgements WHERE {live} GROUP BY ALL ORDER BY t, judge""",
            )
            page.series["root_causes"] = self._rows(
                con,
                f"""SELECT root_cause, count(*) AS n FROM judgements
                    WHERE {live} AND judge = 'overall' AND rating = 'no' AND root_cause IS NOT NULL
                    GROUP BY ALL ORDER BY n DESC""",
            )
            page.tables["judges"] = self._rows(
                con,
                f"""SELECT judge, count(*) AS judgements,
                           count(*) FILTER (WHERE rating = 'yes') AS yes,
                           count(*) FILTER (WHERE rating = 'no') AS no,
                           count(error) AS errors,
                           round(avg(CASE WHEN rating = 'yes' THEN 1.0 WHEN rating = 'no' THEN 0.0 END), 3)
                               AS pass_rate
                    FROM judgements WHERE {live} GROUP BY ALL ORDER BY judge""",
            )
            page.tables["failures"] = self._rows(
                con,
                f"""SELECT judged_at, request_id, judge, coalesce(rating, 'error') AS rating,
                           coalesce(rationale, error) AS why
                    FROM judgements WHERE {live} AND (rating = 'no' OR error IS NOT NULL) AND judge <> 'overall'
                    ORDER BY judged_at DESC LIMIT 25""",
            )
            return page

    def usage(self, rng: TimeRange, scope: Scope, tenant: str | None = None) -> PageData:
        with self._con(
            rng,
            scope,
            tenant,
            usage=(
                "event_time",
                "tenant",
                "user",
                "route",
                "model_id",
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
                "estimated_cost",
            ),
        ) as con:
            page = PageData()
            page.kpis = self._rows(
                con,
                """SELECT count(*) AS responses, coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                          coalesce(sum(completion_tokens), 0) AS completion_tokens,
                          coalesce(sum(estimated_cost), 0) AS estimated_cost,
                          count(DISTINCT tenant) AS tenants, count(DISTINCT "user") AS users
                   FROM usage""",
            )[0]
            page.series["tokens_by_route"] = self._rows(
                con,
                f"""SELECT time_bucket(INTERVAL {rng.bucket_s} SECOND, event_time) AS t,
                           coalesce(route, 'unknown') AS route, coalesce(sum(total_tokens), 0) AS tokens
                    FROM usage GROUP BY ALL ORDER BY t, route""",
            )
            for key, dim in (("by_tenant", "tenant"), ("by_user", '"user"'), ("by_route", "route")):
                page.tables[key] = self._rows(
                    con,
                    f"""SELECT coalesce({dim}, 'unknown') AS name, count(*) AS responses,
                               coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                               coalesce(sum(completion_tokens), 0) AS completion_tokens,
                               round(coalesce(sum(estimated_cost), 0), 6) AS estimated_cost
                        FROM usage GROUP BY ALL ORDER BY estimated_cost DESC, responses DESC LIMIT 50""",
                )
            return page

    def drift(self, rng: TimeRange, scope: Scope, granularity: str, tenant: str | None = None) -> PageData:
        with self._con(
            rng,
            scope,
            tenant,
            monitor_drift=(
                "window_start",
                "granularity",
                "tenant",
                "route",
                "metric",
                "comparison",
                "stat",
                "value",
                "sample_count",
                "baseline_count",
                "computed_at",
            ),
        ) as con:
            page = PageData()
            # An admin's unfiltered view is the all-tenants slice; a tenant's view is its own.
            slice_tenant = (tenant or "*") if scope.admin else scope.tenant
            where = "granularity = ? AND tenant = ? AND route = '*'"
            params = [granularity, slice_tenant]
            page.series["drift"] = self._rows(
                con,
                f"""SELECT window_start AS t, metric || ' (' || stat || ', ' || comparison || ')' AS name, value
                    FROM monitor_drift WHERE {where} AND value IS NOT NULL ORDER BY t, name""",
                params,
            )
            page.tables["latest"] = self._rows(
                con,
                f"""SELECT metric, stat, comparison, arg_max(value, window_start) AS value,
                           arg_max(sample_count, window_start) AS samples,
                           arg_max(baseline_count, window_start) AS baseline_samples,
                           max(window_start) AS window_start
                    FROM monitor_drift WHERE {where} GROUP BY ALL ORDER BY metric, stat, comparison""",
                params,
            )
            page.kpis = {
                "windows": con.execute(
                    f"SELECT count(DISTINCT window_start) FROM monitor_drift WHERE {where}", params
                ).fetchone()[0]
            }
            return page

    def alerts(self, rng: TimeRange, scope: Scope, tenant: str | None = None) -> PageData:
        with self._con(
            rng,
            scope,
            tenant,
            alerts=(
                "changed_at",
                "alert_id",
                "rule",
                "state",
                "severity",
                "slice_tenant",
                "slice_route",
                "metric",
                "value",
                "threshold",
                "condition",
                "message",
                "since",
            ),
        ) as con:
            page = PageData()
            wanted = scope.tenant or (tenant or None)
            where, params = ("WHERE slice_tenant = ?", [wanted]) if wanted else ("", [])
            history = f"SELECT * FROM alerts {where}"
            page.tables["firing"] = self._rows(
                con,
                f"""SELECT alert_id, rule, severity, slice_tenant, slice_route, since, value, threshold,
                           condition, message FROM (
                        SELECT *, row_number() OVER (PARTITION BY alert_id ORDER BY changed_at DESC) AS k
                        FROM ({history})) WHERE k = 1 AND state = 'firing' ORDER BY since DESC""",
                params,
            )
            page.tables["history"] = self._rows(
                con,
                f"""SELECT changed_at, rule, state, severity, slice_tenant, slice_route, value, threshold, message
                    FROM ({history}) ORDER BY changed_at DESC LIMIT 100""",
                params,
            )
            page.series["changes"] = self._rows(
                con,
                f"""SELECT changed_at AS t, rule, state, severity FROM ({history}) ORDER BY t""",
                params,
            )
            page.kpis = {
                "firing": len(page.tables["firing"]),
                "changes": con.execute(f"SELECT count(*) FROM ({history})", params).fetchone()[0],
            }
            return page

    # -- request explorer ----------------------------------------------------------------
    def search(
        self,
        rng: TimeRange,
        scope: Scope,
        *,
        q: str = "",
        status: str = "",
        user: str = "",
        tenant: str | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Requests in range matching a request id, a user or words of the question or
        answer (case-insensitive), newest first."""
        with self._con(
            rng,
            scope,
            tenant,
            inference_log=(
                "request_id",
                "tenant",
                "user",
                "submitted_at",
                "status",
                "route",
                "question",
                "answer",
                "latency_total_ms",
                "total_tokens",
            ),
        ) as con:
            clauses, params = [], []
            if scope.user is not None:
                clauses.append('"user" = ?')
                params.append(scope.user)
            if user:
                clauses.append('"user" = ?')
                params.append(user)
            if status:
                clauses.append("status = ?")
                params.append(status)
            if q:
                clauses.append('(request_id = ? OR "user" = ? OR question ILIKE ? OR answer ILIKE ?)')
                like = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
                params += [q, q, like, like]
            where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
            rows = self._rows(
                con,
                f"""SELECT request_id, tenant, "user", submitted_at, status, route,
                           left(question, 160) AS question, round(latency_total_ms) AS latency_ms,
                           total_tokens
                    FROM inference_log {where} ORDER BY submitted_at DESC LIMIT {int(limit)}""",
                params,
            )
            return rows

    def trace(self, request_id: str, scope: Scope) -> dict[str, Any]:
        """Everything recorded about one request: its inference_log row, guardrail verdicts,
        judgements and dead letters.

        Raises:
            InvalidParameter: not a request id.
            NotFound: no such request, or not one this viewer may see.
        """
        if not IDENTIFIER_RE.fullmatch(request_id):
            raise InvalidParameter(f"{request_id[:64]!r} is not a request id")
        catalog = self._catalog_or_raise()
        ident = (self._settings.iceberg.namespace, INFERENCE_LOG)
        if not catalog.table_exists(ident):
            raise NotFound(f"no request {request_id}")
        table = catalog.load_table(ident)
        # Two reads: the day from two narrow columns, then the whole row from that day only.
        where = f"request_id = '{request_id}'"  # an identifier: no quote can be in it
        found = table.scan(row_filter=where, selected_fields=("request_id", "event_date")).to_arrow()
        if found.num_rows == 0:
            raise NotFound(f"no request {request_id}")
        days = sorted({d.isoformat() for d in found["event_date"].to_pylist()})
        rows = (
            table.scan(
                row_filter=f"request_id = '{request_id}' AND event_date >= '{days[0]}' AND event_date <= '{days[-1]}'"
            )
            .to_arrow()
            .to_pylist()
        )
        rows = [r for r in rows if scope.tenant is None or r.get("tenant") == scope.tenant]
        rows = [r for r in rows if scope.user is None or r.get("user") == scope.user]
        if not rows:
            raise NotFound(f"no request {request_id}")
        # A no_response row and a late real response can both exist: the real one wins.
        rows.sort(key=lambda r: (r.get("status") != "no_response", r.get("logged_at") or datetime.min))
        row = rows[-1]
        submitted: datetime = row["submitted_at"]
        start = submitted.replace(hour=0, minute=0, second=0, microsecond=0)
        from datetime import timedelta

        rng = TimeRange(start=start, end=start + timedelta(days=3), bucket_s=3600, label="")

        def related(name: str) -> list[dict[str, Any]]:
            arrow = self.read(name, _RELATED[name], rng, row.get("tenant"))
            import pyarrow.compute as pc

            picked = arrow.filter(pc.equal(arrow["request_id"], request_id)).to_pylist()
            return sorted(picked, key=lambda r: r[TIME_COLUMNS[name]])

        return {
            "row": row,
            "verdicts": related(GUARDRAIL_VERDICTS),
            "judgements": related(JUDGEMENTS),
            "dead_letters": related(DEAD_LETTERS),
        }


_RELATED: dict[str, tuple[str, ...]] = {
    GUARDRAIL_VERDICTS: (
        "event_time",
        "request_id",
        "policy",
        "direction",
        "rail",
        "action",
        "category",
        "score",
        "detector",
        "latency_ms",
        "output_window",
        "error",
    ),
    JUDGEMENTS: (
        "judged_at",
        "request_id",
        "judge",
        "judge_version",
        "implementation",
        "model",
        "rating",
        "score",
        "rationale",
        "error",
        "root_cause",
        "latency_ms",
        "source",
    ),
    DEAD_LETTERS: ("event_time", "request_id", "stage", "error_kind", "message"),
}

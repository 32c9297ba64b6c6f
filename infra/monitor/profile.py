"""Profile metrics per window and slice, computed with DuckDB over Arrow reads of the audit
tables. Pure computation: the caller reads the tables and writes the rows.

Every profile row is keyed by (window, tenant, route, metric, stat, label). Slices are the
whole stream (`tenant = route = '*'`), each tenant (`route = '*'`) and each tenant and route,
from one GROUPING SETS query per source table. A tenant or route the audit row lacks is
`unknown`.

| metric | stat | label | from |
| --- | --- | --- | --- |
| requests | count, per_min | | inference_log (by submitted_at) |
| status | rate | ok, error, blocked, no_response | inference_log |
| finish_reason | rate | no_context, fallback | inference_log |
| latency_<stage>_ms | p50, p95, p99 | | inference_log's latency columns |
| prompt_tokens, completion_tokens, total_tokens | sum | | inference_log |
| answer_chars | mean, p50 | | inference_log, answered requests |
| retrieval_top_score | mean, p50 | | inference_log, best retrieved score |
| audit_lag_ms | p50, p95 | | logged_at - completed_at: how far the audit sink is behind |
| estimated_cost | sum | | usage (by event_time) |
| guardrail_findings | count | the category (or rail) | guardrail_verdicts |
| guardrail_actions | count | flag, mask, block | guardrail_verdicts |
| judge_pass | rate | the judge, overall included | judgements (live, by judged_at) |
| judge_errors | count | the judge | judgements |
| judge_root_cause | count | the failing judge | judgements, overall = no |
| dead_letters | count, per_min | the stage ('' for all) | dead_letters (tenant slices only) |
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ragstream.infra.audit.columns import LATENCY_STAGES
from ragstream.infra.monitor.windows import Window

__all__ = ["PROFILE_SOURCES", "ProfileValue", "profile_values"]

PROFILE_SOURCES: dict[str, tuple[str, ...]] = {
    "inference_log": (
        "request_id",
        "tenant",
        "route",
        "submitted_at",
        "status",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "question",
        "answer",
        "retrieved_scores",
        "completed_at",
        "logged_at",
        *(f"latency_{stage}_ms" for stage in LATENCY_STAGES),
    ),
    "usage": ("request_id", "event_time", "tenant", "route", "estimated_cost"),
    "guardrail_verdicts": ("request_id", "event_time", "tenant", "rail", "action", "category"),
    "judgements": (
        "request_id",
        "judged_at",
        "tenant",
        "route",
        "judge",
        "rating",
        "error",
        "root_cause",
        "source",
    ),
    "dead_letters": ("event_time", "tenant", "stage"),
}
"""The columns each source table is read with (never the prompts or passages)."""

ProfileValue = tuple[str, str, str, str, str, str, float | None, int]
"""(window_id, tenant, route, metric, stat, label, value, sample_count)."""

_QUANTILES = ((0.5, "p50"), (0.95, "p95"), (0.99, "p99"))


def profile_values(con: Any, windows: Sequence[Window], now: datetime) -> list[ProfileValue]:
    """Every profile value of `windows`, from the tables registered on the DuckDB connection
    `con` under their audit names (Arrow tables with at least `PROFILE_SOURCES`' columns).
    Rates per minute of a window still open at `now` are over its elapsed part.
    """
    con.register(
        "monitor_windows",
        _windows_arrow(windows),
    )
    minutes = {w.window_id: max(1.0, (min(now, w.end) - w.start).total_seconds()) / 60.0 for w in windows}
    out: list[ProfileValue] = []
    out += _requests(con, minutes)
    out += _costs(con)
    out += _guardrails(con)
    out += _judges(con)
    out += _dead_letters(con, minutes)
    # Zero traffic is a value too: every window has its whole-stream request count.
    seen = {(v[0], v[1], v[2]) for v in out if v[3] == "requests"}
    for w in windows:
        if (w.window_id, "*", "*") not in seen:
            out.append((w.window_id, "*", "*", "requests", "count", "", 0.0, 0))
            out.append((w.window_id, "*", "*", "requests", "per_min", "", 0.0, 0))
    return out


def _windows_arrow(windows: Sequence[Window]) -> Any:
    import pyarrow as pa

    return pa.table(
        {
            "window_id": [w.window_id for w in windows],
            "window_start": pa.array([w.start for w in windows], pa.timestamp("us", tz="UTC")),
            "window_end": pa.array([w.end for w in windows], pa.timestamp("us", tz="UTC")),
        }
    )


def _slices(tenant: str = "tenant", route: str | None = "route") -> tuple[str, str]:
    """SELECT columns and GROUP BY for the whole stream, per tenant and per tenant+route."""
    if route is None:
        select = f"CASE WHEN grouping({tenant}) = 1 THEN '*' ELSE {tenant} END AS s_tenant, '*' AS s_route"
        group = f"GROUPING SETS ((window_id), (window_id, {tenant}))"
    else:
        select = (
            f"CASE WHEN grouping({tenant}) = 1 THEN '*' ELSE {tenant} END AS s_tenant, "
            f"CASE WHEN grouping({route}) = 1 THEN '*' ELSE {route} END AS s_route"
        )
        group = f"GROUPING SETS ((window_id), (window_id, {tenant}), (window_id, {tenant}, {route}))"
    return select, group


def _joined(table: str, time_column: str, extra_where: str = "") -> str:
    where = f" AND {extra_where}" if extra_where else ""
    return (
        f"SELECT w.window_id, coalesce(t.tenant, 'unknown') AS tenant_, t.* FROM {table} t "
        f"JOIN monitor_windows w ON t.{time_column} >= w.window_start AND t.{time_column} < w.window_end{where}"
    )


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def _requests(con: Any, minutes: dict[str, float]) -> list[ProfileValue]:
    latency = []
    for stage in LATENCY_STAGES:
        col = f"latency_{stage}_ms"
        latency.append(f"quantile_cont({col}, [0.5, 0.95, 0.99]) AS q_{stage}, count({col}) AS n_{stage}")
    select, group = _slices("tenant_", "route_")
    sql = f"""
        WITH r AS (
            SELECT *, coalesce(route, 'unknown') AS route_,
                   list_extract(retrieved_scores, 1) AS top_score,
                   CASE WHEN status = 'ok' THEN length(coalesce(answer, '')) END AS answer_chars,
                   epoch_ms(logged_at) - epoch_ms(coalesce(completed_at, submitted_at)) AS audit_lag_ms
            FROM ({_joined("inference_log", "submitted_at")})
        )
        SELECT window_id, {select},
               count(*) AS requests,
               avg(CASE WHEN status = 'ok' THEN 1 ELSE 0 END) AS ok_rate,
               avg(CASE WHEN status = 'error' THEN 1 ELSE 0 END) AS error_rate,
               avg(CASE WHEN status = 'blocked' THEN 1 ELSE 0 END) AS blocked_rate,
               avg(CASE WHEN status = 'no_response' THEN 1 ELSE 0 END) AS no_response_rate,
               avg(CASE WHEN finish_reason = 'no_context' THEN 1 ELSE 0 END) AS no_context_rate,
               avg(CASE WHEN starts_with(coalesce(finish_reason, ''), 'fallback') THEN 1 ELSE 0 END)
                   AS fallback_rate,
               sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
               sum(total_tokens) AS total_tokens, count(total_tokens) AS n_tokens,
               avg(answer_chars) AS answer_mean, quantile_cont(answer_chars, 0.5) AS answer_p50,
               count(answer_chars) AS n_answer,
               avg(top_score) AS score_mean, quantile_cont(top_score, 0.5) AS score_p50,
               count(top_score) AS n_score,
               quantile_cont(audit_lag_ms, [0.5, 0.95]) AS q_audit, count(audit_lag_ms) AS n_audit,
               {", ".join(latency)}
        FROM r GROUP BY {group}
    """
    out: list[ProfileValue] = []
    for row in con.execute(sql).fetchall():
        rec = dict(zip([d[0] for d in con.description], row, strict=True))
        key = (rec["window_id"], rec["s_tenant"], rec["s_route"])
        n = int(rec["requests"])

        def put(
            metric: str, stat: str, label: str, value: Any, count: int, key: tuple[str, str, str] = key
        ) -> None:
            out.append((*key, metric, stat, label, _num(value), count))

        put("requests", "count", "", n, n)
        put("requests", "per_min", "", n / minutes[key[0]], n)
        for status in ("ok", "error", "blocked", "no_response"):
            put("status", "rate", status, rec[f"{status}_rate"], n)
        put("finish_reason", "rate", "no_context", rec["no_context_rate"], n)
        put("finish_reason", "rate", "fallback", rec["fallback_rate"], n)
        for metric in ("prompt_tokens", "completion_tokens", "total_tokens"):
            put(metric, "sum", "", rec[metric] or 0, int(rec["n_tokens"]))
        put("answer_chars", "mean", "", rec["answer_mean"], int(rec["n_answer"]))
        put("answer_chars", "p50", "", rec["answer_p50"], int(rec["n_answer"]))
        put("retrieval_top_score", "mean", "", rec["score_mean"], int(rec["n_score"]))
        put("retrieval_top_score", "p50", "", rec["score_p50"], int(rec["n_score"]))
        for stat, value in zip(("p50", "p95"), rec["q_audit"] or [None, None], strict=True):
            put("audit_lag_ms", stat, "", value, int(rec["n_audit"]))
        for stage in LATENCY_STAGES:
            qs = rec[f"q_{stage}"] or [None, None, None]
            for (_, stat), value in zip(_QUANTILES, qs, strict=True):
                put(f"latency_{stage}_ms", stat, "", value, int(rec[f"n_{stage}"]))
    return out


def _costs(con: Any) -> list[ProfileValue]:
    select, group = _slices("tenant_", "route_")
    sql = f"""
        WITH r AS (SELECT *, coalesce(route, 'unknown') AS route_ FROM ({_joined("usage", "event_time")}))
        SELECT window_id, {select}, sum(estimated_cost) AS cost, count(estimated_cost) AS n
        FROM r GROUP BY {group}
    """
    return [
        (w, t, r, "estimated_cost", "sum", "", _num(cost), int(n))
        for w, t, r, cost, n in con.execute(sql).fetchall()
    ]


def _guardrails(con: Any) -> list[ProfileValue]:
    select, group = _slices("tenant_", "route_")
    out: list[ProfileValue] = []
    for metric, label in (
        ("guardrail_findings", "coalesce(category, rail)"),
        ("guardrail_actions", "action"),
    ):
        sql = f"""
            WITH routes AS (SELECT request_id, any_value(route) AS route FROM inference_log GROUP BY request_id),
            r AS (
                SELECT g.*, coalesce(routes.route, 'unknown') AS route_, {label} AS label_
                FROM ({_joined("guardrail_verdicts", "event_time", "t.action <> 'allow'")}) g
                LEFT JOIN routes ON routes.request_id = g.request_id
            )
            SELECT window_id, {select}, label_, count(*) AS n
            FROM r GROUP BY {group.replace("(window_id", "(window_id, label_")}
        """
        out += [
            (w, t, r, metric, "count", str(label_), float(n), int(n))
            for w, t, r, label_, n in con.execute(sql).fetchall()
        ]
    return out


def _judges(con: Any) -> list[ProfileValue]:
    select, group = _slices("tenant_", "route_")
    base = f"""
        WITH r AS (
            SELECT *, coalesce(route, 'unknown') AS route_
            FROM ({_joined("judgements", "judged_at", "t.source = 'stream'")})
        )
    """
    by_judge = group.replace("(window_id", "(window_id, judge")
    out: list[ProfileValue] = []
    sql = f"""{base}
        SELECT window_id, {select}, judge,
               avg(CASE WHEN rating = 'yes' THEN 1.0 WHEN rating = 'no' THEN 0.0 END) AS pass_rate,
               count(rating) AS rated, count(error) AS errors
        FROM r GROUP BY {by_judge}
    """
    for w, t, r, judge, pass_rate, rated, errors in con.execute(sql).fetchall():
        out.append((w, t, r, "judge_pass", "rate", judge, _num(pass_rate), int(rated)))
        out.append((w, t, r, "judge_errors", "count", judge, float(errors), int(errors)))
    by_cause = group.replace("(window_id", "(window_id, root_cause")
    sql = f"""{base}
        SELECT window_id, {select}, root_cause, count(*) FROM r
        WHERE judge = 'overall' AND rating = 'no' AND root_cause IS NOT NULL
        GROUP BY {by_cause}
    """
    for w, t, r, cause, n in con.execute(sql).fetchall():
        out.append((w, t, r, "judge_root_cause", "count", cause, float(n), int(n)))
    return out


def _dead_letters(con: Any, minutes: dict[str, float]) -> list[ProfileValue]:
    select, group = _slices("tenant_", None)
    out: list[ProfileValue] = []
    sql = f"SELECT window_id, {select}, count(*) FROM ({_joined('dead_letters', 'event_time')}) GROUP BY {group}"
    for w, t, r, n in con.execute(sql).fetchall():
        out.append((w, t, r, "dead_letters", "count", "", float(n), int(n)))
        out.append((w, t, r, "dead_letters", "per_min", "", n / minutes[w], int(n)))
    by_stage = group.replace("(window_id", "(window_id, stage")
    sql = f"SELECT window_id, {select}, stage, count(*) FROM ({_joined('dead_letters', 'event_time')}) GROUP BY {by_stage}"
    for w, t, r, stage, n in con.execute(sql).fetchall():
        out.append((w, t, r, "dead_letters", "count", stage, float(n), int(n)))
    return out

"""The audit tables, registered explicitly: what each holds, what it reads, which sink writes it.

Five Iceberg (format v2) tables under `settings.iceberg.namespace`, each partitioned by the
day of its event time:

- `inference_log`: one row per request (see `rows.inference_row` / `rows.no_response_row`).
  A request whose `ResponseCompleted` has not reached the sink by its deadline +
  `audit.join_grace_s` gets a row with `status = 'no_response'` (question, user, submission
  time; no answer); a response arriving after that is dropped from this table (counted,
  logged), so every request id has exactly one row.
- `usage`: one row per `ResponseCompleted` (one per request that got a response): tokens and
  an estimated cost. A request that never got a response spent nothing we can account for
  and has no usage row; a response that arrived too late for `inference_log` (which then
  says `no_response`) still has one, because its tokens were spent.
- `ingestion_log`: one row per `DocumentIndexed` and per document-path dead letter.
- `dead_letters`: one row per `DeadLettered`.
- `guardrail_verdicts`: one row per guardrail verdict that acted (flag, mask, block, or a
  detector error) of each request with a policy, from its final response, exactly once per
  request id like `usage`. Spans and categories only, never the text.
- `judgements`: one row per (request, judge, judge version, source) from the `judgements`
  topic: the judge stage's live judgements and `ragstream judge backfill`'s re-judgements.

Their columns are in `columns`, their rows are built by `rows`, and `creation` makes them
exist. Each table has one committer: `sink_groups` splits the tables between sink processes
(`audit.sinks`), every table in exactly one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from ragstream.infra.audit.columns import (
    alert_schema,
    dead_letter_schema,
    evaluation_schema,
    guardrail_schema,
    inference_schema,
    ingestion_schema,
    judgement_schema,
    monitor_drift_schema,
    monitor_profile_schema,
    usage_schema,
)
from ragstream.infra.settings import AuditSettings
from ragstream.schemas.errors import ConfigError

__all__ = [
    "ALERTS",
    "DEAD_LETTERS",
    "EVALUATIONS",
    "OFFLINE_TABLES",
    "READABLE_TABLES",
    "VIEWS",
    "GUARDRAIL_VERDICTS",
    "INFERENCE_LOG",
    "INGESTION_LOG",
    "JUDGEMENTS",
    "MONITOR_DRIFT",
    "MONITOR_PROFILE",
    "TABLES",
    "USAGE",
    "TableDef",
    "arrow_schema",
    "parse_tables",
    "sink_groups",
    "sink_name",
]

INFERENCE_LOG = "inference_log"
USAGE = "usage"
INGESTION_LOG = "ingestion_log"
DEAD_LETTERS = "dead_letters"
GUARDRAIL_VERDICTS = "guardrail_verdicts"
JUDGEMENTS = "judgements"
EVALUATIONS = "evaluations"
MONITOR_PROFILE = "monitor_profile"
MONITOR_DRIFT = "monitor_drift"
ALERTS = "alerts"


@dataclass(frozen=True, slots=True)
class TableDef:
    name: str
    event_time: str
    """The timestamp column whose UTC day is `event_date`, the partition column."""
    inputs: tuple[str, ...]
    """Names (under the prefix) of the topics its rows are built from; `ragstream.streams.topics`
    declares them (infra does not import streams)."""
    doc: str

    def schema(self) -> Any:
        return _SCHEMAS[self.name]()


_SCHEMAS: dict[str, Callable[[], Any]] = {
    INFERENCE_LOG: inference_schema,
    USAGE: usage_schema,
    INGESTION_LOG: ingestion_schema,
    DEAD_LETTERS: dead_letter_schema,
    GUARDRAIL_VERDICTS: guardrail_schema,
    JUDGEMENTS: judgement_schema,
    EVALUATIONS: evaluation_schema,
    MONITOR_PROFILE: monitor_profile_schema,
    MONITOR_DRIFT: monitor_drift_schema,
    ALERTS: alert_schema,
}

TABLES: dict[str, TableDef] = {
    INFERENCE_LOG: TableDef(
        INFERENCE_LOG,
        "submitted_at",
        ("queries", "responses"),
        "One row per question: what was asked, retrieved, prompted and answered.",
    ),
    USAGE: TableDef(USAGE, "event_time", ("responses",), "Tokens and estimated cost per response."),
    INGESTION_LOG: TableDef(
        INGESTION_LOG,
        "event_time",
        ("documents.indexed", "deadletter"),
        "One row per document submission outcome.",
    ),
    DEAD_LETTERS: TableDef(DEAD_LETTERS, "event_time", ("deadletter",), "Every dead-lettered message."),
    GUARDRAIL_VERDICTS: TableDef(
        GUARDRAIL_VERDICTS,
        "event_time",
        ("responses",),
        "Every guardrail verdict that acted, per request (spans and categories, no text).",
    ),
    JUDGEMENTS: TableDef(
        JUDGEMENTS,
        "judged_at",
        ("judgements",),
        "Every judgement: per request and judge, its rating, score, rationale and root cause.",
    ),
}
"""Every audit table the sink writes, registered explicitly."""

OFFLINE_TABLES: dict[str, TableDef] = {
    EVALUATIONS: TableDef(
        EVALUATIONS,
        "evaluated_at",
        (),
        "`ragstream eval` runs: per run, row and judge, the rating, score and rationale.",
    ),
    MONITOR_PROFILE: TableDef(
        MONITOR_PROFILE,
        "window_start",
        (),
        "Profile metrics per window, tenant and route: traffic, latency, tokens, cost, rates, findings.",
    ),
    MONITOR_DRIFT: TableDef(
        MONITOR_DRIFT,
        "window_start",
        (),
        "Drift per window against the previous window and the baseline: queries, answers, scores, judges.",
    ),
    ALERTS: TableDef(
        ALERTS,
        "changed_at",
        (),
        "Every alert state change (firing, resolved), as published on the alerts topic.",
    ),
}
"""Tables written by commands, not by the sink: `ragstream eval` is `evaluations`' only writer,
the monitoring job (`ragstream monitor run`) the metric tables' and `alerts`'."""

READABLE_TABLES: dict[str, TableDef] = {**TABLES, **OFFLINE_TABLES}

VIEWS: dict[str, str] = {
    "judged_requests": (
        "SELECT i.request_id, i.tenant, i.user, i.submitted_at, i.route, i.status, i.question, i.answer,"
        " j.judge, j.judge_version, j.implementation, j.rating, j.score, j.rationale, j.root_cause,"
        " j.judged_at, j.source, epoch_ms(j.judged_at) - epoch_ms(i.completed_at) AS judge_lag_ms"
        " FROM inference_log i JOIN judgements j ON i.request_id = j.request_id"
    ),
}
"""Views `ragstream sql` offers: `judged_requests` joins each request to its judgements."""


@cache
def arrow_schema(table: str) -> Any:
    """The table's pyarrow schema as this code defines it. Its field ids are not the
    catalog's (a catalog assigns its own on create): for appends, convert with the table's
    `schema().as_arrow()` (see `RowBuffer.to_arrow`)."""
    return READABLE_TABLES[table].schema().as_arrow()


# -- which sink writes which tables ----------------------------------------------------------
def parse_tables(spec: str | Sequence[str]) -> tuple[str, ...]:
    """`"usage,dead_letters"` -> the tables one sink process writes, validated.

    Raises:
        ConfigError: an unknown or repeated table, or none.
    """
    names = tuple(n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip())
    unknown = [n for n in names if n not in TABLES]
    if unknown or not names or len(set(names)) != len(names):
        raise ConfigError(
            f"audit sink tables {spec!r}: name each of {', '.join(TABLES)} at most once"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return names


def sink_groups(audit: AuditSettings) -> list[tuple[str, ...]]:
    """`audit.sinks` parsed: the tables of each sink process.

    Raises:
        ConfigError: a table in no sink or in two (two committers would fight over its
            offsets; none would leave it unwritten).
    """
    groups = [parse_tables(spec) for spec in audit.sinks]
    seen = [name for group in groups for name in group]
    missing = [name for name in TABLES if name not in seen]
    twice = sorted({name for name in seen if seen.count(name) > 1})
    if missing or twice:
        raise ConfigError(
            f"audit.sinks {list(audit.sinks)}: every table must be in exactly one sink"
            + (f"; in none: {', '.join(missing)}" if missing else "")
            + (f"; in several: {', '.join(twice)}" if twice else "")
        )
    return groups


def sink_name(tables: Sequence[str]) -> str:
    """The process name of the sink writing `tables`: `sink` for all of them, else
    `sink-<first table>` (unique, since a table has one sink). Heartbeat: worker-<name>.json."""
    return "sink" if set(tables) == set(TABLES) else f"sink-{tables[0]}"

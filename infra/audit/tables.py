"""The audit tables: their Iceberg schemas, how rows are built from events, and creation.

Four Iceberg (format v2) tables under `settings.iceberg.namespace`, each partitioned by the
day of its event time:

- `inference_log`: one row per request (see `inference_row` / `no_response_row`). A request
  whose `ResponseCompleted` has not reached the sink by its deadline + `audit.join_grace_s`
  gets a row with `status = 'no_response'` (question, user, submission time; no answer); a
  response arriving after that is dropped from this table (counted, logged), so every request
  id has exactly one row.
- `usage`: one row per `ResponseCompleted` (one per request that got a response): tokens and
  an estimated cost. A request that never got a response spent nothing we can account for
  and has no usage row; a response that arrived too late for `inference_log` (which then
  says `no_response`) still has one, because its tokens were spent.
- `ingestion_log`: one row per `DocumentIndexed` and per document-path dead letter.
- `dead_letters`: one row per `DeadLettered`.

Row builders are pure functions of events, so they are unit-tested without Kafka or Iceberg.
Every table also carries lineage (`kafka_topic`, `kafka_partition`, `kafka_offset`: the record
the row came from) and `logged_at` (when the sink built the row; the sink uses it to rebuild
its duplicate filter after a restart).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from ragstream.infra.settings import AuditSettings, ModelPrice, Settings
from ragstream.schemas.errors import ConfigError, DependencyUnavailable
from ragstream.schemas.events import DeadLettered, DocumentIndexed
from ragstream.schemas.queries import QuerySubmitted, ResponseCompleted

__all__ = [
    "DOCUMENT_STAGES",
    "INFERENCE_LOG",
    "INGESTION_LOG",
    "LATENCY_STAGES",
    "TABLES",
    "USAGE",
    "DEAD_LETTERS",
    "AuditSettings",
    "ModelPrice",
    "TableDef",
    "audit_settings",
    "dead_letter_row",
    "ensure_tables",
    "estimated_cost",
    "inference_row",
    "ingestion_dead_letter_row",
    "ingestion_row",
    "is_document_dead_letter",
    "no_response_row",
    "parse_tables",
    "sink_groups",
    "sink_name",
    "RowBuffer",
    "arrow_schema",
    "rows_to_arrow",
    "usage_row",
]

log = logging.getLogger(__name__)

INFERENCE_LOG = "inference_log"
USAGE = "usage"
INGESTION_LOG = "ingestion_log"
DEAD_LETTERS = "dead_letters"

LATENCY_STAGES: tuple[str, ...] = (
    "queue_retrieval",
    "embed_query",
    "search",
    "retrieval",
    "queue_generation",
    "prompt",
    "time_to_first_token",
    "generation",
    "total",
)
"""Stages with their own `latency_<stage>_ms` column; every stage is also in `latency_ms`."""

DOCUMENT_STAGES = frozenset({"ingest", "embed", "index"})
NO_RESPONSE = "no_response"


# -- settings ------------------------------------------------------------------------------
def audit_settings(settings: Settings) -> AuditSettings:
    """The `audit` section of the settings."""
    return settings.audit


# -- schemas -------------------------------------------------------------------------------
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


def _fields() -> Any:
    from pyiceberg.types import NestedField

    counter = iter(range(1, 10_000))

    def f(name: str, typ: Any, doc: str, required: bool = False) -> NestedField:
        return NestedField(next(counter), name, typ, required=required, doc=doc)

    return f, counter


def _lineage(f: Any, event_time: str) -> list[Any]:
    from pyiceberg.types import DateType, IntegerType, LongType, StringType, TimestamptzType

    return [
        f(
            "event_date",
            DateType(),
            f"UTC day of {event_time}: the partition column. Filter on it to read only some days.",
            True,
        ),
        f("kafka_topic", StringType(), "Topic of the record this row was built from."),
        f("kafka_partition", IntegerType(), "Partition of that record."),
        f("kafka_offset", LongType(), "Offset of that record."),
        f("logged_at", TimestamptzType(), "When the audit sink built the row (UTC).", True),
    ]


def _inference_schema() -> Any:
    from pyiceberg.schema import Schema
    from pyiceberg.types import (
        BooleanType,
        DoubleType,
        IntegerType,
        ListType,
        LongType,
        MapType,
        StringType,
        StructType,
        TimestamptzType,
    )

    f, ids = _fields()

    def nf(name: str, typ: Any, doc: str = "") -> Any:
        from pyiceberg.types import NestedField

        return NestedField(next(ids), name, typ, required=False, doc=doc or None)

    fields = [
        f("request_id", StringType(), "The request id (= trace id).", True),
        f("tenant", StringType(), "Tenant the request ran under."),
        f("user", StringType(), "Who asked."),
        f(
            "submitted_at",
            TimestamptzType(),
            "QuerySubmitted.produced_at; if the query was never seen, the response time minus "
            "its total latency. event_date is its UTC day.",
            True,
        ),
        f("completed_at", TimestamptzType(), "ResponseCompleted.produced_at; null for no_response."),
        f("deadline_at", TimestamptzType(), "submitted_at + deadline_ms, when the query was seen."),
        f("question", StringType(), "The question as asked."),
        f("conversation_id", StringType(), "Conversation the question belongs to, if any."),
        f(
            "retrieved_chunk_ids",
            ListType(next(ids), StringType(), element_required=False),
            "Chunks retrieval chose, best first.",
        ),
        f(
            "retrieved_scores",
            ListType(next(ids), DoubleType(), element_required=False),
            "Their scores, same order.",
        ),
        f(
            "citations",
            ListType(
                next(ids),
                StructType(
                    nf("number", IntegerType(), "The [n] used in the answer."),
                    nf("document_id", StringType()),
                    nf("chunk_id", StringType()),
                    nf("title", StringType()),
                    nf("score", DoubleType()),
                    nf("source", StringType()),
                    nf("cited", BooleanType(), "True when the answer refers to [n]."),
                ),
                element_required=False,
            ),
            "Sources offered to the model, numbered as in the prompt.",
        ),
        f("prompt_template_version", StringType(), "Version of the prompt template used."),
        f(
            "prompt_messages",
            ListType(
                next(ids),
                StructType(nf("role", StringType()), nf("content", StringType())),
                element_required=False,
            ),
            "The exact chat messages sent to the model, in order (for audit and replay).",
        ),
        f("answer", StringType(), "The final answer text."),
        f(
            "status",
            StringType(),
            "ok, error, blocked, or no_response (no response by deadline + grace).",
            True,
        ),
        f("error_reason", StringType(), "Why the status is not ok."),
        f("model_id", StringType(), "Model that generated the answer."),
        f("route", StringType(), "Generation route (requested route for no_response rows)."),
        f("finish_reason", StringType(), "stop, length, deadline or error."),
        f("prompt_tokens", LongType(), "Prompt tokens."),
        f("completion_tokens", LongType(), "Completion tokens."),
        f("total_tokens", LongType(), "prompt_tokens + completion_tokens."),
        *[
            f(
                f"latency_{stage}_ms",
                DoubleType(),
                f"Latency of stage {stage!r} in ms (null if not measured).",
            )
            for stage in LATENCY_STAGES
        ],
        f(
            "latency_ms",
            MapType(next(ids), StringType(), next(ids), DoubleType(), value_required=False),
            "Every per-stage latency in ms, including stages without their own column.",
        ),
        f("streamed", BooleanType(), "Whether token deltas were streamed."),
        f("delta_count", IntegerType(), "Token deltas published before the final response."),
        f(
            "guardrail",
            StructType(
                nf("verdict", StringType(), "allow, block, redact, ..."),
                nf("reasons", ListType(next(ids), StringType(), element_required=False)),
                nf("categories", ListType(next(ids), StringType(), element_required=False)),
                nf("checker", StringType()),
                nf("score", DoubleType()),
            ),
            "Reserved for the guardrail verdict (null until guardrails record one).",
        ),
        f(
            "judge",
            StructType(
                nf("faithfulness", DoubleType()),
                nf("relevance", DoubleType()),
                nf("scores", MapType(next(ids), StringType(), next(ids), DoubleType(), value_required=False)),
                nf("model", StringType()),
                nf("verdict", StringType()),
                nf("rationale", StringType()),
            ),
            "Reserved for answer-quality judgements (null until a judge records one).",
        ),
        f("response_event_id", StringType(), "event_id of the ResponseCompleted."),
        f("query_topic", StringType(), "Topic of the QuerySubmitted record, when seen."),
        f("query_partition", IntegerType(), "Its partition."),
        f("query_offset", LongType(), "Its offset."),
        *_lineage(f, "submitted_at"),
    ]
    return Schema(*fields)


def _usage_schema() -> Any:
    from pyiceberg.schema import Schema
    from pyiceberg.types import BooleanType, DoubleType, LongType, StringType, TimestamptzType

    f, _ = _fields()
    return Schema(
        f("request_id", StringType(), "The request id.", True),
        f("event_time", TimestamptzType(), "When the response completed; event_date is its UTC day.", True),
        f("tenant", StringType(), "Tenant billed."),
        f("user", StringType(), "Who asked."),
        f("model_id", StringType(), "Model that generated the answer."),
        f("route", StringType(), "Generation route."),
        f("prompt_tokens", LongType(), "Prompt tokens."),
        f("completion_tokens", LongType(), "Completion tokens."),
        f("total_tokens", LongType(), "prompt_tokens + completion_tokens."),
        f(
            "estimated_cost",
            DoubleType(),
            "prompt/1000 * input_per_1k + completion/1000 * output_per_1k from audit.prices; "
            "null when the model has no price.",
        ),
        f("status", StringType(), "ok, error or blocked.", True),
        f("streamed", BooleanType(), "Whether token deltas were streamed."),
        *_lineage(f, "event_time"),
    )


def _ingestion_schema() -> Any:
    from pyiceberg.schema import Schema
    from pyiceberg.types import IntegerType, LongType, StringType, TimestamptzType

    f, _ = _fields()
    return Schema(
        f("event_time", TimestamptzType(), "When the outcome was produced; event_date is its UTC day.", True),
        f("tenant", StringType(), "Tenant of the document."),
        f("document_id", StringType(), "The document (null if a dead letter could not name it)."),
        f("source_event_id", StringType(), "event_id of the DocumentSubmitted."),
        f("event_id", StringType(), "event_id of the DocumentIndexed or DeadLettered."),
        f("outcome", StringType(), "indexed, unchanged, deleted, stale or dead_lettered.", True),
        f("version", LongType(), "Document version."),
        f("fingerprint", StringType(), "Content fingerprint that was indexed."),
        f("chunk_count", IntegerType(), "Chunks written."),
        f("chunks_removed", IntegerType(), "Chunks removed."),
        f("stage", StringType(), "Stage that dead-lettered the document."),
        f("error", StringType(), "error_kind: message, for dead letters."),
        *_lineage(f, "event_time"),
    )


def _dead_letter_schema() -> Any:
    from pyiceberg.schema import Schema
    from pyiceberg.types import BinaryType, BooleanType, IntegerType, LongType, StringType, TimestamptzType

    f, _ = _fields()
    return Schema(
        f(
            "event_time",
            TimestamptzType(),
            "When the message was dead-lettered; event_date is its UTC day.",
            True,
        ),
        f("event_id", StringType(), "event_id of the DeadLettered."),
        f("trace_id", StringType(), "Trace the bad message belonged to."),
        f("tenant", StringType(), "Tenant, when known."),
        f("stage", StringType(), "Stage that gave up on the message.", True),
        f("error_kind", StringType(), "Error class kind (schema_violation, ...).", True),
        f("message", StringType(), "Human-readable reason."),
        f("original", BinaryType(), "The original message bytes (possibly truncated)."),
        f("original_truncated", BooleanType(), "True when original was cut short."),
        f("original_topic", StringType(), "Where the original message was read."),
        f("original_partition", IntegerType(), "Its partition."),
        f("original_offset", LongType(), "Its offset."),
        f("original_key", StringType(), "Its key."),
        f("source_event_id", StringType(), "Submission it stems from, if known."),
        f("request_id", StringType(), "Request it stems from, if known."),
        f("document_id", StringType(), "Document it stems from, if known."),
        *_lineage(f, "event_time"),
    )


_SCHEMAS = {
    INFERENCE_LOG: _inference_schema,
    USAGE: _usage_schema,
    INGESTION_LOG: _ingestion_schema,
    DEAD_LETTERS: _dead_letter_schema,
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
}
"""Every audit table, registered explicitly."""


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


# Audit tables have one committer (the sink). pyiceberg's own retry would rebuild a
# conflicting commit with the snapshot properties it was first given; for a compaction that
# raced an append that means stale offsets in the newest snapshot. So conflicts surface, and
# each writer retries deliberately (the sink re-appends with its own offsets; maintenance
# recomputes).
TABLE_PROPERTIES: dict[str, str] = {
    "commit.retry.num-retries": "0",
    "commit.manifest-merge.enabled": "true",
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "20",
    "write.parquet.compression-codec": "zstd",
}


def ensure_tables(
    settings: Settings, catalog: Any | None = None, names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Create missing audit tables (`names`, default all) and add columns that newer code
    defines (union by name).

    Adding nullable columns keeps every older snapshot readable; columns are never dropped.

    Raises:
        DependencyUnavailable: the catalog cannot be reached or a table cannot be created.
    """
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import IdentityTransform

    from ragstream.infra.iceberg import create_namespace, open_catalog

    catalog = catalog if catalog is not None else open_catalog(settings)
    ns = settings.iceberg.namespace
    out: dict[str, Any] = {}
    try:
        create_namespace(catalog, ns)
        for name in names if names is not None else TABLES:
            tdef = TABLES[name]
            schema = tdef.schema()
            # identity(event_date) rather than day(event_time): pyiceberg computes the day
            # transform with the optional Rust extension (pyiceberg-core); a date column
            # partitions the same way, needs nothing extra, and every engine can prune on it.
            source = schema.find_field("event_date")
            spec = PartitionSpec(
                PartitionField(
                    source_id=source.field_id, field_id=1000, transform=IdentityTransform(), name="event_date"
                )
            )
            ident = (ns, name)
            # Not create_table_if_not_exists: it writes a metadata file before finding out
            # that the table exists, leaving an orphan on every start.
            if catalog.table_exists(ident):
                table = catalog.load_table(ident)
            else:
                table = catalog.create_table_if_not_exists(
                    ident,
                    schema=schema,
                    partition_spec=spec,
                    properties=TABLE_PROPERTIES | {"comment": tdef.doc},
                )
            out[name] = ensure_schema(table, schema)
    except DependencyUnavailable:
        raise
    except Exception as exc:  # sqlalchemy, http and pyiceberg errors each have their own types
        raise DependencyUnavailable(f"cannot create audit tables in {ns}: {exc}") from exc
    return out


def ensure_schema(table: Any, schema: Any) -> Any:
    """Union `schema` into the table's: new fields are added (nullable), nothing is removed."""
    current = {f.name for f in table.schema().fields}
    if all(f.name in current for f in schema.fields):
        return table
    added = [f.name for f in schema.fields if f.name not in current]
    with table.update_schema() as update:
        update.union_by_name(schema)
    log.info("audit table %s: added columns %s", table.name(), ", ".join(added))
    return table


# -- rows ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Source:
    """Where a record was read: lineage for the row built from it."""

    topic: str
    partition: int
    offset: int


def _lineage_cols(src: Source | None, logged_at: datetime, event_time: datetime) -> dict[str, Any]:
    return {
        "event_date": event_time.astimezone(UTC).date(),
        "kafka_topic": src.topic if src else None,
        "kafka_partition": src.partition if src else None,
        "kafka_offset": src.offset if src else None,
        "logged_at": logged_at,
    }


def _latency_cols(latency_ms: Mapping[str, float]) -> dict[str, Any]:
    cols: dict[str, Any] = {f"latency_{s}_ms": latency_ms.get(s) for s in LATENCY_STAGES}
    cols["latency_ms"] = dict(latency_ms)
    return cols


def _part(model: Any) -> dict[str, Any]:
    """A flat, frozen event part (Citation, PromptMessage) as a dict of its fields.

    Read from the instance's `__dict__` (where pydantic keeps field values) instead of
    `model_dump()`, which costs ~4 µs a call through pydantic's serializer: six calls per
    request were a sixth of the sink's CPU. Parts hold scalars only, so nothing needs dumping.
    """
    return dict(model.__dict__)


def inference_row(
    response: ResponseCompleted,
    query: QuerySubmitted | None,
    *,
    source: Source | None,
    query_source: Source | None,
    logged_at: datetime,
) -> dict[str, Any]:
    """The row of a request that got its response (`query=None`: its query was never seen)."""
    if query is not None:
        submitted_at = query.produced_at
        deadline_at: datetime | None = query.deadline_at()
    else:
        submitted_at = response.produced_at - timedelta(milliseconds=response.latency_ms.get("total", 0.0))
        deadline_at = None
    usage = response.usage
    return {
        "request_id": response.request_id,
        "tenant": response.tenant,
        "user": response.user if response.user != "anonymous" or query is None else query.user,
        "submitted_at": submitted_at,
        "completed_at": response.produced_at,
        "deadline_at": deadline_at,
        "question": query.question if query else response.question,
        "conversation_id": query.conversation_id if query else None,
        "retrieved_chunk_ids": list(response.retrieved_chunk_ids),
        "retrieved_scores": list(response.retrieved_scores),
        "citations": [_part(c) for c in response.citations],
        "prompt_template_version": response.prompt_template_version,
        "prompt_messages": [_part(m) for m in response.prompt_messages],
        "answer": response.answer,
        "status": response.status,
        "error_reason": response.error_reason,
        "model_id": response.model_id,
        "route": response.route or (query.generation.route if query else None),
        "finish_reason": response.finish_reason,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        **_latency_cols(response.latency_ms),
        "streamed": response.streamed,
        "delta_count": response.delta_count,
        "guardrail": None,
        "judge": None,
        "response_event_id": response.event_id,
        "query_topic": query_source.topic if query_source else None,
        "query_partition": query_source.partition if query_source else None,
        "query_offset": query_source.offset if query_source else None,
        **_lineage_cols(source, logged_at, submitted_at),
    }


def no_response_row(
    query: QuerySubmitted, *, grace_s: float, query_source: Source | None, logged_at: datetime
) -> dict[str, Any]:
    """The row of a request whose response had not arrived by its deadline + grace."""
    return {
        "request_id": query.request_id,
        "tenant": query.tenant,
        "user": query.user,
        "submitted_at": query.produced_at,
        "completed_at": None,
        "deadline_at": query.deadline_at(),
        "question": query.question,
        "conversation_id": query.conversation_id,
        "retrieved_chunk_ids": [],
        "retrieved_scores": [],
        "citations": [],
        "prompt_template_version": None,
        "prompt_messages": [],
        "answer": "",
        "status": NO_RESPONSE,
        "error_reason": f"no_response: no ResponseCompleted within deadline_ms={query.deadline_ms} + {grace_s:g}s",
        "model_id": None,
        "route": query.generation.route,
        "finish_reason": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "total_tokens": None,
        **_latency_cols({}),
        "streamed": query.stream,
        "delta_count": None,
        "guardrail": None,
        "judge": None,
        "response_event_id": None,
        "query_topic": query_source.topic if query_source else None,
        "query_partition": query_source.partition if query_source else None,
        "query_offset": query_source.offset if query_source else None,
        **_lineage_cols(query_source, logged_at, query.produced_at),
    }


def estimated_cost(
    model_id: str | None, prompt_tokens: int, completion_tokens: int, prices: Mapping[str, ModelPrice]
) -> float | None:
    price = prices.get(model_id or "")
    if price is None:
        return None
    return prompt_tokens / 1000 * price.input_per_1k + completion_tokens / 1000 * price.output_per_1k


def usage_row(
    response: ResponseCompleted,
    *,
    prices: Mapping[str, ModelPrice],
    source: Source | None,
    logged_at: datetime,
) -> dict[str, Any]:
    u = response.usage
    return {
        "request_id": response.request_id,
        "event_time": response.produced_at,
        "tenant": response.tenant,
        "user": response.user,
        "model_id": response.model_id,
        "route": response.route,
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "estimated_cost": estimated_cost(response.model_id, u.prompt_tokens, u.completion_tokens, prices),
        "status": response.status,
        "streamed": response.streamed,
        **_lineage_cols(source, logged_at, response.produced_at),
    }


def ingestion_row(event: DocumentIndexed, *, source: Source | None, logged_at: datetime) -> dict[str, Any]:
    return {
        "event_time": event.produced_at,
        "tenant": event.tenant,
        "document_id": event.document_id,
        "source_event_id": event.source_event_id,
        "event_id": event.event_id,
        "outcome": event.outcome,
        "version": event.version,
        "fingerprint": event.fingerprint or None,
        "chunk_count": event.chunk_count,
        "chunks_removed": event.chunks_removed,
        "stage": None,
        "error": None,
        **_lineage_cols(source, logged_at, event.produced_at),
    }


def is_document_dead_letter(event: DeadLettered) -> bool:
    """Dead letters of the document path (not of a query) also belong in `ingestion_log`."""
    if event.request_id:
        return False
    return event.stage in DOCUMENT_STAGES or event.document_id is not None


def ingestion_dead_letter_row(
    event: DeadLettered, *, source: Source | None, logged_at: datetime
) -> dict[str, Any]:
    return {
        "event_time": event.produced_at,
        "tenant": event.tenant,
        "document_id": event.document_id,
        "source_event_id": event.source_event_id,
        "event_id": event.event_id,
        "outcome": "dead_lettered",
        "version": None,
        "fingerprint": None,
        "chunk_count": None,
        "chunks_removed": None,
        "stage": event.stage,
        "error": f"{event.error_kind}: {event.message}",
        **_lineage_cols(source, logged_at, event.produced_at),
    }


def dead_letter_row(event: DeadLettered, *, source: Source | None, logged_at: datetime) -> dict[str, Any]:
    return {
        "event_time": event.produced_at,
        "event_id": event.event_id,
        "trace_id": event.trace_id,
        "tenant": event.tenant,
        "stage": event.stage,
        "error_kind": event.error_kind,
        "message": event.message,
        "original": event.original,
        "original_truncated": event.original_truncated,
        "original_topic": event.original_topic,
        "original_partition": event.original_partition,
        "original_offset": event.original_offset,
        "original_key": event.original_key,
        "source_event_id": event.source_event_id,
        "request_id": event.request_id,
        "document_id": event.document_id,
        **_lineage_cols(source, logged_at, event.produced_at),
    }


@cache
def arrow_schema(table: str) -> Any:
    """The table's pyarrow schema as this code defines it. Its field ids are not the
    catalog's (a catalog assigns its own on create): for appends, convert with the table's
    `schema().as_arrow()` (see `RowBuffer.to_arrow`)."""
    return TABLES[table].schema().as_arrow()


class RowBuffer:
    """A table's rows waiting for a commit, converted to Arrow in small chunks as they come.

    Rows come in as dicts (what the builders return), are flattened to tuples on arrival,
    and every `chunk_rows` rows become one Arrow record batch, while the Python objects
    behind them are still hot in cache; then they are released. Measured on the sink's
    work: ~48 µs a request converting every 1000 rows against ~60 µs converting 20k rows at
    commit time, and buffered rows take Arrow's compact form instead of ~10 KB of Python
    objects each, so large `flush_rows` cost little memory.
    """

    __slots__ = ("_batches", "_done", "_rows", "chunk_rows", "names", "schema")

    def __init__(self, schema: Any, chunk_rows: int = 1024) -> None:
        self.schema = schema
        self.names = tuple(schema.names)
        self.chunk_rows = chunk_rows
        self._rows: list[tuple[Any, ...]] = []
        self._batches: list[Any] = []
        self._done = 0

    def append(self, row: Mapping[str, Any]) -> None:
        """Add a row; keys outside the schema are ignored, missing ones are null."""
        self._rows.append(tuple(map(row.get, self.names)))
        if len(self._rows) >= self.chunk_rows:
            self._seal()

    def _seal(self) -> None:
        import pyarrow as pa

        if not self._rows:
            return
        columns = zip(*self._rows, strict=True)
        arrays = [pa.array(col, type=f.type) for col, f in zip(columns, self.schema, strict=True)]
        self._batches.append(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
        self._done += len(self._rows)
        self._rows = []

    def __len__(self) -> int:
        return self._done + len(self._rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rows as dicts again (for tests and debugging, not the hot path)."""
        for batch in self._batches:
            yield from batch.to_pylist()
        for values in self._rows:
            yield dict(zip(self.names, values, strict=True))

    def to_arrow(self, target: Any | None = None) -> Any:
        """Every row as one pyarrow Table, in `target` (the Iceberg table's current
        `schema().as_arrow()`) when given: columns the buffer lacks are null."""
        import pyarrow as pa

        self._seal()
        table = pa.Table.from_batches(self._batches, schema=self.schema)
        if target is None:
            return table
        if target.equals(self.schema):
            # Same names and types; `target` also carries the table's own field ids (the ones
            # pyiceberg matches columns by), which a schema built from code does not know.
            return pa.Table.from_arrays(table.columns, schema=target)
        # The table's schema moved on since this buffer was made (a newer ragstream added
        # columns): rare, so the simple way, which also fills missing nested fields.
        return pa.Table.from_pylist(table.to_pylist(), schema=target)


def rows_to_arrow(rows: Iterable[Mapping[str, Any]], schema: Any) -> Any:
    """Row dicts -> a pyarrow Table in `schema`; columns a row lacks are null."""
    buffer = RowBuffer(schema)
    for row in rows:
        buffer.append(row)
    return buffer.to_arrow()


def utc_now() -> datetime:
    return datetime.now(UTC)

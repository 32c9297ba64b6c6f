"""The audit tables' Iceberg schemas: every column, with the doc a reader sees in the catalog.

One builder per table (registered in `ragstream.infra.audit.tables.TABLES`); field ids are
assigned in order, and every table ends with the same lineage columns. pyiceberg is imported
inside the builders, so importing this module stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LATENCY_STAGES",
    "dead_letter_schema",
    "inference_schema",
    "ingestion_schema",
    "usage_schema",
]

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


def _fields() -> Any:
    from pyiceberg.types import NestedField

    counter = iter(range(1, 10_000))

    def f(name: str, typ: Any, doc: str, required: bool = False) -> NestedField:
        return NestedField(next(counter), name, typ, required=required, doc=doc)

    return f, counter


def _nested(ids: Any) -> Any:
    """A struct member's field maker, numbered from the schema's counter `ids`."""
    from pyiceberg.types import NestedField

    def nf(name: str, typ: Any, doc: str = "") -> NestedField:
        return NestedField(next(ids), name, typ, required=False, doc=doc or None)

    return nf


def _identity(f: Any, ids: Any) -> list[Any]:
    """Who sent the command, from its verified token (see `ragstream.infra.auth`); `tenant`
    and `user` are the token's too. Null where no identity was established (a token that did
    not verify, or a query whose response never came)."""
    from pyiceberg.types import BooleanType, ListType, StringType

    return [
        f(
            "principal_groups",
            ListType(next(ids), StringType(), element_required=False),
            "Groups the verified token holds.",
        ),
        f(
            "principal_client",
            StringType(),
            "Client the token names (its reply stream is <tenant>.<client>).",
        ),
        f("principal_key_id", StringType(), "kid of the key that verified the token."),
        f("principal_token_id", StringType(), "The token's jti, when it has one."),
        f(
            "principal_verified",
            BooleanType(),
            "True: the identity came from a verified token. False: auth.mode=off (the body's claim).",
        ),
    ]


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


def inference_schema() -> Any:
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
    nf = _nested(ids)

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
                nf("verdict", StringType(), "The winning action: allow, flag, mask or block."),
                nf("reasons", ListType(next(ids), StringType(), element_required=False)),
                nf("categories", ListType(next(ids), StringType(), element_required=False)),
                nf("checker", StringType()),
                nf("score", DoubleType()),
            ),
            "The request's guardrail outcome (null when no policy applied): the winning action, "
            "a reason per acting rail ('direction/rail: action category'), the categories, the "
            "policy (checker) and the highest score.",
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
        *_identity(f, ids),
        f(
            "passages",
            ListType(
                next(ids),
                StructType(
                    nf("number", IntegerType(), "The [n] it has in the prompt."),
                    nf("chunk_id", StringType()),
                    nf("document_id", StringType()),
                    nf("text", StringType(), "The passage as the model saw it (PII masked)."),
                ),
                element_required=False,
            ),
            "The retrieved passages in the prompt, in order: what `ragstream judge backfill` "
            "judges an answer against (null on rows written before this column existed).",
        ),
    ]
    return Schema(*fields)


def usage_schema() -> Any:
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


def ingestion_schema() -> Any:
    from pyiceberg.schema import Schema
    from pyiceberg.types import IntegerType, LongType, StringType, TimestamptzType

    f, ids = _fields()
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
        *_identity(f, ids),
    )


def guardrail_schema() -> Any:
    from pyiceberg.schema import Schema
    from pyiceberg.types import (
        DoubleType,
        IntegerType,
        ListType,
        StringType,
        StructType,
        TimestamptzType,
    )

    f, ids = _fields()
    nf = _nested(ids)

    return Schema(
        f("event_time", TimestamptzType(), "When the response completed; event_date is its UTC day.", True),
        f("request_id", StringType(), "The request (join with inference_log).", True),
        f("tenant", StringType(), "Tenant of the request."),
        f("user", StringType(), "Who asked."),
        f("policy", StringType(), "The guardrail policy that applied."),
        f("direction", StringType(), "input, context or output.", True),
        f("rail", StringType(), "pii, safety, injection, keywords or topics.", True),
        f("action", StringType(), "allow, flag, mask or block.", True),
        f("category", StringType(), "The category that decided the action."),
        f("score", DoubleType(), "Its score (0-1)."),
        f("latency_ms", DoubleType(), "Time the rail took."),
        f("detector", StringType(), "Which detector(s) found something."),
        f("output_window", IntegerType(), "For streamed output: the window's index."),
        f("error", StringType(), "Why the detector failed, when it did (fail-open or fail-closed)."),
        f(
            "findings",
            ListType(
                next(ids),
                StructType(
                    nf("category", StringType()),
                    nf("score", DoubleType()),
                    nf("start", IntegerType()),
                    nf("end", IntegerType()),
                ),
                element_required=False,
            ),
            "What was found, as categories and character spans: never the text itself.",
        ),
        f("response_status", StringType(), "ok, error or blocked."),
        *_lineage(f, "event_time"),
    )


def judgement_schema() -> Any:
    from pyiceberg.schema import Schema
    from pyiceberg.types import DoubleType, ListType, StringType, TimestamptzType

    f, ids = _fields()

    return Schema(
        f("judged_at", TimestamptzType(), "When the judgement was made; event_date is its UTC day.", True),
        f("request_id", StringType(), "The judged request (join with inference_log).", True),
        f("judge", StringType(), "relevance_to_query, groundedness, ..., a custom judge, or overall.", True),
        f("judge_version", StringType(), "The judge's version (thresholds or seed included).", True),
        f("implementation", StringType(), "embedding, support, guard, llm:<route> or rollup."),
        f("model", StringType(), "The model that judged."),
        f("rating", StringType(), "yes or no; null when the judge failed (see error)."),
        f("score", DoubleType(), "The judge's score (0-1), where it has one."),
        f("rationale", StringType(), "Why."),
        f("error", StringType(), "Why the judge could not judge, when it could not."),
        f("root_cause", StringType(), "For overall = no: the first failing judge."),
        f(
            "chunk_ratings",
            ListType(next(ids), StringType(), element_required=False),
            "chunk_relevance: a rating per retrieved passage, in the prompt's order.",
        ),
        f("latency_ms", DoubleType(), "Time the judge took."),
        f("tenant", StringType(), "Tenant of the request."),
        f("user", StringType(), "Who asked."),
        f("route", StringType(), "The generation route that answered."),
        f("source", StringType(), "stream (live), backfill (re-judged history) or eval.", True),
        f("source_ref", StringType(), "The judged response's event, or the inference_log snapshot."),
        f("response_event_id", StringType(), "The judged ResponseCompleted's event id."),
        f(
            "event_id",
            StringType(),
            "The judgement's event id (stable per request, judge, version, source).",
            True,
        ),
        *_lineage(f, "judged_at"),
    )


def evaluation_schema() -> Any:
    from pyiceberg.schema import Schema
    from pyiceberg.types import DateType, DoubleType, LongType, StringType, TimestamptzType

    f, _ = _fields()

    return Schema(
        f("evaluated_at", TimestamptzType(), "When the run judged the row; event_date is its UTC day.", True),
        f("run_id", StringType(), "One `ragstream eval` run.", True),
        f("source_file", StringType(), "The evaluation file."),
        f("row_id", StringType(), "The row's request_id, or its line number.", True),
        f("request", StringType(), "The question (PII masked as the default policy masks)."),
        f("response", StringType(), "The judged answer (masked likewise)."),
        f("expected_response", StringType(), "The expected answer, when the row has one."),
        f("answered_by", StringType(), "file (the row's response) or pipeline (--run-pipeline)."),
        f("judge", StringType(), "A judge, or overall.", True),
        f("judge_version", StringType(), "The judge's version."),
        f("implementation", StringType(), "embedding, support, guard, llm:<route> or rollup."),
        f("model", StringType(), "The model that judged."),
        f("rating", StringType(), "yes or no; null when the judge failed."),
        f("score", DoubleType(), "The judge's score, where it has one."),
        f("rationale", StringType(), "Why."),
        f("error", StringType(), "Why the judge could not judge."),
        f("root_cause", StringType(), "For overall = no: the first failing judge."),
        f("latency_ms", DoubleType(), "Time the judge took."),
        f("total_tokens", LongType(), "Tokens the pipeline spent answering (--run-pipeline)."),
        f("event_date", DateType(), "UTC day of evaluated_at: the partition column.", True),
    )


def dead_letter_schema() -> Any:
    from pyiceberg.schema import Schema
    from pyiceberg.types import BinaryType, BooleanType, IntegerType, LongType, StringType, TimestamptzType

    f, ids = _fields()
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
        f("original", BinaryType(), "The original message bytes (possibly truncated; tokens redacted)."),
        f("original_truncated", BooleanType(), "True when original was cut short."),
        f("original_topic", StringType(), "Where the original message was read."),
        f("original_partition", IntegerType(), "Its partition."),
        f("original_offset", LongType(), "Its offset."),
        f("original_key", StringType(), "Its key."),
        f("source_event_id", StringType(), "Submission it stems from, if known."),
        f("request_id", StringType(), "Request it stems from, if known."),
        f("document_id", StringType(), "Document it stems from, if known."),
        *_lineage(f, "event_time"),
        *_identity(f, ids),
    )


def _window_fields(f: Any) -> list[Any]:
    """The window and slice every monitoring row is keyed by."""
    from pyiceberg.types import BooleanType, DateType, LongType, StringType, TimestamptzType

    return [
        f("window_id", StringType(), "granularity:window_start, what a re-run replaces.", True),
        f("granularity", StringType(), "The window length: 5m, 1h, 1d, ...", True),
        f("window_start", TimestamptzType(), "Start of the window (inclusive, UTC).", True),
        f("window_end", TimestamptzType(), "End of the window (exclusive).", True),
        f("complete", BooleanType(), "False while the window was still open when computed.", True),
        f("tenant", StringType(), "The tenant, or * for all tenants together.", True),
        f("route", StringType(), "The generation route, or * for all routes together.", True),
        f("metric", StringType(), "What is measured: requests, status, latency_total_ms, ...", True),
        f(
            "label",
            StringType(),
            "What the metric is broken down by (a status, category, judge, stage), or ''.",
            True,
        ),
        f("computed_at", TimestamptzType(), "When the monitoring run computed the row.", True),
        f("sample_count", LongType(), "How many rows (requests, verdicts, judgements) are behind the value."),
        f("event_date", DateType(), "UTC day of window_start: the partition column.", True),
    ]


def monitor_profile_schema() -> Any:
    from pyiceberg.schema import Schema
    from pyiceberg.types import DoubleType, StringType

    f, _ = _fields()
    return Schema(
        *_window_fields(f),
        f("stat", StringType(), "count, sum, rate, mean, p50, p95, p99 or per_min.", True),
        f("value", DoubleType(), "The statistic's value; null when nothing was measured."),
    )


def monitor_drift_schema() -> Any:
    from pyiceberg.schema import Schema
    from pyiceberg.types import DoubleType, LongType, StringType, TimestamptzType

    f, _ = _fields()
    return Schema(
        *_window_fields(f),
        f("comparison", StringType(), "previous (the window before) or baseline (monitor.baseline_*).", True),
        f("baseline_start", TimestamptzType(), "Start of the window compared against.", True),
        f("baseline_end", TimestamptzType(), "Its end."),
        f("baseline_count", LongType(), "Rows behind the baseline's side."),
        f("stat", StringType(), "centroid_cosine_distance, psi or delta.", True),
        f("value", DoubleType(), "The drift; null when either side had too few rows."),
        f("model", StringType(), "The embedding model, for query embedding drift."),
    )


def alert_schema() -> Any:
    from pyiceberg.schema import Schema
    from pyiceberg.types import DateType, DoubleType, LongType, StringType, TimestamptzType

    f, _ = _fields()
    return Schema(
        f("changed_at", TimestamptzType(), "When the alert changed state; event_date is its UTC day.", True),
        f("alert_id", StringType(), "The rule and its slice: <rule>/<tenant>/<route>.", True),
        f("rule", StringType(), "The rule's name (monitor.alerts.<name>).", True),
        f("state", StringType(), "firing or resolved.", True),
        f("severity", StringType(), "info, warning or critical.", True),
        f("slice_tenant", StringType(), "The tenant watched, or * for all."),
        f("slice_route", StringType(), "The route watched, or * for all."),
        f("metric", StringType(), "The metric the rule watches."),
        f("stat", StringType(), "Its stat."),
        f("label", StringType(), "Its label."),
        f("window_id", StringType(), "The window the condition was evaluated on."),
        f("value", DoubleType(), "The value measured (a ratio for relative rules)."),
        f("sample_count", LongType(), "Rows behind the value."),
        f("threshold", DoubleType(), "The rule's threshold."),
        f("condition", StringType(), "The rule as text."),
        f("message", StringType(), "What happened, in words."),
        f("since", TimestamptzType(), "When the firing began.", True),
        f("event_id", StringType(), "event_id of the AlertChanged published on the alerts topic.", True),
        f("event_date", DateType(), "UTC day of changed_at: the partition column.", True),
    )

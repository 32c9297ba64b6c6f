"""The audit rows, built from events: one builder per kind of row.

Builders are pure functions of events, so they are unit-tested without Kafka or Iceberg; the
join that decides which row a request gets is `ragstream.streams.audit`. Every row also
carries lineage (`kafka_topic`, `kafka_partition`, `kafka_offset`: the record it came from)
and `logged_at` (when the sink built it; the sink uses it to rebuild its duplicate filter
after a restart). Rows are dicts keyed by column name; `buffer.RowBuffer` takes them as they
come.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ragstream.infra.audit.columns import LATENCY_STAGES
from ragstream.infra.settings import ModelPrice
from ragstream.schemas.events import DeadLettered, DocumentIndexed, Principal
from ragstream.schemas.guard import GuardVerdict
from ragstream.schemas.judge import JudgementRecorded
from ragstream.schemas.queries import QuerySubmitted, ResponseCompleted

__all__ = [
    "DOCUMENT_STAGES",
    "NO_RESPONSE",
    "Source",
    "dead_letter_row",
    "estimated_cost",
    "inference_row",
    "ingestion_dead_letter_row",
    "ingestion_row",
    "is_document_dead_letter",
    "judgement_row",
    "no_response_row",
    "usage_row",
]

DOCUMENT_STAGES = frozenset({"ingest", "embed", "index"})
NO_RESPONSE = "no_response"


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


def _principal_cols(p: Principal | None) -> dict[str, Any]:
    if p is None:
        return dict.fromkeys(_PRINCIPAL_COLS)
    return {
        "principal_groups": list(p.groups),
        "principal_client": p.client,
        "principal_key_id": p.key_id,
        "principal_token_id": p.token_id,
        "principal_verified": p.verified,
    }


_PRINCIPAL_COLS = (
    "principal_groups",
    "principal_client",
    "principal_key_id",
    "principal_token_id",
    "principal_verified",
)


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
        "user": _user(response, query),
        "submitted_at": submitted_at,
        "completed_at": response.produced_at,
        "deadline_at": deadline_at,
        # Guarded requests: the question as the rails left it (masked), never the raw one.
        "question": response.question if response.guard_policy or query is None else query.question,
        "conversation_id": query.conversation_id if query else None,
        "retrieved_chunk_ids": list(response.retrieved_chunk_ids),
        "retrieved_scores": list(response.retrieved_scores),
        "citations": [_part(c) for c in response.citations],
        "prompt_template_version": response.prompt_template_version,
        "prompt_messages": [_part(m) for m in response.prompt_messages],
        "passages": [_part(p) for p in response.passages],
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
        "guardrail": _guardrail_col(response),
        "judge": None,
        "response_event_id": response.event_id,
        "query_topic": query_source.topic if query_source else None,
        "query_partition": query_source.partition if query_source else None,
        "query_offset": query_source.offset if query_source else None,
        **_lineage_cols(source, logged_at, submitted_at),
        **_principal_cols(response.principal),
    }


def guardrail_rows(
    response: ResponseCompleted, *, source: Source | None, logged_at: datetime
) -> list[dict[str, Any]]:
    """One row per verdict that acted (not `allow`, or with a detector error)."""
    if response.guard_policy is None:
        return []
    lineage = _lineage_cols(source, logged_at, response.produced_at)
    return [
        {
            "event_time": response.produced_at,
            "request_id": response.request_id,
            "tenant": response.tenant,
            "user": response.principal.user if response.principal is not None else response.user,
            "policy": response.guard_policy,
            "direction": v.direction,
            "rail": v.rail,
            "action": v.action,
            "category": v.category,
            "score": v.score,
            "latency_ms": v.latency_ms,
            "detector": v.detector,
            "output_window": v.window,
            "error": v.error,
            "findings": [
                {"category": f.category, "score": f.score, "start": f.start, "end": f.end} for f in v.findings
            ],
            "response_status": response.status,
            **lineage,
        }
        for v in response.guard_verdicts
        if v.action != "allow" or v.error
    ]


def _guardrail_col(response: ResponseCompleted) -> dict[str, Any] | None:
    """The request's guardrail outcome: the winning action, a reason per acting verdict, the
    categories, the policy and the highest score."""
    if response.guard_policy is None:
        return None
    acting = [v for v in response.guard_verdicts if v.action != "allow"]
    ranks = {"allow": 0, "flag": 1, "mask": 2, "block": 3}

    def effect(v: GuardVerdict) -> str:
        # A context rail that blocks drops one retrieved chunk; the request goes on.
        return "flag" if v.direction == "context" and v.action == "block" else v.action

    def reason(v: GuardVerdict) -> str:
        what = "dropped a chunk" if v.direction == "context" and v.action == "block" else v.action
        return f"{v.direction}/{v.rail}: {what} {v.category or ''}".strip() + (
            f" ({v.error})" if v.error else ""
        )

    overall = max((effect(v) for v in acting), key=ranks.__getitem__, default="allow")
    scores = [v.score for v in acting if v.score is not None]
    return {
        "verdict": overall,
        "reasons": [reason(v) for v in acting],
        "categories": sorted({v.category for v in acting if v.category}),
        "checker": response.guard_policy,
        "score": max(scores) if scores else None,
    }


def _user(response: ResponseCompleted, query: QuerySubmitted | None) -> str:
    if response.principal is not None:
        return response.principal.user
    return response.user if response.user != "anonymous" or query is None else query.user


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
        **_principal_cols(None),
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
        **_principal_cols(event.principal),
    }


def judgement_row(event: JudgementRecorded, *, source: Source | None, logged_at: datetime) -> dict[str, Any]:
    return {
        "judged_at": event.produced_at,
        "request_id": event.request_id,
        "judge": event.judge,
        "judge_version": event.judge_version,
        "implementation": event.implementation,
        "model": event.model,
        "rating": event.rating,
        "score": event.score,
        "rationale": event.rationale,
        "error": event.error,
        "root_cause": event.root_cause,
        "chunk_ratings": list(event.chunk_ratings),
        "latency_ms": event.latency_ms,
        "tenant": event.tenant,
        "user": event.user,
        "route": event.route,
        "source": event.source,
        "source_ref": event.source_ref,
        "response_event_id": event.response_event_id,
        "event_id": event.event_id,
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
        **_principal_cols(event.principal),
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
        **_principal_cols(event.principal),
    }

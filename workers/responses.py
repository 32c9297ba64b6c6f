"""What a caller is told when its request cannot be answered: every caller-facing error
response is built here, so their wording and fields stay the same across stages."""

from __future__ import annotations

from datetime import datetime

from ragstream.schemas.events import DeadLettered, Event, utcnow
from ragstream.schemas.queries import QuerySubmitted, ResponseCompleted

__all__ = ["error_response", "invalid_request_response", "ms_since", "remaining_s"]


def ms_since(t: datetime) -> float:
    return max((utcnow() - t).total_seconds() * 1000.0, 0.0)


def remaining_s(query: QuerySubmitted) -> float:
    """Seconds left before the caller's deadline (negative once it has passed)."""
    return (query.deadline_at() - utcnow()).total_seconds()


def error_response(query: QuerySubmitted, reason: str, latency_ms: dict[str, float]) -> ResponseCompleted:
    """The final response of a query that failed: `status="error"`, `reason` says why, as
    `<kind>: <detail>` (`deadline_exceeded`, `retrieval_failed`, `unknown_route`, ...)."""
    return ResponseCompleted(
        request_id=query.request_id,
        trace_id=query.request_id,
        tenant=query.tenant,
        user=query.user,
        status="error",
        error_reason=reason,
        question=query.question,
        route=query.generation.route,
        finish_reason="error",
        latency_ms={**latency_ms, "total": ms_since(query.produced_at)},
        streamed=query.stream,
    )


def invalid_request_response(record: DeadLettered) -> list[Event]:
    """For a dead-lettered query whose request id could be read: tell the caller why.

    The reason starts with `invalid_request` when the query itself was malformed, and with
    the dead letter's kind otherwise (`internal_error`, `retries_exhausted`, `output_rejected`).
    """
    if not record.request_id:
        return []
    kind = "invalid_request" if record.error_kind == "schema_violation" else record.error_kind
    try:
        response = ResponseCompleted(
            request_id=record.request_id,
            trace_id=record.request_id,
            tenant=record.tenant,
            status="error",
            error_reason=f"{kind}: {record.message}"[:2000],
            finish_reason="error",
        )
    except ValueError:  # the id itself is not a valid identifier: nobody to answer
        return []
    return [response]

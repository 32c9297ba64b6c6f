"""What a caller is told: every final response goes out twice, built here.

- The internal record (`responses` topic) has everything, prompt and principal included,
  for the audit trail and the exactly-once gate.
- The caller's copy goes to the caller's own reply stream, without the prompt (see
  `ResponseCompleted.for_caller`). A request whose sender is unknown (an unverifiable token)
  gets no copy: nobody can be told.

Every error response is built here too, so its wording and fields stay the same across
stages."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ragstream.schemas.events import DeadLettered, Event, utcnow
from ragstream.schemas.guard import GuardVerdict
from ragstream.schemas.queries import QuerySubmitted, ResponseCompleted

__all__ = [
    "blocked_response",
    "error_response",
    "finals",
    "invalid_request_response",
    "ms_since",
    "remaining_s",
]


def ms_since(t: datetime) -> float:
    return max((utcnow() - t).total_seconds() * 1000.0, 0.0)


def remaining_s(query: QuerySubmitted) -> float:
    """Seconds left before the caller's deadline (negative once it has passed)."""
    return (query.deadline_at() - utcnow()).total_seconds()


def finals(response: ResponseCompleted) -> list[Event]:
    """The internal record of a final response, and the caller's copy when there is a caller."""
    copy = response.for_caller()
    return [response] if copy is None else [response, copy]


def error_response(query: QuerySubmitted, reason: str, latency_ms: dict[str, float]) -> list[Event]:
    """The final responses of a query that failed (see `finals`): `status="error"`, `reason`
    says why, as `<kind>: <detail>` (`deadline_exceeded`, `retrieval_failed`, ...)."""
    return finals(_error(query, reason, latency_ms))


def _error(query: QuerySubmitted, reason: str, latency_ms: dict[str, float]) -> ResponseCompleted:
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
        principal=query.principal,
    )


def blocked_response(
    query: QuerySubmitted,
    by: GuardVerdict | None,
    verdicts: Sequence[GuardVerdict],
    policy: str | None,
    latency_ms: dict[str, float],
    *,
    answer: str = "",
    extra: dict[str, Any] | None = None,
) -> list[Event]:
    """The final responses of a request a guardrail blocked: `status="blocked"`, the reason
    names the rail and direction, `blocked_category` the category; `answer` holds only what
    was released before the block (never the failing text)."""
    rail = f"{by.direction} {by.rail}" if by else "guardrail"
    category = by.category if by else None
    detail = f": {by.error}" if by is not None and by.error else ""
    return finals(
        ResponseCompleted(
            request_id=query.request_id,
            trace_id=query.request_id,
            tenant=query.tenant,
            user=query.user,
            status="blocked",
            error_reason=f"guardrail_blocked: {rail} ({category or 'unknown'}){detail}"[:2000],
            question=query.question,
            answer=answer,
            route=query.generation.route,
            finish_reason="blocked",
            latency_ms={**latency_ms, "total": ms_since(query.produced_at)},
            streamed=query.stream,
            principal=query.principal,
            guard_policy=policy,
            guard_verdicts=tuple(verdicts),
            blocked_category=category,
            **(extra or {}),
        )
    )


def invalid_request_response(record: DeadLettered) -> list[Event]:
    """For a dead-lettered query whose request id could be read: record why, and tell the
    caller when it is known (`record.principal`).

    The reason starts with `invalid_request` when the query itself was malformed, and with
    the dead letter's kind otherwise (`unauthenticated`, `forbidden`, `internal_error`,
    `retries_exhausted`, `output_rejected`). It says nothing beyond the dead letter's reason.
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
            principal=record.principal,
            user=record.principal.user if record.principal is not None else "anonymous",
        )
    except ValueError:  # the id itself is not a valid identifier: nobody to answer
        return []
    return finals(response)

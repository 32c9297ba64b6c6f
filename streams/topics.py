"""Every topic, declared once: its name (under the configurable prefix) and its value types.

Callers write to `queries` and `documents` and read only their own reply stream,
`responses.<tenant>.<client>` (`REPLIES`, one per principal, named by the verified token).
Every other topic is internal: only ragstream's own principals read it. The full record of a
response (prompt and passages included) travels on the internal `responses` topic, for the
audit trail; the caller's copy carries the answer, usage and citation metadata only.

Keys are chosen for ordering: all events of one document are keyed by its `document_id`,
so they stay in one partition and in order. A topic may carry more than one event type; the
`event_type` field tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from ragstream.schemas.alerts import AlertChanged
from ragstream.schemas.events import (
    ChunkCreated,
    ChunkEmbedded,
    DeadLettered,
    DocumentIndexed,
    DocumentRetracted,
    DocumentSubmitted,
    Event,
)
from ragstream.schemas.judge import JudgementRecorded
from ragstream.schemas.queries import ContextRetrieved, QuerySubmitted, ResponseCompleted, TokenGenerated

__all__ = [
    "ALERTS",
    "ALL_TOPICS",
    "CHUNKS",
    "DEADLETTER",
    "DOCUMENTS",
    "EMBEDDED",
    "INDEXED",
    "JUDGEMENTS",
    "QUERIES",
    "RESPONSES",
    "RETRIEVALS",
    "REPLIES",
    "TopicSpec",
    "reply_topic",
    "topic_for",
]


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    """Name under the prefix: the full topic is `{prefix}.{name}`."""
    value_types: tuple[type[Event], ...]
    key_doc: str
    description: str
    caller_facing: bool = False
    """Callers publish or consume it (everything else is internal to ragstream)."""
    per_principal: bool = False
    """One topic per principal: `{prefix}.responses.{reply_to}`, named by each event."""

    def full_name(self, prefix: str) -> str:
        if self.per_principal:
            raise TypeError(f"{self.name} is one topic per principal: use topic_name(prefix, event)")
        return f"{prefix}.{self.name}"

    def topic_name(self, prefix: str, event: Event) -> str:
        """The topic `event` is published to."""
        if not self.per_principal:
            return f"{prefix}.{self.name}"
        reply_to = getattr(event, "reply_to", None)
        if not reply_to:
            raise TypeError(f"{type(event).__name__} has no reply_to: it cannot go to a reply stream")
        return reply_topic(prefix, reply_to)


def reply_topic(prefix: str, reply_to: str) -> str:
    """The reply stream of the principal whose `reply_to` is `<tenant>.<client>`."""
    return f"{prefix}.responses.{reply_to}"


DOCUMENTS = TopicSpec(
    "documents",
    (DocumentSubmitted,),
    key_doc="document_id",
    description="Documents to index, update or delete, each with a token. Publish here.",
    caller_facing=True,
)
CHUNKS = TopicSpec(
    "chunks",
    (ChunkCreated, DocumentRetracted),
    key_doc="document_id",
    description="Parsed, cleaned, token-aware chunks, and accepted deletions.",
)
EMBEDDED = TopicSpec(
    "chunks.embedded",
    (ChunkEmbedded, DocumentRetracted),
    key_doc="document_id",
    description="Chunks with their vectors, and deletions passed through in order.",
)
INDEXED = TopicSpec(
    "documents.indexed",
    (DocumentIndexed,),
    key_doc="document_id",
    description="One event per document submission that reached the store.",
)
DEADLETTER = TopicSpec(
    "deadletter",
    (DeadLettered,),
    key_doc="the original message's key, else its source event id",
    description="Messages a stage could not process, with the reason and the original bytes.",
)

QUERIES = TopicSpec(
    "queries",
    (QuerySubmitted,),
    key_doc="request_id",
    description="Questions, each with a token. Publish here.",
    caller_facing=True,
)
RETRIEVALS = TopicSpec(
    "retrievals",
    (ContextRetrieved,),
    key_doc="request_id",
    description="A query with the chunks retrieval chose for it, on its way to generation.",
)
REPLIES = TopicSpec(
    "responses.{reply_to}",
    (TokenGenerated, ResponseCompleted),
    key_doc="request_id",
    description=(
        "A caller's own stream: its answer deltas in sequence order, then exactly one final "
        "response per request (no prompt, no passages). Consume here."
    ),
    caller_facing=True,
    per_principal=True,
)
RESPONSES = TopicSpec(
    "responses",
    (ResponseCompleted,),
    key_doc="request_id",
    description=(
        "Internal: the full record of exactly one final response per request (ok, error or "
        "blocked), prompt and passages included, for the audit trail."
    ),
)

JUDGEMENTS = TopicSpec(
    "judgements",
    (JudgementRecorded,),
    key_doc="request_id",
    description=(
        "Internal: one judgement per judged request and judge, then the request's `overall`; "
        "for the audit trail and monitoring."
    ),
)

ALERTS = TopicSpec(
    "alerts",
    (AlertChanged,),
    key_doc="alert_id",
    description=(
        "Monitoring alerts: one event each time a rule starts or stops firing for a slice; "
        "for on-call tooling, and the `alerts` audit table."
    ),
)

ALL_TOPICS: tuple[TopicSpec, ...] = (
    DOCUMENTS,
    CHUNKS,
    EMBEDDED,
    INDEXED,
    QUERIES,
    RETRIEVALS,
    RESPONSES,
    JUDGEMENTS,
    ALERTS,
    DEADLETTER,
)
"""The topics `ragstream init` creates. Reply streams are created per principal on first use."""

_BY_EVENT: dict[type[Event], TopicSpec] = {}
for _spec in ALL_TOPICS:
    for _t in _spec.value_types:
        _BY_EVENT.setdefault(_t, _spec)
# A retraction is produced by the ingest stage onto `chunks`; the embed stage re-emits it
# onto `chunks.embedded` explicitly.


def topic_for(event: Event) -> TopicSpec:
    """The topic an event is published to by default."""
    return _BY_EVENT[type(event)]

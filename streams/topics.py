"""Every topic, declared once: its name (under the configurable prefix) and its value types.

Keys are chosen for ordering: all events of one document are keyed by its `document_id`,
so they stay in one partition and in order. A topic may carry more than one event type; the
`event_type` field tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from ragstream.schemas.events import (
    ChunkCreated,
    ChunkEmbedded,
    DeadLettered,
    DocumentIndexed,
    DocumentRetracted,
    DocumentSubmitted,
    Event,
)
from ragstream.schemas.queries import ContextRetrieved, QuerySubmitted, ResponseCompleted, TokenGenerated

__all__ = [
    "ALL_TOPICS",
    "CHUNKS",
    "DEADLETTER",
    "DOCUMENTS",
    "EMBEDDED",
    "INDEXED",
    "QUERIES",
    "RESPONSES",
    "RETRIEVALS",
    "TOKENS",
    "TopicSpec",
    "topic_for",
]


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    """Name under the prefix: the full topic is `{prefix}.{name}`."""
    value_types: tuple[type[Event], ...]
    key_doc: str
    description: str

    def full_name(self, prefix: str) -> str:
        return f"{prefix}.{self.name}"


DOCUMENTS = TopicSpec(
    "documents",
    (DocumentSubmitted,),
    key_doc="document_id",
    description="Documents to index, update or delete. Publish here.",
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
    description="Questions. Publish here.",
)
RETRIEVALS = TopicSpec(
    "retrievals",
    (ContextRetrieved,),
    key_doc="request_id",
    description="A query with the chunks retrieval chose for it, on its way to generation.",
)
TOKENS = TopicSpec(
    "responses.tokens",
    (TokenGenerated,),
    key_doc="request_id",
    description="Answer tokens as they are generated (streaming requests), ordered by sequence.",
)
RESPONSES = TopicSpec(
    "responses",
    (ResponseCompleted,),
    key_doc="request_id",
    description="Exactly one final response per request: ok, error or blocked. Consume here.",
)

ALL_TOPICS: tuple[TopicSpec, ...] = (
    DOCUMENTS,
    CHUNKS,
    EMBEDDED,
    INDEXED,
    QUERIES,
    RETRIEVALS,
    TOKENS,
    RESPONSES,
    DEADLETTER,
)

_BY_EVENT: dict[type[Event], TopicSpec] = {}
for _spec in ALL_TOPICS:
    for _t in _spec.value_types:
        _BY_EVENT.setdefault(_t, _spec)
# A retraction is produced by the ingest stage onto `chunks`; the embed stage re-emits it
# onto `chunks.embedded` explicitly.


def topic_for(event: Event) -> TopicSpec:
    """The topic an event is published to by default."""
    return _BY_EVENT[type(event)]

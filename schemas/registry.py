"""Every event type, registered explicitly, by its `event_type`."""

from __future__ import annotations

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

__all__ = ["EVENT_TYPES"]

EVENT_TYPES: dict[str, type[Event]] = {
    cls.model_fields["event_type"].default: cls
    for cls in (
        DocumentSubmitted,
        ChunkCreated,
        ChunkEmbedded,
        DocumentRetracted,
        DocumentIndexed,
        DeadLettered,
        QuerySubmitted,
        ContextRetrieved,
        TokenGenerated,
        ResponseCompleted,
        JudgementRecorded,
        AlertChanged,
    )
}
"""The JSON Schema export and the audit sink use it."""

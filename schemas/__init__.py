"""Event contracts shared by every stage, and the error hierarchy.

Events are frozen pydantic v2 models that forbid unknown fields and carry a `schema_version`.
"""

from ragstream.schemas.events import (
    Chunk,
    ChunkCreated,
    ChunkEmbedded,
    DeadLettered,
    DocumentIndexed,
    DocumentRetracted,
    DocumentSubmitted,
    Event,
)
from ragstream.schemas.queries import (
    Citation,
    ContextRetrieved,
    QuerySubmitted,
    ResponseCompleted,
    TokenGenerated,
    Usage,
)
from ragstream.schemas.registry import EVENT_TYPES

__all__ = [
    "EVENT_TYPES",
    "Chunk",
    "ChunkCreated",
    "ChunkEmbedded",
    "Citation",
    "ContextRetrieved",
    "DeadLettered",
    "DocumentIndexed",
    "DocumentRetracted",
    "DocumentSubmitted",
    "Event",
    "QuerySubmitted",
    "ResponseCompleted",
    "TokenGenerated",
    "Usage",
]

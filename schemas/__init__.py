"""Event contracts shared by every stage, and the error hierarchy.

Events are frozen pydantic v2 models that forbid unknown fields and carry a `schema_version`.
"""

from ragstream.schemas.events import (
    EVENT_TYPES,
    Chunk,
    ChunkCreated,
    ChunkEmbedded,
    DeadLettered,
    DocumentIndexed,
    DocumentRetracted,
    DocumentSubmitted,
    Event,
)

__all__ = [
    "EVENT_TYPES",
    "Chunk",
    "ChunkCreated",
    "ChunkEmbedded",
    "DeadLettered",
    "DocumentIndexed",
    "DocumentRetracted",
    "DocumentSubmitted",
    "Event",
]

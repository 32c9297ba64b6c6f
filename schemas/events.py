"""Event contracts for the document path and the dead-letter topic.

Every event shares the envelope in `Event`: `event_id` (unique per event), `trace_id`
(shared by every event that stems from one submission or request), `tenant` and
`produced_at`. Field names carry units. Values are JSON on the wire (UTF-8), so plain Kafka
clients can produce and consume them; `ragstream schemas export` writes the JSON Schemas.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

from ragstream.schemas.identity import Principal
from ragstream.schemas.ids import (
    IDENTIFIER_CHARS,
    IDENTIFIER_MAX_CHARS,
    IDENTIFIER_RE,
    Identifier,
    new_id,
    utcnow,
)

__all__ = [
    "IDENTIFIER_CHARS",
    "IDENTIFIER_MAX_CHARS",
    "IDENTIFIER_RE",
    "MAX_TOKEN_FIELD_CHARS",
    "Chunk",
    "ChunkCreated",
    "ChunkEmbedded",
    "DeadLettered",
    "DocumentIndexed",
    "DocumentRetracted",
    "DocumentSubmitted",
    "Event",
    "Identifier",
    "MetadataValue",
    "Principal",
    "new_id",
    "unset_identity_dropped",
    "utcnow",
]


MAX_TOKEN_FIELD_CHARS = 16 * 1024 * 1024
"""The contract's bound on a `token` field; `auth.max_token_bytes` (8 KB) is the real limit,
checked by the verifier so that an oversized token is refused as `unauthenticated`."""

MetadataValue = str | int | float | bool
"""Flat metadata values, so they can be filtered on in every vector store."""


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


Base64Bytes = Annotated[bytes, PlainSerializer(_b64, return_type=str, when_used="json")]


class Event(BaseModel):
    """The common envelope."""

    # cache_strings="keys": pydantic's default also interns short string *values* while
    # parsing JSON; ids and timestamps are unique per event, so that only costs (~15% of
    # decoding a response, measured in the audit sink).
    # allow_inf_nan=False: JSON has no NaN or Infinity; accepting them (as pydantic does by
    # default) would re-encode them as null, which the next stage rejects.
    model_config = ConfigDict(
        frozen=True, extra="forbid", ser_json_timedelta="float", cache_strings="keys", allow_inf_nan=False
    )

    # Subclasses pin `event_type` and `schema_version` with Literal defaults.
    event_type: str
    schema_version: int
    event_id: str = Field(default_factory=new_id, min_length=1, max_length=64)
    trace_id: str = Field(default_factory=new_id, min_length=1, max_length=IDENTIFIER_MAX_CHARS)
    """As long as any id: a query's trace id is its request id."""
    tenant: Identifier = "default"
    produced_at: datetime = Field(default_factory=utcnow)

    key_field: ClassVar[str] = "event_id"
    """The field whose value is the Kafka key: events that must stay ordered share it."""

    def kafka_key(self) -> bytes:
        return str(getattr(self, self.key_field)).encode()


def unset_identity_dropped(model: BaseModel, data: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """`data` (a command event serialised to a dict) without the identity fields its sender
    never set."""
    out: dict[str, Any] = data
    for name in names:
        if name not in model.model_fields_set:
            out.pop(name, None)
    return out


class DocumentSubmitted(Event):
    """A document to index, a new version of one, or (`deleted=True`) its removal.

    `content` is UTF-8 text when `content_encoding="utf-8"` and base64 when binary (PDF).
    Re-submitting the same content, title, metadata and access groups is a no-op; any change
    replaces the document's chunks. A `version` lower than the indexed one is ignored.
    """

    event_type: Literal["document.submitted"] = "document.submitted"
    schema_version: Literal[1] = 1
    document_id: Identifier
    source: str = Field(default="", max_length=2048)
    title: str = Field(default="", max_length=1024)
    content: str = ""
    content_encoding: Literal["utf-8", "base64"] = "utf-8"
    media_type: str = Field(default="text/plain", max_length=128)
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    access_groups: tuple[Identifier, ...] = ()
    """Groups allowed to read the document. Empty means everyone in the tenant."""
    version: int = Field(default=1, ge=1)
    deleted: bool = False
    token: str | None = Field(default=None, max_length=MAX_TOKEN_FIELD_CHARS, repr=False)
    """The submitter's signed token (JWT): its claims must allow `ingest` into `tenant`."""
    principal: Principal | None = None
    """Set by ragstream once the token is verified; a submitter never sets it."""

    key_field: ClassVar[str] = "document_id"

    @model_serializer(mode="wrap")
    def _tenant_only_when_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # An unset tenant is not written, so the token's claim fills it in.
        return unset_identity_dropped(self, handler(self), ("tenant",))

    def content_bytes(self) -> bytes:
        """Raw document bytes.

        Raises:
            ValueError: `content` is not valid base64.
        """
        if self.content_encoding == "base64":
            return base64.b64decode(self.content, validate=True)
        return self.content.encode("utf-8")


class Chunk(BaseModel):
    """A span of a parsed document, with enough context to cite it and to filter on it."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    chunk_id: str = Field(min_length=1, max_length=400)
    document_id: Identifier
    tenant: Identifier
    fingerprint: str = Field(min_length=8, max_length=64)
    """Hash of the document's content, title, metadata and access groups."""
    version: int = Field(ge=1)
    chunk_index: int = Field(ge=0)
    chunk_count: int = Field(ge=1)
    text: str = Field(min_length=1)
    headings: tuple[str, ...] = ()
    """Heading path above the chunk, outermost first."""
    char_start: int = Field(ge=0)
    char_end: int = Field(ge=0)
    page: int | None = None
    token_count: int = Field(ge=1)
    title: str = ""
    source: str = ""
    media_type: str = "text/plain"
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    access_groups: tuple[Identifier, ...] = ()

    def embedding_text(self) -> str:
        """What the embedder sees: title and heading path give a chunk its context."""
        context = " > ".join(h for h in (self.title, *self.headings) if h)
        return f"{context}\n{self.text}" if context else self.text


class ChunkCreated(Event):
    event_type: Literal["chunk.created"] = "chunk.created"
    schema_version: Literal[1] = 1
    source_event_id: str
    """`event_id` of the DocumentSubmitted this chunk came from."""
    chunk: Chunk
    principal: Principal | None = None
    """Who submitted the document (verified), for the audit trail."""

    @property
    def document_id(self) -> str:
        return self.chunk.document_id

    def kafka_key(self) -> bytes:
        return self.chunk.document_id.encode()


class ChunkEmbedded(Event):
    event_type: Literal["chunk.embedded"] = "chunk.embedded"
    schema_version: Literal[1] = 1
    source_event_id: str
    chunk: Chunk
    vector: tuple[float, ...] = Field(min_length=1)
    embedding_model: str
    principal: Principal | None = None

    def kafka_key(self) -> bytes:
        return self.chunk.document_id.encode()


class DocumentRetracted(Event):
    """The ingest stage accepted a deletion. It travels the chunk topics behind any earlier
    chunks of the same document (same key, same partition), so the index stage removes the
    document only after everything submitted before the delete has landed."""

    event_type: Literal["document.retracted"] = "document.retracted"
    schema_version: Literal[1] = 1
    source_event_id: str
    document_id: Identifier
    version: int = Field(ge=1)
    principal: Principal | None = None

    key_field: ClassVar[str] = "document_id"


class DocumentIndexed(Event):
    """The terminal event of a document submission that succeeded.

    `outcome`: `indexed` (new chunks written), `unchanged` (same fingerprint, nothing written),
    `deleted` (chunks removed), `stale` (a newer version is already indexed; ignored).
    """

    event_type: Literal["document.indexed"] = "document.indexed"
    schema_version: Literal[1] = 1
    source_event_id: str
    document_id: Identifier
    version: int = Field(ge=1)
    fingerprint: str = ""
    outcome: Literal["indexed", "unchanged", "deleted", "stale"]
    chunk_count: int = Field(ge=0)
    chunks_removed: int = Field(default=0, ge=0)
    principal: Principal | None = None
    """Who submitted the document (verified)."""

    key_field: ClassVar[str] = "document_id"


class DeadLettered(Event):
    """A message a stage could not process, kept whole so it can be inspected and replayed.

    `source_event_id` and `request_id` are filled when they can be read from the bad message,
    so the submitter can be told.
    """

    event_type: Literal["dead_lettered"] = "dead_lettered"
    schema_version: Literal[1] = 1
    stage: str
    error_kind: str
    message: str
    original: Base64Bytes
    original_topic: str | None = None
    original_partition: int | None = None
    original_offset: int | None = None
    original_key: str | None = None
    original_truncated: bool = False
    source_event_id: str | None = None
    request_id: str | None = None
    document_id: str | None = None
    principal: Principal | None = None
    """The sender's verified identity, when it could be established (audit, and who to tell)."""

    @field_validator("original", mode="before")
    @classmethod
    def _decode_b64(cls, v: Any) -> Any:
        # JSON carries bytes as base64 text; Python callers pass bytes.
        if isinstance(v, str):
            return base64.b64decode(v, validate=True)
        return v

    def kafka_key(self) -> bytes:
        return (self.original_key or self.source_event_id or self.event_id).encode()

"""Event contracts for question answering.

A caller publishes `QuerySubmitted` (key: `request_id`) and consumes `TokenGenerated` deltas
(key: `request_id`, ordered by `sequence`) and exactly one final `ResponseCompleted` per
request (key: `request_id`). Between the stages, `ContextRetrieved` carries the query and the
chunks retrieval chose.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from ragstream.schemas.events import (
    MAX_TOKEN_FIELD_CHARS,
    Event,
    Identifier,
    MetadataValue,
    Principal,
    new_id,
    unset_identity_dropped,
)
from ragstream.schemas.guard import GuardVerdict

__all__ = [
    "Citation",
    "ContextRetrieved",
    "ConversationTurn",
    "GenerationOptions",
    "Passage",
    "PromptMessage",
    "QuerySubmitted",
    "ResponseCompleted",
    "RetrievalOptions",
    "RetrievedChunk",
    "TokenGenerated",
    "Usage",
]


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class ConversationTurn(_Part):
    role: Literal["user", "assistant"]
    content: str = Field(max_length=20_000)


class RetrievalOptions(_Part):
    top_k: int = Field(default=5, ge=1, le=50)
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    """Hybrid weighting: 1.0 = vector only, 0.0 = keyword (BM25) only."""
    mode: Literal["hybrid", "vector", "keyword"] = "hybrid"
    metadata_filters: dict[str, MetadataValue] = Field(default_factory=dict)
    document_ids: tuple[str, ...] | None = None
    neighbours: int = Field(default=0, ge=0, le=3)
    """Also include this many chunks either side of each hit, from the same document."""


class GenerationOptions(_Part):
    route: str = Field(default="default", min_length=1, max_length=128)
    """A route name from `generation.routes`; it names the Triton model to call."""
    max_tokens: int = Field(default=256, ge=1, le=4096)
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)


class QuerySubmitted(Event):
    """A question. `request_id` correlates every event of its answer."""

    event_type: Literal["query.submitted"] = "query.submitted"
    schema_version: Literal[1] = 1
    request_id: Identifier = Field(default_factory=new_id)
    user: str = Field(default="anonymous", min_length=1, max_length=256)
    access_groups: tuple[Identifier, ...] = ()
    """The user's groups; retrieval only returns chunks open to one of them (or to all)."""
    question: str = Field(min_length=1, max_length=8_000)
    conversation_id: str | None = Field(default=None, max_length=256)
    history: tuple[ConversationTurn, ...] = Field(default=(), max_length=50)
    retrieval: RetrievalOptions = RetrievalOptions()
    generation: GenerationOptions = GenerationOptions()
    deadline_ms: int = Field(default=30_000, ge=1, le=600_000)
    """Time budget from `produced_at`; past it, the caller gets an error response."""
    stream: bool = True
    """Publish `TokenGenerated` deltas as they are generated."""
    token: str | None = Field(default=None, max_length=MAX_TOKEN_FIELD_CHARS, repr=False)
    """The caller's signed token (JWT). Its claims give the tenant, user, groups and reply
    stream; `tenant`, `user` and `access_groups` above may be left out, and must agree with
    the claims when given. Removed once verified: no token travels past the first stage."""
    principal: Principal | None = None
    """Set by ragstream once the token is verified; a caller never sets it."""
    guard_policy: str | None = Field(default=None, max_length=128)
    """A guardrail policy to apply instead of the route's or tenant's, among those a request
    may choose (`guardrails.request_may_choose`)."""

    key_field: ClassVar[str] = "request_id"

    @model_serializer(mode="wrap")
    def _identity_only_when_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # `tenant`, `user` and `access_groups` left at their defaults are not written, so the
        # token's claims fill them in; written defaults would be a claim the token must match.
        return unset_identity_dropped(self, handler(self), ("tenant", "user", "access_groups"))

    @model_validator(mode="after")
    def _trace_is_request(self) -> QuerySubmitted:
        # The request id is the trace id of everything that follows.
        if self.trace_id != self.request_id:
            object.__setattr__(self, "trace_id", self.request_id)
        return self

    def deadline_at(self) -> datetime:
        return self.produced_at + timedelta(milliseconds=self.deadline_ms)


class RetrievedChunk(_Part):
    chunk_id: str
    document_id: str
    title: str = ""
    text: str
    headings: tuple[str, ...] = ()
    chunk_index: int = 0
    source: str = ""
    score: float = 0.0
    vector_score: float | None = None
    keyword_score: float | None = None
    neighbour_of: str | None = None
    """Set when the chunk was added as a neighbour of this hit."""


class ContextRetrieved(Event):
    """Retrieval's result, handed to generation."""

    event_type: Literal["context.retrieved"] = "context.retrieved"
    schema_version: Literal[1] = 1
    request_id: Identifier
    query: QuerySubmitted
    chunks: tuple[RetrievedChunk, ...]
    latency_ms: dict[str, float] = Field(default_factory=dict)
    """Per-stage latencies so far (e.g. `queue_retrieval`, `embed_query`, `search`)."""
    guard_policy: str | None = None
    """The guardrail policy that applies to the request (its input and context rails have
    passed; `query.question` is masked where they mask)."""
    guard_verdicts: tuple[GuardVerdict, ...] = ()

    key_field: ClassVar[str] = "request_id"


class TokenGenerated(Event):
    """A piece of the answer. Concatenated in `sequence` order, the deltas equal the final
    answer of the `ResponseCompleted` with the same request id."""

    event_type: Literal["token.generated"] = "token.generated"
    schema_version: Literal[1] = 1
    request_id: Identifier
    sequence: int = Field(ge=0)
    delta: str

    reply_to: str | None = None
    """The reply stream (`<tenant>.<client>`) it is published to."""

    key_field: ClassVar[str] = "request_id"


class PromptMessage(_Part):
    role: Literal["system", "user", "assistant"]
    content: str


class Citation(_Part):
    number: int = Field(ge=1)
    """The `[n]` the answer uses for this source."""
    document_id: str
    chunk_id: str
    title: str = ""
    score: float = 0.0
    source: str = ""
    cited: bool = False
    """True when the answer refers to this source as `[number]`."""


class Passage(_Part):
    """A retrieved passage as the model was given it: the judges' context."""

    number: int = Field(ge=1)
    """The `[n]` it has in the prompt."""
    chunk_id: str
    document_id: str
    text: str


class Usage(_Part):
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ResponseCompleted(Event):
    """The one final event of every request: an answer, an error or a block."""

    event_type: Literal["response.completed"] = "response.completed"
    schema_version: Literal[1] = 1
    request_id: Identifier
    user: str = "anonymous"
    status: Literal["ok", "error", "blocked"]
    error_reason: str | None = None
    """Why the status is not ok: `deadline_exceeded`, `retrieval_failed`, `generation_failed`,
    `invalid_request`, `unknown_route`, ... followed by a human-readable message."""
    question: str = ""
    answer: str = ""
    citations: tuple[Citation, ...] = ()
    usage: Usage = Usage()
    model_id: str | None = None
    route: str | None = None
    finish_reason: str | None = None
    """`stop`, `length`, `deadline` or `error`."""
    prompt_template_version: str | None = None
    prompt_messages: tuple[PromptMessage, ...] = ()
    passages: tuple[Passage, ...] = ()
    """The passages in the prompt, in order (internal record only): what the judges judge
    an answer against."""
    """The exact messages sent to the model (for audit and replay)."""
    retrieved_chunk_ids: tuple[str, ...] = ()
    retrieved_scores: tuple[float, ...] = ()
    latency_ms: dict[str, float] = Field(default_factory=dict)
    """Per-stage latencies in ms, e.g. `queue_retrieval`, `embed_query`, `search`,
    `queue_generation`, `prompt`, `time_to_first_token`, `generation`, `total`."""
    streamed: bool = True
    delta_count: int = Field(default=0, ge=0)
    """How many `TokenGenerated` events were published before this one (sequences
    0..delta_count-1), so a consumer knows when it has them all."""
    principal: Principal | None = None
    """Who asked (verified): on the internal record only."""
    reply_to: str | None = None
    """Set on the caller's copy: the reply stream it is published to. The caller's copy has
    no `prompt_messages` and no `principal` (see `for_caller`)."""
    guard_policy: str | None = None
    guard_verdicts: tuple[GuardVerdict, ...] = ()
    """Every guardrail verdict of the request (input, context, output windows)."""
    blocked_category: str | None = None
    """With `status="blocked"`: the category of the finding that blocked it."""

    key_field: ClassVar[str] = "request_id"

    def for_caller(self) -> ResponseCompleted | None:
        """The copy for the caller's own reply stream: the answer, status, usage, latencies
        and citation metadata, without the prompt (which holds the passages). None when the
        caller is not known."""
        if self.principal is None:
            return None
        return self.model_copy(
            update={
                "prompt_messages": (),
                "passages": (),
                "principal": None,
                "reply_to": self.principal.reply_to,
            }
        )

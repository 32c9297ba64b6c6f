"""The vector store contract, its value types, rank fusion and the backend registry.

Every backend enforces tenant and access-group visibility inside the query (a prefilter or
where clause), never by dropping results afterwards, so `top_k` is always filled from what the
caller may see. A chunk with no `access_groups` is visible to everyone in its tenant; otherwise
only to callers sharing at least one group. Another tenant's chunks are never visible.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ragstream.schemas.errors import BadInputError, ConfigError
from ragstream.schemas.events import Chunk, MetadataValue

if TYPE_CHECKING:
    from ragstream.infra.settings import Settings

__all__ = [
    "chunk_fields",
    "hit_from_fields",
    "DocumentState",
    "FingerprintState",
    "SearchHit",
    "SearchMode",
    "SearchQuery",
    "VectorStore",
    "check_vector",
    "metadata_terms",
    "open_vector_store",
    "weighted_rrf",
]

SearchMode = Literal["hybrid", "vector", "keyword"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FingerprintState(_Model):
    """What is stored for one fingerprint (one content version) of a document."""

    fingerprint: str
    version: int
    chunk_count: int
    """Chunks the document was split into (`Chunk.chunk_count`)."""
    chunks_stored: int
    """Chunks actually present; fewer than `chunk_count` means indexing is still under way."""

    @property
    def complete(self) -> bool:
        return self.chunks_stored >= self.chunk_count


class DocumentState(_Model):
    """Everything stored for a document, by fingerprint; the index stage dedupes with it."""

    tenant: str
    document_id: str
    fingerprints: dict[str, FingerprintState]

    @property
    def version(self) -> int:
        """The highest version stored."""
        return max(f.version for f in self.fingerprints.values())

    def is_complete(self, fingerprint: str) -> bool:
        """Whether this fingerprint is stored with all of its chunks."""
        state = self.fingerprints.get(fingerprint)
        return state is not None and state.complete


class SearchQuery(_Model):
    """A retrieval request, already scoped to the caller's tenant and groups.

    `alpha` weights hybrid fusion: 1.0 ranks by vector only, 0.0 by keyword only.
    `metadata_filters` are exact-equality filters on `Chunk.metadata`, ANDed together.
    """

    tenant: str = Field(min_length=1)
    access_groups: tuple[str, ...] = ()
    text: str = ""
    vector: tuple[float, ...] | None = None
    top_k: int = Field(default=8, ge=1, le=1000)
    mode: SearchMode = "hybrid"
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    metadata_filters: dict[str, MetadataValue] = Field(default_factory=dict)
    document_ids: tuple[str, ...] | None = None
    """Restrict the search to these documents; None means all, an empty tuple means none."""

    @model_validator(mode="after")
    def _inputs_for_mode(self) -> Self:
        if self.mode in ("vector", "hybrid") and not self.vector:
            raise ValueError(f"mode={self.mode!r} needs a query vector")
        if self.mode in ("keyword", "hybrid") and not self.text.strip():
            raise ValueError(f"mode={self.mode!r} needs query text")
        return self


class SearchHit(_Model):
    """A retrieved chunk with what a citation needs, and how it scored.

    `score` orders the hits: the fused RRF score in hybrid mode, cosine similarity in vector
    mode, BM25 in keyword mode. `vector_score` (cosine similarity) and `keyword_score` (BM25)
    are filled where the backend reports them.
    """

    chunk_id: str
    document_id: str
    tenant: str
    fingerprint: str
    version: int
    chunk_index: int
    chunk_count: int
    title: str
    text: str
    headings: tuple[str, ...] = ()
    source: str = ""
    media_type: str = "text/plain"
    page: int | None = None
    char_start: int = 0
    char_end: int = 0
    token_count: int = 1
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    access_groups: tuple[str, ...] = ()
    score: float = 0.0
    vector_score: float | None = None
    keyword_score: float | None = None


@runtime_checkable
class VectorStore(Protocol):
    """Chunk storage with hybrid retrieval. Constructors do no I/O; call `start()` first."""

    async def start(self) -> None:
        """Connect, and create the table or collection if it does not exist.

        Raises:
            StartupError: the backend cannot be reached or opened.
            ConfigError: the existing table does not match the settings (e.g. dimension).
        """
        ...

    async def close(self) -> None: ...

    async def upsert(self, rows: Sequence[tuple[Chunk, Sequence[float]]]) -> None:
        """Write chunks with their vectors; a chunk already stored (same tenant and
        `chunk_id`) is replaced, so redelivery never duplicates.

        Raises:
            BadInputError: a vector has the wrong dimension or non-finite values.
            DependencyUnavailable: the backend did not accept the write; retry.
        """
        ...

    async def document_state(self, tenant: str, document_id: str) -> DocumentState | None:
        """What is stored for a document, or None if nothing is.

        Raises:
            DependencyUnavailable: the backend did not answer.
        """
        ...

    async def count_chunks(self, tenant: str, document_id: str, fingerprint: str | None = None) -> int:
        """Chunks stored for a document (of one fingerprint, if given).

        Raises:
            DependencyUnavailable: the backend did not answer.
        """
        ...

    async def delete_document(
        self, tenant: str, document_id: str, *, keep_fingerprint: str | None = None
    ) -> int:
        """Delete a document's chunks, or all but those of `keep_fingerprint` (replacing an
        old version once the new one is complete). Returns how many were removed.

        Raises:
            DependencyUnavailable: the backend did not answer.
        """
        ...

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        """The best `query.top_k` chunks the caller may see, best first.

        Raises:
            DependencyUnavailable: the backend did not answer.
        """
        ...

    async def neighbours(
        self,
        tenant: str,
        document_id: str,
        chunk_index: int,
        window: int,
        access_groups: Sequence[str],
        *,
        fingerprint: str | None = None,
    ) -> list[SearchHit]:
        """Chunks `chunk_index - window .. chunk_index + window` of a document (the chunk
        itself included) that the caller may see, in document order. Pass the hit's
        `fingerprint` so a version being replaced does not mix in.

        Raises:
            DependencyUnavailable: the backend did not answer.
        """
        ...


def weighted_rrf(
    vector_ranking: Sequence[str],
    keyword_ranking: Sequence[str],
    *,
    alpha: float,
    k: int = 60,
) -> list[tuple[str, float]]:
    """Fuse two ranked id lists by reciprocal rank fusion, weighted by `alpha`.

    score(d) = alpha / (k + rank_v(d)) + (1 - alpha) / (k + rank_k(d))

    with 1-based ranks, and a term left out when d is not in that list. `alpha=1` ranks by the
    vector list alone, `alpha=0` by the keyword list alone; ids whose score is 0 (only in a list
    weighted 0) are dropped. Ties go to the id with the better single rank, then to the id, so
    the order is deterministic. Weaviate's server-side `rankedFusion` is the same formula (recent
    servers use 0-based ranks, which changes scores slightly but orders results the same way
    up to near-ties).

    Raises:
        ValueError: alpha is outside [0, 1] or k < 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scores: dict[str, float] = {}
    best_rank: dict[str, int] = {}
    for weight, ranking in ((alpha, vector_ranking), (1.0 - alpha, keyword_ranking)):
        seen: set[str] = set()
        for rank, item in enumerate(ranking, start=1):
            if item in seen:  # a list that repeats an id counts its best rank only
                continue
            seen.add(item)
            best_rank[item] = min(best_rank.get(item, rank), rank)
            if weight > 0.0:
                scores[item] = scores.get(item, 0.0) + weight / (k + rank)
    fused = [(item, score) for item, score in scores.items() if score > 0.0]
    fused.sort(key=lambda pair: (-pair[1], best_rank[pair[0]], pair[0]))
    return fused


def metadata_terms(metadata: Mapping[str, MetadataValue]) -> list[str]:
    """Encode metadata as exact-match terms (`["key", value]` as JSON), one per entry.

    Both backends store these in a string-array column and filter `key == value` as "the array
    contains this term", which needs no per-key schema. Integral floats are written as ints, so
    3 and 3.0 match; strings, numbers and booleans never match each other ("1" != 1 != true).
    """
    terms = []
    for key, value in metadata.items():
        if isinstance(value, float) and not isinstance(value, bool) and value.is_integer():
            value = int(value)
        terms.append(json.dumps([key, value], ensure_ascii=False, separators=(",", ":")))
    return terms


def check_vector(chunk: Chunk, vector: Sequence[float], dimension: int) -> list[float]:
    """The vector as floats, checked against the store's dimension.

    Raises:
        BadInputError: wrong dimension or a NaN/inf value.
    """
    values = [float(v) for v in vector]
    if len(values) != dimension:
        raise BadInputError(
            f"chunk {chunk.chunk_id!r}: vector has {len(values)} dimensions, the store expects {dimension}"
        )
    if not all(math.isfinite(v) for v in values):
        raise BadInputError(f"chunk {chunk.chunk_id!r}: vector has NaN or infinite values")
    return values


# --- registry ---------------------------------------------------------------------------
def _load_lancedb(settings: Settings) -> VectorStore:
    try:
        from ragstream.infra.vectorstore.lance import LanceDBVectorStore
    except ImportError as exc:
        raise ConfigError(
            f"vector_store.kind='lancedb' needs the lancedb package ({exc}); "
            "pip install 'lancedb>=0.40,<0.41'"
        ) from exc
    return LanceDBVectorStore(settings)


def _load_weaviate(settings: Settings) -> VectorStore:
    if not settings.vector_store.weaviate_url:
        raise ConfigError(
            "vector_store.kind='weaviate' needs vector_store.weaviate_url "
            "(env RAGSTREAM_VECTOR_STORE__WEAVIATE_URL, e.g. http://localhost:8080)"
        )
    try:
        from ragstream.infra.vectorstore.weaviate import WeaviateVectorStore
    except ImportError as exc:
        raise ConfigError(
            f"vector_store.kind='weaviate' needs weaviate-client ({exc}); "
            "pip install 'weaviate-client>=4.16,<5'"
        ) from exc
    return WeaviateVectorStore(settings)


_LOADERS: dict[str, Callable[[Settings], VectorStore]] = {
    "lancedb": _load_lancedb,
    "weaviate": _load_weaviate,
}


def open_vector_store(settings: Settings) -> VectorStore:
    """Build (not start) the store named by `settings.vector_store.kind`.

    Raises:
        ConfigError: unknown kind, a setting the backend needs is missing, or its client
            package is not installed.
    """
    kind = settings.vector_store.kind
    try:
        loader = _LOADERS[kind]
    except KeyError:
        raise ConfigError(f"vector_store.kind={kind!r} is not one of {sorted(_LOADERS)}") from None
    return loader(settings)


def chunk_fields(chunk: Chunk) -> dict[str, object]:
    """What every backend stores of a chunk, besides its vector and backend-specific fields:
    one mapping, so the backends cannot drift apart."""
    return {
        "chunk_id": chunk.chunk_id,
        "tenant": chunk.tenant,
        "document_id": chunk.document_id,
        "fingerprint": chunk.fingerprint,
        "version": chunk.version,
        "chunk_index": chunk.chunk_index,
        "chunk_count": chunk.chunk_count,
        "text": chunk.text,
        "headings": list(chunk.headings),
        "title": chunk.title,
        "source": chunk.source,
        "media_type": chunk.media_type,
        "page": chunk.page,
        "char_start": chunk.char_start,
        "char_end": chunk.char_end,
        "token_count": chunk.token_count,
        "metadata_json": json.dumps(chunk.metadata, ensure_ascii=False),
        "metadata_kv": metadata_terms(chunk.metadata),
        "access_groups": list(chunk.access_groups),
    }


def hit_from_fields(
    fields: Mapping[str, Any],
    *,
    score: float = 0.0,
    vector_score: float | None = None,
    keyword_score: float | None = None,
) -> SearchHit:
    """A `SearchHit` from what `chunk_fields` stored (missing optional fields take defaults;
    numbers may come back as floats from some backends)."""

    def number(name: str, default: int) -> int:
        value = fields.get(name)
        return default if value is None else int(value)

    page = fields.get("page")
    return SearchHit(
        chunk_id=str(fields["chunk_id"]),
        document_id=str(fields["document_id"]),
        tenant=str(fields["tenant"]),
        fingerprint=str(fields["fingerprint"]),
        version=number("version", 1),
        chunk_index=number("chunk_index", 0),
        chunk_count=number("chunk_count", 1),
        title=str(fields.get("title") or ""),
        text=str(fields["text"]),
        headings=tuple(fields.get("headings") or ()),
        source=str(fields.get("source") or ""),
        media_type=str(fields.get("media_type") or "text/plain"),
        page=None if page is None else int(page),
        char_start=number("char_start", 0) or 0,
        char_end=number("char_end", 0) or 0,
        token_count=number("token_count", 1) or 1,
        metadata=json.loads(str(fields.get("metadata_json") or "{}")),
        access_groups=tuple(fields.get("access_groups") or ()),
        score=score,
        vector_score=vector_score,
        keyword_score=keyword_score,
    )

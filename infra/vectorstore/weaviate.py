"""Weaviate adapter (production), on weaviate-client v4's async client.

One collection with multi-tenancy: each ragstream tenant is a Weaviate tenant (its own shard),
so every read and write names the tenant and one tenant's objects cannot reach another's
results. Access groups are a where filter inside the query: `readers` (the chunk's groups, or
`["*"]` when it has none; group ids cannot start with `*`) contains any of `["*", *caller_groups]`.

Vectors are ours (no vectorizer), in a named vector "default" with cosine HNSW. Object UUIDs are
uuid5(chunk_id), and batch inserts overwrite an object with the same UUID, so redelivery is an
upsert. Hybrid search uses the server's `rankedFusion` with `alpha`: the same weighted RRF
(k=60) as `weighted_rrf`. Keyword search is BM25 over `search_text` (title, headings, text).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import weaviate
from weaviate.classes.aggregate import GroupByAggregate, Metrics
from weaviate.classes.config import Configure, DataType, Property, Tokenization, VectorDistances
from weaviate.classes.data import DataObject
from weaviate.classes.init import AdditionalConfig, Auth, Timeout
from weaviate.classes.query import Filter, HybridFusion, MetadataQuery
from weaviate.classes.tenants import Tenant
from weaviate.exceptions import UnexpectedStatusCodeError, WeaviateBaseError

from ragstream.infra.vectorstore.base import (
    DocumentState,
    FingerprintState,
    SearchHit,
    SearchQuery,
    check_vector,
    chunk_fields,
    hit_from_fields,
    metadata_terms,
)
from ragstream.schemas.errors import ConfigError, DependencyUnavailable, StartupError
from ragstream.schemas.events import Chunk

if TYPE_CHECKING:
    from weaviate.collections.classes.filters import _Filters

    from ragstream.infra.settings import Settings

__all__ = ["WeaviateVectorStore", "chunk_uuid", "weaviate_tenant"]

log = logging.getLogger(__name__)

_VECTOR = "default"
_PUBLIC = "*"  # the `readers` entry of a chunk without access groups
_UUID_NAMESPACE = uuid.UUID("5b1f2a8e-3c4d-5e6f-8a9b-0c1d2e3f4a5b")
_TENANT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# delete_many removes at most QUERY_MAXIMUM_RESULTS (10k by default) per call.
_MAX_DELETE_ROUNDS = 1000
_RETURN_PROPERTIES = [
    "chunk_id",
    "document_id",
    "tenant",
    "fingerprint",
    "version",
    "chunk_index",
    "chunk_count",
    "title",
    "text",
    "headings",
    "source",
    "media_type",
    "page",
    "char_start",
    "char_end",
    "token_count",
    "metadata_json",
    "access_groups",
]


def chunk_uuid(chunk_id: str) -> uuid.UUID:
    """The object UUID for a chunk: stable, so a re-sent chunk overwrites itself."""
    return uuid.uuid5(_UUID_NAMESPACE, chunk_id)


def weaviate_tenant(tenant: str) -> str:
    """The Weaviate tenant name for a ragstream tenant.

    Weaviate allows `[A-Za-z0-9_-]{1,64}`; other ragstream tenant ids (with `.:/@+=` or longer)
    map to `t_` + a SHA-256 prefix, which is stable and cannot collide in practice.
    """
    if _TENANT_NAME.match(tenant):
        return tenant
    return "t_" + hashlib.sha256(tenant.encode()).hexdigest()[:40]


def _properties() -> list[Property]:
    def key(name: str) -> Property:  # exact-match filter only
        return Property(
            name=name,
            data_type=DataType.TEXT,
            tokenization=Tokenization.FIELD,
            index_searchable=False,
            index_filterable=True,
        )

    def stored(name: str, data_type: DataType) -> Property:  # returned, never searched
        return Property(name=name, data_type=data_type, index_searchable=False, index_filterable=False)

    return [
        key("chunk_id"),
        key("tenant"),
        key("document_id"),
        key("fingerprint"),
        Property(name="version", data_type=DataType.INT, index_filterable=True),
        Property(name="chunk_index", data_type=DataType.INT, index_filterable=True, index_range_filters=True),
        Property(name="chunk_count", data_type=DataType.INT, index_filterable=True),
        Property(
            name="search_text",
            data_type=DataType.TEXT,
            tokenization=Tokenization.WORD,
            index_searchable=True,
            index_filterable=False,
        ),
        stored("text", DataType.TEXT),
        stored("headings", DataType.TEXT_ARRAY),
        stored("title", DataType.TEXT),
        stored("source", DataType.TEXT),
        stored("media_type", DataType.TEXT),
        stored("page", DataType.INT),
        stored("char_start", DataType.INT),
        stored("char_end", DataType.INT),
        stored("token_count", DataType.INT),
        stored("metadata_json", DataType.TEXT),
        Property(
            name="metadata_kv",
            data_type=DataType.TEXT_ARRAY,
            tokenization=Tokenization.FIELD,
            index_searchable=False,
            index_filterable=True,
        ),
        stored("access_groups", DataType.TEXT_ARRAY),
        Property(
            name="readers",
            data_type=DataType.TEXT_ARRAY,
            tokenization=Tokenization.FIELD,
            index_searchable=False,
            index_filterable=True,
        ),
    ]


def _visible_to(tenant: str, access_groups: Sequence[str]) -> _Filters:
    # `tenant` is also enforced by the Weaviate tenant itself; this is belt and braces.
    readers = Filter.by_property("readers").contains_any([_PUBLIC, *access_groups])
    return Filter.by_property("tenant").equal(tenant) & readers


def _document(document_id: str) -> _Filters:
    return Filter.by_property("document_id").equal(document_id)


class WeaviateVectorStore:
    """The production vector store: a Weaviate collection with one tenant per ragstream tenant."""

    def __init__(self, settings: Settings) -> None:
        vs = settings.vector_store
        if not vs.weaviate_url:
            raise ConfigError("vector_store.weaviate_url is required for vector_store.kind='weaviate'")
        url = urlsplit(vs.weaviate_url if "://" in vs.weaviate_url else f"http://{vs.weaviate_url}")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"vector_store.weaviate_url={vs.weaviate_url!r} is not an http(s) URL")
        self._http_host = url.hostname
        self._http_secure = url.scheme == "https"
        self._http_port = url.port or (443 if self._http_secure else 80)
        self._grpc_host = vs.weaviate_grpc_host or url.hostname
        self._grpc_port = vs.weaviate_grpc_port
        self._grpc_secure = self._http_secure if vs.weaviate_grpc_secure is None else vs.weaviate_grpc_secure
        self._api_key = vs.weaviate_api_key
        self._timeout_s = vs.weaviate_timeout_s
        self._collection_name = vs.weaviate_collection
        self._dimension = settings.embed.dimension
        self._candidates_factor = vs.hybrid_candidates_factor
        self._client: weaviate.WeaviateAsyncClient | None = None
        self._known_tenants: set[str] = set()

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and create the collection if it does not exist.

        Raises:
            StartupError: Weaviate cannot be reached, refuses the credentials, or the
                collection cannot be created.
        """
        client = weaviate.use_async_with_custom(
            http_host=self._http_host,
            http_port=self._http_port,
            http_secure=self._http_secure,
            grpc_host=self._grpc_host,
            grpc_port=self._grpc_port,
            grpc_secure=self._grpc_secure,
            auth_credentials=Auth.api_key(self._api_key.get_secret_value()) if self._api_key else None,
            additional_config=AdditionalConfig(
                timeout=Timeout(init=self._timeout_s, query=self._timeout_s, insert=self._timeout_s)
            ),
        )
        try:
            await client.connect()
            if not await client.collections.exists(self._collection_name):
                await self._create_collection(client)
        except WeaviateBaseError as exc:
            await client.close()
            raise StartupError(
                f"cannot open Weaviate collection {self._collection_name!r} at "
                f"{self._http_host}:{self._http_port} (gRPC {self._grpc_host}:{self._grpc_port}): {exc}"
            ) from exc
        self._client = client
        log.info(
            "Weaviate collection %s ready at %s:%d", self._collection_name, self._http_host, self._http_port
        )

    async def _create_collection(self, client: weaviate.WeaviateAsyncClient) -> None:
        try:
            await client.collections.create(
                self._collection_name,
                description="ragstream chunks; vectors supplied by the embed stage",
                properties=_properties(),
                vector_config=Configure.Vectors.self_provided(
                    name=_VECTOR,
                    vector_index_config=Configure.VectorIndex.hnsw(distance_metric=VectorDistances.COSINE),
                ),
                multi_tenancy_config=Configure.multi_tenancy(
                    enabled=True, auto_tenant_creation=True, auto_tenant_activation=True
                ),
            )
        except UnexpectedStatusCodeError:
            # Another process may have created it between exists() and create().
            if not await client.collections.exists(self._collection_name):
                raise

    async def drop_collection(self) -> None:
        """Delete the whole collection, every tenant's chunks with it (tests, full re-index).

        Raises:
            DependencyUnavailable: Weaviate did not answer.
        """
        if self._client is None:
            raise RuntimeError("WeaviateVectorStore.start() was not called")
        async with self._io("drop"):
            await self._client.collections.delete(self._collection_name)
        self._known_tenants.clear()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> WeaviateVectorStore:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _collection(self, tenant: str) -> Any:
        if self._client is None:
            raise RuntimeError("WeaviateVectorStore.start() was not called")
        return self._client.collections.use(self._collection_name).with_tenant(weaviate_tenant(tenant))

    @contextlib.asynccontextmanager
    async def _io(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except WeaviateBaseError as exc:
            raise DependencyUnavailable(f"Weaviate {what} failed: {exc}") from exc

    async def _tenant_exists(self, tenant: str, *, create: bool = False) -> bool:
        """Whether the Weaviate tenant exists (creating it if asked). Reads of a tenant that
        does not exist return nothing instead of failing; only positives are cached, since
        another process may create the tenant later."""
        name = weaviate_tenant(tenant)
        if name in self._known_tenants:
            return True
        if self._client is None:
            raise RuntimeError("WeaviateVectorStore.start() was not called")
        tenants = self._client.collections.use(self._collection_name).tenants
        exists = bool(await tenants.exists(name))
        if not exists and create:
            try:
                await tenants.create([Tenant(name=name)])
            except UnexpectedStatusCodeError:
                if not await tenants.exists(name):  # lost a race with another writer: fine
                    raise
            exists = True
        if exists:
            self._known_tenants.add(name)
        return exists

    # --- writes -------------------------------------------------------------------------
    async def upsert(self, rows: Sequence[tuple[Chunk, Sequence[float]]]) -> None:
        """Insert or replace chunks (UUID = uuid5(chunk_id)) in their tenants.

        Raises:
            BadInputError: a vector has the wrong dimension or non-finite values.
            DependencyUnavailable: Weaviate rejected or did not answer the batch.
        """
        by_tenant: dict[str, list[DataObject[dict[str, Any], None]]] = defaultdict(list)
        for chunk, vector in rows:
            by_tenant[chunk.tenant].append(
                DataObject(
                    properties=self._properties(chunk),
                    uuid=chunk_uuid(chunk.chunk_id),
                    vector={_VECTOR: check_vector(chunk, vector, self._dimension)},
                )
            )
        async with self._io("upsert"):
            for tenant, objects in by_tenant.items():
                await self._tenant_exists(tenant, create=True)
                result = await self._collection(tenant).data.insert_many(objects)
                if result.has_errors:
                    first = next(iter(result.errors.values()))
                    raise DependencyUnavailable(
                        f"Weaviate rejected {len(result.errors)} of {len(objects)} chunks "
                        f"for tenant {tenant!r}: {first.message}"
                    )

    @staticmethod
    def _properties(chunk: Chunk) -> dict[str, Any]:
        props: dict[str, Any] = {
            **chunk_fields(chunk),
            "search_text": chunk.embedding_text(),
            "readers": list(chunk.access_groups) or [_PUBLIC],
        }
        if chunk.page is None:  # Weaviate has no null for an int property
            del props["page"]
        return props

    async def delete_document(
        self, tenant: str, document_id: str, *, keep_fingerprint: str | None = None
    ) -> int:
        """Delete a document's chunks, or all but `keep_fingerprint`'s; returns how many.

        Raises:
            DependencyUnavailable: Weaviate did not answer.
        """
        where = _document(document_id)
        if keep_fingerprint is not None:
            where = where & Filter.by_property("fingerprint").not_equal(keep_fingerprint)
        removed = 0
        async with self._io("delete"):
            if not await self._tenant_exists(tenant):
                return 0
            collection = self._collection(tenant)
            for _ in range(_MAX_DELETE_ROUNDS):
                result = await collection.data.delete_many(where=where)
                removed += result.successful
                if result.failed:
                    raise DependencyUnavailable(
                        f"Weaviate failed to delete {result.failed} chunks of {document_id!r}"
                    )
                if result.matches == 0 or result.successful == 0:
                    break
        return removed

    # --- reads --------------------------------------------------------------------------
    async def document_state(self, tenant: str, document_id: str) -> DocumentState | None:
        """What is stored for a document, by fingerprint; None if nothing.

        Raises:
            DependencyUnavailable: Weaviate did not answer.
        """
        async with self._io("read"):
            if not await self._tenant_exists(tenant):
                return None
            result = await self._collection(tenant).aggregate.over_all(
                filters=_document(document_id),
                group_by=GroupByAggregate(prop="fingerprint"),
                total_count=True,
                return_metrics=[
                    Metrics("version").integer(maximum=True),
                    Metrics("chunk_count").integer(maximum=True),
                ],
            )
        states = {}
        for group in result.groups:
            if not group.total_count:
                continue
            fp = str(group.grouped_by.value)
            states[fp] = FingerprintState(
                fingerprint=fp,
                version=int(group.properties["version"].maximum or 0),
                chunk_count=int(group.properties["chunk_count"].maximum or 0),
                chunks_stored=int(group.total_count),
            )
        if not states:
            return None
        return DocumentState(tenant=tenant, document_id=document_id, fingerprints=states)

    async def count_chunks(self, tenant: str, document_id: str, fingerprint: str | None = None) -> int:
        """Chunks stored for a document (of one fingerprint, if given).

        Raises:
            DependencyUnavailable: Weaviate did not answer.
        """
        where = _document(document_id)
        if fingerprint is not None:
            where = where & Filter.by_property("fingerprint").equal(fingerprint)
        async with self._io("count"):
            if not await self._tenant_exists(tenant):
                return 0
            result = await self._collection(tenant).aggregate.over_all(filters=where, total_count=True)
        return int(result.total_count or 0)

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        """Hybrid (server-side rankedFusion), vector or BM25 search, filtered inside the query.

        Raises:
            DependencyUnavailable: Weaviate did not answer.
        """
        if query.document_ids is not None and not query.document_ids:
            return []
        filters = self._filters(query)
        async with self._io("search"):
            if not await self._tenant_exists(query.tenant):
                return []
            q = self._collection(query.tenant).query
            if query.mode == "vector":
                result = await q.near_vector(
                    near_vector=list(query.vector or ()),
                    target_vector=_VECTOR,
                    limit=query.top_k,
                    filters=filters,
                    return_properties=_RETURN_PROPERTIES,
                    return_metadata=MetadataQuery(distance=True),
                )
                return [
                    hit_from_fields(
                        o.properties, score=1.0 - o.metadata.distance, vector_score=1.0 - o.metadata.distance
                    )
                    for o in result.objects
                ]
            if query.mode == "keyword":
                result = await q.bm25(
                    query=query.text,
                    query_properties=["search_text"],
                    limit=query.top_k,
                    filters=filters,
                    return_properties=_RETURN_PROPERTIES,
                    return_metadata=MetadataQuery(score=True),
                )
                return [
                    hit_from_fields(o.properties, score=o.metadata.score, keyword_score=o.metadata.score)
                    for o in result.objects
                ]
            result = await q.hybrid(
                query=query.text,
                vector=list(query.vector or ()),
                alpha=query.alpha,
                fusion_type=HybridFusion.RANKED,
                query_properties=["search_text"],
                target_vector=_VECTOR,
                limit=query.top_k,
                filters=filters,
                return_properties=_RETURN_PROPERTIES,
                return_metadata=MetadataQuery(score=True),
            )
            return [hit_from_fields(o.properties, score=o.metadata.score or 0.0) for o in result.objects]

    @staticmethod
    def _filters(query: SearchQuery) -> _Filters:
        where = _visible_to(query.tenant, query.access_groups)
        if query.document_ids is not None:
            where = where & Filter.by_property("document_id").contains_any(list(query.document_ids))
        terms = metadata_terms(query.metadata_filters)
        if terms:
            where = where & Filter.by_property("metadata_kv").contains_all(terms)
        return where

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
        """Chunks around `chunk_index` of a document that the caller may see, in order.

        Raises:
            DependencyUnavailable: Weaviate did not answer.
        """
        lo, hi = max(0, chunk_index - window), chunk_index + max(0, window)
        where = (
            _visible_to(tenant, access_groups)
            & _document(document_id)
            & Filter.by_property("chunk_index").greater_or_equal(lo)
            & Filter.by_property("chunk_index").less_or_equal(hi)
        )
        if fingerprint is not None:
            where = where & Filter.by_property("fingerprint").equal(fingerprint)
        async with self._io("read"):
            if not await self._tenant_exists(tenant):
                return []
            result = await self._collection(tenant).query.fetch_objects(
                filters=where, limit=(hi - lo + 1) * 8, return_properties=_RETURN_PROPERTIES
            )
        hits = [hit_from_fields(o.properties) for o in result.objects]
        hits.sort(key=lambda h: (h.chunk_index, -h.version, h.chunk_id))
        return hits

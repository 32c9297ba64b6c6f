"""LanceDB adapter: the embedded default, one table under `settings.lancedb_uri`.

Uses LanceDB's native async API (its calls run on LanceDB's own Rust runtime, so the event loop
is never blocked and no thread pool is needed). All tenants share one table; every read carries
a SQL prefilter on `tenant` and on access (`public OR array_has_any(access_groups, [...])`).

Hybrid search runs the vector and the BM25 query side by side, each for
`top_k * hybrid_candidates_factor` candidates, and fuses them with `weighted_rrf` (LanceDB's
`RRFReranker` cannot weight the two lists).

Freshness: rows written after the FTS index was built are still found by keyword search (LanceDB
scans the unindexed rows), so a chunk is searchable as soon as `upsert` returns, in this process
and (with `lancedb_read_consistency_s=0`) in any other. The writer runs `optimize()` in the
background after `lancedb_optimize_after_writes` writes or `lancedb_optimize_interval_s` after
its first unoptimized write; that folds new rows into the indexes and compacts the small
fragments each write adds, which keeps searches fast (5k rows in 160 unoptimized 32-row writes:
hybrid p50 ~140 ms; after a 0.4 s optimize: ~15 ms).

Vectors are searched exactly until the table holds `lancedb_vector_index_min_rows`; then the
writer's optimize builds an IVF_HNSW_SQ index. An IVF index probes only some partitions, so a
selective prefilter (a small tenant, a rare group, `document_ids`) can return fewer than `limit`
rows although more match; a vector query that comes back short is therefore re-run exactly
(`bypass_vector_index`), which is cheap precisely because few rows match. Scalar indexes on
`tenant`, `public` and `document_id` keep the prefilters cheap. Metadata lives in
`metadata_json`, and filters match terms in `metadata_kv` (see `metadata_terms`): equality only,
on top-level keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import FTS, Bitmap, BTree, IvfHnswSq
from lancedb.query import FullTextOperator, MatchQuery
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_incrementing

from ragstream.infra.vectorstore.base import (
    DocumentState,
    FingerprintState,
    SearchHit,
    SearchQuery,
    chunk_fields,
    hit_from_fields,
    metadata_terms,
    weighted_rrf,
)
from ragstream.schemas.errors import BadInputError, ConfigError, DependencyUnavailable, StartupError
from ragstream.schemas.events import Chunk

if TYPE_CHECKING:
    from ragstream.infra.settings import Settings

__all__ = ["LanceDBVectorStore", "chunk_schema"]

log = logging.getLogger(__name__)

_FTS_COLUMN = "search_text"
# What a hit needs; the vector and the search-only columns stay on disk.
_HIT_COLUMNS = [
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


def chunk_schema(dimension: int) -> pa.Schema:
    """The table's schema: the Chunk's fields, plus the columns search needs."""
    return pa.schema(
        [
            pa.field("chunk_id", pa.string(), nullable=False),
            pa.field("tenant", pa.string(), nullable=False),
            pa.field("document_id", pa.string(), nullable=False),
            pa.field("fingerprint", pa.string(), nullable=False),
            pa.field("version", pa.int64(), nullable=False),
            pa.field("chunk_index", pa.int32(), nullable=False),
            pa.field("chunk_count", pa.int32(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field(_FTS_COLUMN, pa.string(), nullable=False),
            pa.field("headings", pa.list_(pa.string())),
            pa.field("title", pa.string()),
            pa.field("source", pa.string()),
            pa.field("media_type", pa.string()),
            pa.field("page", pa.int32(), nullable=True),
            pa.field("char_start", pa.int64()),
            pa.field("char_end", pa.int64()),
            pa.field("token_count", pa.int32()),
            pa.field("metadata_json", pa.string()),
            pa.field("metadata_kv", pa.list_(pa.string())),
            pa.field("access_groups", pa.list_(pa.string())),
            pa.field("public", pa.bool_(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dimension)),
        ]
    )


def _lit(value: str) -> str:
    """A SQL string literal (DataFusion: quotes doubled, backslashes are plain characters)."""
    return "'" + value.replace("'", "''") + "'"


def _visible_to(tenant: str, access_groups: Sequence[str]) -> str:
    where = f"tenant = {_lit(tenant)}"
    if access_groups:
        groups = ", ".join(_lit(g) for g in access_groups)
        return f"{where} AND (public OR array_has_any(access_groups, [{groups}]))"
    return f"{where} AND public"


def _document(tenant: str, document_id: str) -> str:
    return f"tenant = {_lit(tenant)} AND document_id = {_lit(document_id)}"


def _match(text: str) -> MatchQuery:
    # Terms ORed, exact (no fuzziness): a product code must match itself, not its neighbours.
    return MatchQuery(
        text,
        _FTS_COLUMN,
        boost=1.0,
        fuzziness=0,
        max_expansions=50,
        operator=FullTextOperator.OR,
        prefix_length=0,
        document_granularity=None,
    )


class LanceDBVectorStore:
    """The embedded vector store. One writer per process; any number of reader processes."""

    def __init__(self, settings: Settings) -> None:
        vs = settings.vector_store
        self._uri = settings.lancedb_uri
        self._table_name = vs.table
        self._dimension = settings.embed.dimension
        self._schema = chunk_schema(self._dimension)
        self._consistency = (
            None
            if vs.lancedb_read_consistency_s is None
            else timedelta(seconds=vs.lancedb_read_consistency_s)
        )
        self._optimize_interval_s = vs.lancedb_optimize_interval_s
        self._optimize_after_writes = vs.lancedb_optimize_after_writes
        self._keep_versions = timedelta(seconds=vs.lancedb_keep_versions_s)
        self._candidates_factor = vs.hybrid_candidates_factor
        self._rrf_k = vs.rrf_k
        self._vector_index_min_rows = vs.lancedb_vector_index_min_rows
        self._vector_index_partitions = vs.lancedb_vector_index_partitions
        self._db: lancedb.AsyncConnection | None = None
        self._table: lancedb.AsyncTable | None = None
        self._write_lock = asyncio.Lock()
        self._writes = 0  # since the last optimize
        self._first_write_at = 0.0
        self._maintenance: asyncio.Task[None] | None = None

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Open (or create) the table and its FTS and scalar indexes; start background optimize.

        Raises:
            StartupError: the database cannot be opened.
            ConfigError: the existing table's vector dimension differs from `embed.dimension`.
        """
        try:
            self._db = await lancedb.connect_async(self._uri, read_consistency_interval=self._consistency)
            try:
                table = await self._db.open_table(self._table_name)
            except ValueError:  # not there yet; exist_ok covers a racing creator
                table = await self._db.create_table(self._table_name, schema=self._schema, exist_ok=True)
            existing = await table.schema()
        except (OSError, RuntimeError, ValueError) as exc:
            raise StartupError(
                f"cannot open LanceDB table {self._table_name!r} at {self._uri}: {exc}"
            ) from exc
        if existing != self._schema:
            got = existing.field("vector").type if "vector" in existing.names else None
            await self.close()
            raise ConfigError(
                f"LanceDB table {self._table_name!r} at {self._uri} has another schema (vector type {got}) "
                f"than this version expects (dimension {self._dimension} from embed.dimension); "
                "use another vector_store.table or re-index"
            )
        self._table = table
        wanted: dict[str, FTS | BTree | Bitmap] = {
            _FTS_COLUMN: FTS(),
            "tenant": Bitmap(),
            "public": Bitmap(),
            "document_id": BTree(),
        }
        async with self._write_lock:
            # Processes opening a new table together race to create its indexes, and a
            # commit resolved against an older version can leave out an index another one
            # made: an opener starts only once the latest version has them all.
            for _ in range(_INDEX_RACE_ATTEMPTS):
                await table.checkout_latest()  # type: ignore[no-untyped-call]
                indexed = {tuple(ix.columns) for ix in await table.list_indices()}
                missing = [column for column in wanted if (column,) not in indexed]
                if not missing:
                    break
                for column in missing:
                    await _create_index_once(table, column, wanted[column])
            else:
                raise StartupError(f"LanceDB table {self._table_name!r}: indexes {missing} keep disappearing")
        if self._optimize_interval_s > 0:
            self._maintenance = asyncio.create_task(self._optimize_forever(), name="lancedb-optimize")
        log.info(
            "LanceDB table %s at %s open (%d rows)", self._table_name, self._uri, await table.count_rows()
        )

    async def close(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        if self._table is not None:
            self._table.close()  # type: ignore[no-untyped-call]
            self._table = None
        if self._db is not None:
            self._db.close()  # type: ignore[no-untyped-call]
            self._db = None

    async def __aenter__(self) -> LanceDBVectorStore:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def table(self) -> lancedb.AsyncTable:
        if self._table is None:
            raise RuntimeError("LanceDBVectorStore.start() was not called")
        return self._table

    @contextlib.asynccontextmanager
    async def _io(self, what: str) -> AsyncIterator[None]:
        # Local disk errors may pass (disk full, NFS hiccup); anything else is a bug to surface.
        try:
            yield
        except OSError as exc:
            raise DependencyUnavailable(f"LanceDB {what} failed: {exc}") from exc

    # --- writes -------------------------------------------------------------------------
    async def upsert(self, rows: Sequence[tuple[Chunk, Sequence[float]]]) -> None:
        """Insert or replace chunks, keyed by (tenant, chunk_id).

        Raises:
            BadInputError: a vector has the wrong dimension or non-finite values.
            DependencyUnavailable: the write failed on disk.
        """
        if not rows:
            return
        # One row per key: merge_insert inserts every unmatched source row, so a chunk that
        # arrives twice in one batch (redelivered after a crash upstream) would be stored twice.
        rows = list({(chunk.tenant, chunk.chunk_id): (chunk, vector) for chunk, vector in rows}.values())
        vectors = self._vector_column([vector for _, vector in rows], [chunk for chunk, _ in rows])
        records = [self._record(chunk) for chunk, _ in rows]
        data = pa.Table.from_pylist(
            records, schema=self._schema.remove(self._schema.get_field_index("vector"))
        )
        data = data.append_column(self._schema.field("vector"), vectors)
        async with self._io("upsert"), self._write_lock:
            await (
                self.table.merge_insert(["tenant", "chunk_id"])
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute(data)
            )
            self._wrote()

    def _vector_column(self, vectors: Sequence[Sequence[float]], chunks: Sequence[Chunk]) -> pa.Array:
        """Vectors as one float32 Arrow column (Python lists of floats cost ~10x more).

        Raises:
            BadInputError: wrong dimension or a NaN/inf value.
        """
        matrix = np.empty((len(vectors), self._dimension), dtype=np.float32)
        for i, vector in enumerate(vectors):
            v = np.asarray(vector, dtype=np.float32)
            if v.shape != (self._dimension,):
                raise BadInputError(
                    f"chunk {chunks[i].chunk_id!r}: vector has shape {v.shape}, "
                    f"the store expects ({self._dimension},)"
                )
            matrix[i] = v
        finite = np.isfinite(matrix).all(axis=1)
        if not finite.all():
            bad = chunks[int(np.argmin(finite))].chunk_id
            raise BadInputError(f"chunk {bad!r}: vector has NaN or infinite values")
        return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), self._dimension)

    def _record(self, chunk: Chunk) -> dict[str, Any]:
        return {**chunk_fields(chunk), _FTS_COLUMN: chunk.embedding_text(), "public": not chunk.access_groups}

    async def delete_document(
        self, tenant: str, document_id: str, *, keep_fingerprint: str | None = None
    ) -> int:
        """Delete a document's chunks, or all but `keep_fingerprint`'s; returns how many.

        Raises:
            DependencyUnavailable: the delete failed on disk.
        """
        where = _document(tenant, document_id)
        if keep_fingerprint is not None:
            where += f" AND fingerprint != {_lit(keep_fingerprint)}"
        async with self._io("delete"), self._write_lock:
            result = await self.table.delete(where)
            self._wrote()
        return int(result.num_deleted_rows)  # type: ignore[attr-defined]  # the .pyi lags the binary

    async def optimize(self) -> None:
        """Fold new rows into the FTS index, compact fragments, drop old versions.

        Raises:
            DependencyUnavailable: the optimize failed on disk.
        """
        started = time.perf_counter()
        async with self._io("optimize"):
            async with self._write_lock:  # compaction conflicts with concurrent updates
                self._writes = 0
                await self.table.optimize(cleanup_older_than=self._keep_versions)
            log.debug("LanceDB optimize took %.2f s", time.perf_counter() - started)
            await self._maybe_build_vector_index()

    async def _maybe_build_vector_index(self) -> None:
        # Built outside the write lock: it only adds an index, so writes go on meanwhile and
        # the rows they add are searched flat until the next optimize folds them in.
        if self._vector_index_min_rows <= 0:
            return
        if any(ix.columns == ["vector"] for ix in await self.table.list_indices()):
            return
        rows = await self.table.count_rows()
        if rows < self._vector_index_min_rows:
            return
        started = time.perf_counter()
        await self.table.create_index(
            "vector",
            config=IvfHnswSq(distance_type="cosine", num_partitions=self._vector_index_partitions),
        )
        log.info("LanceDB vector index built over %d rows in %.1f s", rows, time.perf_counter() - started)

    def _wrote(self) -> None:
        if self._writes == 0:
            self._first_write_at = time.monotonic()
        self._writes += 1

    async def _optimize_forever(self) -> None:
        # Only after this process wrote, so read-only processes never contend for commits.
        while True:
            await asyncio.sleep(min(1.0, self._optimize_interval_s))
            due = self._writes >= self._optimize_after_writes or (
                self._writes > 0 and time.monotonic() - self._first_write_at >= self._optimize_interval_s
            )
            if not due:
                continue
            try:
                await self.optimize()
            except Exception:  # keep maintaining: a failed optimize only costs scan time
                log.warning("LanceDB background optimize failed; retrying later", exc_info=True)

    # --- reads --------------------------------------------------------------------------
    async def document_state(self, tenant: str, document_id: str) -> DocumentState | None:
        """What is stored for a document, by fingerprint; None if nothing.

        Raises:
            DependencyUnavailable: the read failed on disk.
        """
        async with self._io("read"):
            rows = await (
                self.table.query()
                .where(_document(tenant, document_id))
                .select(["fingerprint", "version", "chunk_count"])
                .to_list()
            )
        if not rows:
            return None
        states: dict[str, FingerprintState] = {}
        for row in rows:
            fp = row["fingerprint"]
            prev = states.get(fp)
            states[fp] = FingerprintState(
                fingerprint=fp,
                version=max(row["version"], prev.version if prev else 0),
                chunk_count=max(row["chunk_count"], prev.chunk_count if prev else 0),
                chunks_stored=(prev.chunks_stored if prev else 0) + 1,
            )
        return DocumentState(tenant=tenant, document_id=document_id, fingerprints=states)

    async def count_chunks(self, tenant: str, document_id: str, fingerprint: str | None = None) -> int:
        """Chunks stored for a document (of one fingerprint, if given).

        Raises:
            DependencyUnavailable: the read failed on disk.
        """
        where = _document(tenant, document_id)
        if fingerprint is not None:
            where += f" AND fingerprint = {_lit(fingerprint)}"
        async with self._io("count"):
            return int(await self.table.count_rows(where))

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        """Hybrid, vector or keyword search, prefiltered to what the caller may see.

        Raises:
            DependencyUnavailable: the read failed on disk.
        """
        if query.document_ids is not None and not query.document_ids:
            return []
        where = self._where(query)
        async with self._io("search"):
            if query.mode == "vector" or (query.mode == "hybrid" and query.alpha == 1.0):
                vector_rows = await self._vector(query, where, query.top_k)
                return [
                    hit_from_fields(r, score=1.0 - r["_distance"], vector_score=1.0 - r["_distance"])
                    for r in vector_rows
                ]
            if query.mode == "keyword" or (query.mode == "hybrid" and query.alpha == 0.0):
                keyword_rows = await self._keyword(query, where, query.top_k)
                return [
                    hit_from_fields(r, score=r["_score"], keyword_score=r["_score"]) for r in keyword_rows
                ]
            candidates = query.top_k * self._candidates_factor
            vector_rows, keyword_rows = await asyncio.gather(
                self._vector(query, where, candidates), self._keyword(query, where, candidates)
            )
        by_id_vector = {r["chunk_id"]: r for r in vector_rows}
        by_id_keyword = {r["chunk_id"]: r for r in keyword_rows}
        fused = weighted_rrf(
            [r["chunk_id"] for r in vector_rows],
            [r["chunk_id"] for r in keyword_rows],
            alpha=query.alpha,
            k=self._rrf_k,
        )
        hits = []
        for chunk_id, score in fused[: query.top_k]:
            v, kw = by_id_vector.get(chunk_id), by_id_keyword.get(chunk_id)
            row = v if v is not None else kw
            assert row is not None  # fused ids come from the two lists
            hits.append(
                hit_from_fields(
                    row,
                    score=score,
                    vector_score=None if v is None else 1.0 - v["_distance"],
                    keyword_score=None if kw is None else kw["_score"],
                )
            )
        return hits

    def _where(self, query: SearchQuery) -> str:
        clauses = [_visible_to(query.tenant, query.access_groups)]
        if query.document_ids is not None:
            clauses.append(f"document_id IN ({', '.join(_lit(d) for d in query.document_ids)})")
        clauses.extend(f"array_has(metadata_kv, {_lit(t)})" for t in metadata_terms(query.metadata_filters))
        return " AND ".join(clauses)

    async def _vector(self, query: SearchQuery, where: str, limit: int) -> list[dict[str, Any]]:
        assert query.vector is not None  # SearchQuery validates this per mode
        vector = list(query.vector)
        rows: list[dict[str, Any]] = await (
            self.table.query()
            .nearest_to(vector)
            .distance_type("cosine")
            .where(where)
            .select(_HIT_COLUMNS)
            .limit(limit)
            .to_list()
        )
        if len(rows) < limit:  # an IVF index may have missed prefiltered rows: search exactly
            rows = await (
                self.table.query()
                .nearest_to(vector)
                .distance_type("cosine")
                .bypass_vector_index()
                .where(where)
                .select(_HIT_COLUMNS)
                .limit(limit)
                .to_list()
            )
        return rows

    async def _keyword(self, query: SearchQuery, where: str, limit: int) -> list[dict[str, Any]]:
        # MatchQuery: the text is matched term by term (OR), never parsed as query syntax.
        return await (
            self.table.query()
            .nearest_to_text(_match(query.text))
            .where(where)
            .select(_HIT_COLUMNS)
            .limit(limit)
            .to_list()
        )

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
            DependencyUnavailable: the read failed on disk.
        """
        lo, hi = max(0, chunk_index - window), chunk_index + max(0, window)
        where = (
            f"{_visible_to(tenant, access_groups)} AND document_id = {_lit(document_id)}"
            f" AND chunk_index >= {lo} AND chunk_index <= {hi}"
        )
        if fingerprint is not None:
            where += f" AND fingerprint = {_lit(fingerprint)}"
        async with self._io("read"):
            rows = await self.table.query().where(where).select(_HIT_COLUMNS).to_list()
        rows.sort(key=lambda r: (r["chunk_index"], -r["version"], r["chunk_id"]))
        return [hit_from_fields(r) for r in rows]


_INDEX_RACE_ATTEMPTS = 8


class _IndexRace(Exception):
    """Another opener's `CreateIndex` committed first and the index is still missing."""


async def _create_index_once(table: lancedb.AsyncTable, column: str, config: FTS | BTree | Bitmap) -> None:
    """Create an index that several processes may be creating at the same moment.

    Stages of a fresh stack open the store together; LanceDB lets one `CreateIndex` commit
    and fails the others with "Retryable commit conflict". The loser checks whether the
    winner made the index, and otherwise tries again.

    Raises:
        StartupError: still conflicting after `_INDEX_RACE_ATTEMPTS` tries, or another error.
    """

    async def attempt() -> None:
        try:
            await table.create_index(column, config=config)
        except (RuntimeError, OSError, ValueError) as exc:
            text = str(exc)
            if "onflict" not in text and "preempted" not in text and "etryable" not in text:
                raise StartupError(f"cannot create the {column!r} index: {exc}") from exc
            await table.checkout_latest()  # type: ignore[no-untyped-call]
            if (column,) not in {tuple(ix.columns) for ix in await table.list_indices()}:
                log.info("LanceDB index %r: commit conflict; retrying", column)
                raise _IndexRace(text) from exc

    try:
        await AsyncRetrying(
            retry=retry_if_exception_type(_IndexRace),
            stop=stop_after_attempt(_INDEX_RACE_ATTEMPTS),
            wait=wait_incrementing(start=0.05, increment=0.05),
            reraise=True,
        )(attempt)
    except _IndexRace as exc:
        raise StartupError(f"cannot create the {column!r} index: commit conflicts on every try") from exc

"""Index stage: upserts embedded chunks (vector + text, so both vector and BM25 search work)
and reports each document once its last chunk has landed.

A document's chunks share its key, so they arrive here in order on one partition: when the
chunk with `chunk_index == chunk_count - 1` is written, the whole new version is in the store.
Only then are the previous version's chunks deleted, so readers never see a half-indexed
document replace a whole one.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from ragstream.infra.lifecycle import started
from ragstream.infra.settings import Settings
from ragstream.infra.vectorstore.base import VectorStore
from ragstream.schemas.events import ChunkEmbedded, DocumentIndexed, DocumentRetracted, Event
from ragstream.streams.runner import StageRunner
from ragstream.streams.stage import Batched, Stage
from ragstream.streams.topics import EMBEDDED, INDEXED

__all__ = ["STAGE", "handle", "open_deps"]

log = logging.getLogger(__name__)


async def handle(events: Sequence[Event], store: VectorStore) -> list[Event]:
    """Apply a batch of chunks and retractions to the store, in order.

    Raises:
        TransientError: the store failed (the runner retries the batch; upserts are idempotent).
    """
    out: list[Event] = []
    pending: list[ChunkEmbedded] = []
    for e in events:
        if isinstance(e, ChunkEmbedded):
            pending.append(e)
        elif isinstance(e, DocumentRetracted):
            out.extend(await _flush(pending, store))
            pending = []
            removed = await store.delete_document(e.tenant, e.document_id)
            out.append(
                DocumentIndexed(
                    source_event_id=e.source_event_id,
                    trace_id=e.trace_id,
                    tenant=e.tenant,
                    document_id=e.document_id,
                    version=e.version,
                    outcome="deleted",
                    chunk_count=0,
                    chunks_removed=removed,
                    principal=e.principal,
                )
            )
    out.extend(await _flush(pending, store))
    return out


async def _flush(pending: list[ChunkEmbedded], store: VectorStore) -> list[Event]:
    if not pending:
        return []
    await store.upsert([(e.chunk, e.vector) for e in pending])
    out: list[Event] = []
    for e in pending:
        c = e.chunk
        if c.chunk_index != c.chunk_count - 1:
            continue
        present = await store.count_chunks(c.tenant, c.document_id, c.fingerprint)
        if present < c.chunk_count:
            # Only possible if a producer broke per-document ordering; keep the old version.
            log.warning(
                "document %s/%s: last chunk landed but only %d of %d are present; not swapping",
                c.tenant,
                c.document_id,
                present,
                c.chunk_count,
            )
            continue
        removed = await store.delete_document(c.tenant, c.document_id, keep_fingerprint=c.fingerprint)
        out.append(
            DocumentIndexed(
                source_event_id=e.source_event_id,
                trace_id=e.trace_id,
                tenant=c.tenant,
                document_id=c.document_id,
                version=c.version,
                fingerprint=c.fingerprint,
                outcome="indexed",
                chunk_count=c.chunk_count,
                chunks_removed=removed,
                principal=e.principal,
            )
        )
    return out


@asynccontextmanager
async def open_deps(settings: Settings, runner: StageRunner) -> AsyncIterator[VectorStore]:
    from ragstream.infra.vectorstore import open_vector_store

    async with started(open_vector_store(settings)) as store:
        yield store


STAGE = Stage(
    name="index",
    consumes=EMBEDDED,
    produces=(INDEXED,),
    # depth 1: a document is swapped in when its last chunk lands, which needs order.
    # A short gather turns many small LanceDB commits into few larger ones.
    flow=Batched(size=lambda s: 512, max_wait_s=lambda s: s.index_max_wait_ms / 1000),
    deps=open_deps,
    handle=handle,
    fetch_max_wait_ms=lambda s: s.kafka.document_path_fetch_max_wait_ms,
)
"""Embedded chunks and retractions in, applied to the store in order; one verdict per
document out."""

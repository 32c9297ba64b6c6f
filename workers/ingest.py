"""Ingest stage: parse, clean, chunk and dedupe submitted documents.

Dedupe rules (the document's *fingerprint* hashes its content, title, media type, metadata
and access groups, so an access change re-indexes too):
- same fingerprint already fully indexed -> `DocumentIndexed(outcome="unchanged")`, no chunks;
- a version lower than the indexed one -> `DocumentIndexed(outcome="stale")`, ignored;
- otherwise the chunks go out; the index stage swaps them in for the old version when the
  last one lands;
- `deleted=True` -> a `DocumentRetracted` that follows earlier chunks down the pipeline.
Chunk ids are deterministic (`{document_id}:{fingerprint[:16]}:{index}`), so a redelivered or
re-submitted document upserts the same rows instead of adding new ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from ragstream.infra.chunking import Chunker
from ragstream.infra.lifecycle import started
from ragstream.infra.parsing import parse_document
from ragstream.infra.settings import ChunkingSettings, Settings
from ragstream.infra.vectorstore.base import VectorStore
from ragstream.schemas.errors import DocumentTooLarge, UnreadableDocument
from ragstream.schemas.events import (
    Chunk,
    ChunkCreated,
    DocumentIndexed,
    DocumentRetracted,
    DocumentSubmitted,
    Event,
)
from ragstream.streams.admission import Admission, opened_admission
from ragstream.streams.runner import StageRunner
from ragstream.streams.stage import Batched, Stage
from ragstream.streams.topics import CHUNKS, DOCUMENTS, INDEXED

__all__ = ["STAGE", "IngestDeps", "document_fingerprint", "handle", "handle_document", "open_deps"]

log = logging.getLogger(__name__)


@dataclass
class IngestDeps:
    chunking: ChunkingSettings
    chunker: Chunker
    store: VectorStore
    admission: Admission | None = None
    """Verifies each submission's sender (`STAGE.admit`); None in unit tests of `handle`."""


def document_fingerprint(doc: DocumentSubmitted, data: bytes) -> str:
    canonical = json.dumps(
        {
            "content_sha256": hashlib.sha256(data).hexdigest(),
            "media_type": doc.media_type,
            "title": doc.title,
            "metadata": doc.metadata,
            "access_groups": sorted(set(doc.access_groups)),
        },
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


async def handle_document(doc: DocumentSubmitted, deps: IngestDeps) -> list[Event]:
    """Turn one submitted document into chunks (or a retraction, or a no-op verdict).

    Raises:
        BadInputError: unsupported, unreadable, empty or too large (the runner dead-letters it).
        TransientError: the store could not be asked for the document's state.
    """
    state = await deps.store.document_state(doc.tenant, doc.document_id)
    if state is not None and doc.version < state.version:
        newest = max(state.fingerprints.values(), key=lambda f: f.version)
        return [_verdict(doc, "stale", newest.fingerprint, newest.chunk_count)]

    if doc.deleted:
        return [
            DocumentRetracted(
                source_event_id=doc.event_id,
                trace_id=doc.trace_id,
                tenant=doc.tenant,
                document_id=doc.document_id,
                version=doc.version,
                principal=doc.principal,
            )
        ]

    if len(doc.content) > deps.chunking.max_document_bytes * 4 // 3 + 4:
        raise DocumentTooLarge(_too_large(len(doc.content), deps.chunking.max_document_bytes))
    try:
        data = doc.content_bytes()
    except ValueError as exc:
        raise UnreadableDocument(f"content is not valid base64: {exc}") from exc
    if len(data) > deps.chunking.max_document_bytes:
        raise DocumentTooLarge(_too_large(len(data), deps.chunking.max_document_bytes))

    fingerprint = document_fingerprint(doc, data)
    if state is not None and state.is_complete(fingerprint):
        return [_verdict(doc, "unchanged", fingerprint, state.fingerprints[fingerprint].chunk_count)]

    # Parsing and tokenising are CPU-bound; keep the event loop free for heartbeats.
    spans, title = await asyncio.to_thread(_parse_and_chunk, doc, data, deps)
    title = doc.title or title or doc.source.rsplit("/", 1)[-1] or doc.document_id
    n = len(spans)
    return [
        ChunkCreated(
            source_event_id=doc.event_id,
            trace_id=doc.trace_id,
            tenant=doc.tenant,
            chunk=Chunk(
                chunk_id=f"{doc.document_id}:{fingerprint[:16]}:{i}",
                document_id=doc.document_id,
                tenant=doc.tenant,
                fingerprint=fingerprint,
                version=doc.version,
                chunk_index=i,
                chunk_count=n,
                text=span.text,
                headings=tuple(span.headings),
                char_start=span.char_start,
                char_end=span.char_end,
                page=span.page,
                token_count=span.token_count,
                title=title,
                source=doc.source,
                media_type=doc.media_type,
                metadata=doc.metadata,
                access_groups=tuple(sorted(set(doc.access_groups))),
            ),
            principal=doc.principal,
        )
        for i, span in enumerate(spans)
    ]


def _parse_and_chunk(doc: DocumentSubmitted, data: bytes, deps: IngestDeps) -> tuple[list[Any], str]:
    parsed = parse_document(data, doc.media_type, source=doc.source, settings=deps.chunking)
    return list(deps.chunker.chunk(parsed)), parsed.title


def _verdict(doc: DocumentSubmitted, outcome: Any, fingerprint: str, chunk_count: int) -> DocumentIndexed:
    return DocumentIndexed(
        source_event_id=doc.event_id,
        trace_id=doc.trace_id,
        tenant=doc.tenant,
        document_id=doc.document_id,
        version=doc.version,
        fingerprint=fingerprint,
        outcome=outcome,
        chunk_count=chunk_count,
        principal=doc.principal,
    )


def _too_large(size: int, limit: int) -> str:
    return f"document is {size} bytes; the limit is {limit} (chunking.max_document_bytes)"


def build_deps(settings: Settings, store: VectorStore, admission: Admission | None = None) -> IngestDeps:
    return IngestDeps(
        chunking=settings.chunking,
        chunker=Chunker(settings.chunking.max_tokens, settings.chunking.overlap_tokens),
        store=store,
        admission=admission,
    )


def _admit(event: Event, deps: IngestDeps) -> Event:
    if deps.admission is None:
        raise RuntimeError("the ingest stage was opened without admission")
    return deps.admission.admit(event)


async def handle(events: Sequence[Event], deps: IngestDeps) -> list[Event]:
    out: list[Event] = []
    for e in events:
        assert isinstance(e, DocumentSubmitted)  # the topic's contract guarantees it
        out.extend(await handle_document(e, deps))
    return out


@asynccontextmanager
async def open_deps(settings: Settings, runner: StageRunner) -> AsyncIterator[IngestDeps]:
    from ragstream.infra.vectorstore import open_vector_store

    async with opened_admission(settings) as admission, started(open_vector_store(settings)) as store:
        yield build_deps(settings, store, admission)


STAGE = Stage(
    name="ingest",
    consumes=DOCUMENTS,
    produces=(CHUNKS, INDEXED),
    flow=Batched(size=lambda s: 8),
    deps=open_deps,
    handle=handle,
    fetch_max_wait_ms=lambda s: s.kafka.document_path_fetch_max_wait_ms,
    admit=_admit,
)
"""Documents in (each submitter verified first: the token must grant `ingest` in the
document's tenant); their chunks (or a retraction) out, or a verdict when nothing changes."""

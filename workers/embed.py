"""Embed stage: micro-batches chunks to the embedding model on Triton.

The Faust agent takes up to `embed.batch_size` chunks that are already waiting (so the model
sees full batches under load) and flushes a partial batch after `embed.max_wait_ms` (so a
single chunk is not held back when idle). Triton's dynamic batcher merges concurrent callers.
Retractions pass through in their place, keeping per-document order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from ragstream.infra.embedder import Embedder
from ragstream.infra.lifecycle import started
from ragstream.infra.settings import Settings
from ragstream.schemas.events import ChunkCreated, ChunkEmbedded, DocumentRetracted, Event
from ragstream.streams.runner import StageRunner
from ragstream.streams.stage import Batched, Stage
from ragstream.streams.topics import CHUNKS, EMBEDDED

__all__ = ["STAGE", "handle", "open_deps"]


@dataclass(frozen=True)
class Passages:
    """The embed stage's deps: the embedder, and what goes before each chunk's text."""

    embedder: Embedder
    prefix: str = ""


async def handle(events: Sequence[Event], deps: Embedder | Passages) -> list[Event]:
    """Embed every chunk in the batch with one model call; keep the input order.

    Raises:
        TransientError: Triton did not answer (the runner retries).
    """
    embedder, prefix = (deps.embedder, deps.prefix) if isinstance(deps, Passages) else (deps, "")
    chunks = [e for e in events if isinstance(e, ChunkCreated)]
    texts = [prefix + c.chunk.embedding_text() for c in chunks]
    vectors = await embedder.embed(texts) if chunks else None
    out: list[Event] = []
    i = 0
    for e in events:
        if isinstance(e, ChunkCreated):
            assert vectors is not None
            out.append(
                ChunkEmbedded(
                    source_event_id=e.source_event_id,
                    trace_id=e.trace_id,
                    tenant=e.tenant,
                    chunk=e.chunk,
                    vector=tuple(float(x) for x in vectors[i]),
                    embedding_model=embedder.model_id,
                    principal=e.principal,
                )
            )
            i += 1
        elif isinstance(e, DocumentRetracted):
            out.append(e)
    return out


@asynccontextmanager
async def open_deps(settings: Settings, runner: StageRunner) -> AsyncIterator[Passages]:
    from ragstream.infra.embedder import TritonEmbedder

    async with started(TritonEmbedder(settings)) as embedder:
        yield Passages(embedder, settings.embed.passage_prefix)


STAGE = Stage(
    name="embed",
    consumes=CHUNKS,
    produces=(EMBEDDED,),
    # Pipelined: the next batch is on Triton while the previous one is published.
    flow=Batched(
        size=lambda s: s.embed.batch_size,
        max_wait_s=lambda s: s.embed.max_wait_ms / 1000,
        depth=lambda s: s.embed.pipeline_depth,
    ),
    deps=open_deps,
    handle=handle,
    fetch_max_wait_ms=lambda s: s.kafka.document_path_fetch_max_wait_ms,
)
"""Chunks in; chunks with their vectors out, retractions passed through in order."""

"""Embed stage: micro-batches chunks to the embedding model on Triton.

The Faust agent takes up to `embed.batch_size` chunks that are already waiting (so the model
sees full batches under load) and flushes a partial batch after `embed.max_wait_ms` (so a
single chunk is not held back when idle). Triton's dynamic batcher merges concurrent callers.
Retractions pass through in their place, keeping per-document order.
"""

from __future__ import annotations

from collections.abc import Sequence

from ragstream.infra.embedder import Embedder
from ragstream.schemas.events import ChunkCreated, ChunkEmbedded, DocumentRetracted, Event
from ragstream.streams.stage import Emit, emit
from ragstream.streams.topics import EMBEDDED

__all__ = ["handle_chunks"]


async def handle_chunks(events: Sequence[Event], embedder: Embedder) -> list[Emit]:
    """Embed every chunk in the batch with one model call; keep the input order.

    Raises:
        TransientError: Triton did not answer (the runner retries).
    """
    chunks = [e for e in events if isinstance(e, ChunkCreated)]
    vectors = await embedder.embed([c.chunk.embedding_text() for c in chunks]) if chunks else None
    out: list[Emit] = []
    i = 0
    for e in events:
        if isinstance(e, ChunkCreated):
            assert vectors is not None
            out.append(
                emit(
                    ChunkEmbedded(
                        source_event_id=e.source_event_id,
                        trace_id=e.trace_id,
                        tenant=e.tenant,
                        chunk=e.chunk,
                        vector=tuple(float(x) for x in vectors[i]),
                        embedding_model=embedder.model_id,
                    )
                )
            )
            i += 1
        elif isinstance(e, DocumentRetracted):
            out.append(emit(e, EMBEDDED))
    return out

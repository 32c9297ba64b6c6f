"""The stages, registered explicitly: input topic, batching, concurrency, dependencies.

No Faust here, so the supervisor and the CLI can read the registry cheaply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragstream.infra.settings import Settings
from ragstream.schemas.errors import ConfigError
from ragstream.schemas.events import DeadLettered, Event
from ragstream.streams.stage import Emit, StageRunner
from ragstream.streams.topics import CHUNKS, DOCUMENTS, EMBEDDED, QUERIES, RETRIEVALS, TopicSpec

__all__ = ["STAGES", "StageDef", "heartbeat_path", "parse_stages"]

log = logging.getLogger(__name__)

Handler = Callable[[Sequence[Event]], Awaitable[Sequence[Emit]]]


@dataclass(frozen=True)
class StageDef:
    name: str
    source: TopicSpec
    batch_size: Callable[[Settings], int]
    max_wait_s: Callable[[Settings], float]
    open: Callable[[Settings, StageRunner], Any]
    """Returns an async context manager yielding the stage's handler."""
    depth: Callable[[Settings], int] = lambda s: 1
    """Batches in flight; >1 only for stages whose effects do not depend on order."""
    fetch_max_wait_ms: Callable[[Settings], int] = lambda s: s.kafka.fetch_max_wait_ms
    concurrency: Callable[[Settings], int] | None = None
    """If set, requests are independent: up to this many are processed at once, each
    published and acked when done (the query path), instead of ordered batches."""
    on_dead_letter: Callable[[DeadLettered], Sequence[Emit]] | None = None
    """What the caller is told when one of its messages is dead-lettered."""
    once_per_request: bool = False
    """Skip inputs whose request already has its final response (`streams.completions`):
    after a crash, nothing is generated or answered twice."""


class _Resources:
    """Starts the stage's dependencies when the agent starts and closes them after."""

    def __init__(self, build: Callable[[], Awaitable[tuple[Handler, list[Any]]]]) -> None:
        self._build = build
        self._closables: list[Any] = []

    async def __aenter__(self) -> Handler:
        handler, self._closables = await self._build()
        return handler

    async def __aexit__(self, *exc: object) -> None:
        for c in reversed(self._closables):
            await c.close()


def _open_ingest(settings: Settings, runner: StageRunner) -> _Resources:
    async def build() -> tuple[Handler, list[Any]]:
        from ragstream.infra.vectorstore import open_vector_store
        from ragstream.workers import ingest

        store = open_vector_store(settings)
        await store.start()
        deps = ingest.build_deps(settings, store)

        async def handler(events: Sequence[Event]) -> Sequence[Emit]:
            return await ingest.handle(events, deps)

        return handler, [store]

    return _Resources(build)


def _open_embed(settings: Settings, runner: StageRunner) -> _Resources:
    async def build() -> tuple[Handler, list[Any]]:
        from ragstream.infra.embedder import TritonEmbedder
        from ragstream.workers.embed import handle_chunks

        embedder = TritonEmbedder(settings)
        await embedder.start()

        async def handler(events: Sequence[Event]) -> Sequence[Emit]:
            return await handle_chunks(events, embedder)

        return handler, [embedder]

    return _Resources(build)


def _open_index(settings: Settings, runner: StageRunner) -> _Resources:
    async def build() -> tuple[Handler, list[Any]]:
        from ragstream.infra.vectorstore import open_vector_store
        from ragstream.workers.index import handle_embedded

        store = open_vector_store(settings)
        await store.start()

        async def handler(events: Sequence[Event]) -> Sequence[Emit]:
            return await handle_embedded(events, store)

        return handler, [store]

    return _Resources(build)


def _open_retrieve(settings: Settings, runner: StageRunner) -> _Resources:
    async def build() -> tuple[Handler, list[Any]]:
        from ragstream.infra.embedder import TritonEmbedder
        from ragstream.infra.vectorstore import open_vector_store
        from ragstream.workers import retrieve

        store = open_vector_store(settings)
        await store.start()
        embedder = TritonEmbedder(settings)
        await embedder.start()
        deps = retrieve.RetrievalDeps(embedder=embedder, store=store)

        async def handler(events: Sequence[Event]) -> Sequence[Emit]:
            return await retrieve.handle(events, deps)

        return handler, [store, embedder]

    return _Resources(build)


def _open_generate(settings: Settings, runner: StageRunner) -> _Resources:
    async def build() -> tuple[Handler, list[Any]]:
        from ragstream.infra.generator import GeneratorTokenizer, TritonGenerator
        from ragstream.workers import generate

        generator = TritonGenerator(settings)
        await generator.start()
        tokenizer = GeneratorTokenizer(settings)
        await asyncio.to_thread(tokenizer.load)  # not on the first request's clock
        deps = generate.GenerationDeps(
            settings=settings,
            generator=generator,
            count_tokens=tokenizer.count,
            send_nowait=runner.send_nowait,
        )

        async def handler(events: Sequence[Event]) -> Sequence[Emit]:
            return await generate.handle(events, deps)

        return handler, [generator]

    return _Resources(build)


def _caller_error(record: DeadLettered) -> Sequence[Emit]:
    from ragstream.workers.retrieve import invalid_request_response

    return invalid_request_response(record)


def _document_path_wait(settings: Settings) -> int:
    return settings.kafka.document_path_fetch_max_wait_ms


STAGES: dict[str, StageDef] = {
    "ingest": StageDef(
        "ingest", DOCUMENTS, lambda s: 8, lambda s: 0.0, _open_ingest, fetch_max_wait_ms=_document_path_wait
    ),
    "embed": StageDef(
        "embed",
        CHUNKS,
        lambda s: s.embed.batch_size,
        lambda s: s.embed.max_wait_ms / 1000,
        _open_embed,
        depth=lambda s: s.embed.pipeline_depth,
        fetch_max_wait_ms=_document_path_wait,
    ),
    # depth 1: a document is swapped in when its last chunk lands, which needs order.
    # A short gather turns many small LanceDB commits into few larger ones.
    "index": StageDef(
        "index",
        EMBEDDED,
        lambda s: 512,
        lambda s: s.index_max_wait_ms / 1000,
        _open_index,
        fetch_max_wait_ms=_document_path_wait,
    ),
    "retrieve": StageDef(
        "retrieve",
        QUERIES,
        lambda s: 1,
        lambda s: 0.0,
        _open_retrieve,
        concurrency=lambda s: s.serving.retrieval_concurrency,
        on_dead_letter=_caller_error,
        once_per_request=True,
    ),
    "generate": StageDef(
        "generate",
        RETRIEVALS,
        lambda s: 1,
        lambda s: 0.0,
        _open_generate,
        concurrency=lambda s: s.serving.generation_concurrency,
        on_dead_letter=_caller_error,
        once_per_request=True,
    ),
}
"""Every stage, registered explicitly."""


def heartbeat_path(settings: Settings, stage: str) -> Path:
    return settings.run_dir / f"worker-{stage}.json"


def parse_stages(spec: str | Sequence[str]) -> tuple[str, ...]:
    """`"ingest,embed,index"` -> the stages one worker process runs, validated.

    Raises:
        ConfigError: an unknown or repeated stage.
    """
    stages = tuple(s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"unknown stage(s) {unknown or spec!r}; known: {', '.join(STAGES)}")
    if len(set(stages)) != len(stages):
        raise ConfigError(f"stage listed twice in {spec!r}")
    return stages

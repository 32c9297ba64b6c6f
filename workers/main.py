"""Worker processes: `ragstream worker STAGE` runs one stage as a Faust worker.

Each stage is a thin agent: it takes messages off its input topic and hands them to the
`StageRunner` with the stage's plain handler. A timer writes a heartbeat file (liveness,
partition assignment, counters) that the supervisor and `ragstream status` read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragstream.infra.settings import Settings
from ragstream.schemas.errors import ConfigError
from ragstream.schemas.events import DeadLettered, Event
from ragstream.streams.app import RagstreamApp, create_app, faust_topic
from ragstream.streams.pipeline import BatchPipeline, ConcurrentPipeline
from ragstream.streams.stage import Emit, StageRunner
from ragstream.streams.topics import CHUNKS, DOCUMENTS, EMBEDDED, QUERIES, RETRIEVALS, TopicSpec

__all__ = ["STAGES", "StageDef", "build_worker_app", "heartbeat_path", "parse_stages", "run_worker"]

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
    ),
    "generate": StageDef(
        "generate",
        RETRIEVALS,
        lambda s: 1,
        lambda s: 0.0,
        _open_generate,
        concurrency=lambda s: s.serving.generation_concurrency,
        on_dead_letter=_caller_error,
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


def build_worker_app(
    settings: Settings, stages: str | Sequence[str]
) -> tuple[RagstreamApp, list[StageRunner]]:
    """One Faust app running one or more stages, each as its own agent with its own runner.

    Several stages in one process share one consumer (one consumer group, named after the
    stages): fewer processes and fewer idle polls. Run each stage in exactly one group
    layout at a time, or its input would be consumed by two groups.
    """
    names = parse_stages(stages)
    defs = [STAGES[n] for n in names]
    app = create_app(
        settings,
        "-".join(names),
        fetch_max_wait_ms=min(d.fetch_max_wait_ms(settings) for d in defs),
    )
    topics: dict[str, Any] = {}

    async def send(topic: str, key: bytes, value: bytes) -> Awaitable[Any]:
        t = topics.get(topic)
        if t is None:
            t = topics[topic] = app.topic(topic, value_serializer="raw", key_serializer="raw")
        fut: Awaitable[Any] = await t.send(key=key, value=value)
        return fut

    runners = [_register_stage(app, settings, sdef, send) for sdef in defs]
    beats = [(heartbeat_path(settings, r.stage), r) for r in runners]

    @app.timer(0.5)  # type: ignore[untyped-decorator]
    async def heartbeat() -> None:
        assigned = bool(app.consumer.assignment())
        for path, runner in beats:
            write_heartbeat(path, runner.stage, runner, assigned)

    return app, runners


def _register_stage(
    app: RagstreamApp,
    settings: Settings,
    sdef: StageDef,
    send: Callable[[str, bytes, bytes], Awaitable[Awaitable[Any]]],
) -> StageRunner:
    runner = StageRunner(settings, sdef.name, send, on_dead_letter=sdef.on_dead_letter)
    source = faust_topic(app, settings, sdef.source)

    @app.agent(source, name=f"{settings.kafka.topic_prefix}.{sdef.name}")
    async def agent(stream: Any) -> None:
        async with sdef.open(settings, runner) as handler:
            pipeline: BatchPipeline | ConcurrentPipeline
            if sdef.concurrency is not None:
                pipeline = ConcurrentPipeline(
                    runner, sdef.source, handler, concurrency=sdef.concurrency(settings)
                )
            else:
                pipeline = BatchPipeline(
                    runner,
                    sdef.source,
                    handler,
                    batch_size=sdef.batch_size(settings),
                    max_wait_s=sdef.max_wait_s(settings),
                    depth=sdef.depth(settings),
                )
            runner.ready = True
            await pipeline.run(stream.noack().events())

    return runner


def write_heartbeat(path: Path, stage: str, runner: StageRunner, assigned: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "stage": stage,
                "pid": os.getpid(),
                "ts": time.time(),
                "ready": runner.ready and assigned,
                "processed": runner.processed,
                "dead_lettered": runner.dead_lettered,
            }
        )
    )
    tmp.replace(path)


def run_worker(settings: Settings, stages: str | Sequence[str]) -> None:
    """Run one or more stages until SIGTERM/SIGINT (Faust's worker handles both gracefully)."""
    import faust

    app, runners = build_worker_app(settings, stages)
    for r in runners:
        heartbeat_path(settings, r.stage).unlink(missing_ok=True)
    worker = faust.Worker(
        app,
        loglevel=settings.log_level,
        quiet=True,
        redirect_stdouts=False,
        override_logging=False,
    )
    worker.execute_from_commandline()

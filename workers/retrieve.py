"""Retrieval stage: embed the question on Triton, run hybrid search with the tenant and
access-group filter inside the search, optionally widen hits to neighbouring chunks.

A query that cannot be served (Triton or the store failing past the deadline) is answered
with an error `ResponseCompleted` right here, so the caller hears about it within the
deadline instead of waiting for a generation that will never come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from tenacity import AsyncRetrying, retry_if_exception_type, wait_fixed

from ragstream.infra.embedder import Embedder
from ragstream.infra.lifecycle import started
from ragstream.infra.settings import GuardPolicy, Settings
from ragstream.infra.vectorstore.base import SearchHit, SearchQuery, VectorStore
from ragstream.schemas.errors import TransientError
from ragstream.schemas.events import Event, Principal, utcnow
from ragstream.schemas.guard import GuardVerdict
from ragstream.schemas.queries import ContextRetrieved, QuerySubmitted, RetrievedChunk
from ragstream.streams.admission import Admission, opened_admission
from ragstream.streams.guardrails import Guardrails, GuardResult, UnknownPolicy, opened_guardrails
from ragstream.streams.runner import StageRunner
from ragstream.streams.stage import Concurrent, Stage
from ragstream.streams.topics import QUERIES, REPLIES, RESPONSES, RETRIEVALS, reply_topic
from ragstream.workers.responses import (
    blocked_response,
    error_response,
    invalid_request_response,
    ms_since,
    remaining_s,
)

__all__ = ["STAGE", "RetrievalDeps", "handle", "handle_query", "open_deps"]

log = logging.getLogger(__name__)

_RETRY_DELAY_S = 0.2


@dataclass
class RetrievalDeps:
    embedder: Embedder
    store: VectorStore
    guard: Guardrails | None = None
    """The input and context rails; None when guardrails are disabled."""
    admission: Admission | None = None
    """Verifies each query's sender (`STAGE.admit`); None in unit tests of `handle`."""
    reply_streams: Callable[[set[str]], Awaitable[set[str]]] | None = None
    """Creates callers' reply streams on first use."""
    topic_prefix: str = "ragstream"


async def handle_query(query: QuerySubmitted, deps: RetrievalDeps) -> list[Event]:
    """Find the context for one question; never raises for a valid query.

    The input rails run concurrently with retrieval: nothing reaches generation (or the
    caller) unless they pass. The model then sees the question as they left it (masked where
    they mask). The context rails check each retrieved chunk; a chunk they block is dropped.
    """
    started = utcnow()
    latency: dict[str, float] = {"queue_retrieval": ms_since(query.produced_at)}
    if remaining_s(query) <= 0:
        return error_response(query, "deadline_exceeded: the deadline passed before retrieval", latency)
    if query.principal is not None and deps.reply_streams is not None:
        # The caller's stream exists before anything is sent to it.
        await deps.reply_streams({reply_topic(deps.topic_prefix, query.principal.reply_to)})
    policy_name: str | None = None
    policy = GuardPolicy()
    guard_task: asyncio.Task[GuardResult] | None = None
    if deps.guard is not None:
        try:
            policy_name, policy = deps.guard.policy(
                tenant=query.tenant, route=query.generation.route, requested=query.guard_policy
            )
        except UnknownPolicy as exc:
            return error_response(query, f"invalid_request: {exc}", latency)
        guard_task = asyncio.create_task(
            _timed(deps.guard.check(query.question, "input", policy), latency, "guard_input")
        )
    try:
        hits = await asyncio.wait_for(_retrieve(query, deps, latency), timeout=remaining_s(query))
    except TimeoutError:
        return await _after(
            guard_task, error_response(query, "deadline_exceeded: retrieval did not finish in time", latency)
        )
    except TransientError as exc:
        return await _after(guard_task, error_response(query, f"retrieval_failed: {exc}", latency))
    verdicts: list[GuardVerdict] = []
    if guard_task is not None and deps.guard is not None:
        checked = await guard_task
        verdicts.extend(checked.verdicts)
        if checked.action == "block":
            return blocked_response(query, checked.blocked_by, verdicts, policy_name, latency)
        if checked.text != query.question:
            query = query.model_copy(update={"question": checked.text})
        hits, dropped = await _context_rails(deps.guard, policy, hits, latency)
        verdicts.extend(dropped)
    latency["retrieval"] = ms_since(started)
    return [
        ContextRetrieved(
            request_id=query.request_id,
            trace_id=query.request_id,
            tenant=query.tenant,
            query=query,
            chunks=tuple(hits),
            latency_ms=latency,
            guard_policy=policy_name,
            guard_verdicts=tuple(verdicts),
        )
    ]


async def _timed(call: Awaitable[GuardResult], latency: dict[str, float], name: str) -> GuardResult:
    t = time.perf_counter()
    try:
        return await call
    finally:
        latency[name] = (time.perf_counter() - t) * 1000.0


async def _after(task: asyncio.Task[GuardResult] | None, out: list[Event]) -> list[Event]:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    return out


async def _context_rails(
    guard: Guardrails, policy: GuardPolicy, hits: list[RetrievedChunk], latency: dict[str, float]
) -> tuple[list[RetrievedChunk], list[GuardVerdict]]:
    """The retrieved chunks the context rails let through, and their verdicts (a blocked chunk
    is dropped: instructions hidden in a document never reach the model)."""
    if not policy.context or not hits:
        return hits, []
    t = time.perf_counter()
    results = await asyncio.gather(*(guard.check(c.text, "context", policy) for c in hits))
    latency["guard_context"] = (time.perf_counter() - t) * 1000.0
    kept = [
        c.model_copy(update={"text": r.text}) if r.text != c.text else c
        for c, r in zip(hits, results, strict=True)
        if r.action != "block"
    ]
    verdicts = [v for r in results for v in r.verdicts if v.action != "allow"]
    return kept, verdicts


async def _retrieve(
    query: QuerySubmitted, deps: RetrievalDeps, latency: dict[str, float]
) -> list[RetrievedChunk]:
    """Retries transient failures while the caller's deadline leaves room for another try."""
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(TransientError),
        stop=lambda _: remaining_s(query) <= _RETRY_DELAY_S,
        wait=wait_fixed(_RETRY_DELAY_S),
        before_sleep=lambda rs: log.warning(
            "retrieval for %s failed (%s); retrying", query.request_id, rs.outcome and rs.outcome.exception()
        ),
        reraise=True,
    )
    return await retrying(_retrieve_once, query, deps, latency)


async def _retrieve_once(
    query: QuerySubmitted, deps: RetrievalDeps, latency: dict[str, float]
) -> list[RetrievedChunk]:
    opts = query.retrieval
    vector: tuple[float, ...] | None = None
    if opts.mode != "keyword":
        t = time.perf_counter()
        vector = tuple(float(x) for x in (await deps.embedder.embed([query.question]))[0])
        latency["embed_query"] = (time.perf_counter() - t) * 1000.0
    t = time.perf_counter()
    hits = await deps.store.search(
        SearchQuery(
            tenant=query.tenant,
            access_groups=query.access_groups,
            text=query.question,
            vector=vector,
            top_k=opts.top_k,
            mode=opts.mode,
            alpha=opts.alpha,
            metadata_filters=opts.metadata_filters,
            document_ids=opts.document_ids,
        )
    )
    latency["search"] = (time.perf_counter() - t) * 1000.0
    chunks = [_chunk(h) for h in hits]
    if opts.neighbours and hits:
        t = time.perf_counter()
        chunks = await _with_neighbours(query, deps.store, hits, opts.neighbours)
        latency["expand"] = (time.perf_counter() - t) * 1000.0
    return chunks


def _chunk(h: SearchHit, neighbour_of: str | None = None) -> RetrievedChunk:
    return RetrievedChunk(
        chunk_id=h.chunk_id,
        document_id=h.document_id,
        title=h.title,
        text=h.text,
        headings=h.headings,
        chunk_index=h.chunk_index,
        source=h.source,
        score=h.score,
        vector_score=h.vector_score,
        keyword_score=h.keyword_score,
        neighbour_of=neighbour_of,
    )


async def _with_neighbours(
    query: QuerySubmitted, store: VectorStore, hits: Sequence[SearchHit], window: int
) -> list[RetrievedChunk]:
    """Each hit followed by its neighbours (same document version, same access filter)."""
    seen = {h.chunk_id for h in hits}
    out: list[RetrievedChunk] = []
    for h in hits:
        out.append(_chunk(h))
        near = await store.neighbours(
            query.tenant, h.document_id, h.chunk_index, window, query.access_groups, fingerprint=h.fingerprint
        )
        for n in sorted(near, key=lambda n: n.chunk_index):
            if n.chunk_id not in seen:
                seen.add(n.chunk_id)
                out.append(_chunk(n, neighbour_of=h.chunk_id).model_copy(update={"score": h.score}))
    return out


async def handle(events: Sequence[Event], deps: RetrievalDeps) -> list[Event]:
    out: list[Event] = []
    for e in events:
        assert isinstance(e, QuerySubmitted)  # the topic's contract guarantees it
        out.extend(await handle_query(e, deps))
    return out


@asynccontextmanager
async def open_deps(settings: Settings, runner: StageRunner) -> AsyncIterator[RetrievalDeps]:
    from ragstream.infra.embedder import TritonEmbedder
    from ragstream.infra.vectorstore import open_vector_store

    async with (
        opened_admission(settings) as admission,
        started(open_vector_store(settings)) as store,
        started(TritonEmbedder(settings)) as embedder,
        opened_guardrails(settings) as guard,
    ):
        yield RetrievalDeps(
            embedder=embedder,
            store=store,
            guard=guard,
            admission=admission,
            reply_streams=runner.ensure_reply_streams,
            topic_prefix=settings.kafka.topic_prefix,
        )


def _admit(event: Event, deps: RetrievalDeps) -> Event:
    if deps.admission is None:
        raise RuntimeError("the retrieve stage was opened without admission")
    return deps.admission.admit(event)


def _caller(raw: bytes | None, deps: RetrievalDeps) -> Principal | None:
    return deps.admission.caller(raw) if deps.admission is not None else None


STAGE = Stage(
    name="retrieve",
    consumes=QUERIES,
    produces=(RETRIEVALS, RESPONSES, REPLIES),
    flow=Concurrent(limit=lambda s: s.serving.retrieval_concurrency),
    deps=open_deps,
    handle=handle,
    on_dead_letter=invalid_request_response,
    once_per_request=True,
    admit=_admit,
    caller=_caller,
)
"""Questions in (each sender verified first); their context out to generation, or an error
response to the caller."""

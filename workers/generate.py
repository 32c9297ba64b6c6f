"""Generation stage: assemble the grounded prompt, stream the answer from the generator on
Triton, publish each token delta as it arrives (to the caller's own reply stream), then the
final response (its full record internally, the caller's copy without the prompt).

The route in the query (`generation.route`) names a Triton model through
`generation.routes`, so several models can be served and routed between. The caller's
deadline bounds everything: past it, the stream is cancelled (freeing the model slot) and
the final response says `deadline_exceeded`, with whatever was generated so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from ragstream.infra import telemetry
from ragstream.infra.embedder import Embedder
from ragstream.infra.lifecycle import started
from ragstream.infra.settings import GuardPolicy, Settings
from ragstream.schemas.errors import BadInputError, DeadlineExceeded, TransientError
from ragstream.schemas.events import Event
from ragstream.schemas.queries import (
    ContextRetrieved,
    Passage,
    PromptMessage,
    ResponseCompleted,
    TokenGenerated,
    Usage,
)
from ragstream.streams.admission import principal_in
from ragstream.streams.guardrails import Guardrails, StreamGuard, opened_guardrails
from ragstream.streams.runner import StageRunner
from ragstream.streams.stage import Concurrent, Stage
from ragstream.streams.topics import REPLIES, RESPONSES, RETRIEVALS
from ragstream.workers.extractive import EXTRACTIVE_MODEL, dont_know, extract, relevance, trimmed
from ragstream.workers.prompt import build_prompt, citations_for
from ragstream.workers.responses import (
    blocked_response,
    error_response,
    finals,
    invalid_request_response,
    ms_since,
    remaining_s,
)

__all__ = ["STAGE", "GenerationDeps", "handle", "handle_context", "open_deps"]

log = logging.getLogger(__name__)


@dataclass
class GenerationDeps:
    settings: Settings
    generator: Any
    """`stream(model, messages, *, max_tokens, temperature, timeout_s)` -> async deltas."""
    count_tokens: Callable[[str], int]
    send_nowait: Callable[[Sequence[Event]], Awaitable[list[Awaitable[Any]]]]
    """Publishes token deltas as they come, without waiting for the broker."""
    guard: Guardrails | None = None
    """The output rails; None when guardrails are disabled."""
    e5: Embedder | None = None
    """multilingual e5 (Triton `embed-e5`): the extractive route and the no-context check."""


async def handle_context(ctx: ContextRetrieved, deps: GenerationDeps) -> list[Event]:
    """Answer one retrieved query; never raises for a valid event."""
    q = ctx.query
    gen = deps.settings.generation
    latency = dict(ctx.latency_ms)
    latency["queue_generation"] = ms_since(ctx.produced_at)
    if remaining_s(q) <= 0:
        return error_response(q, "deadline_exceeded: the deadline passed before generation", latency)
    route = q.generation.route
    model = gen.model_for(route)
    if model is None:
        known = ", ".join(sorted({*gen.routes, EXTRACTIVE_MODEL}))
        return error_response(q, f"unknown_route: {route!r} (known: {known})", latency)
    if deps.e5 is not None and gen.min_context_relevance > 0:
        t_rel = time.perf_counter()
        try:
            found = await relevance(q.question, ctx.chunks, deps.e5)
        except TransientError as exc:  # the check is a courtesy: without it, answer as usual
            log.warning("no-context check skipped for %s: %s", q.request_id, exc)
            found = None
        latency["context_relevance"] = (time.perf_counter() - t_rel) * 1000.0
        if found is not None and not found.relevant(gen.min_context_relevance, gen.min_context_term_coverage):
            return _no_context(ctx, route, latency)
    fallback = gen.fallback_routes.get(route)
    if model == EXTRACTIVE_MODEL:
        return await _extractive(ctx, deps, route, latency)
    if (
        fallback is not None
        and gen.model_for(fallback) == EXTRACTIVE_MODEL
        and remaining_s(q) < gen.min_generation_s
    ):
        latency["fallback"] = 1.0
        return await _extractive(ctx, deps, fallback, latency, why="deadline")

    chunks = list(ctx.chunks)
    keep = gen.prompt_sentences.get(route, 0)
    if keep > 0 and deps.e5 is not None:
        t_trim = time.perf_counter()
        try:
            chunks = await trimmed(q.question, chunks, deps.e5, keep)
        except TransientError as exc:  # whole chunks then: slower, still right
            log.warning("prompt trimming skipped for %s: %s", q.request_id, exc)
        latency["trim"] = (time.perf_counter() - t_trim) * 1000.0
    t0 = time.perf_counter()
    prompt = await asyncio.to_thread(
        build_prompt,
        q.question,
        chunks,
        count_tokens=deps.count_tokens,
        context_window=gen.context_tokens,
        max_new_tokens=q.generation.max_tokens,
        history=q.history,
    )
    latency["prompt"] = (time.perf_counter() - t0) * 1000.0

    parts: list[str] = []
    sent: list[Awaitable[Any]] = []
    finish_reason: str | None = None
    usage = Usage()
    status = "ok"
    reason: str | None = None
    policy = _output_policy(ctx, deps)
    # Streamed answers pass the output rails a window at a time; only passed text is sent.
    sg = (
        StreamGuard(deps.guard, policy)
        if deps.guard is not None and policy is not None and q.stream
        else None
    )
    streams_to_caller = q.stream and q.principal is not None

    async def release(text: str) -> None:
        if not text:
            return
        if not parts:
            latency["time_to_first_token"] = (time.perf_counter() - t_gen) * 1000.0
        if streams_to_caller:
            assert q.principal is not None
            token = TokenGenerated(
                request_id=q.request_id,
                trace_id=q.request_id,
                tenant=q.tenant,
                sequence=len(parts),
                delta=text,
                reply_to=q.principal.reply_to,
            )
            sent.extend(await deps.send_nowait([token]))
        parts.append(text)

    t_gen = time.perf_counter()
    try:
        stream = deps.generator.stream(
            model,
            list(prompt.messages),
            max_tokens=q.generation.max_tokens,
            temperature=q.generation.temperature,
            timeout_s=max(remaining_s(q), 0.001),
        )
        # aclosing: leaving early (a blocked window) closes the stream, which stops the model.
        async with asyncio.timeout(remaining_s(q)), contextlib.aclosing(stream) as deltas:
            async for delta in deltas:
                if delta.text:
                    latency.setdefault("model_first_token", (time.perf_counter() - t_gen) * 1000.0)
                    await release(await sg.push(delta.text) if sg is not None else delta.text)
                    if sg is not None and sg.blocked is not None:
                        break  # stops the model: nothing after a failing window is generated
                if delta.final:
                    finish_reason = delta.finish_reason
                    usage = Usage(
                        prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens
                    )
            if sg is not None and sg.blocked is None:
                await release(await sg.finish())
    except (TimeoutError, DeadlineExceeded):
        status, reason, finish_reason = (
            "error",
            "deadline_exceeded: generation did not finish in time",
            "deadline",
        )
    except (TransientError, BadInputError) as exc:
        if (
            isinstance(exc, TransientError)
            and not parts
            and fallback is not None
            and gen.model_for(fallback) == EXTRACTIVE_MODEL
            and remaining_s(q) > 0
        ):
            log.warning("generator failed for %s (%s); answering on route %s", q.request_id, exc, fallback)
            latency["fallback"] = 1.0
            return await _extractive(ctx, deps, fallback, latency, why="generator_unavailable")
        status, reason, finish_reason = "error", f"generation_failed: {exc}", "error"
    latency["generation"] = (time.perf_counter() - t_gen) * 1000.0
    for fut in sent:  # every delta is on the broker before the final response
        await fut
    answer = "".join(parts)
    verdicts = list(ctx.guard_verdicts)
    if sg is not None:
        verdicts += [v for v in sg.verdicts if v.action != "allow"]
        latency["guard_holdback_max_chars"] = float(sg.max_held_chars)
    elif deps.guard is not None and policy is not None and answer and status == "ok":
        t_out = time.perf_counter()
        checked = await deps.guard.check(answer, "output", policy)  # a non-streamed answer, whole
        latency["guard_output"] = (time.perf_counter() - t_out) * 1000.0
        verdicts += [v for v in checked.verdicts if v.action != "allow"]
        if checked.action == "block":
            return blocked_response(
                q,
                checked.blocked_by,
                verdicts,
                ctx.guard_policy,
                latency,
                extra=_record(ctx, prompt, model, usage),
            )
        answer = checked.text
    if sg is not None and sg.blocked is not None:
        return blocked_response(
            q,
            sg.blocked,
            verdicts,
            ctx.guard_policy,
            latency,
            answer=answer,
            extra={
                **_record(ctx, prompt, model, usage),
                "delta_count": len(parts) if streams_to_caller else 0,
            },
        )
    latency["total"] = ms_since(q.produced_at)
    return finals(
        ResponseCompleted(
            request_id=q.request_id,
            trace_id=q.request_id,
            tenant=q.tenant,
            user=q.user,
            status=status,  # type: ignore[arg-type]
            error_reason=reason,
            question=q.question,
            answer=answer,
            citations=citations_for(answer, prompt.sources),
            usage=usage,
            model_id=model,
            route=q.generation.route,
            finish_reason=finish_reason,
            prompt_template_version=prompt.template_version,
            prompt_messages=tuple(PromptMessage.model_validate(m) for m in prompt.messages),
            passages=tuple(
                Passage(number=i, chunk_id=c.chunk_id, document_id=c.document_id, text=c.text)
                for i, c in enumerate(prompt.sources, start=1)
            ),
            retrieved_chunk_ids=tuple(c.chunk_id for c in ctx.chunks),
            retrieved_scores=tuple(c.score for c in ctx.chunks),
            latency_ms=latency,
            streamed=q.stream,
            delta_count=len(parts) if streams_to_caller else 0,
            principal=q.principal,
            guard_policy=ctx.guard_policy,
            guard_verdicts=tuple(verdicts),
        )
    )


def _no_context(ctx: ContextRetrieved, route: str, latency: dict[str, float]) -> list[Event]:
    """ "I don't know" in the question's language: nothing retrieved is relevant enough."""
    q = ctx.query
    latency["total"] = ms_since(q.produced_at)
    return finals(
        ResponseCompleted(
            request_id=q.request_id,
            trace_id=q.request_id,
            tenant=q.tenant,
            user=q.user,
            status="ok",
            question=q.question,
            answer=dont_know(q.question),
            model_id="none",
            route=route,
            finish_reason="no_context",
            retrieved_chunk_ids=tuple(c.chunk_id for c in ctx.chunks),
            retrieved_scores=tuple(c.score for c in ctx.chunks),
            latency_ms=latency,
            streamed=q.stream,
            principal=q.principal,
            guard_policy=ctx.guard_policy,
            guard_verdicts=ctx.guard_verdicts,
        )
    )


async def _extractive(
    ctx: ContextRetrieved,
    deps: GenerationDeps,
    route: str,
    latency: dict[str, float],
    *,
    why: str | None = None,
) -> list[Event]:
    """The answer quoted from the passages (`workers/extractive.py`); `why` names the reason
    a generated route fell back to it (`deadline`, `generator_unavailable`)."""
    q = ctx.query
    if deps.e5 is None:
        return error_response(q, "generation_failed: the extractive route has no embedder", latency)
    t0 = time.perf_counter()
    try:
        found = await extract(q.question, ctx.chunks, deps.e5)
    except TransientError as exc:
        return error_response(q, f"generation_failed: extractive route: {exc}", latency)
    latency["extract"] = (time.perf_counter() - t0) * 1000.0
    if found is None:
        return _no_context(ctx, route, latency)
    answer = found.text
    verdicts = list(ctx.guard_verdicts)
    policy = _output_policy(ctx, deps)
    if deps.guard is not None and policy is not None:
        t_out = time.perf_counter()
        checked = await deps.guard.check(answer, "output", policy)
        latency["guard_output"] = (time.perf_counter() - t_out) * 1000.0
        verdicts += [v for v in checked.verdicts if v.action != "allow"]
        if checked.action == "block":
            return blocked_response(q, checked.blocked_by, verdicts, ctx.guard_policy, latency)
        answer = checked.text
    delta_count = 0
    if q.stream and q.principal is not None:
        token = TokenGenerated(
            request_id=q.request_id,
            trace_id=q.request_id,
            tenant=q.tenant,
            sequence=0,
            delta=answer,
            reply_to=q.principal.reply_to,
        )
        for fut in await deps.send_nowait([token]):
            await fut
        delta_count = 1
    latency["time_to_first_token"] = (time.perf_counter() - t0) * 1000.0
    latency["total"] = ms_since(q.produced_at)
    sources = tuple(ctx.chunks)
    return finals(
        ResponseCompleted(
            request_id=q.request_id,
            trace_id=q.request_id,
            tenant=q.tenant,
            user=q.user,
            status="ok",
            question=q.question,
            answer=answer,
            citations=citations_for(answer, sources),
            model_id=EXTRACTIVE_MODEL,
            route=route,
            finish_reason=f"fallback:{why}" if why else "stop",
            passages=tuple(
                Passage(number=i, chunk_id=c.chunk_id, document_id=c.document_id, text=c.text)
                for i, c in enumerate(sources, start=1)
            ),
            retrieved_chunk_ids=tuple(c.chunk_id for c in ctx.chunks),
            retrieved_scores=tuple(c.score for c in ctx.chunks),
            latency_ms=latency,
            streamed=q.stream,
            delta_count=delta_count,
            principal=q.principal,
            guard_policy=ctx.guard_policy,
            guard_verdicts=tuple(verdicts),
        )
    )


def _output_policy(ctx: ContextRetrieved, deps: GenerationDeps) -> GuardPolicy | None:
    if deps.guard is None or ctx.guard_policy is None:
        return None
    policy = deps.guard.settings.policies.get(ctx.guard_policy)
    return policy if policy is not None and policy.output else None


def _record(ctx: ContextRetrieved, prompt: Any, model: str, usage: Usage) -> dict[str, Any]:
    """What the internal record of a blocked answer keeps, for the audit trail."""
    return {
        "model_id": model,
        "usage": usage,
        "prompt_template_version": prompt.template_version,
        "prompt_messages": tuple(PromptMessage.model_validate(m) for m in prompt.messages),
        "retrieved_chunk_ids": tuple(c.chunk_id for c in ctx.chunks),
        "retrieved_scores": tuple(c.score for c in ctx.chunks),
    }


async def handle(events: Sequence[Event], deps: GenerationDeps) -> list[Event]:
    out: list[Event] = []
    for e in events:
        assert isinstance(e, ContextRetrieved)  # the topic's contract guarantees it
        out.extend(await handle_context(e, deps))
    _observe(out)
    return out


def _observe(out: Sequence[Event]) -> None:
    """Tokens and time to first token of the final responses (their internal record only,
    not the caller's copy of the same answer)."""
    for r in out:
        if isinstance(r, ResponseCompleted) and r.reply_to is None and r.route:
            if r.usage.completion_tokens:
                telemetry.GENERATED_TOKENS.labels(r.route).inc(r.usage.completion_tokens)
            ttft_ms = r.latency_ms.get("time_to_first_token")
            if ttft_ms is not None:
                telemetry.TIME_TO_FIRST_TOKEN.labels(r.route).observe(ttft_ms / 1000.0)


@asynccontextmanager
async def open_deps(settings: Settings, runner: StageRunner) -> AsyncIterator[GenerationDeps]:
    from ragstream.infra.embedder import E5_MODEL_ID, TritonEmbedder
    from ragstream.infra.generator import GeneratorTokenizer, TritonGenerator

    e5 = TritonEmbedder(settings, model=settings.triton.guard_embed_model, model_id=E5_MODEL_ID)
    async with (
        started(TritonGenerator(settings)) as generator,
        opened_guardrails(settings) as guard,
        started(e5),
    ):
        tokenizer = GeneratorTokenizer(settings)
        await asyncio.to_thread(tokenizer.load)  # not on the first request's clock
        yield GenerationDeps(
            settings=settings,
            generator=generator,
            count_tokens=tokenizer.count,
            send_nowait=runner.send_nowait,
            guard=guard,
            e5=e5,
        )


STAGE = Stage(
    name="generate",
    consumes=RETRIEVALS,
    produces=(REPLIES, RESPONSES),
    flow=Concurrent(limit=lambda s: s.serving.generation_concurrency),
    deps=open_deps,
    handle=handle,
    on_dead_letter=invalid_request_response,
    once_per_request=True,
    caller=lambda raw, deps: principal_in(raw, "query", "principal"),
)
"""Retrieved context in; token deltas to the caller's own stream, and exactly one final
response: its full record (prompt included) to `responses`, the caller's copy to the caller."""

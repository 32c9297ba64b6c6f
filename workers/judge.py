"""Judge stage: every answered request, judged off the response path, exactly once.

It consumes the internal `responses` topic (the full record: question, answer, the passages
the model was given) and publishes one `JudgementRecorded` per judge to `judgements`, then
the request's `overall` judgement with its root cause. Nothing on the query path waits for
it; a slow judge only grows this stage's consumer lag, which `ragstream status` shows.

- Judging yields to the query path where they share a machine: before each judgement the
  stage waits (at most `judges.max_yield_s`) while the stages in `judges.yield_to_stages`
  have requests in flight, as their heartbeats say. Its e5 runs in this process on one
  thread at nice 10.
- Only `ok` responses with an answer are judged: an error or a block has nothing to judge.
- A request is judged with probability `judges.sample_rate` (per route, else per tenant,
  else the default), decided by a hash of its id: a redelivery decides the same way.
- Exactly once: the stage is gated on the `judgements` topic (`streams.completions`). A
  request whose `overall` judgement is published is never judged again; a worker killed
  between a request's first judgement and its `overall` judges it again on restart, and the
  audit sink keeps one row per (request, judge, version): each judgement's event id is derived
  from those, so the copies are recognisably the same.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from ragstream.infra import telemetry
from ragstream.infra.judges.base import JudgeCase, Verdict
from ragstream.infra.judges.panel import JudgePanel, opened_panel
from ragstream.infra.settings import JudgesSettings, Settings
from ragstream.schemas.events import Event
from ragstream.schemas.judge import JudgementRecorded, judgement_id
from ragstream.schemas.queries import ResponseCompleted
from ragstream.streams.runner import StageRunner
from ragstream.streams.stage import Batched, Stage
from ragstream.streams.topics import JUDGEMENTS, RESPONSES

__all__ = ["STAGE", "JudgeDeps", "handle", "judgement_events", "judgements_of", "open_deps", "sampled"]

log = logging.getLogger(__name__)


@dataclass
class JudgeDeps:
    settings: JudgesSettings
    panel: JudgePanel | None
    """None when judging is disabled (`judges.enabled = false`): responses pass unjudged."""
    queries_busy: Callable[[], bool] | None = None
    """True while the query path has requests in flight on this machine (see `yield_to_stages`)."""


def busy_reader(paths: Sequence[Path]) -> Callable[[], bool]:
    """Whether any of these stage heartbeats reports requests in flight (fresh within 5 s)."""

    def busy() -> bool:
        for path in paths:
            try:
                beat = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if (
                isinstance(beat, dict)
                and beat.get("inflight", 0)
                and time.time() - float(beat.get("ts", 0)) < 5
            ):
                return True
        return False

    return busy


async def yield_to_queries(deps: JudgeDeps) -> float:
    """Wait while the query path is busy, up to `max_yield_s`; returns the seconds waited."""
    if deps.queries_busy is None:
        return 0.0
    waited = 0.0
    while waited < deps.settings.max_yield_s and deps.queries_busy():
        await asyncio.sleep(0.1)
        waited += 0.1
    return waited


def sampled(request_id: str, rate: float) -> bool:
    """Whether a request is judged at `rate`: a hash of its id, so the same every time."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    h = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big")
    return h / 2**64 < rate


def judgements_of(
    response: ResponseCompleted,
    verdicts: Sequence[Verdict],
    overall: Verdict,
    root_cause: str | None,
    *,
    source: str,
    source_ref: str,
) -> list[JudgementRecorded]:
    """The events for one judged response: a judgement per verdict, then `overall`."""
    return judgement_events(
        verdicts,
        overall,
        root_cause,
        request_id=response.request_id,
        tenant=response.tenant,
        user=response.principal.user if response.principal is not None else response.user,
        route=response.route,
        source=source,
        source_ref=source_ref,
        response_event_id=response.event_id,
    )


def judgement_events(
    verdicts: Sequence[Verdict],
    overall: Verdict,
    root_cause: str | None,
    *,
    request_id: str,
    tenant: str,
    user: str | None,
    route: str | None,
    source: str,
    source_ref: str,
    version: str | None = None,
    id_source: str | None = None,
    response_event_id: str | None = None,
) -> list[JudgementRecorded]:
    """A judgement per verdict, then `overall`. `version` overrides each judge's own (a
    backfill labels its run); the event id derives from (request, judge, version,
    `id_source` or `source`)."""
    out: list[JudgementRecorded] = []
    for v in (*verdicts, overall):
        judge_version = version or v.version or "1"
        out.append(
            JudgementRecorded(
                event_id=judgement_id(request_id, v.judge, judge_version, id_source or source),
                trace_id=request_id,
                tenant=tenant,
                request_id=request_id,
                judge=v.judge,
                judge_version=judge_version[:64],
                implementation=v.implementation[:128],
                model=(v.model or None) and v.model[:256],
                rating=v.rating,
                score=v.score,
                rationale=v.rationale[:4000],
                error=v.error[:1000] if v.error else None,
                latency_ms=max(v.latency_ms, 0.0),
                chunk_ratings=v.chunk_ratings,
                root_cause=root_cause if v is overall else None,
                user=user[:256] if user else None,
                route=route,
                source=source,  # type: ignore[arg-type]
                source_ref=source_ref[:256],
                response_event_id=response_event_id,
            )
        )
    return out


def case_of(response: ResponseCompleted, guidelines: Sequence[str] = ()) -> JudgeCase:
    return JudgeCase(
        request_id=response.request_id,
        question=response.question,
        answer=response.answer,
        passages=[p.text for p in response.passages],
        guidelines=guidelines,
    )


async def handle(events: Sequence[Event], deps: JudgeDeps) -> list[Event]:
    out: list[Event] = []
    if deps.panel is None:
        return out
    for e in events:
        assert isinstance(e, ResponseCompleted)  # the topic's contract guarantees it
        if e.status != "ok" or not e.answer.strip():
            continue
        if not sampled(e.request_id, deps.settings.sample_rate_for(tenant=e.tenant, route=e.route)):
            continue
        await yield_to_queries(deps)
        result = await deps.panel.judge(case_of(e, deps.settings.guidelines))
        judged = judgements_of(
            e,
            result.verdicts,
            result.overall,
            result.root_cause,
            source="stream",
            source_ref=f"response:{e.event_id}",
        )
        for j in judged:
            telemetry.JUDGEMENTS.labels(j.judge, j.rating or "error").inc()
        out.extend(judged)
    return out


@asynccontextmanager
async def open_deps(settings: Settings, runner: StageRunner) -> AsyncIterator[JudgeDeps]:
    from ragstream.infra.embedder import E5Embedder
    from ragstream.infra.lifecycle import started

    if not settings.judges.enabled:
        yield JudgeDeps(settings=settings.judges, panel=None)
        return
    # e5 in this process, on one low-priority thread, not on Triton: the guardrails' head
    # calls the Triton e5 on the query path, and judge traffic queued in front of it made
    # guard checks run past their budget (measured: 3 of 16 benign questions blocked).
    async with (
        started(E5Embedder(settings, cpu_threads=1, nice=10)) as embedder,
        opened_panel(settings, embedder) as panel,
    ):
        from ragstream.workers.stages import heartbeat_path

        paths = [heartbeat_path(settings, stage) for stage in settings.judges.yield_to_stages]
        yield JudgeDeps(
            settings=settings.judges,
            panel=panel,
            queries_busy=busy_reader(paths) if paths and settings.judges.max_yield_s > 0 else None,
        )


STAGE = Stage(
    name="judge",
    consumes=RESPONSES,
    produces=(JUDGEMENTS,),
    # In order, not concurrent. With out-of-order acks, faust-streaming's commit
    # (`Consumer._new_offset`) lets one un-acked message right after the committed offset be
    # committed over when later ones are acked; a judge worker killed then lost that request
    # (the chaos test saw 1-2 in ~33). Judging is CPU-bound on one thread anyway.
    flow=Batched(size=lambda s: s.judges.concurrency, max_wait_s=lambda s: 0.05),
    deps=open_deps,
    handle=handle,
    once_per_request=True,
    finished_on=JUDGEMENTS,
)
"""Final responses in, judgements out (off the response path)."""

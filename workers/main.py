"""Worker processes: `ragstream worker STAGE[,STAGE...]` runs stages as one Faust worker.

Each stage's declaration (`STAGE` at the end of its module, listed in `workers.stages`)
becomes a thin agent: it opens the stage's deps, takes messages off its input topic and
hands them to the `StageRunner` with the stage's `handle`. A timer writes a heartbeat file
(liveness, partition assignment, counters, crash and stall reasons, the `/metrics` URL) that
the supervisor and `ragstream status` read, and updates the consumer-lag gauge.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ragstream.infra import telemetry
from ragstream.infra.files import write_json_atomic
from ragstream.infra.kafka import ReplyStreams
from ragstream.infra.settings import Settings
from ragstream.schemas.events import Event
from ragstream.schemas.identity import Principal
from ragstream.streams.app import RagstreamApp, create_app, faust_topic
from ragstream.streams.completions import CompletedRequests
from ragstream.streams.pipeline import BatchPipeline, ConcurrentPipeline
from ragstream.streams.runner import StageRunner
from ragstream.streams.stage import Concurrent, Stage
from ragstream.workers.stages import STAGES, heartbeat_path, parse_stages

__all__ = ["STAGES", "build_worker_app", "heartbeat_path", "parse_stages", "run_worker"]

log = logging.getLogger(__name__)

CRASH_EXIT_CODE = 70
"""A worker exits with this when one of its stages crashed (EX_SOFTWARE)."""


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

    async def send(
        topic: str, key: bytes, value: bytes, headers: telemetry.Headers | None = None
    ) -> Awaitable[Any]:
        t = topics.get(topic)
        if t is None:
            t = topics[topic] = app.topic(topic, value_serializer="raw", key_serializer="raw")
        fut: Awaitable[Any] = await t.send(key=key, value=value, headers=headers)
        return fut

    # One gate per topic that finishes requests (responses; judgements), shared by the
    # worker's stages that wait on it.
    gates = {
        d.finished_on.name: _Gate(CompletedRequests(settings, d.finished_on))
        for d in defs
        if d.once_per_request
    }
    replies = ReplyStreams(settings)
    runners = [
        _register_stage(app, settings, stage, send, gates.get(stage.finished_on.name, _Gate(None)), replies)
        for stage in defs
    ]
    if gates:

        @app.on_partitions_assigned.connect  # type: ignore[arg-type]
        async def _caught_up_before_new_partitions(app: Any, assigned: Any, **kwargs: Any) -> None:
            # Another worker's answers for these partitions must be known before their
            # inputs are looked at (its crash left them unacked).
            for gate in gates.values():
                if gate.started and gate.completions is not None:
                    await gate.completions.caught_up()

    beats = [(heartbeat_path(settings, r.stage), r) for r in runners]
    lag = ConsumerLag({d.consumes.full_name(settings.kafka.topic_prefix): d.name for d in defs})

    @app.timer(0.5)  # type: ignore[untyped-decorator]
    async def heartbeat() -> None:
        assignment = app.consumer.assignment()
        for path, runner in beats:
            write_heartbeat(path, runner.stage, runner, bool(assignment))
        lag.update(app.consumer, assignment)

    return app, runners


class _Gate:
    """Starts the worker's `CompletedRequests` once, for whichever request stage asks first."""

    def __init__(self, completions: CompletedRequests | None) -> None:
        self.completions = completions
        self.started = False
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            if self.completions is not None and not self.started:
                await self.completions.start()
                self.started = True


def _register_stage(
    app: RagstreamApp,
    settings: Settings,
    stage: Stage[Any],
    send: Callable[[str, bytes, bytes], Awaitable[Awaitable[Any]]],
    gate: _Gate,
    replies: ReplyStreams,
) -> StageRunner:
    runner = StageRunner(
        settings,
        stage.name,
        send,
        on_dead_letter=stage.on_dead_letter,
        completions=gate.completions if stage.once_per_request else None,
        route=stage.route,
    )
    runner.ensure_reply_streams = replies.ensure
    source = faust_topic(app, settings, stage.consumes)

    @app.agent(source, name=f"{settings.kafka.topic_prefix}.{stage.name}")
    async def agent(stream: Any) -> None:
        try:
            await _run_stage(stream)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported, then the whole worker exits
            if app.should_stop:  # the worker is stopping (SIGTERM, `down`): its input ended
                log.info("stage %s stopped with its worker (%s)", stage.name, exc)
                return
            _crash(settings, runner, exc)

    async def _run_stage(stream: Any) -> None:
        if stage.once_per_request:
            await gate.start()  # every answer already published is known before any input
        async with stage.deps(settings, runner) as deps:
            runner.admit, runner.caller = _bound(stage, deps)

            async def handler(events: Sequence[Event]) -> Sequence[Event]:
                return await stage.handle(events, deps)

            pipeline: BatchPipeline | ConcurrentPipeline
            flow = stage.flow
            if isinstance(flow, Concurrent):
                pipeline = ConcurrentPipeline(
                    runner, stage.consumes, handler, concurrency=flow.limit(settings)
                )
            else:
                pipeline = BatchPipeline(
                    runner,
                    stage.consumes,
                    handler,
                    batch_size=flow.size(settings),
                    max_wait_s=flow.max_wait_s(settings),
                    depth=flow.depth(settings),
                )
            runner.ready = True
            await pipeline.run(stream.noack().events())

    return runner


class ConsumerLag:
    """`ragstream_consumer_lag_messages` for the partitions the worker holds: the highwater
    aiokafka last fetched minus the offset Faust last committed (negative readings, which the
    embedded broker's under-reported end offsets can give, count as 0)."""

    def __init__(self, stages_by_topic: dict[str, str]) -> None:
        self._stages = stages_by_topic
        self._shown: set[tuple[str, str, str]] = set()

    def update(self, consumer: Any, assignment: Any) -> None:
        # Faust keeps what it committed per partition (the next offset to read) in
        # `_committed_offset`; a partition never committed counts from 0.
        committed = getattr(consumer, "_committed_offset", None) or {}
        shown: set[tuple[str, str, str]] = set()
        for tp in assignment:
            stage = self._stages.get(tp.topic)
            if stage is None:
                continue
            try:
                highwater = consumer.highwater(tp)
            except Exception:  # noqa: BLE001 - not fetched yet (or the consumer is restarting)
                continue
            if highwater is None:
                continue
            labels = (stage, tp.topic, str(tp.partition))
            position = committed.get(tp) or 0
            telemetry.CONSUMER_LAG.labels(*labels).set(max(int(highwater) - int(position), 0))
            shown.add(labels)
        for labels in self._shown - shown:  # revoked partitions
            telemetry.CONSUMER_LAG.remove(*labels)
        self._shown = shown


def _bound(
    stage: Stage[Any], deps: Any
) -> tuple[Callable[[Event], Event] | None, Callable[[bytes | None], Principal | None] | None]:
    """The stage's admission and caller hooks with its deps bound."""
    admit, caller = stage.admit, stage.caller

    def admit_bound(event: Event) -> Event:
        assert admit is not None
        return admit(event, deps)

    def caller_bound(raw: bytes | None) -> Principal | None:
        assert caller is not None
        return caller(raw, deps)

    return (admit_bound if admit else None, caller_bound if caller else None)


def _crash(settings: Settings, runner: StageRunner, exc: BaseException) -> NoReturn:
    """A stage's agent failed: never let it sit dead (or be restarted silently by Faust) while
    the process looks healthy. The heartbeat records why, then the worker exits with
    `CRASH_EXIT_CODE`; the supervisor restarts it, counts it and shows the reason. Nothing
    unacked is lost: the new process consumes it again."""
    runner.ready = False
    runner.crashed = f"{type(exc).__name__}: {exc}"[:500]
    log.critical(
        "stage %s crashed; the worker exits to be restarted:\n%s",
        runner.stage,
        "".join(traceback.format_exception(exc)),
    )
    try:
        write_heartbeat(heartbeat_path(settings, runner.stage), runner.stage, runner, False)
    finally:
        logging.shutdown()
        os._exit(CRASH_EXIT_CODE)


def write_heartbeat(path: Path, stage: str, runner: StageRunner, assigned: bool) -> None:
    write_json_atomic(
        path,
        {
            "stage": stage,
            "pid": os.getpid(),
            "ts": time.time(),
            "ready": runner.ready and assigned,
            "processed": runner.processed,
            "lag_s": round(runner.lag_s, 3),
            "dead_lettered": runner.dead_lettered,
            "crashed": runner.crashed,
            "stalled_since": runner.stalled_since,
            "stalled_reason": runner.stalled_reason,
            "publish_retries": runner.publish_retries,
            "inflight": len(runner.inflight),
            "oldest_inflight_s": round(runner.inflight.oldest_age_s(), 3),
            "duplicates_skipped": runner.duplicates_skipped,
            "rejected": runner.rejected,
            "responses_gate_behind": runner.completions.behind if runner.completions else None,
            "metrics_url": telemetry.metrics_url(),
        },
    )


def run_worker(settings: Settings, stages: str | Sequence[str]) -> None:
    """Run one or more stages until SIGTERM/SIGINT (Faust's worker handles both gracefully)."""
    import faust

    app, runners = build_worker_app(settings, stages)
    for r in runners:
        heartbeat_path(settings, r.stage).unlink(missing_ok=True)
    telemetry.start_metrics_server(settings)
    telemetry.setup_tracing(settings, "worker-" + "+".join(r.stage for r in runners))
    worker = faust.Worker(
        app,
        loglevel=settings.log_level,
        quiet=True,
        redirect_stdouts=False,
        override_logging=False,
    )
    worker.execute_from_commandline()

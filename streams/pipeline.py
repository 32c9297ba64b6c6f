"""Pipelined micro-batching for a stage's input stream.

    reader ──► queue ──► batcher ──(slot)──► process_batch task ──► drainer: deliver, ack

- The batcher waits for a free slot (at most `depth` batches in flight), then takes one
  event and whatever else is already queued, up to `batch_size`, waiting at most
  `max_wait_s` for more. Under load, batches are full; an idle single event goes at once.
- With `depth > 1` the next batch is computed (e.g. on Triton) while the previous one is
  published, so the model is not idle while the worker encodes and sends. Only stateless
  stages may use it; stages whose effects depend on order (the index) keep `depth=1`.
- The drainer publishes results strictly in input order and acks the input events only once
  the broker has the outputs, so a crash at any point re-delivers rather than loses
  (at-least-once; stage effects are idempotent).
- Nothing here waits forever on a failure: `StageRunner.process_batch` never raises, and
  `StageRunner.deliver` is bounded. If delivery gives up (`PublishStalled`) or any task of
  the pipeline fails, `run()` raises it, the stage crashes visibly and its worker exits to be
  restarted; unacked inputs are consumed again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from ragstream.streams.runner import Emit, Handler, Message, StageRunner
from ragstream.streams.topics import TopicSpec

__all__ = ["BatchPipeline", "ConcurrentPipeline"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class BatchPipeline:
    def __init__(
        self,
        runner: StageRunner,
        spec: TopicSpec,
        handler: Handler,
        *,
        batch_size: int,
        max_wait_s: float,
        depth: int = 1,
    ) -> None:
        self.runner = runner
        self.spec = spec
        self.handler = handler
        self.batch_size = max(batch_size, 1)
        self.max_wait_s = max(max_wait_s, 0.0)
        self.depth = max(depth, 1)
        self.batches = 0
        self.batched_events = 0
        self.inflight = runner.inflight

    async def run(self, events: AsyncIterator[Any]) -> None:
        """Consume `events` (Faust events with manual acks) until cancelled.

        Raises:
            PublishStalled: delivery gave up; nothing of the failed batch was acked.
        """
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=self.batch_size * (self.depth + 1))
        inflight: asyncio.Queue[tuple[asyncio.Task[list[Emit]], list[Any], list[Message], int]] = (
            asyncio.Queue()
        )
        slots = asyncio.Semaphore(self.depth)
        reader = asyncio.create_task(self._read(events, queue), name=f"{self.runner.stage}-reader")
        drainer = asyncio.create_task(self._drain(inflight, slots), name=f"{self.runner.stage}-drainer")
        watched = {reader, drainer}
        try:
            while True:
                await _first(slots.acquire(), watched)
                batch = await _first(self._next_batch(queue), watched)
                messages = [Message.from_faust(e) for e in batch]
                token = self.inflight.begin()
                task = asyncio.create_task(self.runner.process_batch(self.spec, messages, self.handler))
                await inflight.put((task, batch, messages, token))
                self.batches += 1
                self.batched_events += len(batch)
        finally:
            for t in (reader, drainer):
                t.cancel()
            await asyncio.gather(reader, drainer, return_exceptions=True)

    async def _read(self, events: AsyncIterator[Any], queue: asyncio.Queue[Any]) -> None:
        async for event in events:
            await queue.put(event)
        raise RuntimeError("input stream ended")

    async def _next_batch(self, queue: asyncio.Queue[Any]) -> list[Any]:
        batch = [await queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.batch_size:
            try:
                batch.append(queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _drain(
        self,
        inflight: asyncio.Queue[tuple[asyncio.Task[list[Emit]], list[Any], list[Message], int]],
        slots: asyncio.Semaphore,
    ) -> None:
        while True:
            task, batch, messages, token = await inflight.get()
            outputs = await task  # process_batch never raises
            await self.runner.deliver(messages, outputs)  # bounded; raises PublishStalled
            for event in batch:
                event.ack()
            self.inflight.end(token)
            slots.release()


class _InOrderAcks:
    """Acks each partition's events in offset order, whatever order they finish in.

    faust-streaming's commit can move past an un-acked event that sits right after the
    committed offset once later events are acked (the judge stage lost requests to it under
    kill -9, and the query path once in the chaos test). Acking only the finished prefix of
    each partition never leaves such a gap: a crash redelivers everything from the oldest
    unfinished event on, and the completions gate drops what was already answered.
    """

    def __init__(self) -> None:
        self._queues: dict[tuple[str, int], collections.deque[list[Any]]] = {}

    def started(self, event: Any) -> list[Any]:
        """Register an event in its partition's order; returns its slot for `finished`."""
        m = event.message
        slot = [event, False]
        self._queues.setdefault((m.topic, m.partition), collections.deque()).append(slot)
        return slot

    def finished(self, slot: list[Any]) -> None:
        """Mark the event done, then ack the partition's finished prefix."""
        slot[1] = True
        m = slot[0].message
        queue = self._queues[(m.topic, m.partition)]
        while queue and queue[0][1]:
            queue.popleft()[0].ack()


class ConcurrentPipeline:
    """Independent requests, processed concurrently (up to `concurrency`), each published
    as soon as it is done, and acked in offset order (`_InOrderAcks`).

    For the query path: one slow answer must not hold back a quick one. Its commit waits
    for the slow one; a crash then redelivers the quick ones too, and the completions gate
    drops them as already answered.
    """

    def __init__(
        self,
        runner: StageRunner,
        spec: TopicSpec,
        handler: Handler,
        *,
        concurrency: int,
    ) -> None:
        self.runner = runner
        self.spec = spec
        self.handler = handler
        self.concurrency = max(concurrency, 1)
        self._tasks: set[asyncio.Task[None]] = set()
        self.inflight = runner.inflight
        self._failed: asyncio.Future[None] | None = None
        self._acks = _InOrderAcks()

    async def run(self, events: AsyncIterator[Any]) -> None:
        """Consume `events` until cancelled.

        Raises:
            PublishStalled: a request's delivery gave up (or any task failed); the stage
                stops rather than losing it, and the request is consumed again.
        """
        self._failed = asyncio.get_running_loop().create_future()
        slots = asyncio.Semaphore(self.concurrency)
        consume = asyncio.create_task(self._consume(events, slots), name=f"{self.runner.stage}-consume")
        try:
            await _first(asyncio.shield(self._failed), {consume})
            await self._failed  # re-raises what failed
        finally:
            consume.cancel()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(consume, *self._tasks, return_exceptions=True)

    async def _consume(self, events: AsyncIterator[Any], slots: asyncio.Semaphore) -> None:
        async for event in events:
            await slots.acquire()
            slot = self._acks.started(event)
            task = asyncio.create_task(self._one(event, slot, slots))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        raise RuntimeError("input stream ended")

    async def _one(self, event: Any, slot: list[Any], slots: asyncio.Semaphore) -> None:
        token = self.inflight.begin()
        try:
            message = Message.from_faust(event)
            outputs = await self.runner.process_batch(self.spec, [message], self.handler)
            await self.runner.deliver([message], outputs)
            self._acks.finished(slot)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - not acked: the stage fails, the request is redelivered
            if self._failed is not None and not self._failed.done():
                self._failed.set_exception(exc)
        finally:
            self.inflight.end(token)
            slots.release()


async def _first(work: Awaitable[T], watched: set[asyncio.Task[Any]]) -> T:
    """Await `work`, unless a watched task ends first: then raise what it raised."""
    fut = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({fut, *watched}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        fut.cancel()
        raise
    if fut in done:
        return fut.result()
    fut.cancel()
    for t in watched & done:
        t.result()  # raises the task's failure
    raise RuntimeError("a pipeline task ended")

"""Pipelined micro-batching for a stage's input stream.

    reader ──► queue ──► batcher ──(slot)──► process_batch task ──► drainer: publish, ack

- The batcher waits for a free slot (at most `depth` batches in flight), then takes one
  event and whatever else is already queued, up to `batch_size`, waiting at most
  `max_wait_s` for more. Under load, batches are full; an idle single event goes at once.
- With `depth > 1` the next batch is computed (e.g. on Triton) while the previous one is
  published, so the model is not idle while the worker encodes and sends. Only stateless
  stages may use it; stages whose effects depend on order (the index) keep `depth=1`.
- The drainer publishes results strictly in input order and acks the input events only once
  the broker has the outputs, so a crash at any point re-delivers rather than loses
  (at-least-once; stage effects are idempotent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from ragstream.schemas.events import Event
from ragstream.streams.stage import Emit, Message, StageRunner
from ragstream.streams.topics import TopicSpec

__all__ = ["BatchPipeline"]

log = logging.getLogger(__name__)

_PUBLISH_RETRY_MAX_S = 5.0


class BatchPipeline:
    def __init__(
        self,
        runner: StageRunner,
        spec: TopicSpec,
        handler: Callable[[Sequence[Event]], Awaitable[Sequence[Emit]]],
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

    async def run(self, events: AsyncIterator[Any]) -> None:
        """Consume `events` (Faust events with manual acks) until cancelled."""
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=self.batch_size * (self.depth + 1))
        inflight: asyncio.Queue[tuple[asyncio.Task[list[Emit]], list[Any]]] = asyncio.Queue()
        slots = asyncio.Semaphore(self.depth)
        reader = asyncio.create_task(self._read(events, queue), name=f"{self.runner.stage}-reader")
        drainer = asyncio.create_task(self._drain(inflight, slots), name=f"{self.runner.stage}-drainer")
        try:
            while True:
                await slots.acquire()
                batch = await self._next_batch(queue, reader)
                messages = [Message.from_faust(e) for e in batch]
                task = asyncio.create_task(self.runner.process_batch(self.spec, messages, self.handler))
                await inflight.put((task, batch))
                self.batches += 1
                self.batched_events += len(batch)
        finally:
            for t in (reader, drainer):
                t.cancel()
            await asyncio.gather(reader, drainer, return_exceptions=True)

    async def _read(self, events: AsyncIterator[Any], queue: asyncio.Queue[Any]) -> None:
        async for event in events:
            await queue.put(event)

    async def _next_batch(self, queue: asyncio.Queue[Any], reader: asyncio.Task[None]) -> list[Any]:
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            reader.result()  # re-raise the reader's failure
            raise RuntimeError("input stream ended")
        batch = [getter.result()]
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
        inflight: asyncio.Queue[tuple[asyncio.Task[list[Emit]], list[Any]]],
        slots: asyncio.Semaphore,
    ) -> None:
        while True:
            task, batch = await inflight.get()
            outputs = await task  # process_batch never raises
            delay = 0.1
            while True:
                try:
                    await self.runner.publish(outputs)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - Kafka hiccup: keep order, retry
                    log.warning(
                        "%s: publishing failed (%s); retrying in %.1fs", self.runner.stage, exc, delay
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _PUBLISH_RETRY_MAX_S)
            for event in batch:
                event.ack()
            slots.release()


class ConcurrentPipeline:
    """Independent requests, processed concurrently (up to `concurrency`), each published
    and acked as soon as it is done.

    For the query path: one slow answer must not hold back a quick one. Out-of-order acks
    are safe; Faust commits only up to the lowest offset not yet acked.
    """

    def __init__(
        self,
        runner: StageRunner,
        spec: TopicSpec,
        handler: Callable[[Sequence[Event]], Awaitable[Sequence[Emit]]],
        *,
        concurrency: int,
    ) -> None:
        self.runner = runner
        self.spec = spec
        self.handler = handler
        self.concurrency = max(concurrency, 1)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, events: AsyncIterator[Any]) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        try:
            async for event in events:
                await slots.acquire()
                task = asyncio.create_task(self._one(event, slots))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _one(self, event: Any, slots: asyncio.Semaphore) -> None:
        try:
            outputs = await self.runner.process_batch(self.spec, [Message.from_faust(event)], self.handler)
            delay = 0.1
            while True:
                try:
                    await self.runner.publish(outputs)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - Kafka hiccup: retry, never drop
                    log.warning(
                        "%s: publishing failed (%s); retrying in %.1fs", self.runner.stage, exc, delay
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _PUBLISH_RETRY_MAX_S)
            event.ack()
        finally:
            slots.release()

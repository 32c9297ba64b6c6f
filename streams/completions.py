"""Which requests already have their final response: the query path's exactly-once gate.

The query path is at-least-once underneath (Faust/aiokafka commit offsets after the outputs
are on the broker, and this broker cannot run Kafka transactions from aiokafka). A worker
killed after publishing a final response but before committing its input gets that input
again when it restarts. Without a gate, it would generate the answer a second time (paying
for it) and publish a second final response.

`CompletedRequests` tails the `responses` topic itself, the one source of truth for "this
request is answered": its records are keyed by `request_id`, so reading keys is enough (no
JSON decoding). At start it reads back `serving.completed_window_s` and blocks processing
until it has caught up with the topic's end (`caught_up()`), so every answer published
before a crash is known before any input is looked at. While running it also learns:
- from its own deliveries (`mark_done`), at once;
- from other workers' answers, through the tail.

Stages `claim()` a request before working on it; a claim fails when the request is done or
already being worked on in this process (a duplicate arriving while the original is still
in flight), and the duplicate is acked without output. The contract a consumer of
`responses` sees is the README's: exactly one final response per request, as long as a
redelivery happens within the window (a restart takes seconds; the window defaults to an
hour).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ragstream.infra.kafka import aiokafka_kwargs
from ragstream.infra.settings import Settings
from ragstream.schemas.errors import DependencyUnavailable
from ragstream.schemas.events import Event
from ragstream.schemas.judge import OVERALL, JudgementRecorded
from ragstream.schemas.queries import ResponseCompleted
from ragstream.streams.topics import JUDGEMENTS, RESPONSES, TopicSpec

__all__ = ["CompletedRequests"]

log = logging.getLogger(__name__)


def _is_final_response(event: Event) -> bool:
    return isinstance(event, ResponseCompleted)


def _is_overall_judgement(event: Event) -> bool:
    return isinstance(event, JudgementRecorded) and event.judge == OVERALL


def _overall_record(value: bytes | None) -> bool:
    # The judge stage publishes a request's `overall` judgement after all its others: only
    # that one says the request is judged. A substring test, not a decode: values are ours.
    return value is not None and b'"judge":"overall"' in value


_DONE_BY: dict[
    str, tuple[Callable[[Event], bool], Callable[[bytes | None], bool] | None, tuple[type[Event], ...]]
] = {
    RESPONSES.name: (_is_final_response, None, (ResponseCompleted,)),
    JUDGEMENTS.name: (_is_overall_judgement, _overall_record, (JudgementRecorded,)),
}


class CompletedRequests:
    """The gate for one topic of finished requests: `responses` for the query path (every
    record is a final response), `judgements` for the judge stage (a request is judged once
    its `overall` judgement is on the topic)."""

    def __init__(self, settings: Settings, topic: TopicSpec = RESPONSES) -> None:
        if topic.name not in _DONE_BY:
            raise ValueError(f"no completion rule for topic {topic.name}")
        self.topic = topic
        self.marks_done, self._record_done, self.once_types = _DONE_BY[topic.name]
        """`marks_done(event)`: whether delivering `event` finishes its request;
        `once_types`: outputs dropped once their request is done (published once)."""
        self._settings = settings
        self._window_s = settings.serving.completed_window_s
        self._done: OrderedDict[str, float] = OrderedDict()
        self._claims: set[tuple[str, str]] = set()
        self._consumer: Any = None
        self._tail: asyncio.Task[None] | None = None
        self._positions: dict[Any, int] = {}
        self.learned = 0
        """Answers learned from the topic (not from this process's own deliveries)."""
        self.behind: str | None = None
        """Why the start could not catch up with the topic (None when it did)."""

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Assign every partition of `responses`, seek back `completed_window_s`, start
        tailing, and return once caught up with the end of the topic.

        Raises:
            DependencyUnavailable: the broker did not answer.
        """
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.errors import KafkaError

        topic = self.topic.full_name(self._settings.kafka.topic_prefix)
        kafka = self._settings.kafka
        self._consumer = AIOKafkaConsumer(
            **aiokafka_kwargs(kafka),
            enable_auto_commit=False,
            group_id=None,
            fetch_max_wait_ms=max(kafka.fetch_max_wait_ms, 20),
            max_partition_fetch_bytes=kafka.max_message_bytes,
            fetch_max_bytes=kafka.max_message_bytes,
        )
        try:
            await self._consumer.start()
            parts = await self._partitions(topic)
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            self._consumer.assign(tps)
            since_ms = int((time.time() - self._window_s) * 1000)
            found = await self._consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
            for tp in tps:
                at = found.get(tp)
                if at is None:
                    await self._consumer.seek_to_end(tp)
                else:
                    self._consumer.seek(tp, at.offset)
        except KafkaError as exc:
            await self.close()
            raise DependencyUnavailable(f"cannot read {topic}: {exc}") from exc
        self._tail = asyncio.create_task(self._run(), name=f"completed-{self.topic.name}")
        try:
            await self.caught_up()
        except DependencyUnavailable as exc:
            # Availability first: answering with the answers known so far beats a worker that
            # restarts forever. Seen only right after the embedded broker lost its data (so
            # there is nothing to know); the heartbeat and status say so.
            self.behind = str(exc)
            log.error("serving without being caught up with the responses topic: %s", exc)
        log.info(
            "completed requests: %d known from the last %.0fs of %s", len(self._done), self._window_s, topic
        )

    async def _partitions(self, topic: str) -> set[int]:
        for _ in range(100):
            parts = self._consumer.partitions_for_topic(topic)
            if parts:
                return set(parts)
            await self._consumer.topics()  # refreshes the cluster metadata
            await asyncio.sleep(0.1)
        raise DependencyUnavailable(f"topic {topic} has no partitions")

    async def close(self) -> None:
        if self._tail is not None:
            self._tail.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._tail
            self._tail = None
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._consumer = None

    async def caught_up(self, timeout_s: float = 30.0) -> None:
        """Wait until every answer on the topic when this was called is known.

        Raises:
            DependencyUnavailable: not caught up within `timeout_s` (or the tail failed).
        """
        consumer = self._consumer
        if consumer is None:
            return
        ends = await consumer.end_offsets(list(consumer.assignment()))
        deadline = time.monotonic() + timeout_s
        while any(self._positions.get(tp, -1) < end and end > 0 for tp, end in ends.items()):
            if self._tail is not None and self._tail.done():
                self._tail.result()
                raise DependencyUnavailable("the responses tail stopped")
            if time.monotonic() > deadline:
                raise DependencyUnavailable(
                    f"could not read the responses topic to its end in {timeout_s:.0f}s"
                )
            # positions advance as the tail fetches; an empty partition has position == end
            for tp in ends:
                with contextlib.suppress(Exception):
                    self._positions[tp] = max(self._positions.get(tp, -1), await consumer.position(tp))
            await asyncio.sleep(0.02)

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=500, max_records=10_000)
            now = time.time()
            for tp, records in batches.items():
                for r in records:
                    if r.key and (self._record_done is None or self._record_done(r.value)):
                        self._remember(r.key.decode("utf-8", "replace"), now)
                        self.learned += 1
                    self._positions[tp] = r.offset + 1

    # -- the gate -------------------------------------------------------------------------
    def is_done(self, request_id: str) -> bool:
        return request_id in self._done

    def claim(self, stage: str, request_id: str) -> bool:
        """True if `stage` may work on the request now: not answered, not in flight here."""
        key = (stage, request_id)
        if request_id in self._done or key in self._claims:
            return False
        self._claims.add(key)
        return True

    def release(self, stage: str, request_id: str) -> None:
        self._claims.discard((stage, request_id))

    def mark_done(self, request_id: str) -> None:
        self._remember(request_id, time.time())

    def _remember(self, request_id: str, now: float) -> None:
        self._done[request_id] = now
        self._done.move_to_end(request_id)
        horizon = now - self._window_s
        while self._done:
            oldest_id, at = next(iter(self._done.items()))
            if at >= horizon:
                break
            del self._done[oldest_id]

    def __len__(self) -> int:
        return len(self._done)

"""Where the audit sink reads: its input partitions, positioned from the tables' offsets.

The sink has no consumer group. It assigns the partitions its tables read and seeks each to
what the tables' snapshots say they still need (`ragstream.streams.audit.start_offsets`).
From there this module notices a log that no longer holds those offsets, says when the sink
has caught up with the responses, and holds responses back while they run ahead of their
queries. End offsets reported by the embedded broker are wrong after multi-record batches;
they only decide when the sink counts as caught up and when responses wait, never which rows
are written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ragstream.infra.audit.commits import TP
from ragstream.infra.kafka import KafkaConnection
from ragstream.infra.settings import AuditSettings, KafkaSettings
from ragstream.schemas.errors import DependencyUnavailable, StartupError
from ragstream.streams.topics import QUERIES, RESPONSES

__all__ = ["PartitionReader"]

log = logging.getLogger(__name__)

_PROBE_TIMEOUT_S = 5.0
_ALIGN_SLACK_MS = 2000


class PartitionReader:
    """The sink's consumer and where it stands in each partition.

    `await connect()`, `await partitions(...)`, `await seek(...)`; then the sink polls
    `consumer` itself and reports every batch with `consumed`. `on_reset` is told of a
    partition that is read again from its beginning (the tables forget their offsets in it).
    """

    def __init__(self, kafka: KafkaSettings, audit: AuditSettings, on_reset: Callable[[TP], None]) -> None:
        self._kafka = kafka
        self._fetch_max_wait_ms = audit.fetch_max_wait_ms
        self._on_reset = on_reset
        self.consumer: Any = None
        """The aiokafka consumer, once `connect()` made it."""
        self._queries_topic = QUERIES.full_name(kafka.topic_prefix)
        self._responses_topic = RESPONSES.full_name(kafka.topic_prefix)
        self._read_pos: dict[TP, int] = {}
        """Next offset to read in each partition."""
        self._last_ts: dict[TP, int] = {}
        """Timestamp (ms) of the last record read in each partition."""
        self._probes: dict[TP, int] = {}
        """Partitions resumed one record early, until that record comes back."""
        self._probe_deadline = 0.0
        self._queries_tps: list[TP] = []
        self._responses_tps: list[TP] = []
        self._paused = False

    # -- positioning -----------------------------------------------------------------------
    async def connect(self) -> None:
        """Make the consumer and reach the broker.

        Raises:
            DependencyUnavailable: the broker cannot be reached.
        """
        from aiokafka import AIOKafkaConsumer

        kafka = self._kafka
        self.consumer = AIOKafkaConsumer(
            **KafkaConnection.from_settings(kafka).aiokafka_kwargs(),
            group_id=None,
            enable_auto_commit=False,
            # "none": an offset the log no longer has raises, so the tables' floors can be
            # reset with it (`out_of_range`) instead of silently skipping the new records.
            auto_offset_reset="none",
            # Freshness is bounded by the flush interval (seconds), not by the fetch wait, so
            # the sink need not poll the broker every 10 ms like the query path.
            fetch_max_wait_ms=max(self._fetch_max_wait_ms, 1),
            max_partition_fetch_bytes=kafka.max_message_bytes,
            fetch_max_bytes=max(kafka.max_message_bytes, 52_428_800),
            client_id="ragstream-audit-sink",
        )
        try:
            await self.consumer.start()
        except Exception as exc:  # aiokafka raises KafkaConnectionError and others
            raise DependencyUnavailable(f"cannot reach Kafka at {kafka.servers}: {exc}") from exc

    async def partitions(self, topics: Iterable[str], timeout_s: float) -> dict[str, list[int]]:
        """The partitions of each topic, once every topic exists.

        Raises:
            StartupError: a topic did not appear within `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            await self.consumer.topics()  # refreshes the metadata
            found = {t: sorted(self.consumer.partitions_for_topic(t) or ()) for t in topics}
            missing = [t for t, ps in found.items() if not ps]
            if not missing:
                return found
            if time.monotonic() > deadline:
                raise StartupError(
                    f"audit sink: topics {missing} do not exist (run `ragstream topics create`)"
                )
            log.info("audit sink: waiting for topics %s", missing)
            await asyncio.sleep(1.0)

    async def seek(self, starts: Mapping[TP, int | None]) -> None:
        """Assign the partitions and seek each to its start (None: the log's beginning)."""
        from aiokafka import TopicPartition

        tps = [TopicPartition(t, p) for (t, p) in sorted(starts)]
        self.consumer.assign(tps)
        from_start = [tp for tp in tps if starts[(tp.topic, tp.partition)] is None]
        if from_start:
            await self.consumer.seek_to_beginning(*from_start)
        for tp in tps:
            offset = starts[(tp.topic, tp.partition)]
            if offset:
                # Re-read the last record already consumed: if the log no longer has it,
                # the topic was re-created (see `check_probes`). Tables skip it anyway.
                self.consumer.seek(tp, offset - 1)
                self._probes[(tp.topic, tp.partition)] = offset - 1
                self._read_pos[(tp.topic, tp.partition)] = offset - 1
            elif offset is not None:
                self.consumer.seek(tp, offset)
                self._read_pos[(tp.topic, tp.partition)] = offset
        self._probe_deadline = time.monotonic() + _PROBE_TIMEOUT_S
        self._responses_tps = [tp for tp in starts if tp[0] == self._responses_topic]
        self._queries_tps = [tp for tp in starts if tp[0] == self._queries_topic]
        log.info("audit sink: assigned %d partitions; resuming at %s", len(tps), starts)

    def consumed(self, batch: Mapping[Any, Sequence[Any]]) -> None:
        """Where a fetched batch leaves each partition (once per batch, not per record)."""
        for tp, records in batch.items():
            key = (tp.topic, tp.partition)
            self._probes.pop(key, None)  # the log still has it
            if records:
                last = records[-1]
                self._read_pos[key] = last.offset + 1
                self._last_ts[key] = last.timestamp

    async def out_of_range(self, offsets: Mapping[Any, int]) -> None:
        """Partitions whose offset the log no longer holds: read each from its beginning."""
        for tp, offset in offsets.items():
            log.warning(
                "audit sink: offset %d of %s[%d] is not in the log (topic re-created, or records "
                "expired before the sink read them); reading the partition from its beginning",
                offset,
                tp.topic,
                tp.partition,
            )
            self._on_reset((tp.topic, tp.partition))
            self._read_pos[(tp.topic, tp.partition)] = 0
            await self.consumer.seek_to_beginning(tp)

    async def check_probes(self) -> None:
        """Partitions that never returned the last record the tables consumed: the log lost
        it. Real Kafka says so (OffsetOutOfRange, `auto_offset_reset="none"`); the embedded
        broker, whose in-memory topics are re-created empty when it restarts, just returns
        nothing past its end. Either way the new log is read from its beginning."""
        if not self._probes or time.monotonic() <= self._probe_deadline:
            return
        from aiokafka import TopicPartition

        lost = {TopicPartition(t, p): offset + 1 for (t, p), offset in self._probes.items()}
        self._probes.clear()
        await self.out_of_range(lost)

    # -- pace ------------------------------------------------------------------------------
    def caught_up(self) -> bool:
        """Every responses partition read to its end (and no partition still on probation)."""
        return not self._probes and all(self._at_end(tp) for tp in self._responses_tps)

    def align(self) -> None:
        """Keep responses from running ahead of queries while catching up on a backlog.

        A response read before its query still makes a row, but one without the query's
        submission time and deadline; pausing the responses partitions while they are more
        than `_ALIGN_SLACK_MS` (by record timestamp) ahead of an unfinished queries partition
        keeps the join whole. Fails open: a queries partition at its end never holds back.
        """
        from aiokafka import TopicPartition

        behind = [tp for tp in self._queries_tps if not self._at_end(tp)]
        queries_ms = min((self._last_ts.get(tp, -1) for tp in behind), default=None)
        responses_ms = max((self._last_ts.get(tp, -1) for tp in self._responses_tps), default=-1)
        pause = queries_ms is not None and responses_ms > queries_ms + _ALIGN_SLACK_MS
        if pause != self._paused:
            tps = [TopicPartition(*tp) for tp in self._responses_tps]
            if pause:
                self.consumer.pause(*tps)
            else:
                self.consumer.resume(*tps)
            self._paused = pause

    def _at_end(self, tp: TP) -> bool:
        from aiokafka import TopicPartition

        hw = self.consumer.highwater(TopicPartition(*tp))
        # The embedded broker may under-report by one producer batch; good enough here.
        return hw is not None and self._read_pos.get(tp, 0) >= hw

    async def close(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()

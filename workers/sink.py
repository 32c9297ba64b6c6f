"""The audit sink: responses, queries, indexed documents and dead letters -> Iceberg, exactly once.

Run it as its own process: `python -m ragstream.workers.sink [--tables inference_log,usage]`.

Why a plain aiokafka consumer and not a Faust agent: exactly-once into Iceberg needs the sink
to own its offsets. They live in each table's snapshot summary, committed atomically with
the rows (see `ragstream.streams.audit` and `ragstream.infra.audit.commits`), and on start
every partition is resumed from what the tables say. Faust commits offsets to the consumer
group on its own schedule, rebalances partitions between workers, and would need
transactions for anything stronger (aiokafka's transactional producer does not work against
the embedded broker). So the sink uses manual `assign()` of the partitions its tables read
(no group, no rebalance), never commits to Kafka, and is the one committer of its tables.

Scaling out is by table: `--tables` (and `audit.sinks` for `ragstream up`) gives each sink
process its own tables, so each stays their only committer while the processes share the
CPU work (decoding dominates it). A second sink started on a table already written by
another fails at its first commit (`StartupError`), before writing anything.

One process, one commit thread: every catalog call (appends, maintenance) runs on a single
worker thread, so commits to a table never race each other or maintenance, while the event
loop keeps consuming into the next micro-batch. End offsets reported by the embedded broker
are wrong after multi-record batches; they only decide when the sink counts as caught up
(which lets the join start expiring queries, and stops holding responses back so they do not
run ahead of their queries while a backlog is read), never which rows are written.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ragstream.infra.audit.commits import TP, Batch, commit_batch, load_written_ids, read_committed
from ragstream.infra.audit.maintenance import maintain_table
from ragstream.infra.audit.tables import (
    INFERENCE_LOG,
    TABLES,
    USAGE,
    AuditSettings,
    audit_settings,
    ensure_tables,
    parse_tables,
    sink_name,
)
from ragstream.infra.iceberg import open_catalog
from ragstream.infra.kafka import aiokafka_kwargs
from ragstream.infra.logs import configure_logging
from ragstream.infra.settings import Settings, load_settings
from ragstream.schemas.errors import DependencyUnavailable, SchemaViolation, StartupError
from ragstream.schemas.events import Event
from ragstream.streams.audit import AuditWriter, start_offsets
from ragstream.streams.codec import decode
from ragstream.streams.topics import ALL_TOPICS, QUERIES, RESPONSES, TopicSpec
from ragstream.workers.stages import heartbeat_path

__all__ = ["AuditSink", "heartbeat_path", "main", "run_sink"]

# Named explicitly: under `python -m` this module's __name__ is "__main__".
log = logging.getLogger("ragstream.workers.sink")

_HEARTBEAT_S = 0.5
_POLL_MS = 100
_PROBE_TIMEOUT_S = 5.0
_ALIGN_SLACK_MS = 2000


class AuditSink:
    """Consumes the audit inputs and commits micro-batches; see the module docstring.

    Use `await start()`, then `await run()` until `stop()` is called, then `await close()`.
    """

    def __init__(
        self, settings: Settings, audit: AuditSettings | None = None, tables: Sequence[str] | None = None
    ) -> None:
        self.settings = settings
        self.audit = audit or audit_settings(settings)
        self.tables = parse_tables(tables) if tables is not None else tuple(TABLES)
        """The tables this sink commits to (it must be their only committer)."""
        self.name = sink_name(self.tables)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-commit")
        self._tables: dict[str, Any] = {}
        self._consumer: Any = None
        self._writer: AuditWriter | None = None
        prefix = settings.kafka.topic_prefix
        self._specs: dict[str, TopicSpec] = {spec.full_name(prefix): spec for spec in ALL_TOPICS}
        self._queries_topic = QUERIES.full_name(prefix)
        self._responses_tps: list[TP] = []
        self._read_pos: dict[TP, int] = {}
        self._inflight: dict[str, asyncio.Future[Batch]] = {}
        self._stopping = asyncio.Event()
        self._ready = False
        self._last_maintenance_mono = self._last_expire_mono = time.monotonic()
        self._maintenance: asyncio.Future[Any] | None = None
        self._failed = False
        self._probes: dict[TP, int] = {}
        self._probe_deadline = 0.0
        self._last_ts: dict[TP, int] = {}
        self._queries_tps: list[TP] = []
        self._paused = False

    # -- lifecycle -----------------------------------------------------------------------
    async def _io(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def start(self) -> None:
        """Open the tables, restore each one's offsets and join memory, assign and seek.

        Raises:
            DependencyUnavailable: the catalog or the broker cannot be reached.
            StartupError: the input topics did not appear in time.
        """
        from aiokafka import AIOKafkaConsumer, TopicPartition

        # The commit thread imports pyarrow's Iceberg IO on first use (~1 s): do it now, not
        # on the first commit.
        await self._io(importlib.import_module, "pyiceberg.io.pyarrow")
        catalog = await self._io(open_catalog, self.settings)
        self._tables = await self._io(ensure_tables, self.settings, catalog, self.tables)
        committed = {name: await self._io(read_committed, t) for name, t in self._tables.items()}
        written: dict[str, dict[str, datetime]] = {}
        for name, column in ((INFERENCE_LOG, "submitted_at"), (USAGE, "event_time")):
            if name not in committed:
                continue
            since = committed[name].join_since
            if since is not None:
                written[name] = await self._io(
                    load_written_ids, self._tables[name], "request_id", column, since
                )
        self._writer = AuditWriter(
            self.audit,
            topic_prefix=self.settings.kafka.topic_prefix,
            committed=committed,
            written_ids=written,
            tables=self.tables,
            schemas={name: t.schema().as_arrow() for name, t in self._tables.items()},
        )
        log.info(
            "audit %s (%s): resuming with %s remembered request ids",
            self.name,
            ", ".join(self.tables),
            {k: len(v) for k, v in written.items()},
        )
        kafka = self.settings.kafka
        self._consumer = AIOKafkaConsumer(
            **aiokafka_kwargs(kafka),
            group_id=None,
            enable_auto_commit=False,
            # "none": an offset the log no longer has raises, so the tables' floors can be
            # reset with it (`_out_of_range`) instead of silently skipping the new records.
            auto_offset_reset="none",
            # Freshness is bounded by the flush interval (seconds), not by the fetch wait, so
            # the sink need not poll the broker every 10 ms like the query path.
            fetch_max_wait_ms=max(self.audit.fetch_max_wait_ms, 1),
            max_partition_fetch_bytes=kafka.max_message_bytes,
            fetch_max_bytes=max(kafka.max_message_bytes, 52_428_800),
            client_id="ragstream-audit-sink",
        )
        try:
            await self._consumer.start()
        except Exception as exc:  # aiokafka raises KafkaConnectionError and others
            raise DependencyUnavailable(f"cannot reach Kafka at {kafka.servers}: {exc}") from exc
        partitions = await self._partitions()
        starts = start_offsets(committed, self._writer.table_inputs(), partitions)
        tps = [TopicPartition(t, p) for (t, p) in sorted(starts)]
        self._consumer.assign(tps)
        from_start = [tp for tp in tps if starts[(tp.topic, tp.partition)] is None]
        if from_start:
            await self._consumer.seek_to_beginning(*from_start)
        for tp in tps:
            offset = starts[(tp.topic, tp.partition)]
            if offset:
                # Re-read the last record already consumed: if the log no longer has it,
                # the topic was re-created (see `_check_probes`). Tables skip it anyway.
                self._consumer.seek(tp, offset - 1)
                self._probes[(tp.topic, tp.partition)] = offset - 1
                self._read_pos[(tp.topic, tp.partition)] = offset - 1
            elif offset is not None:
                self._consumer.seek(tp, offset)
                self._read_pos[(tp.topic, tp.partition)] = offset
        self._probe_deadline = time.monotonic() + _PROBE_TIMEOUT_S
        self._responses_tps = [tp for tp in starts if tp[0] == RESPONSES.full_name(kafka.topic_prefix)]
        self._queries_tps = [tp for tp in starts if tp[0] == QUERIES.full_name(kafka.topic_prefix)]
        log.info("audit sink: assigned %d partitions; resuming at %s", len(tps), starts)
        self._ready = True

    async def _partitions(self) -> dict[str, list[int]]:
        deadline = time.monotonic() + self.settings.ready_timeout_s
        while True:
            await self._consumer.topics()  # refreshes the metadata
            assert self._writer is not None
            found = {t: sorted(self._consumer.partitions_for_topic(t) or ()) for t in self._writer.topics}
            missing = [t for t, ps in found.items() if not ps]
            if not missing:
                return found
            if time.monotonic() > deadline:
                raise StartupError(
                    f"audit sink: topics {missing} do not exist (run `ragstream topics create`)"
                )
            log.info("audit sink: waiting for topics %s", missing)
            await asyncio.sleep(1.0)

    def stop(self) -> None:
        self._stopping.set()

    async def close(self, *, flush: bool = True) -> None:
        """Commit what is buffered (unless `flush=False`, after a failure), then release the
        consumer and the commit thread."""
        try:
            # After a failed commit the writer's positions are past rows that never landed:
            # committing anything more would skip them. Stop; a restart re-reads them.
            if flush and not self._failed and self._writer is not None and self._tables:
                await self._drain_inflight()
                for name in self._writer.due(float("inf")):
                    self._launch(name)
                await self._drain_inflight()
        finally:
            if self._consumer is not None:
                await self._consumer.stop()
            self._executor.shutdown(wait=True)

    # -- the loop ------------------------------------------------------------------------
    async def run(self) -> None:
        """Consume and commit until `stop()`.

        Raises:
            StartupError: a second sink commits to the same tables.
            CommitFailedException: a commit kept conflicting (the process should restart).
        """
        assert self._writer is not None, "start() first"
        writer = self._writer
        hb = heartbeat_path(self.settings, self.name)
        last_hb = 0.0
        from aiokafka.errors import OffsetOutOfRangeError

        while not self._stopping.is_set():
            try:
                batch = await self._consumer.getmany(
                    timeout_ms=_POLL_MS, max_records=self.audit.max_poll_records
                )
            except OffsetOutOfRangeError as exc:
                await self._out_of_range(exc.args[0] if exc.args else {})
                continue
            now = datetime.now(UTC)
            # Queries first: a response fetched together with its query finds it pending.
            for tp in sorted(batch, key=lambda tp: tp.topic != self._queries_topic):
                self._probes.pop((tp.topic, tp.partition), None)  # the log still has it
                spec = self._specs[tp.topic]
                for record in batch[tp]:
                    event: Event | None
                    try:
                        event = decode(spec, record.value)
                    except SchemaViolation as exc:
                        writer.counters.undecodable += 1
                        log.warning(
                            "skipping undecodable record %s[%d]@%d: %s",
                            tp.topic,
                            tp.partition,
                            record.offset,
                            exc,
                        )
                        event = None
                    writer.process(tp.topic, tp.partition, record.offset, event, now)
                    self._read_pos[(tp.topic, tp.partition)] = record.offset + 1
                    self._last_ts[(tp.topic, tp.partition)] = record.timestamp
            self._align()
            if self._probes and time.monotonic() > self._probe_deadline:
                await self._check_probes()
            if not writer.live and self._caught_up():
                writer.live = True
                log.info("audit sink: caught up; the join now expires unanswered queries")
            writer.expire(now)
            self._collect()
            for name in writer.due():
                self._launch(name)
            self._maybe_maintain()
            mono = time.monotonic()
            if mono - last_hb >= _HEARTBEAT_S:
                self._heartbeat(hb)
                last_hb = mono

    async def _out_of_range(self, offsets: dict[Any, int]) -> None:
        assert self._writer is not None
        for tp, offset in offsets.items():
            log.warning(
                "audit sink: offset %d of %s[%d] is not in the log (topic re-created, or records "
                "expired before the sink read them); reading the partition from its beginning",
                offset,
                tp.topic,
                tp.partition,
            )
            self._writer.reset_partition((tp.topic, tp.partition))
            self._read_pos[(tp.topic, tp.partition)] = 0
            await self._consumer.seek_to_beginning(tp)

    async def _check_probes(self) -> None:
        """Partitions that never returned the last record the tables consumed: the log lost
        it. Real Kafka says so (OffsetOutOfRange, `auto_offset_reset="none"`); the embedded
        broker, whose in-memory topics are re-created empty when it restarts, just returns
        nothing past its end. Either way the new log is read from its beginning."""
        from aiokafka import TopicPartition

        lost = {TopicPartition(t, p): offset + 1 for (t, p), offset in self._probes.items()}
        self._probes.clear()
        await self._out_of_range(lost)

    def _at_end(self, tp: TP) -> bool:
        from aiokafka import TopicPartition

        hw = self._consumer.highwater(TopicPartition(*tp))
        # The embedded broker may under-report by one producer batch; good enough here.
        return hw is not None and self._read_pos.get(tp, 0) >= hw

    def _caught_up(self) -> bool:
        return not self._probes and all(self._at_end(tp) for tp in self._responses_tps)

    def _align(self) -> None:
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
                self._consumer.pause(*tps)
            else:
                self._consumer.resume(*tps)
            self._paused = pause

    def _launch(self, name: str) -> None:
        assert self._writer is not None
        batch = self._writer.take(name, datetime.now(UTC))
        fut = asyncio.ensure_future(self._io(self._commit, batch))
        self._inflight[name] = fut

    def _commit(self, batch: Batch) -> Batch:
        commit_batch(self._tables[batch.table], batch)
        return batch

    def _collect(self) -> None:
        assert self._writer is not None
        for name, fut in list(self._inflight.items()):
            if fut.done():
                del self._inflight[name]
                if fut.exception() is not None:
                    self._failed = True
                batch = fut.result()  # raises the commit's error: the process must restart
                self._writer.committed(batch)

    async def _drain_inflight(self) -> None:
        if self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)
            self._collect()

    def _maybe_maintain(self) -> None:
        """Expire snapshots often (cheap, keeps commits fast); compact and clean up rarely."""
        if self._maintenance is not None:
            if not self._maintenance.done():
                return
            self._maintenance.result()  # a failure stops the sink; a restart recovers
            self._maintenance = None
        now = time.monotonic()
        full_every, expire_every = self.audit.maintenance_interval_s, self.audit.expire_interval_s
        if full_every > 0 and now - self._last_maintenance_mono >= full_every:
            self._last_maintenance_mono = self._last_expire_mono = now
            self._maintenance = asyncio.ensure_future(self._io(self._maintain_all, True))
        elif expire_every > 0 and now - self._last_expire_mono >= expire_every:
            self._last_expire_mono = now
            self._maintenance = asyncio.ensure_future(self._io(self._maintain_all, False))

    def _maintain_all(self, full: bool) -> None:
        # On the commit thread: never concurrent with this sink's appends.
        for table in self._tables.values():
            report = maintain_table(table, self.audit, compact=full, remove_orphans=full)
            if full or report.snapshots_expired:
                log.log(logging.INFO if full else logging.DEBUG, "audit maintenance: %s", asdict(report))

    def _heartbeat(self, path: Path) -> None:
        assert self._writer is not None
        c = self._writer.counters
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "stage": self.name,
                    "tables": list(self.tables),
                    "pid": os.getpid(),
                    "ts": time.time(),
                    "ready": self._ready,
                    "live": self._writer.live,
                    "processed": c.records,
                    "dead_lettered": 0,
                    "rows": c.rows,
                    "commits": c.commits,
                    "pending_queries": self._writer.pending_count,
                    "late_responses": c.late_responses,
                    "duplicate_responses": c.duplicate_responses,
                    "no_response": c.no_response,
                    "undecodable": c.undecodable,
                    "buffered": self._writer.buffered(),
                }
            )
        )
        tmp.replace(path)


async def run_sink(
    settings: Settings, audit: AuditSettings | None = None, tables: Sequence[str] | None = None
) -> None:
    """Run the sink until SIGTERM/SIGINT, then commit what is buffered and return.

    Raises:
        DependencyUnavailable: the catalog or the broker cannot be reached.
        StartupError: topics missing, or a second sink writes the same tables.
    """
    sink = AuditSink(settings, audit, tables)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sink.stop)
    try:
        await sink.start()
        await sink.run()
    except BaseException:
        await sink.close(flush=False)
        raise
    await sink.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ragstream.workers.sink", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--tables",
        help="comma-separated tables this process commits to (default: all); "
        "run one sink per group of `audit.sinks`, never two for one table",
    )
    args = parser.parse_args(argv)
    settings = load_settings()
    configure_logging(settings)
    # The sink allocates many short-lived objects per record (decode, rows, Arrow); the
    # default gen-0 threshold (700) made the collector ~20% of its CPU (measured). Freeze
    # what was imported and collect far less often.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    asyncio.run(run_sink(settings, tables=parse_tables(args.tables) if args.tables else None))


if __name__ == "__main__":
    main()

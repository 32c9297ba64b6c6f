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
another stops at its first commit (`FencedError`), before writing anything.

The sink reads top to bottom here; its collaborators each do one job:
- `sink_reader.PartitionReader`: the consumer, positioned from the tables' offsets; notices a
  log that lost them, says when the sink has caught up, keeps responses behind queries.
- `ragstream.streams.audit.AuditWriter`: records -> rows, the join, per-table micro-batches.
- `sink_commits.Commits` on the one `CommitThread`: every catalog call (appends,
  maintenance) runs on that single thread, so commits to a table never race each other or
  maintenance, while the event loop keeps consuming into the next micro-batch.
- `sink_maintenance.MaintenanceSchedule`: snapshot expiry and compaction, on that thread.
- `sink_heartbeat.SinkHeartbeat`: liveness and counters for the supervisor.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import logging
import signal
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ragstream.infra import telemetry
from ragstream.infra.audit.commits import load_written_ids, read_committed
from ragstream.infra.audit.creation import ensure_tables
from ragstream.infra.audit.tables import (
    GUARDRAIL_VERDICTS,
    INFERENCE_LOG,
    JUDGEMENTS,
    TABLES,
    USAGE,
    parse_tables,
    sink_name,
)
from ragstream.infra.guard.scrub import PiiScrubber
from ragstream.infra.iceberg import open_catalog
from ragstream.infra.logs import configure_logging
from ragstream.infra.settings import AuditSettings, Settings, load_settings
from ragstream.schemas.errors import SchemaViolation
from ragstream.schemas.events import Event
from ragstream.streams.audit import AuditWriter, start_offsets
from ragstream.streams.codec import decode
from ragstream.streams.topics import ALL_TOPICS, QUERIES
from ragstream.workers.sink_commits import Commits, CommitThread
from ragstream.workers.sink_heartbeat import SinkHeartbeat
from ragstream.workers.sink_maintenance import MaintenanceSchedule
from ragstream.workers.sink_reader import PartitionReader
from ragstream.workers.stages import heartbeat_path

__all__ = ["AuditSink", "heartbeat_path", "main", "run_sink"]

# Named explicitly: under `python -m` this module's __name__ is "__main__".
log = logging.getLogger("ragstream.workers.sink")

_POLL_MS = 100


class AuditSink:
    """Consumes the audit inputs and commits micro-batches; see the module docstring.

    Use `await start()`, then `await run()` until `stop()` is called, then `await close()`.
    """

    def __init__(
        self, settings: Settings, audit: AuditSettings | None = None, tables: Sequence[str] | None = None
    ) -> None:
        self.settings = settings
        self.audit = audit or settings.audit
        self.tables = parse_tables(tables) if tables is not None else tuple(TABLES)
        """The tables this sink commits to (it must be their only committer)."""
        self.name = sink_name(self.tables)
        self._thread = CommitThread()
        self._maintenance = MaintenanceSchedule(self._thread, self.audit)
        self._heartbeat = SinkHeartbeat(heartbeat_path(settings, self.name), self.name, self.tables)
        self._stopping = asyncio.Event()
        # Opened by start():
        self._tables: dict[str, Any] = {}
        self._writer: AuditWriter | None = None
        self._commits: Commits | None = None
        self._reader: PartitionReader | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Open the tables, restore each one's offsets and join memory, assign and seek.

        Raises:
            DependencyUnavailable: the catalog or the broker cannot be reached.
            StartupError: the input topics did not appear in time.
        """
        call = self._thread.call
        # The commit thread imports pyarrow's Iceberg IO on first use (~1 s): do it now, not
        # on the first commit.
        await call(importlib.import_module, "pyiceberg.io.pyarrow")
        catalog = await call(open_catalog, self.settings)
        self._tables = await call(ensure_tables, self.settings, catalog, self.tables)
        committed = {name: await call(read_committed, t) for name, t in self._tables.items()}
        written: dict[str, dict[str, datetime]] = {}
        for name, id_column, column in (
            (INFERENCE_LOG, "request_id", "submitted_at"),
            (USAGE, "request_id", "event_time"),
            (GUARDRAIL_VERDICTS, "request_id", "event_time"),
            (JUDGEMENTS, "event_id", "judged_at"),
        ):
            if name not in committed:
                continue
            since = committed[name].join_since
            if since is not None:
                written[name] = await call(load_written_ids, self._tables[name], id_column, column, since)
        scrubber = None
        if self.settings.guardrails.enabled:
            scrubber = PiiScrubber(self.settings.guardrails)
            await call(scrubber.start)
        writer = self._writer = AuditWriter(
            self.audit,
            topic_prefix=self.settings.kafka.topic_prefix,
            committed=committed,
            written_ids=written,
            tables=self.tables,
            schemas={name: t.schema().as_arrow() for name, t in self._tables.items()},
            scrubber=scrubber,
        )
        log.info(
            "audit %s (%s): resuming with %s remembered request ids",
            self.name,
            ", ".join(self.tables),
            {k: len(v) for k, v in written.items()},
        )
        self._commits = Commits(self._thread, self._tables, writer)
        reader = self._reader = PartitionReader(self.settings.kafka, self.audit, writer.reset_partition)
        await reader.connect()
        partitions = await reader.partitions(writer.topics, self.settings.ready_timeout_s)
        await reader.seek(start_offsets(committed, writer.table_inputs(), partitions))

    def stop(self) -> None:
        self._stopping.set()

    async def close(self, *, flush: bool = True) -> None:
        """Commit what is buffered (unless `flush=False`, after a failure), then release the
        consumer and the commit thread."""
        try:
            if flush and self._commits is not None:
                await self._commits.flush()
        finally:
            if self._reader is not None:
                await self._reader.close()
            self._thread.close()

    # -- the loop ------------------------------------------------------------------------
    async def run(self) -> None:
        """Consume and commit until `stop()`.

        Raises:
            FencedError: a second sink commits to the same tables.
            CommitFailedException: a commit kept conflicting (the process should restart).
        """
        assert self._writer is not None and self._commits is not None and self._reader is not None, (
            "start() first"
        )
        writer, commits, reader = self._writer, self._commits, self._reader
        consumer = reader.consumer
        prefix = self.settings.kafka.topic_prefix
        specs = {spec.full_name(prefix): spec for spec in ALL_TOPICS}
        queries_topic = QUERIES.full_name(prefix)
        from aiokafka.errors import OffsetOutOfRangeError

        while not self._stopping.is_set():
            try:
                batch = await consumer.getmany(timeout_ms=_POLL_MS, max_records=self.audit.max_poll_records)
            except OffsetOutOfRangeError as exc:
                await reader.out_of_range(exc.args[0] if exc.args else {})
                continue
            now = datetime.now(UTC)
            # Queries first: a response fetched together with its query finds it pending.
            for tp in sorted(batch, key=lambda tp: tp.topic != queries_topic):
                spec = specs[tp.topic]
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
            reader.consumed(batch)
            reader.align()
            await reader.check_probes()
            if not writer.live and reader.caught_up():
                writer.live = True
                log.info("audit sink: caught up; the join now expires unanswered queries")
            writer.expire(now)
            commits.collect()
            commits.launch_due()
            self._maintenance.tick(self._tables)
            self._heartbeat.beat(writer)


async def run_sink(
    settings: Settings, audit: AuditSettings | None = None, tables: Sequence[str] | None = None
) -> None:
    """Run the sink until SIGTERM/SIGINT, then commit what is buffered and return.

    Raises:
        DependencyUnavailable: the catalog or the broker cannot be reached.
        StartupError: topics missing.
        FencedError: a second sink writes the same tables.
    """
    sink = AuditSink(settings, audit, tables)
    telemetry.start_metrics_server(settings)
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

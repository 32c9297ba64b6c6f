"""The audit sink's stream processing: micro-batching, the query/response join, offsets.

This module holds no Kafka client and does no I/O: `AuditWriter` is fed decoded records with
their coordinates and hands out `Batch`es (rows plus the snapshot properties to commit them
with); `ragstream.infra.audit.commits.commit_batch` appends one to its table. The sink
(`ragstream.workers.sink`) drives both.

Exactly-once, per table
-----------------------
Every commit is one `table.append(rows, snapshot_properties=...)`, atomic in Iceberg, whose
summary stores `ragstream.offsets`: for each input topic-partition, the next offset the table
still needs. A row built from record R is in the same commit as an offset past R, or in a
later one. On start the sink resumes every partition at the minimum over the tables that read
it and each table ignores records below its own stored offset, so after a kill at any point
(mid-batch, mid-commit) a table re-reads exactly what its last commit does not cover: no row
is lost and none is written twice. Rows buffered but not committed die with their offsets.
There is no cross-table transaction and none is needed: tables only share inputs, never
decisions (`usage` is built from responses alone, independent of the join below).

The join (inference_log only)
-----------------------------
A request's row needs its `QuerySubmitted` (submission time; requests that never get a
response) and its `ResponseCompleted` (everything else). Queries wait in `pending`; a
response for a pending query makes the joined row; a pending query whose response has not
come by `deadline + join_grace_s` becomes a `no_response` row; a response whose query was
never seen makes a row on its own. Every written request id goes into `written`, so a second
response (duplicate or late, after `no_response`) and a query read after its response are
dropped (and counted) instead of making a second row.

Crash safety of the join: `inference_log` stores for a queries partition not its read
position but the offset of its oldest pending query, so a restart re-reads every query that
might still need a row. Re-read queries whose row was already committed must be recognised:
the commit also stores `ragstream.join_since` = min(produced_at of each partition's oldest
pending query, now) - `join_memory_s`, and on start the sink loads into `written` the request ids of every row
with `submitted_at >= join_since`. That covers every re-read query, assuming queries in one
partition are stamped within `join_memory_s` (default 1 h) of their offset order, which
holds when producers publish what they stamp. Responses are not rewound: a response's row is
written when it is read, so its stored offset is its read position.

Expiry uses the wall clock, but only once the sink has caught up with the responses topic
since it started, so a restart that re-reads old queries does not declare them unanswered
before it has re-read their responses. A response read later than `join_memory_s` after its
request's `no_response` row (or a query read that long after its response's row) is no longer
recognised and would make a second row; `join_memory_s` bounds that window.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ragstream.infra.audit.buffer import RowBuffer
from ragstream.infra.audit.commits import (
    JOIN_SINCE_KEY,
    OFFSETS_KEY,
    TP,
    Batch,
    Committed,
    decode_offsets,
    encode_offsets,
)
from ragstream.infra.audit.rows import (
    Source,
    dead_letter_row,
    guardrail_rows,
    inference_row,
    ingestion_dead_letter_row,
    ingestion_row,
    is_document_dead_letter,
    judgement_row,
    no_response_row,
    usage_row,
)
from ragstream.infra.audit.tables import (
    DEAD_LETTERS,
    GUARDRAIL_VERDICTS,
    INFERENCE_LOG,
    INGESTION_LOG,
    JUDGEMENTS,
    TABLES,
    USAGE,
    arrow_schema,
)
from ragstream.infra.guard.scrub import PiiScrubber
from ragstream.infra.settings import AuditSettings
from ragstream.schemas.events import DeadLettered, DocumentIndexed, Event
from ragstream.schemas.judge import JudgementRecorded
from ragstream.schemas.queries import QuerySubmitted, ResponseCompleted
from ragstream.streams.topics import ALL_TOPICS, QUERIES

__all__ = ["AuditWriter", "Counters", "start_offsets", "table_topics"]

log = logging.getLogger(__name__)

_SPECS = {spec.name: spec for spec in ALL_TOPICS}


def table_topics(topic_prefix: str) -> dict[str, frozenset[str]]:
    """Each audit table's input topics, by full name."""
    return {
        name: frozenset(_SPECS[topic].full_name(topic_prefix) for topic in tdef.inputs)
        for name, tdef in TABLES.items()
    }


def start_offsets(
    committed: Mapping[str, Committed],
    table_inputs: Mapping[str, Iterable[str]],
    partitions: Mapping[str, Iterable[int]],
) -> dict[TP, int | None]:
    """Where to resume each input partition: the minimum over the tables that read it.

    None means some table has never consumed it: start from the beginning of the log.
    """
    wanted: dict[TP, list[int | None]] = {}
    for table, topics in table_inputs.items():
        offsets = committed.get(table, Committed()).offsets
        for topic in topics:
            for p in partitions.get(topic, ()):
                wanted.setdefault((topic, p), []).append(offsets.get((topic, p)))
    return {
        tp: None if None in offs else min(o for o in offs if o is not None) for tp, offs in wanted.items()
    }


# -- the writer ------------------------------------------------------------------------------
@dataclass(slots=True)
class _Pending:
    query: QuerySubmitted
    source: Source


@dataclass(slots=True)
class _TableState:
    name: str
    topics: frozenset[str]
    floors: dict[TP, int]
    """The committed offsets: records below are already covered by the table."""
    positions: dict[TP, int]
    """Next offset after the last record this table has taken into account."""
    rows: RowBuffer
    first_row_mono: float | None = None
    last_commit_mono: float = field(default_factory=time.monotonic)
    committed_props: dict[str, str] = field(default_factory=dict)
    committed_offsets: dict[TP, int] | None = None
    """What the table's current snapshot says (None: no snapshot yet)."""
    inflight: bool = False
    oldest_at: float | None = None
    """When (epoch s) the event behind the oldest buffered row was produced."""
    taken_oldest_at: float | None = None
    """The same for the batch being committed."""
    commit_lag_s: float = 0.0
    """Age of the oldest row of the last commit when it landed (`ragstream_audit_lag_seconds`)."""


@dataclass(slots=True)
class Counters:
    records: int = 0
    rows: int = 0
    late_responses: int = 0
    duplicate_responses: int = 0
    duplicate_queries: int = 0
    duplicate_judgements: int = 0
    no_response: int = 0
    undecodable: int = 0
    commits: int = 0


class _RecentIds:
    """Request ids already written, with their rows' event time, forgotten past a horizon."""

    def __init__(self, ids: Mapping[str, datetime]) -> None:
        self._at: dict[str, datetime] = {}
        self._order: deque[tuple[datetime, str]] = deque()
        for rid, at in sorted(ids.items(), key=lambda kv: kv[1]):
            self.add(rid, at)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._at

    def add(self, request_id: str, at: datetime) -> None:
        self._at[request_id] = at
        self._order.append((at, request_id))

    def evict(self, horizon: datetime) -> None:
        # Entries are roughly in time order; stopping at the first young one only delays.
        while self._order and self._order[0][0] < horizon:
            at, rid = self._order.popleft()
            if self._at.get(rid) == at:
                del self._at[rid]

    def __len__(self) -> int:
        return len(self._at)


class AuditWriter:
    """Turns consumed records into per-table batches; knows what each table has covered.

    Single-threaded: the sink calls `process`, `expire`, `due`, `take` and `committed` from
    one task. `take` snapshots the offsets at the moment the rows are taken, so consuming may
    go on while that batch commits.

    `tables` limits it to some of the tables (default: all); `schemas` gives the tables'
    pyarrow schemas as the catalog has them (default: as this code defines them).
    """

    def __init__(
        self,
        audit: AuditSettings,
        *,
        topic_prefix: str,
        committed: Mapping[str, Committed],
        written_ids: Mapping[str, Mapping[str, datetime]] | None = None,
        tables: Iterable[str] | None = None,
        schemas: Mapping[str, Any] | None = None,
        scrubber: PiiScrubber | None = None,
    ) -> None:
        self.audit = audit
        self._scrubber = scrubber
        self.counters = Counters()
        self._queries = QUERIES.full_name(topic_prefix)
        inputs = table_topics(topic_prefix)
        schemas = schemas or {}
        self.tables: dict[str, _TableState] = {}
        for name in tables if tables is not None else TABLES:
            c = committed.get(name, Committed())
            self.tables[name] = _TableState(
                name=name,
                topics=inputs[name],
                rows=RowBuffer(schemas.get(name) or arrow_schema(name), audit.arrow_chunk_rows),
                floors=dict(c.offsets),
                positions=dict(c.offsets),
                committed_offsets=dict(c.offsets) if c.snapshot_id is not None else None,
            )
        self.topics = frozenset().union(*(t.topics for t in self.tables.values()))
        """Every topic some table of this writer reads."""
        written_ids = written_ids or {}
        self._written = {
            INFERENCE_LOG: _RecentIds(written_ids.get(INFERENCE_LOG, {})),
            USAGE: _RecentIds(written_ids.get(USAGE, {})),
            GUARDRAIL_VERDICTS: _RecentIds(written_ids.get(GUARDRAIL_VERDICTS, {})),
            JUDGEMENTS: _RecentIds(written_ids.get(JUDGEMENTS, {})),
        }
        self._pending: dict[str, _Pending] = {}
        self._pending_by_tp: dict[TP, deque[tuple[int, str]]] = {}
        self._expiry: list[tuple[datetime, str]] = []
        self._readers: dict[str, tuple[_TableState, ...]] = {
            topic: tuple(t for t in self.tables.values() if topic in t.topics) for topic in self.topics
        }
        self.live = False
        """Set by the sink once it has caught up with the responses topic since starting."""
        self._event_at = 0.0
        """When the event being processed was produced (epoch s): the age of its rows."""

    # -- input ---------------------------------------------------------------------------
    def table_inputs(self) -> dict[str, frozenset[str]]:
        return {name: t.topics for name, t in self.tables.items()}

    def process(self, topic: str, partition: int, offset: int, event: Event | None, now: datetime) -> None:
        """Take one record into account (event=None: it could not be decoded; skip it)."""
        self.counters.records += 1
        tp = (topic, partition)
        src = Source(topic, partition, offset)
        if event is not None:
            self._event_at = event.produced_at.timestamp()
        for t in self._readers.get(topic, ()):
            if offset < t.floors.get(tp, -1):
                continue
            if event is not None:
                self._route(t.name, event, src, now)
            t.positions[tp] = offset + 1

    def _route(self, table: str, event: Event, src: Source, now: datetime) -> None:
        if table == INFERENCE_LOG:
            if isinstance(event, QuerySubmitted):
                self._on_query(event, src, now)
            elif isinstance(event, ResponseCompleted):
                self._on_response(event, src, now)
        elif table == USAGE and isinstance(event, ResponseCompleted):
            if event.request_id in self._written[USAGE]:
                self.counters.duplicate_responses += 1
                return
            self._written[USAGE].add(event.request_id, event.produced_at)
            self._add(USAGE, usage_row(event, prices=self.audit.prices, source=src, logged_at=now))
        elif table == INGESTION_LOG:
            if isinstance(event, DocumentIndexed):
                self._add(table, ingestion_row(event, source=src, logged_at=now))
            elif isinstance(event, DeadLettered) and is_document_dead_letter(event):
                self._add(table, ingestion_dead_letter_row(event, source=src, logged_at=now))
        elif table == GUARDRAIL_VERDICTS and isinstance(event, ResponseCompleted):
            if event.request_id in self._written[GUARDRAIL_VERDICTS]:
                return
            self._written[GUARDRAIL_VERDICTS].add(event.request_id, event.produced_at)
            for row in guardrail_rows(event, source=src, logged_at=now):
                self._add(GUARDRAIL_VERDICTS, row)
        elif table == DEAD_LETTERS and isinstance(event, DeadLettered):
            self._add(table, dead_letter_row(event, source=src, logged_at=now))
        elif table == JUDGEMENTS and isinstance(event, JudgementRecorded):
            # A judgement published twice (a judge worker killed mid-request) has the same
            # event id: one row.
            if event.event_id in self._written[JUDGEMENTS]:
                self.counters.duplicate_judgements += 1
                return
            self._written[JUDGEMENTS].add(event.event_id, event.produced_at)
            self._add(JUDGEMENTS, judgement_row(event, source=src, logged_at=now))

    def _on_query(self, query: QuerySubmitted, src: Source, now: datetime) -> None:
        rid = query.request_id
        if rid in self._pending or rid in self._written[INFERENCE_LOG]:
            self.counters.duplicate_queries += 1
            return
        self._pending[rid] = _Pending(query, src)
        self._pending_by_tp.setdefault((src.topic, src.partition), deque()).append((src.offset, rid))
        expire_at = query.deadline_at() + timedelta(seconds=self.audit.join_grace_s)
        heapq.heappush(self._expiry, (expire_at, rid))

    def _on_response(self, response: ResponseCompleted, src: Source, now: datetime) -> None:
        rid = response.request_id
        pending = self._pending.pop(rid, None)
        if pending is None and rid in self._written[INFERENCE_LOG]:
            self.counters.late_responses += 1
            log.warning(
                "response %s arrived after its request was logged (no_response or duplicate); "
                "dropped from inference_log",
                rid,
            )
            return
        row = inference_row(
            response,
            pending.query if pending else None,
            source=src,
            query_source=pending.source if pending else None,
            logged_at=now,
        )
        self._written[INFERENCE_LOG].add(rid, row["submitted_at"])
        self._add(INFERENCE_LOG, row)

    def _scrub(self, table: str, row: dict[str, Any]) -> None:
        """Mask PII in the row's free text, as the policy that applied masks it (see
        `ragstream.infra.guard.scrub`): the one place every audit row passes."""
        scrub = self._scrubber
        assert scrub is not None
        if table == INFERENCE_LOG:
            guard = row.get("guardrail")
            if guard is not None:
                entities = scrub.entities(guard.get("checker"))
            else:
                entities = scrub.for_tenant(row.get("tenant"), row.get("route"))
            if not entities:
                return
            row["question"] = scrub.mask(row.get("question") or "", entities)
            row["answer"] = scrub.mask(row.get("answer") or "", entities)
            if row.get("error_reason"):
                row["error_reason"] = scrub.mask(row["error_reason"], entities)
            row["prompt_messages"] = [
                {**m, "content": scrub.mask(m.get("content") or "", entities)}
                for m in row.get("prompt_messages") or ()
            ]
            row["passages"] = [
                {**p, "text": scrub.mask(p.get("text") or "", entities)} for p in row.get("passages") or ()
            ]
        elif table in (DEAD_LETTERS, INGESTION_LOG):
            entities = scrub.for_tenant(row.get("tenant"))
            if not entities:
                return
            for column in ("message", "error"):
                if row.get(column):
                    row[column] = scrub.mask(row[column], entities)
            if row.get("original"):
                row["original"] = scrub.mask_bytes(row["original"], entities)

    def expire(self, now: datetime) -> int:
        """Write `no_response` rows for pending queries past deadline + grace (once live)."""
        if not self.live:
            return 0
        n = 0
        self._event_at = now.timestamp()  # a no_response row is due now, not when its query came
        while self._expiry and self._expiry[0][0] <= now:
            _, rid = heapq.heappop(self._expiry)
            pending = self._pending.pop(rid, None)
            if pending is None:
                continue  # answered meanwhile
            q = pending.query
            self._written[INFERENCE_LOG].add(rid, q.produced_at)
            self._add(
                INFERENCE_LOG,
                no_response_row(
                    q, grace_s=self.audit.join_grace_s, query_source=pending.source, logged_at=now
                ),
            )
            n += 1
        self.counters.no_response += n
        return n

    def _add(self, table: str, row: dict[str, Any]) -> None:
        if self._scrubber is not None:
            self._scrub(table, row)
        t = self.tables[table]
        if not t.rows:
            t.first_row_mono = time.monotonic()
        if t.oldest_at is None or self._event_at < t.oldest_at:
            t.oldest_at = self._event_at
        t.rows.append(row)
        self.counters.rows += 1

    # -- output --------------------------------------------------------------------------
    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def _oldest_pending(self, tp: TP) -> _Pending | None:
        """The pending query of the partition with the lowest offset (answered ones are
        dropped from the front as they are met: amortized O(1))."""
        q = self._pending_by_tp.get(tp)
        while q:
            offset, rid = q[0]
            p = self._pending.get(rid)
            if p is not None and p.source.offset == offset and p.source.partition == tp[1]:
                return p
            q.popleft()
        return None

    def offsets_for(self, table: str) -> dict[TP, int]:
        """What the table may store now: its positions, queries held back to the oldest
        pending query."""
        t = self.tables[table]
        out = dict(t.positions)
        if table == INFERENCE_LOG:
            for tp in list(out):
                if tp[0] == self._queries:
                    oldest = self._oldest_pending(tp)
                    if oldest is not None:
                        out[tp] = min(out[tp], oldest.source.offset)
        return out

    def _join_since(self, table: str, now: datetime) -> datetime | None:
        if table == INFERENCE_LOG:
            # Per queries partition, the query a restart re-reads from (the oldest pending by
            # offset); every re-read query is stamped within join_memory_s of it.
            oldest = now
            for tp in self._pending_by_tp:
                p = self._oldest_pending(tp)
                if p is not None and p.query.produced_at < oldest:
                    oldest = p.query.produced_at
            return oldest - timedelta(seconds=self.audit.join_memory_s)
        if table in (USAGE, GUARDRAIL_VERDICTS, JUDGEMENTS):
            return now - timedelta(seconds=self.audit.join_memory_s)
        return None

    def due(self, now_mono: float | None = None) -> list[str]:
        """Tables to commit now: enough rows, old enough rows, or offsets idle too long."""
        now_mono = time.monotonic() if now_mono is None else now_mono
        out = []
        for t in self.tables.values():
            if t.inflight:
                continue
            if t.rows:
                assert t.first_row_mono is not None
                if (
                    len(t.rows) >= self.audit.flush_rows
                    or now_mono - t.first_row_mono >= self.audit.flush_interval_s
                ):
                    out.append(t.name)
            elif now_mono - t.last_commit_mono >= self._offsets_interval_s(t) and encode_offsets(
                self.offsets_for(t.name)
            ) != t.committed_props.get(OFFSETS_KEY, encode_offsets(t.floors)):
                out.append(t.name)
        return out

    def _offsets_interval_s(self, t: _TableState) -> float:
        """How often a table without rows stores how far it has read. A table that has never
        stored any (a new one, or one whose rows are rare, like `guardrail_verdicts`) does so
        at the flush interval: until then, a restart re-reads its topics from the start."""
        if OFFSETS_KEY not in t.committed_props:
            return self.audit.flush_interval_s
        return self.audit.offsets_commit_interval_s

    def take(self, table: str, now: datetime) -> Batch:
        """Hand out the table's buffered rows with the offsets they bring the table to."""
        t = self.tables[table]
        props = {OFFSETS_KEY: encode_offsets(self.offsets_for(table))}
        since = self._join_since(table, now)
        if since is not None:
            props[JOIN_SINCE_KEY] = since.isoformat()
        batch = Batch(table, t.rows, props, t.committed_offsets)
        t.rows = RowBuffer(t.rows.schema, t.rows.chunk_rows)
        t.first_row_mono = None
        t.taken_oldest_at, t.oldest_at = t.oldest_at, None
        t.inflight = True
        if since is not None and self.live:
            # Not while catching up: re-read queries must still find the ids loaded at start.
            self._written[table].evict(since)
        return batch

    def committed(self, batch: Batch) -> None:
        """The batch landed: its offsets are the table's new floors."""
        t = self.tables[batch.table]
        t.inflight = False
        t.last_commit_mono = time.monotonic()
        t.committed_props = batch.properties
        t.floors = decode_offsets(batch.properties[OFFSETS_KEY])
        t.committed_offsets = dict(t.floors)
        t.commit_lag_s = max(time.time() - t.taken_oldest_at, 0.0) if t.taken_oldest_at is not None else 0.0
        t.taken_oldest_at = None
        self.counters.commits += 1

    def reset_partition(self, tp: TP) -> None:
        """The partition's log no longer holds our offset (topic re-created, e.g. by a restart
        of the in-memory embedded broker, or records expired unread): every table reads it
        again from its beginning."""
        for t in self.tables.values():
            if tp[0] in t.topics:
                t.floors[tp] = 0
                t.positions[tp] = 0

    def buffered(self) -> dict[str, int]:
        return {name: len(t.rows) for name, t in self.tables.items()}

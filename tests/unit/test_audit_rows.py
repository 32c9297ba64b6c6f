"""Audit rows from events, the query/response join, and the offsets that make the sink
exactly-once (replayed here against a real SQLite-catalog Iceberg table on tmp_path)."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ragstream.infra.audit.buffer import RowBuffer, rows_to_arrow
from ragstream.infra.audit.commits import (
    OFFSETS_KEY,
    Committed,
    commit_batch,
    decode_offsets,
    encode_offsets,
    load_written_ids,
    read_committed,
)
from ragstream.infra.audit.creation import ensure_tables
from ragstream.infra.audit.rows import (
    Source,
    dead_letter_row,
    inference_row,
    ingestion_dead_letter_row,
    is_document_dead_letter,
    no_response_row,
    usage_row,
)
from ragstream.infra.audit.tables import INFERENCE_LOG, INGESTION_LOG, USAGE, arrow_schema
from ragstream.infra.settings import AuditSettings, ModelPrice, Settings
from ragstream.schemas.events import DeadLettered, DocumentIndexed, Event
from ragstream.schemas.queries import (
    Citation,
    Passage,
    PromptMessage,
    QuerySubmitted,
    ResponseCompleted,
    Usage,
)
from ragstream.streams.audit import AuditWriter, start_offsets

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
Q_TOPIC, R_TOPIC, I_TOPIC, D_TOPIC = "rs.queries", "rs.responses", "rs.documents.indexed", "rs.deadletter"


def _query(rid: str, at: datetime = T0, deadline_ms: int = 10_000) -> QuerySubmitted:
    return QuerySubmitted(
        request_id=rid,
        question=f"what is {rid}?",
        user="alice",
        tenant="acme",
        produced_at=at,
        deadline_ms=deadline_ms,
    )


def _response(rid: str, at: datetime = T0 + timedelta(seconds=2), **kw: Any) -> ResponseCompleted:
    fields: dict[str, Any] = {
        "request_id": rid,
        "status": "ok",
        "user": "alice",
        "tenant": "acme",
        "question": f"what is {rid}?",
        "answer": "It is [1].",
        "citations": (Citation(number=1, document_id="d1", chunk_id="d1#0", cited=True, score=0.9),),
        "usage": Usage(prompt_tokens=1200, completion_tokens=300),
        "model_id": "smol",
        "route": "default",
        "finish_reason": "stop",
        "prompt_template_version": "v3",
        "prompt_messages": (
            PromptMessage(role="system", content="Answer from the sources."),
            PromptMessage(role="user", content="what?"),
        ),
        "retrieved_chunk_ids": ("d1#0", "d2#3"),
        "retrieved_scores": (0.9, 0.4),
        "latency_ms": {"search": 3.5, "generation": 1500.0, "total": 2000.0, "rerank": 7.0},
        "produced_at": at,
    }
    fields.update(kw)
    return ResponseCompleted(**fields)


# -- rows ----------------------------------------------------------------------------------------
def test_joined_row_carries_the_query_time_and_the_whole_answer() -> None:
    q, r = _query("r1"), _response("r1")
    row = inference_row(r, q, source=Source(R_TOPIC, 1, 7), query_source=Source(Q_TOPIC, 2, 3), logged_at=T0)
    assert row["submitted_at"] == T0 and row["completed_at"] == r.produced_at
    assert row["deadline_at"] == T0 + timedelta(seconds=10)
    assert row["event_date"].isoformat() == "2025-03-01"
    assert row["citations"] == [c.model_dump() for c in r.citations]  # every field, as dumped
    assert row["prompt_messages"] == [m.model_dump() for m in r.prompt_messages]
    assert row["citations"][0]["chunk_id"] == "d1#0" and row["citations"][0]["cited"] is True
    assert [m["role"] for m in row["prompt_messages"]] == ["system", "user"]
    assert row["retrieved_chunk_ids"] == ["d1#0", "d2#3"] and row["retrieved_scores"] == [0.9, 0.4]
    assert row["latency_total_ms"] == 2000.0 and row["latency_search_ms"] == 3.5
    assert row["latency_prompt_ms"] is None  # not measured: null, not 0
    assert row["latency_ms"]["rerank"] == 7.0  # stages without a column live in the map
    assert row["total_tokens"] == 1500 and row["status"] == "ok"
    assert (row["query_partition"], row["query_offset"]) == (2, 3)
    assert (row["kafka_topic"], row["kafka_partition"], row["kafka_offset"]) == (R_TOPIC, 1, 7)


def test_response_without_query_dates_itself_from_its_total_latency() -> None:
    r = _response("r2", at=T0 + timedelta(seconds=5))
    row = inference_row(r, None, source=None, query_source=None, logged_at=T0)
    assert row["submitted_at"] == T0 + timedelta(seconds=3)  # 5 s - total 2000 ms
    assert row["deadline_at"] is None and row["query_offset"] is None


def test_no_response_row_keeps_the_question_and_says_why() -> None:
    q = _query("r3")
    row = no_response_row(q, grace_s=30, query_source=Source(Q_TOPIC, 0, 9), logged_at=T0)
    assert row["status"] == "no_response" and row["completed_at"] is None
    assert row["question"] == "what is r3?" and row["user"] == "alice" and row["tenant"] == "acme"
    assert "deadline" in row["error_reason"]
    assert row["prompt_tokens"] is None and row["answer"] == ""


def test_usage_cost_comes_from_configured_prices() -> None:
    prices = {"smol": ModelPrice(input_per_1k=0.5, output_per_1k=2.0)}
    row = usage_row(_response("r4"), prices=prices, source=None, logged_at=T0)
    assert row["estimated_cost"] == pytest.approx(1.2 * 0.5 + 0.3 * 2.0)
    assert row["total_tokens"] == 1500
    unpriced = usage_row(_response("r5", model_id="other"), prices=prices, source=None, logged_at=T0)
    assert unpriced["estimated_cost"] is None


def test_document_outcomes_and_dead_letters() -> None:
    dl = DeadLettered(
        stage="ingest",
        error_kind="unreadable_document",
        message="bad pdf",
        original=b"%PDF-\x00",
        document_id="doc-9",
        tenant="acme",
        original_topic="rs.documents",
        original_offset=4,
    )
    assert is_document_dead_letter(dl)
    query_dl = DeadLettered(
        stage="retrieve", error_kind="schema_violation", message="x", original=b"{}", request_id="r"
    )
    assert not is_document_dead_letter(query_dl)
    row = ingestion_dead_letter_row(dl, source=None, logged_at=T0)
    assert row["outcome"] == "dead_lettered" and row["error"] == "unreadable_document: bad pdf"
    full = dead_letter_row(dl, source=None, logged_at=T0)
    assert full["original"] == b"%PDF-\x00" and full["original_offset"] == 4


# -- offsets ------------------------------------------------------------------------------------
def test_offsets_round_trip_and_resume_from_the_slowest_table() -> None:
    offsets = {(R_TOPIC, 0): 10, (R_TOPIC, 1): 3, (Q_TOPIC, 0): 7}
    assert decode_offsets(encode_offsets(offsets)) == offsets
    committed = {
        INFERENCE_LOG: Committed({(R_TOPIC, 0): 10, (R_TOPIC, 1): 3, (Q_TOPIC, 0): 7}),
        USAGE: Committed({(R_TOPIC, 0): 4, (R_TOPIC, 1): 9}),
    }
    starts = start_offsets(
        committed,
        {INFERENCE_LOG: [Q_TOPIC, R_TOPIC], USAGE: [R_TOPIC], INGESTION_LOG: [I_TOPIC]},
        {Q_TOPIC: [0, 1], R_TOPIC: [0, 1], I_TOPIC: [0]},
    )
    assert starts == {
        (Q_TOPIC, 0): 7,
        (Q_TOPIC, 1): None,
        (R_TOPIC, 0): 4,
        (R_TOPIC, 1): 3,
        (I_TOPIC, 0): None,
    }


def _writer(committed: dict[str, Committed] | None = None, **kw: Any) -> AuditWriter:
    audit = AuditSettings(join_grace_s=5, **kw)
    return AuditWriter(audit, topic_prefix="rs", committed=committed or {})


def test_a_table_ignores_records_below_its_own_offset() -> None:
    w = _writer({USAGE: Committed({(R_TOPIC, 0): 2})})
    for off in range(4):
        w.process(R_TOPIC, 0, off, _response(f"r{off}"), T0)
    assert [r["request_id"] for r in w.tables[USAGE].rows] == ["r2", "r3"]
    assert len(w.tables[INFERENCE_LOG].rows) == 4  # no offset stored: reads everything
    assert w.offsets_for(USAGE) == {(R_TOPIC, 0): 4}


def test_inference_log_holds_queries_offset_at_the_oldest_pending_query() -> None:
    w = _writer()
    for off, rid in enumerate(["a", "b", "c"]):
        w.process(Q_TOPIC, 0, off, _query(rid), T0)
    w.process(R_TOPIC, 0, 0, _response("b"), T0)
    assert w.offsets_for(INFERENCE_LOG) == {(Q_TOPIC, 0): 0, (R_TOPIC, 0): 1}
    w.process(R_TOPIC, 0, 1, _response("a"), T0)
    assert w.offsets_for(INFERENCE_LOG)[(Q_TOPIC, 0)] == 2  # "c" still waits
    w.process(R_TOPIC, 0, 2, _response("c"), T0)
    assert w.offsets_for(INFERENCE_LOG)[(Q_TOPIC, 0)] == 3
    assert sorted(r["request_id"] for r in w.tables[INFERENCE_LOG].rows) == ["a", "b", "c"]


def test_unanswered_query_becomes_no_response_once_live_and_a_late_answer_is_dropped() -> None:
    w = _writer()
    w.process(Q_TOPIC, 0, 0, _query("slow", deadline_ms=1000), T0)
    after = T0 + timedelta(seconds=7)  # deadline 1 s + grace 5 s
    assert w.expire(after) == 0  # not caught up yet: its response may be unread
    w.live = True
    assert w.expire(after) == 1
    w.process(R_TOPIC, 0, 0, _response("slow"), after)
    rows = w.tables[INFERENCE_LOG].rows
    assert [(r["request_id"], r["status"]) for r in rows] == [("slow", "no_response")]
    assert w.counters.late_responses == 1
    assert [r["request_id"] for r in w.tables[USAGE].rows] == ["slow"]  # its tokens were spent
    assert w.offsets_for(INFERENCE_LOG)[(Q_TOPIC, 0)] == 1


def test_duplicate_responses_make_one_row_per_table() -> None:
    w = _writer()
    w.process(Q_TOPIC, 0, 0, _query("d"), T0)
    w.process(R_TOPIC, 0, 0, _response("d"), T0)
    w.process(R_TOPIC, 1, 0, _response("d"), T0)
    w.process(Q_TOPIC, 0, 1, _query("d"), T0)
    assert len(w.tables[INFERENCE_LOG].rows) == 1 and len(w.tables[USAGE].rows) == 1


def test_flush_at_n_rows_or_t_seconds() -> None:
    w = _writer(flush_rows=3, flush_interval_s=2.0)
    w.process(R_TOPIC, 0, 0, _response("x0"), T0)
    first = w.tables[USAGE].first_row_mono
    assert first is not None
    assert w.due(first + 0.1) == []
    # guardrail_verdicts has no rows, but has never stored its offsets: it does at the flush
    # interval, so a restart does not re-read `responses` from the start for its sake.
    assert set(w.due(first + 2.0)) == {INFERENCE_LOG, USAGE, "guardrail_verdicts"}
    for i in range(1, 3):
        w.process(R_TOPIC, 0, i, _response(f"x{i}"), T0)
    assert set(w.due(first)) == {INFERENCE_LOG, USAGE}
    batch = w.take(USAGE, T0)
    assert len(batch.rows) == 3 and decode_offsets(batch.properties[OFFSETS_KEY]) == {(R_TOPIC, 0): 3}
    assert USAGE not in w.due(first + 100)  # in flight until committed


# -- crash and replay against a real Iceberg table ---------------------------------------------
def _stream(n: int, seed: int) -> list[tuple[str, int, int, Event]]:
    """Queries and responses interleaved as a broker would hold them (2 partitions each);
    every 7th request never gets a response, every 11th answers twice."""
    rng = random.Random(seed)
    logs: dict[tuple[str, int], list[Event]] = {(t, p): [] for t in (Q_TOPIC, R_TOPIC) for p in (0, 1)}
    out = []
    for i in range(n):
        rid = f"req-{i:05d}"
        at = T0 + timedelta(milliseconds=10 * i)
        p = rng.randrange(2)
        events: list[tuple[str, Event]] = [(Q_TOPIC, _query(rid, at=at, deadline_ms=1000))]
        if i % 7 != 3:
            events.append((R_TOPIC, _response(rid, at=at + timedelta(milliseconds=300))))
        if i % 7 != 3 and i % 11 == 5:
            events.append((R_TOPIC, _response(rid, at=at + timedelta(milliseconds=400))))
        for topic, ev in events:
            logs[(topic, p)].append(ev)
            out.append((topic, p, len(logs[(topic, p)]) - 1, ev))
    return out


def _open(tmp_path: Path) -> dict[str, Any]:
    return ensure_tables(Settings(data_dir=tmp_path))


def _restart(tables: dict[str, Any]) -> AuditWriter:
    committed = {name: read_committed(t) for name, t in tables.items()}
    written = {}
    for name, col in ((INFERENCE_LOG, "submitted_at"), (USAGE, "event_time")):
        since = committed[name].join_since
        if since is not None:
            written[name] = load_written_ids(tables[name], "request_id", col, since)
    return AuditWriter(
        AuditSettings(join_grace_s=1.0, join_memory_s=600),
        topic_prefix="rs",
        committed=committed,
        written_ids=written,
    )


def test_kill_at_random_points_then_replay_writes_each_request_exactly_once(tmp_path: Path) -> None:
    stream = _stream(300, seed=1)
    tables = _open(tmp_path)
    rng = random.Random(2)
    done = False
    crashes = 0
    while not done:
        w = _restart(tables)
        w.live = True
        starts = start_offsets(
            {n: read_committed(t) for n, t in tables.items()},
            w.table_inputs(),
            {Q_TOPIC: [0, 1], R_TOPIC: [0, 1]},
        )
        replay = [r for r in stream if r[2] >= (starts.get((r[0], r[1])) or 0)]
        crash_after = rng.randrange(len(replay) + 40) if crashes < 6 else None
        for i, (topic, p, off, ev) in enumerate(replay):
            if crash_after is not None and i == crash_after:
                break  # kill -9: buffered rows and uncommitted offsets are gone
            w.process(topic, p, off, ev, ev.produced_at)
            w.expire(ev.produced_at)  # the stream's own clock: answers come 300-400 ms after
            if rng.random() < 0.05:
                for name in (INFERENCE_LOG, USAGE):
                    commit_batch(tables[name], b := w.take(name, ev.produced_at))
                    w.committed(b)
        else:
            w.expire(T0 + timedelta(days=1))
            for name in (INFERENCE_LOG, USAGE):
                commit_batch(tables[name], b := w.take(name, T0 + timedelta(days=1)))
                w.committed(b)
            done = True
        crashes += 1
    log_rows = tables[INFERENCE_LOG].scan().to_arrow().to_pylist()
    per_id = Counter(r["request_id"] for r in log_rows)
    assert len(per_id) == 300 and set(per_id.values()) == {1}
    no_resp = {r["request_id"] for r in log_rows if r["status"] == "no_response"}
    assert no_resp == {f"req-{i:05d}" for i in range(300) if i % 7 == 3}
    usage = Counter(r["request_id"] for r in tables[USAGE].scan().to_arrow().to_pylist())
    assert set(usage.values()) == {1} and len(usage) == len([i for i in range(300) if i % 7 != 3])


def test_new_nullable_column_keeps_old_snapshots_readable(tmp_path: Path) -> None:
    from pyiceberg.schema import Schema
    from pyiceberg.types import NestedField, StringType

    from ragstream.infra.audit.creation import ensure_schema

    tables = _open(tmp_path)
    table = tables[USAGE]
    row = usage_row(_response("old"), prices={}, source=None, logged_at=T0)
    table.append(rows_to_arrow([row], table.schema().as_arrow()))
    old_snapshot = table.current_snapshot().snapshot_id
    wider = Schema(*table.schema().fields, NestedField(999, "region", StringType(), required=False))
    ensure_schema(table, wider)
    table.append(rows_to_arrow([{**row, "request_id": "new", "region": "eu"}], table.schema().as_arrow()))
    assert table.scan(snapshot_id=old_snapshot).to_arrow().column("request_id").to_pylist() == ["old"]
    now = {r["request_id"]: r["region"] for r in table.scan().to_arrow().to_pylist()}
    assert now == {"old": None, "new": "eu"}
    # A fresh ensure_tables keeps the added column (union, never drop).
    assert "region" in {f.name for f in _open(tmp_path)[USAGE].schema().fields}


def test_ingestion_rows_land(tmp_path: Path) -> None:
    tables = _open(tmp_path)
    w = _writer()
    ev = DocumentIndexed(source_event_id="s1", document_id="doc", version=2, outcome="indexed", chunk_count=4)
    w.process(I_TOPIC, 0, 0, ev, T0)
    commit_batch(tables[INGESTION_LOG], b := w.take(INGESTION_LOG, T0))
    rows = tables[INGESTION_LOG].scan().to_arrow().to_pylist()
    assert [(r["document_id"], r["outcome"], r["chunk_count"], r["version"]) for r in rows] == [
        ("doc", "indexed", 4, 2)
    ]
    assert read_committed(tables[INGESTION_LOG]).offsets == {(I_TOPIC, 0): 1}
    assert b.rows


def test_a_second_writer_on_a_table_is_fenced_before_writing(tmp_path: Path) -> None:
    from ragstream.schemas.errors import FencedError

    table = _open(tmp_path)[USAGE]
    first, second = _writer(), _writer()  # both started on the empty table
    first.process(R_TOPIC, 0, 0, _response("a"), T0)
    commit_batch(table, b := first.take(USAGE, T0))
    first.committed(b)
    second.process(R_TOPIC, 0, 0, _response("b"), T0)
    with pytest.raises(FencedError, match="second audit sink"):
        commit_batch(table, second.take(USAGE, T0))
    assert table.scan().to_arrow().column("request_id").to_pylist() == ["a"]
    # The table's owner goes on committing.
    first.process(R_TOPIC, 0, 1, _response("c"), T0)
    commit_batch(table, first.take(USAGE, T0))
    assert sorted(table.scan().to_arrow().column("request_id").to_pylist()) == ["a", "c"]


def test_maintenance_compacts_closed_days_keeps_offsets_and_cleans_up(tmp_path: Path) -> None:
    from ragstream.infra.audit.maintenance import maintain_table

    tables = _open(tmp_path)
    table = tables[USAGE]
    w = _writer()
    for i in range(10):  # ten commits -> ten small files in the 2025-03-01 partition
        w.process(R_TOPIC, 0, i, _response(f"m{i}"), T0)
        commit_batch(table, b := w.take(USAGE, T0))
        w.committed(b)
    offsets_before = read_committed(table).offsets
    stray = Path(table.location().removeprefix("file://")) / "data" / "stray.parquet"
    stray.write_bytes(b"not referenced by any snapshot")
    audit = AuditSettings(compact_min_files=8, snapshot_retention_s=3600, orphan_min_age_s=3600)

    young = maintain_table(table, audit, compact=False)  # now: nothing is old enough to go
    assert young.orphans_removed == 0 and young.snapshots_expired == 0 and stray.exists()

    report = maintain_table(table, audit, now=datetime.now(UTC) + timedelta(days=2))
    assert report.partitions_compacted == ["2025-03-01"] and report.files_compacted == 10
    assert len(table.inspect.files()) == 1
    assert report.snapshots_expired > 0 and len(table.metadata.snapshots) <= 2
    assert report.orphans_removed >= 11 and not stray.exists()  # ten small files + the stray
    # Same rows, same offsets: a restarted sink resumes exactly where it was.
    assert sorted(table.scan().to_arrow().column("request_id").to_pylist()) == sorted(
        f"m{i}" for i in range(10)
    )
    assert read_committed(table).offsets == offsets_before == {(R_TOPIC, 0): 10}
    # And the table still takes the sink's next commit.
    w.process(R_TOPIC, 0, 10, _response("m10"), T0)
    commit_batch(table, b := w.take(USAGE, T0))
    assert table.scan().to_arrow().num_rows == 11


def test_row_buffer_converts_in_chunks_and_keeps_every_row_in_order() -> None:
    import pyarrow as pa

    schema = pa.schema(
        [
            ("id", pa.string()),
            ("n", pa.int64()),
            ("tags", pa.list_(pa.struct([("k", pa.string()), ("v", pa.float64())]))),
        ]
    )
    buf = RowBuffer(schema, chunk_rows=3)
    rows = [{"id": f"r{i}", "n": i, "tags": [{"k": "a", "v": i / 2}], "ignored": 1} for i in range(7)]
    for row in rows:
        buf.append(row)
    buf.append({"id": "sparse"})  # missing keys are null
    assert len(buf) == 8
    got = list(buf)
    assert [r["id"] for r in got] == [f"r{i}" for i in range(7)] + ["sparse"]
    assert got[5] == {"id": "r5", "n": 5, "tags": [{"k": "a", "v": 2.5}]}
    table = buf.to_arrow()
    assert table.num_rows == 8 and table.column("n").to_pylist() == [*range(7), None]

    # The Iceberg table gained a column since the buffer was made: it comes back null.
    newer = schema.append(pa.field("region", pa.string()))
    moved = buf.to_arrow(newer)
    assert moved.schema.equals(newer) and moved.column("region").null_count == 8
    assert moved.column("tags").to_pylist()[6] == [{"k": "a", "v": 3.0}]


def test_row_buffer_takes_the_tables_field_ids(tmp_path: Path) -> None:
    table = ensure_tables(Settings(data_dir=tmp_path))[USAGE]
    buf = RowBuffer(arrow_schema(USAGE))
    buf.append(usage_row(_response("r1"), prices={}, source=None, logged_at=T0))
    target = table.schema().as_arrow()
    out = buf.to_arrow(target)
    assert [f.metadata for f in out.schema] == [f.metadata for f in target]
    table.append(out)
    assert table.scan().to_arrow().column("request_id").to_pylist() == ["r1"]


def test_sink_groups_give_every_table_exactly_one_committer() -> None:
    from ragstream.infra.audit.tables import TABLES, parse_tables, sink_groups, sink_name
    from ragstream.schemas.errors import ConfigError

    assert sink_groups(AuditSettings()) == [tuple(TABLES)]
    assert sink_name(tuple(TABLES)) == "sink"
    split = sink_groups(
        AuditSettings(
            sinks=("inference_log", "usage, ingestion_log,dead_letters,guardrail_verdicts,judgements")
        )
    )
    assert split == [
        ("inference_log",),
        ("usage", "ingestion_log", "dead_letters", "guardrail_verdicts", "judgements"),
    ]
    assert [sink_name(g) for g in split] == ["sink-inference_log", "sink-usage"]
    for bad in (
        ("inference_log",),
        ("inference_log,usage,ingestion_log,dead_letters,guardrail_verdicts,judgements", "usage"),
    ):
        with pytest.raises(ConfigError, match="exactly one sink"):
            sink_groups(AuditSettings(sinks=bad))
    for spec in ("usage,usage", "usage,billing", ""):
        with pytest.raises(ConfigError, match="at most once"):
            parse_tables(spec)


def test_a_writer_for_some_tables_reads_only_their_topics() -> None:
    w = AuditWriter(AuditSettings(), topic_prefix="rs", committed={}, tables=("inference_log",))
    assert set(w.tables) == {INFERENCE_LOG} and w.topics == {Q_TOPIC, R_TOPIC}
    w.process(Q_TOPIC, 0, 0, _query("a"), T0)
    w.process(R_TOPIC, 0, 0, _response("a"), T0)
    assert [r["request_id"] for r in w.tables[INFERENCE_LOG].rows] == ["a"]
    other = AuditWriter(
        AuditSettings(), topic_prefix="rs", committed={}, tables=("usage", "ingestion_log", "dead_letters")
    )
    assert other.topics == {R_TOPIC, I_TOPIC, D_TOPIC}


def _start_together(settings: Settings, groups: list[list[str]]) -> tuple[list[list[str]], list[str]]:
    import threading

    from ragstream.infra.iceberg import open_catalog

    barrier = threading.Barrier(len(groups))
    opened: list[list[str]] = []
    errors: list[str] = []

    def start(names: list[str]) -> None:
        barrier.wait()
        try:
            opened.append(sorted(ensure_tables(settings, open_catalog(settings), names)))
        except Exception as exc:  # noqa: BLE001  # reported by the test
            errors.append(repr(exc))

    threads = [threading.Thread(target=start, args=(g,)) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return opened, errors


def test_sinks_starting_together_on_a_new_catalog_all_start(tmp_path: Path) -> None:
    """Sinks opening a brand-new SQLite catalog at the same instant race to create its
    bookkeeping tables and the namespace; every one must still start. (Without the retries
    in `open_catalog`/`ensure_tables`, 9 rounds in 10 had a loser here.)"""
    groups = [["inference_log"], ["usage"], ["ingestion_log"], ["dead_letters"], ["usage"], ["inference_log"]]
    for round_ in range(5):
        opened, errors = _start_together(Settings(data_dir=tmp_path / str(round_)), groups)
        assert not errors, errors
        assert sorted(opened) == sorted(groups)


def test_guardrail_verdicts_land_once_per_request_without_text_and_fill_inference_log() -> None:
    from ragstream.infra.audit.tables import GUARDRAIL_VERDICTS
    from ragstream.schemas.guard import GuardFinding, GuardVerdict

    verdicts = (
        GuardVerdict(rail="pii", direction="input", action="mask", category="EMAIL_ADDRESS", score=1.0,
                     findings=(GuardFinding(rail="pii", category="EMAIL_ADDRESS", score=1.0, start=3, end=20),)),
        GuardVerdict(rail="safety", direction="input", action="allow"),
        GuardVerdict(rail="pii", direction="output", action="flag", category="detector_unavailable",
                     error="pii detector failed (timed out); fail-open", window=2),
    )  # fmt: skip
    guarded = _response("g1", question="My <EMAIL_ADDRESS>?", guard_policy="default", guard_verdicts=verdicts)
    w = AuditWriter(AuditSettings(), topic_prefix="rs", committed={})
    w.process(R_TOPIC, 0, 0, guarded, T0)
    w.process(R_TOPIC, 1, 5, guarded, T0)  # a re-delivered copy adds nothing
    w.process(R_TOPIC, 0, 1, _response("plain"), T0)  # no policy: no rows
    rows = list(w.tables[GUARDRAIL_VERDICTS].rows)
    assert [(r["direction"], r["rail"], r["action"]) for r in rows] == [
        ("input", "pii", "mask"),
        ("output", "pii", "flag"),
    ]
    assert rows[0]["findings"] == [{"category": "EMAIL_ADDRESS", "score": 1.0, "start": 3, "end": 20}]
    assert rows[1]["error"].endswith("fail-open") and rows[1]["output_window"] == 2
    log_row = inference_row(guarded, _query("g1"), source=None, query_source=None, logged_at=T0)
    assert log_row["question"] == "My <EMAIL_ADDRESS>?"  # the masked question, not the raw one
    assert log_row["guardrail"]["verdict"] == "mask" and log_row["guardrail"]["checker"] == "default"
    assert set(log_row["guardrail"]["categories"]) == {"EMAIL_ADDRESS", "detector_unavailable"}


def test_pii_is_masked_in_every_audit_text_column_as_the_policy_masks_it() -> None:
    from ragstream.infra.audit.tables import DEAD_LETTERS
    from ragstream.infra.guard.scrub import PiiScrubber
    from ragstream.infra.settings import GuardrailsSettings

    scrubber = PiiScrubber(GuardrailsSettings(tenant_policies={"open-co": "off"}))
    scrubber.start()
    w = AuditWriter(AuditSettings(join_grace_s=5), topic_prefix="rs", committed={}, scrubber=scrubber)
    passage = (
        "HR contact: marie.dupont@example.fr, +33 6 12 34 56 78, IBAN FR76 3000 6000 0112 3456 7890 189."
    )
    w.process(
        R_TOPIC,
        0,
        0,
        _response(
            "guarded",
            guard_policy="default",
            answer="Write to marie.dupont@example.fr [1].",
            prompt_messages=(
                PromptMessage(role="system", content="Answer from the sources."),
                PromptMessage(role="user", content=f"[1] {passage}\n\nQuestion: who is in HR?"),
            ),
            passages=(Passage(number=1, chunk_id="c1", document_id="d1", text=passage),),
        ),
        T0,
    )
    w.process(R_TOPIC, 0, 1, _response("open", tenant="open-co", answer=passage), T0)
    # A question never answered, and a dead letter with broken UTF-8 around an e-mail.
    w.process(Q_TOPIC, 0, 0, _query("lost", deadline_ms=1000).model_copy(update={"question": passage}), T0)
    w.live = True
    w.expire(T0 + timedelta(seconds=7))
    w.process(
        D_TOPIC,
        0,
        0,
        DeadLettered(
            stage="retrieve",
            error_kind="schema_violation",
            message="bad field near jean@example.com",
            original=b'{"question": "mail jean@example.com \xff\xfe"',
            request_id="x",
            tenant="acme",
        ),
        T0,
    )
    rows = {r["request_id"]: r for r in w.tables[INFERENCE_LOG].rows}
    guarded = rows["guarded"]
    stored = " ".join(
        [
            guarded["answer"],
            *(m["content"] for m in guarded["prompt_messages"]),
            *(p["text"] for p in guarded["passages"]),
        ]
    )
    for clear in ("marie.dupont@example.fr", "12 34 56 78", "FR76 3000"):
        assert clear not in stored and clear not in rows["lost"]["question"]
    assert "<EMAIL_ADDRESS>" in guarded["answer"] and "<PHONE_NUMBER>" in stored and "<IBAN_CODE>" in stored
    assert rows["open"]["answer"] == passage, "a policy without PII masking keeps the text"
    (dl,) = list(w.tables[DEAD_LETTERS].rows)
    assert dl["original"] == b'{"question": "mail <EMAIL_ADDRESS> \xff\xfe"' and "jean@" not in dl["message"]


def test_a_chunk_dropped_by_a_context_rail_does_not_read_as_a_blocked_request() -> None:
    from ragstream.schemas.guard import GuardVerdict

    dropped = GuardVerdict(
        rail="injection", direction="context", action="block", category="injection:override"
    )
    row = inference_row(
        _response("ctx", guard_policy="default", guard_verdicts=(dropped,)),
        None,
        source=None,
        query_source=None,
        logged_at=T0,
    )
    assert row["status"] == "ok" and row["guardrail"]["verdict"] == "flag"
    assert row["guardrail"]["reasons"] == ["context/injection: dropped a chunk injection:override"]

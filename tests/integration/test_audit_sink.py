"""The audit sink against a real Tansu broker and a real SQLite-catalog Iceberg warehouse.

Events are published directly with kafka-python; the sink runs as its own process. Tables are
read back with plain pyiceberg (`load_catalog`) and DuckDB, without ragstream code, as any
downstream consumer would.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ragstream.infra import kafka
from ragstream.infra.settings import KafkaSettings, Settings
from ragstream.schemas.events import DeadLettered, DocumentIndexed, Event
from ragstream.schemas.queries import Citation, PromptMessage, QuerySubmitted, ResponseCompleted, Usage
from ragstream.streams.codec import encode
from ragstream.streams.topics import ALL_TOPICS, topic_for
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.integration

PREFIX = "audittest"
PARTITIONS = 2

_SINK = (
    "import asyncio, logging, sys\n"
    "from ragstream.infra.settings import AuditSettings, load_settings\n"
    "from ragstream.workers.sink import run_sink\n"
    "logging.basicConfig(level='INFO', format='%(asctime)s %(name)s %(message)s')\n"
    "logging.getLogger('aiokafka').setLevel('WARNING')\n"
    "tables = sys.argv[2].split(',') if len(sys.argv) > 2 else None\n"
    "asyncio.run(run_sink(load_settings(), AuditSettings.model_validate_json(sys.argv[1]), tables))\n"
)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Settings]:
    """A Tansu broker on a free port with every topic created; killed at the end."""
    s = Settings(
        data_dir=tmp_path,
        kafka=KafkaSettings(embedded_port=free_port(), topic_prefix=PREFIX, partitions=PARTITIONS),
    )
    with open(tmp_path / "broker.log", "wb") as logf:
        proc = subprocess.Popen(
            kafka.broker_command(s), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        kafka.wait_broker(s, timeout_s=15)
        kafka.create_topics(s, [kafka.NewTopicSpec(t.full_name(PREFIX), PARTITIONS) for t in ALL_TOPICS])
        yield s
    finally:
        proc.kill()
        proc.wait()


class SinkProcess:
    def __init__(self, settings: Settings, audit: dict[str, Any], tables: tuple[str, ...] = ()) -> None:
        from ragstream.infra.audit.tables import sink_name

        self.settings = settings
        self.audit = json.dumps(audit)
        self.tables = tables
        self.name = sink_name(tables) if tables else "sink"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = settings.data_dir / f"{self.name}.log"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAGSTREAM_")}
        env.update(
            {
                "RAGSTREAM_DATA_DIR": str(self.settings.data_dir),
                "RAGSTREAM_KAFKA__EMBEDDED_PORT": str(self.settings.kafka.embedded_port),
                "RAGSTREAM_KAFKA__TOPIC_PREFIX": PREFIX,
                "PYTHONUNBUFFERED": "1",
            }
        )
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _SINK, self.audit, *([",".join(self.tables)] if self.tables else [])],
                env=env,
                cwd=REPO,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def wait_running(self, timeout_s: float = 30) -> None:
        """Until this process's heartbeat says its consume loop runs (startup is done)."""
        assert self.proc is not None
        hb = self.settings.run_dir / f"worker-{self.name}.json"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if json.loads(hb.read_text()).get("pid") == self.proc.pid:
                    return
            except (OSError, ValueError):
                pass
            assert self.proc.poll() is None, f"sink died:\n{self.tail()}"
            time.sleep(0.05)
        raise AssertionError(f"sink did not start:\n{self.tail()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout_s: float = 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill9()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def sink_factory(broker: Settings) -> Iterator[Callable[..., SinkProcess]]:
    made: list[SinkProcess] = []

    def make(audit: dict[str, Any], tables: tuple[str, ...] = ()) -> SinkProcess:
        s = SinkProcess(broker, audit, tables)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def publish(settings: Settings, events: list[Event]) -> None:
    producer = kafka.make_producer(settings)
    try:
        for ev in events:
            producer.send(topic_for(ev).full_name(PREFIX), key=ev.kafka_key(), value=encode(ev))
        producer.flush(timeout=30)
    finally:
        producer.close()


def plain_catalog(settings: Settings) -> Any:
    """The warehouse opened with nothing but pyiceberg, as an outside reader would.

    A SqlCatalog keys its rows by catalog name: readers must use the writer's ("ragstream").
    """
    from pyiceberg.catalog import load_catalog

    root = settings.data_dir / "iceberg"
    return load_catalog(
        "ragstream",
        type="sql",
        uri=f"sqlite:///{root / 'catalog.db'}",
        warehouse=f"file://{root / 'warehouse'}",
    )


def read(settings: Settings, table: str) -> list[dict[str, Any]]:
    from pyiceberg.exceptions import NoSuchTableError

    if not (settings.data_dir / "iceberg" / "catalog.db").exists():
        return []
    try:
        t = plain_catalog(settings).load_table(("ragstream", table))
    except NoSuchTableError:
        return []
    rows: list[dict[str, Any]] = t.scan().to_arrow().to_pylist()
    return rows


def wait_for(check: Callable[[], bool], timeout_s: float, sink: SinkProcess) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        assert sink.proc is not None and sink.proc.poll() is None, f"sink died:\n{sink.tail()}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting; sink log:\n{sink.tail()}")


def _response(rid: str, *, latency_total_ms: float = 800.0, **kw: Any) -> ResponseCompleted:
    return ResponseCompleted(
        request_id=rid,
        status="ok",
        user="alice",
        tenant="acme",
        question=f"q {rid}",
        answer=f"answer for {rid} [1]",
        citations=(Citation(number=1, document_id="doc-1", chunk_id="doc-1#0", cited=True, score=0.8),),
        usage=Usage(prompt_tokens=100, completion_tokens=20),
        model_id="smol",
        route="default",
        finish_reason="stop",
        prompt_template_version="v1",
        prompt_messages=(
            PromptMessage(role="system", content="be brief"),
            PromptMessage(role="user", content="q"),
        ),
        retrieved_chunk_ids=("doc-1#0",),
        retrieved_scores=(0.8,),
        latency_ms={"search": 2.0, "time_to_first_token": 120.0, "total": latency_total_ms},
        **kw,
    )


FAST = {
    "flush_interval_s": 0.3,
    "flush_rows": 500,
    "join_grace_s": 1.0,
    "offsets_commit_interval_s": 1.0,
    "maintenance_interval_s": 0,
    "prices": {"smol": {"input_per_1k": 1.0, "output_per_1k": 3.0}},
}


def test_rows_land_with_their_values_and_plain_readers_see_them(
    broker: Settings, sink_factory: Callable[..., SinkProcess]
) -> None:
    answered = QuerySubmitted(request_id="answered", question="What is X?", user="alice", tenant="acme")
    silent = QuerySubmitted(
        request_id="silent", question="Anyone?", user="bob", tenant="acme", deadline_ms=300
    )
    orphan = _response("orphan", latency_total_ms=1500.0)
    indexed = DocumentIndexed(
        source_event_id="sub-1",
        document_id="doc-1",
        version=3,
        fingerprint="f" * 16,
        outcome="indexed",
        chunk_count=7,
    )
    bad_doc = DeadLettered(
        stage="ingest",
        error_kind="unreadable_document",
        message="not a PDF",
        original=b"%PDF-broken\x00\xff",
        document_id="doc-2",
        source_event_id="sub-2",
        tenant="acme",
        original_topic=f"{PREFIX}.documents",
        original_partition=0,
        original_offset=12,
    )
    publish(broker, [answered, silent, _response("answered"), orphan, indexed, bad_doc])
    sink = sink_factory(FAST)
    sink.start()

    def landed() -> bool:
        log_ids = {r["request_id"] for r in read(broker, "inference_log")}
        return log_ids == {"answered", "silent", "orphan"} and len(read(broker, "ingestion_log")) == 2

    wait_for(landed, 20, sink)
    rows = {r["request_id"]: r for r in read(broker, "inference_log")}
    a = rows["answered"]
    assert a["status"] == "ok" and a["submitted_at"] == answered.produced_at
    assert a["question"] == "What is X?" and a["answer"] == "answer for answered [1]"
    assert a["citations"][0]["document_id"] == "doc-1" and a["prompt_messages"][1]["content"] == "q"
    assert a["latency_time_to_first_token_ms"] == 120.0 and a["prompt_tokens"] == 100
    assert a["query_topic"] == f"{PREFIX}.queries" and a["kafka_topic"] == f"{PREFIX}.responses"
    assert rows["silent"]["status"] == "no_response" and rows["silent"]["user"] == "bob"
    o = rows["orphan"]
    assert o["submitted_at"] == orphan.produced_at - timedelta(milliseconds=1500)
    usage = {r["request_id"]: r for r in read(broker, "usage")}
    assert set(usage) == {"answered", "orphan"}  # "silent" spent nothing
    assert usage["answered"]["estimated_cost"] == pytest.approx(0.1 * 1.0 + 0.02 * 3.0)
    ingestion = {r["document_id"]: r for r in read(broker, "ingestion_log")}
    assert ingestion["doc-1"]["outcome"] == "indexed" and ingestion["doc-1"]["chunk_count"] == 7
    assert ingestion["doc-2"]["outcome"] == "dead_lettered" and "not a PDF" in ingestion["doc-2"]["error"]
    dead = read(broker, "dead_letters")
    assert [d["original"] for d in dead] == [b"%PDF-broken\x00\xff"]

    # A response after its request was logged as no_response is dropped, not a second row.
    publish(broker, [_response("silent")])
    wait_for(lambda: "silent" in {r["request_id"] for r in read(broker, "usage")}, 30, sink)
    assert Counter(r["request_id"] for r in read(broker, "inference_log"))["silent"] == 1

    # DuckDB reads the tables through plain pyiceberg, and ragstream's SQL helper joins them.
    import duckdb

    cat = plain_catalog(broker)
    con = duckdb.connect()
    con.register("log", cat.load_table(("ragstream", "inference_log")).scan().to_arrow())
    statuses = dict(con.execute("SELECT request_id, status FROM log ORDER BY 1").fetchall())
    assert statuses == {"answered": "ok", "orphan": "ok", "silent": "no_response"}
    # polars scans the Iceberg table itself (through pyiceberg), with nested columns intact.
    import polars as pl

    os.environ["POLARS_ICEBERG_PLANNER"] = "pyiceberg"  # its other planner is another package

    frame = pl.scan_iceberg(cat.load_table(("ragstream", "inference_log"))).filter(
        pl.col("request_id") == "answered"
    )
    got = frame.select("status", "citations", "latency_ms", "event_date").collect().to_dicts()
    assert got[0]["status"] == "ok" and got[0]["citations"][0]["chunk_id"] == "doc-1#0"
    assert got[0]["event_date"] == answered.produced_at.date()
    cost = (
        pl.scan_iceberg(cat.load_table(("ragstream", "usage")))
        .group_by("tenant")
        .agg(pl.col("estimated_cost").sum())
        .collect()
    )
    n_usage = len(read(broker, "usage"))  # answered, orphan and the late silent one
    assert cost.to_dicts() == [{"tenant": "acme", "estimated_cost": pytest.approx(n_usage * (0.1 + 0.06))}]
    from ragstream.infra.audit.query import audit_sql

    joined = audit_sql(
        broker,
        "SELECT l.request_id, u.total_tokens FROM inference_log l JOIN usage u USING (request_id) ORDER BY 1",
    ).to_pylist()
    assert joined == [
        {"request_id": "answered", "total_tokens": 120},
        {"request_id": "orphan", "total_tokens": 120},
        {"request_id": "silent", "total_tokens": 120},
    ]
    assert sink.terminate() == 0, sink.tail()


def test_kill_9_at_random_moments_loses_nothing_and_duplicates_nothing(
    broker: Settings, sink_factory: Callable[..., SinkProcess]
) -> None:
    """Thousands of requests published while the sink is killed with SIGKILL again and again
    (small, frequent batches: kills land mid-batch and mid-commit), then restarted."""
    rng = random.Random(7)
    n_requests, chunk = 4000, 200
    # Maintenance runs too (expiry every second, orphan removal every 3 s), so kills also
    # land around it, and files orphaned by killed commits are cleaned up.
    audit = FAST | {
        "flush_rows": 150,
        "flush_interval_s": 0.2,
        "join_grace_s": 2.0,
        "expire_interval_s": 1.0,
        "snapshot_retention_s": 2.0,
        "maintenance_interval_s": 3.0,
        "orphan_min_age_s": 3.0,
    }
    ids = [f"req-{i:05d}" for i in range(n_requests)]

    def publisher() -> None:
        for start in range(0, n_requests, chunk):
            events: list[Event] = []
            for rid in ids[start : start + chunk]:
                events += [QuerySubmitted(request_id=rid, question="?", deadline_ms=60_000), _response(rid)]
            publish(broker, events)
            time.sleep(0.25)  # ~800 requests/s, ~5 s in all

    sink = sink_factory(audit)
    sink.start()
    pool = ThreadPoolExecutor(max_workers=1)
    pub = pool.submit(publisher)
    kills = 0
    evolved = False
    try:
        while not pub.done() or kills < 4:
            sink.wait_running()
            time.sleep(rng.uniform(0.1, 1.5))  # while it consumes, batches and commits
            sink.kill9()
            kills += 1
            table = plain_catalog(broker).load_table(("ragstream", "inference_log"))
            if not evolved and table.current_snapshot() is not None:
                # Someone evolves the schema while the sink is down: old snapshots stay
                # readable and the restarted sink writes the wider schema.
                from pyiceberg.types import StringType

                before = table.current_snapshot().snapshot_id
                old_rows = table.scan(snapshot_id=before).to_arrow().num_rows
                with table.update_schema() as update:
                    update.add_column("reviewer", StringType(), doc="Who reviewed the answer.")
                assert table.scan(snapshot_id=before).to_arrow().num_rows == old_rows
                evolved = True
            sink.start()
    finally:
        pool.shutdown(wait=True)
    pub.result()  # the publisher's error, if any
    assert evolved
    expected = set(ids)

    def complete() -> bool:
        log_ids = {r["request_id"] for r in read(broker, "inference_log")}
        return log_ids >= expected and {r["request_id"] for r in read(broker, "usage")} >= expected

    wait_for(complete, 90, sink)
    time.sleep(4)  # one more maintenance round
    assert sink.terminate() == 0, sink.tail()
    log_rows = read(broker, "inference_log")
    per_id = Counter(r["request_id"] for r in log_rows)
    assert set(per_id) == expected and max(per_id.values()) == 1, per_id.most_common(3)
    assert all(r["status"] == "ok" for r in log_rows)
    # Every row joined its query, even when a restart caught up on a backlog.
    assert all(r["query_offset"] is not None for r in log_rows)
    assert "reviewer" in log_rows[0]
    usage_ids = Counter(r["request_id"] for r in read(broker, "usage"))
    assert set(usage_ids) == expected and max(usage_ids.values()) == 1
    table = plain_catalog(broker).load_table(("ragstream", "inference_log"))
    assert len(table.snapshots()) < 30  # expired as it went
    assert "orphans_removed" in sink.log.read_text()
    # The kills interrupted real work: restarts resumed from offsets stored mid-stream.
    resumed = [line for line in sink.log.read_text().splitlines() if "resuming at" in line]
    assert sum(f"('{PREFIX}.responses', 0): None" not in line for line in resumed) >= kills - 1


def test_a_recreated_topic_is_read_from_its_start(
    broker: Settings, sink_factory: Callable[..., SinkProcess]
) -> None:
    """The embedded broker keeps topics in memory: after its restart every offset the tables
    stored is past the end of the new, empty log. New records must still be audited."""
    publish(broker, [_response(f"before-{i}") for i in range(6)])
    sink = sink_factory(FAST)
    sink.start()
    wait_for(lambda: len(read(broker, "usage")) == 6, 30, sink)
    assert sink.terminate() == 0, sink.tail()
    port = broker.kafka.embedded_port
    # Restart the broker: same port, nothing in it.
    for proc in _tansu_on(port):
        proc.kill()
        proc.wait(timeout=5)
    restarted = subprocess.Popen(
        kafka.broker_command(broker),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        kafka.wait_broker(broker, timeout_s=15)
        kafka.create_topics(broker, [kafka.NewTopicSpec(t.full_name(PREFIX), PARTITIONS) for t in ALL_TOPICS])
        publish(broker, [_response(f"after-{i}") for i in range(2)])
        sink.start()
        wait_for(lambda: len(read(broker, "usage")) == 8, 30, sink)
        assert sink.terminate() == 0, sink.tail()
        assert "not in the log" in sink.log.read_text()
    finally:
        restarted.kill()
        restarted.wait()


def test_sinks_split_by_table_each_write_only_their_own(
    broker: Settings, sink_factory: Callable[..., SinkProcess]
) -> None:
    """Two sink processes, `inference_log` and the rest, as `audit.sinks` can run them: every
    request lands once in each table, and a third sink for a table that already has one stops
    at its first commit instead of writing twice."""
    ids = [f"split-{i:04d}" for i in range(300)]
    events: list[Event] = []
    for rid in ids:
        events += [QuerySubmitted(request_id=rid, question="?", deadline_ms=60_000), _response(rid)]
    bad = DeadLettered(
        stage="ingest", error_kind="unreadable", message="not a pdf", document_id="d9", original=b"%PDF"
    )
    publish(broker, [*events, bad])
    first = sink_factory(FAST, ("inference_log",))
    rest = sink_factory(FAST, ("usage", "ingestion_log", "dead_letters"))
    first.start()
    rest.start()

    def landed() -> bool:
        return len(read(broker, "inference_log")) == len(ids) and len(read(broker, "usage")) == len(ids)

    wait_for(landed, 60, first)
    wait_for(lambda: len(read(broker, "dead_letters")) == 1, 30, rest)
    hb = json.loads((broker.run_dir / "worker-sink-usage.json").read_text())
    assert hb["tables"] == ["usage", "ingestion_log", "dead_letters"]

    # A second committer for usage. Both read `late-1` and both build a batch on the same
    # committed offsets: whichever commits second finds offsets it did not write and stops.
    # Which one wins is a race (on a loaded 2-core box the newcomer sometimes does).
    intruder = sink_factory(FAST, ("usage",))
    intruder.start()
    intruder.wait_running()
    publish(broker, [_response("late-1")])
    deadline = time.monotonic() + 90
    while "late-1" not in {r["request_id"] for r in read(broker, "usage")}:
        assert time.monotonic() < deadline, f"late-1 never landed:\n{intruder.tail()}\n{rest.tail()}"
        time.sleep(0.2)
    contenders = {"intruder": intruder, "rest": rest}
    while time.monotonic() < deadline and all(
        c.proc is not None and c.proc.poll() is None for c in contenders.values()
    ):
        time.sleep(0.2)
    fenced = {name for name, c in contenders.items() if c.proc is not None and c.proc.poll() is not None}
    assert len(fenced) == 1, (
        f"expected exactly one sink fenced, got {fenced}:\n{intruder.tail()}\n{rest.tail()}"
    )
    loser = contenders[fenced.pop()]
    assert loser.proc is not None and loser.proc.returncode != 0
    assert "second audit sink" in loser.tail()
    survivor = intruder if loser is rest else rest
    assert survivor.terminate() == 0, survivor.tail()
    assert first.terminate() == 0, first.tail()
    for table in ("inference_log", "usage"):
        per_id = Counter(r["request_id"] for r in read(broker, table))
        assert max(per_id.values()) == 1 and set(ids) <= set(per_id), table
    assert [r["document_id"] for r in read(broker, "ingestion_log")] == ["d9"]


def _tansu_on(port: int) -> list[Any]:
    import psutil

    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"]
        and "tansu" in p.info["cmdline"][0]
        and f"127.0.0.1:{port}" in " ".join(p.info["cmdline"])
    ]

"""Issue 4 benchmark: the audit sink's throughput and freshness, against pyiceberg directly.

Everything runs on a temporary data dir: a real Tansu broker on a free port, the real sink
(`python -m ragstream.workers.sink`, default audit settings) and a SQLite-catalog warehouse.

- Sustained throughput: a backlog of N requests (a `QuerySubmitted` and its
  `ResponseCompleted` each, built with the real models at realistic sizes) is published
  first, then the sink starts and drains it. The rate is taken from the tables' own snapshot
  history (commit timestamps and added-records), from the first commit to the last, over
  `inference_log` + `usage` rows.
- Direct: the same events turned into rows by the sink's row builders, converted with
  `rows_to_arrow` and appended to fresh tables in batches of the sink's `flush_rows`, in this
  process (before the sink starts and after it stops; the mean is the baseline). The per-stage
  timings (decode, build rows, Arrow, append) double as a profile of the sink's work.
- Freshness: with the sink live, requests are published at a steady rate and a separate
  catalog handle polls `inference_log` every 200 ms; publish -> visible, p50/p99.

Quick run: `python -m bench.audit --requests 5000 --fresh-s 8` (or BENCH_AUDIT_REQUESTS,
BENCH_AUDIT_FRESH_RATE, BENCH_AUDIT_FRESH_S).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench.common import REPO, BenchStack, Results, console, verdict
from ragstream.infra import kafka
from ragstream.infra.audit.buffer import rows_to_arrow
from ragstream.infra.audit.creation import ensure_tables
from ragstream.infra.audit.rows import Source, inference_row, usage_row
from ragstream.infra.audit.tables import INFERENCE_LOG, USAGE, sink_name
from ragstream.infra.settings import Settings
from ragstream.schemas.queries import Citation, PromptMessage, QuerySubmitted, ResponseCompleted, Usage
from ragstream.streams.codec import decode, encode
from ragstream.streams.topics import ALL_TOPICS, QUERIES, RESPONSES

PREFIX = "auditbench"
MODEL = "smollm2-135m"
PRICES = {MODEL: {"input_per_1k": 0.0005, "output_per_1k": 0.0015}}
TARGET_ROWS_S = 20_000
SPLIT = (("inference_log",), ("usage", "ingestion_log", "dead_letters"))
"""The production layout (docker-compose): inference_log's sink, and one for the rest."""
SPLIT_NAMESPACE = "ragstream_split"
FRESH_SLACK_S = 5.0
POLL_S = 0.2

_SYSTEM = (
    "You are the Larkspur handbook assistant. Answer only from the numbered sources below and "
    "cite them as [n]. If the sources do not contain the answer, say you do not know. "
) * 2
_CHUNK = (
    "The on-call rotation hands over every Monday at 09:00 UTC. The outgoing engineer writes a "
    "summary of open incidents, pending changes and known noisy alerts, and the incoming engineer "
    "acknowledges it in the on-call channel before taking the pager. "
) * 2


# -- events ------------------------------------------------------------------------------------
def make_request(i: int, prefix: str = "bench") -> tuple[QuerySubmitted, ResponseCompleted]:
    """One realistic request: 4 retrieved chunks and citations, ~300-char answer, ~2 KB prompt."""
    rid = f"{prefix}-{i:08d}"
    query = QuerySubmitted(
        request_id=rid,
        question=f"How does the on-call handover work for team {i % 37}?",
        user=f"user-{i % 50}",
        tenant=f"tenant-{i % 5}",
    )
    docs = [f"doc-{(i * 7 + k) % 500}" for k in range(4)]
    citations = tuple(
        Citation(
            number=k + 1,
            document_id=d,
            chunk_id=f"{d}#{k}",
            title=f"Handbook {d}",
            score=round(0.9 - k * 0.1, 3),
            source=f"handbook/{d}.md",
            cited=k < 2,
        )
        for k, d in enumerate(docs)
    )
    context = "\n\n".join(f"[{k + 1}] {_CHUNK[:440]}" for k in range(4))
    failed = i % 50 == 49  # a few errors, as in real traffic
    response = ResponseCompleted(
        request_id=rid,
        user=query.user,
        tenant=query.tenant,
        status="error" if failed else "ok",
        error_reason="generation_failed: model server unavailable" if failed else None,
        question=query.question,
        answer=""
        if failed
        else (
            "The handover happens every Monday at 09:00 UTC [1]. The outgoing engineer writes a "
            "summary of open incidents, pending changes and noisy alerts [2], and the incoming "
            "engineer acknowledges it in the on-call channel before taking the pager [1]. Ask "
            f"your team lead for team {i % 37}'s exceptions."
        ),
        citations=citations,
        usage=Usage(prompt_tokens=520 + i % 40, completion_tokens=0 if failed else 60 + i % 30),
        model_id=MODEL,
        route="default",
        finish_reason="error" if failed else "stop",
        prompt_template_version="v1",
        prompt_messages=(
            PromptMessage(role="system", content=_SYSTEM),
            PromptMessage(role="user", content=f"{context}\n\nQuestion: {query.question}"),
        ),
        retrieved_chunk_ids=tuple(c.chunk_id for c in citations),
        retrieved_scores=tuple(c.score for c in citations),
        latency_ms={
            "queue_retrieval": 3.0,
            "embed_query": 18.0 + i % 5,
            "search": 4.0,
            "retrieval": 25.0,
            "queue_generation": 2.0,
            "prompt": 0.5,
            "time_to_first_token": 300.0 + i % 100,
            "generation": 2500.0 + i % 700,
            "total": 2830.0 + i % 800,
        },
        streamed=True,
        delta_count=0 if failed else 60,
    )
    return query, response


# -- processes ---------------------------------------------------------------------------------
@contextmanager
def broker(settings: Settings, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A Tansu broker with every topic created; killed on the way out, whatever happens."""
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            kafka.broker_command(settings), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        kafka.wait_broker(settings, timeout_s=15)
        prefix = settings.kafka.topic_prefix
        kafka.create_topics(
            settings, [kafka.NewTopicSpec(t.full_name(prefix), settings.kafka.partitions) for t in ALL_TOPICS]
        )
        yield proc
    finally:
        proc.kill()
        proc.wait()


# The sink's own `main()`, with cProfile on the event-loop thread and around every commit on
# the commit thread (cProfile sees one thread per profiler). The sink's code is unchanged.
_PROFILED_SINK = """
import cProfile, sys
import ragstream.workers.sink as sink
from ragstream.workers.sink_commits import Commits
loop_prof, commit_prof = cProfile.Profile(), cProfile.Profile()
plain_commit = Commits._commit
def _commit(self, batch):
    commit_prof.enable()
    try:
        return plain_commit(self, batch)
    finally:
        commit_prof.disable()
Commits._commit = _commit
loop_prof.enable()
try:
    sink.main(sys.argv[3:])
finally:
    loop_prof.disable()
    loop_prof.dump_stats(sys.argv[1])
    commit_prof.dump_stats(sys.argv[2])
"""


class SinkProcess:
    """`python -m ragstream.workers.sink` with the bench's environment (optionally profiled)."""

    def __init__(
        self,
        stack: BenchStack,
        profile_dir: Path | None = None,
        tables: tuple[str, ...] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.stack = stack
        self.tables = tables
        self.name = sink_name(tables) if tables else "sink"
        self.env = stack.env | (env or {})
        self.log_path = stack.data_dir / f"{self.name}-{len(list(stack.data_dir.glob('*.log')))}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.profile_dir = profile_dir

    def _argv(self) -> list[str]:
        tables = ["--tables", ",".join(self.tables)] if self.tables else []
        if self.profile_dir is None:
            return [sys.executable, "-m", "ragstream.workers.sink", *tables]
        return [
            sys.executable,
            "-c",
            _PROFILED_SINK,
            str(self.profile_dir / "loop.prof"),
            str(self.profile_dir / "commit.prof"),
            *tables,
        ]

    def start(self, timeout_s: float = 60) -> float:
        """Start it and wait for its first heartbeat; returns the monotonic start time."""
        hb = self.stack.settings.run_dir / f"worker-{self.name}.json"
        t0 = time.monotonic()
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                self._argv(),
                env=self.env | {"PYTHONUNBUFFERED": "1"},
                cwd=REPO,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            try:
                if json.loads(hb.read_text()).get("pid") == self.proc.pid:
                    return t0
            except (OSError, ValueError):
                pass
            self.check()
            time.sleep(0.05)
        raise RuntimeError(f"sink did not start within {timeout_s:.0f}s:\n{self.tail()}")

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"sink exited with {self.proc.returncode}:\n{self.tail()}")

    def cpu_s(self) -> float:
        assert self.proc is not None
        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM (it commits what is buffered), SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def independent_catalog(settings: Settings) -> Any:
    """The warehouse opened with plain pyiceberg, as an outside reader would."""
    from pyiceberg.catalog import load_catalog

    return load_catalog(
        "ragstream", type="sql", uri=settings.iceberg_catalog_uri, warehouse=settings.iceberg_warehouse
    )


def _total_records(catalog: Any, name: str, namespace: str) -> int:
    from pyiceberg.exceptions import NoSuchTableError

    try:
        snap = catalog.load_table((namespace, name)).current_snapshot()
    except NoSuchTableError:
        return 0
    if snap is None or snap.summary is None:
        return 0
    return int(snap.summary.additional_properties.get("total-records", 0))


# -- phase 1: backlog -> sink ----------------------------------------------------------------
@dataclass
class Drain:
    requests: int
    rows: int
    commits: int
    first_commit_s: float
    """From sink start (process spawn) to its first data commit."""
    steady_rows_s: float
    """Rows after the first commit / time from the first to the last commit."""
    overall_rows_s: float
    """All rows / time from sink start to the last commit (startup and first batch included)."""
    sink_cpu_s: float
    """CPU seconds (all threads) from the first poll that saw rows to the one that saw all."""
    cpu_window_s: float
    drain_wall_s: float
    rows_per_commit: dict[str, float]


def publish_backlog(settings: Settings, payloads: list[tuple[bytes, bytes, bytes]]) -> float:
    """Queries and responses interleaved, as live traffic would be; returns messages/s.

    aiokafka, not kafka-python: without the optional `crc32c` package kafka-python checksums
    record batches in pure Python (~2k msg/s at 4 KB), which would make the backlog the slow part.
    """
    return asyncio.run(_publish(settings, payloads))


async def _publish(settings: Settings, payloads: list[tuple[bytes, bytes, bytes]]) -> float:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        **kafka.aiokafka_kwargs(settings.kafka),
        linger_ms=5,
        max_batch_size=1 << 20,
        max_request_size=settings.kafka.max_message_bytes,
        acks="all",
    )
    await producer.start()
    qt, rt = QUERIES.full_name(PREFIX), RESPONSES.full_name(PREFIX)
    t0 = time.perf_counter()
    try:
        acks = []
        for key, q, r in payloads:
            acks.append(await producer.send(qt, q, key=key))
            acks.append(await producer.send(rt, r, key=key))
        await producer.flush()
        await asyncio.gather(*acks)
    finally:
        await producer.stop()
    return 2 * len(payloads) / (time.perf_counter() - t0)


def drain(
    stack: BenchStack, sinks: list[SinkProcess], n_requests: int, timeout_s: float, namespace: str
) -> Drain:
    """Start the sinks (one or several, each its own tables) and time how fast they land the
    backlog in `namespace`."""
    settings = stack.settings
    expected = 2 * n_requests
    t_start_mono = min(sink.start() for sink in sinks)
    t_start_wall = time.time() - (time.monotonic() - t_start_mono)
    catalog = independent_catalog(settings)
    deadline = time.monotonic() + timeout_s
    first: tuple[float, float] | None = None
    while True:
        landed = sum(_total_records(catalog, t, namespace) for t in (INFERENCE_LOG, USAGE))
        cpu, mono = sum(sink.cpu_s() for sink in sinks), time.monotonic()
        if first is None and landed > 0:
            first = (cpu, mono)
        if landed >= expected:
            break
        for sink in sinks:
            sink.check()
        if time.monotonic() > deadline:
            tails = "\n".join(sink.tail() for sink in sinks)
            raise RuntimeError(f"sinks landed {landed}/{expected} rows within {timeout_s:.0f}s:\n{tails}")
        time.sleep(0.5)
    drain_wall_s = mono - t_start_mono
    assert first is not None
    cpu_s, cpu_window_s = cpu - first[0], mono - first[1]
    commits: list[tuple[float, int]] = []
    per_table: dict[str, float] = {}
    for name in (INFERENCE_LOG, USAGE):
        table = catalog.load_table((namespace, name))
        mine = [
            (s.timestamp_ms / 1000, int(s.summary.additional_properties.get("added-records", 0)))
            for s in table.metadata.snapshots
            if s.summary is not None
        ]
        mine = [c for c in mine if c[1] > 0]
        per_table[name] = sum(n for _, n in mine) / max(len(mine), 1)
        commits += mine
    commits.sort()
    rows = sum(n for _, n in commits)
    if rows != expected:
        raise RuntimeError(f"snapshot history holds {rows} rows, expected {expected} (snapshots expired?)")
    t_first, t_last = commits[0][0], commits[-1][0]
    steady = (rows - commits[0][1]) / (t_last - t_first) if t_last > t_first else float("nan")
    return Drain(
        requests=n_requests,
        rows=rows,
        commits=len(commits),
        first_commit_s=t_first - t_start_wall,
        steady_rows_s=steady,
        overall_rows_s=rows / (t_last - t_start_wall),
        sink_cpu_s=cpu_s,
        cpu_window_s=cpu_window_s,
        drain_wall_s=drain_wall_s,
        rows_per_commit=per_table,
    )


# -- phase 2: direct pyiceberg -------------------------------------------------------------
@dataclass
class Direct:
    rows_s: float
    """Build rows + rows_to_arrow + append, per row."""
    append_rows_s: float
    us_per_request: dict[str, float]
    """decode (both records), build (both rows), arrow, append: microseconds per request."""


def direct(
    settings: Settings, data_dir: Path, payloads: list[tuple[bytes, bytes, bytes]], flush_rows: int
) -> Direct:
    """The sink's work minus Kafka, in this process, on fresh tables, timed per stage."""
    s = settings.model_copy(update={"data_dir": data_dir})
    tables = ensure_tables(s)
    import pyiceberg.io.pyarrow  # noqa: F401  # imported up front, as the sink does

    schemas = {name: tables[name].schema().as_arrow() for name in (INFERENCE_LOG, USAGE)}
    prices = settings.audit.prices
    qt, rt = QUERIES.full_name(PREFIX), RESPONSES.full_name(PREFIX)
    t = {"decode": 0.0, "build": 0.0, "arrow": 0.0, "append": 0.0}
    decode(QUERIES, payloads[0][1]), decode(RESPONSES, payloads[0][2])  # builds the validators
    for start in range(0, len(payloads), flush_rows):
        chunk = payloads[start : start + flush_rows]
        t0 = time.perf_counter()
        events = [(decode(QUERIES, q), decode(RESPONSES, r)) for _, q, r in chunk]
        t1 = time.perf_counter()
        now = datetime.now(UTC)
        log_rows, usage_rows = [], []
        for k, (query, response) in enumerate(events):
            off = start + k
            assert isinstance(query, QuerySubmitted) and isinstance(response, ResponseCompleted)
            src, qsrc = Source(rt, 0, off), Source(qt, 0, off)
            log_rows.append(inference_row(response, query, source=src, query_source=qsrc, logged_at=now))
            usage_rows.append(usage_row(response, prices=prices, source=src, logged_at=now))
        t2 = time.perf_counter()
        arrows = {
            INFERENCE_LOG: rows_to_arrow(log_rows, schemas[INFERENCE_LOG]),
            USAGE: rows_to_arrow(usage_rows, schemas[USAGE]),
        }
        t3 = time.perf_counter()
        for name, arrow in arrows.items():
            tables[name].append(arrow, snapshot_properties={"ragstream.offsets": json.dumps({"x": start})})
        t4 = time.perf_counter()
        t["decode"] += t1 - t0
        t["build"] += t2 - t1
        t["arrow"] += t3 - t2
        t["append"] += t4 - t3
    n = len(payloads)
    rows = 2 * n
    return Direct(
        rows_s=rows / (t["build"] + t["arrow"] + t["append"]),
        append_rows_s=rows / t["append"],
        us_per_request={k: v / n * 1e6 for k, v in t.items()},
    )


# -- phase 3: freshness ----------------------------------------------------------------------
@dataclass
class Freshness:
    published: int
    seen: int
    rate_req_s: float
    p50_s: float
    p99_s: float
    max_s: float


def freshness(settings: Settings, sink: SinkProcess, rate_req_s: float, duration_s: float) -> Freshness:
    """Publish at a steady rate; an independent reader polls for the rows every 200 ms."""
    n = int(rate_req_s * duration_s)
    sent_at: dict[str, float] = {}
    seen_at: dict[str, float] = {}
    since = datetime.now(UTC).isoformat()
    stop = threading.Event()
    errors: list[Exception] = []

    def reader() -> None:
        try:
            catalog = independent_catalog(settings)
            while not stop.is_set():
                t_poll = time.time()
                table = catalog.load_table(("ragstream", INFERENCE_LOG))
                ids = (
                    table.scan(row_filter=f"logged_at >= '{since}'", selected_fields=("request_id",))
                    .to_arrow()
                    .column("request_id")
                    .to_pylist()
                )
                t_seen = time.time()
                for rid in ids:
                    seen_at.setdefault(rid, t_seen)
                stop.wait(max(0.0, POLL_S - (time.time() - t_poll)))
        except Exception as exc:  # noqa: BLE001  # re-raised in the main thread
            errors.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    producer = kafka.make_producer(settings, linger_ms=0)
    qt, rt = QUERIES.full_name(PREFIX), RESPONSES.full_name(PREFIX)
    try:
        t0 = time.monotonic()
        for i in range(n):
            wait = t0 + i / rate_req_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            query, response = make_request(i, prefix="fresh")
            key = query.request_id.encode()
            producer.send(qt, key=key, value=encode(query))
            sent_at[query.request_id] = time.time()
            producer.send(rt, key=key, value=encode(response))
        producer.flush(timeout=30)
        publish_s = time.monotonic() - t0
        deadline = time.monotonic() + settings.audit.flush_interval_s + FRESH_SLACK_S + 10
        while len(seen_at) < n and time.monotonic() < deadline and not errors:
            sink.check()
            time.sleep(0.2)
    finally:
        producer.close()
        stop.set()
        thread.join()
    if errors:
        raise errors[0]
    lat = sorted(seen_at[r] - sent_at[r] for r in sent_at if r in seen_at)
    if not lat:
        raise RuntimeError(f"no freshness row became visible:\n{sink.tail()}")
    q = statistics.quantiles(lat, n=100, method="inclusive")
    # A row never seen counts as the slowest possible for the percentile: report it plainly.
    return Freshness(
        published=n,
        seen=len(lat),
        rate_req_s=n / publish_s,
        p50_s=statistics.median(lat),
        p99_s=q[98],
        max_s=lat[-1],
    )


# -- the run -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Params:
    requests: int
    direct_requests: int
    fresh_rate: float
    fresh_s: float
    timeout_s: float
    profile: bool
    sink_env: dict[str, str]
    """Extra RAGSTREAM_* settings for the sink (and the direct baseline), e.g. flush_rows."""


def _profile_top(path: Path, n: int = 18) -> list[str]:
    import io
    import pstats

    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(n)
    return [line for line in out.getvalue().splitlines() if line.strip()][-(n + 1) :]


def run(p: Params) -> Results:
    res = Results()
    work = Path(tempfile.mkdtemp(prefix="ragstream-bench-audit-"))
    sink: SinkProcess | None = None
    sinks: list[SinkProcess] = []
    try:
        stack = BenchStack.create(
            work / "data",
            RAGSTREAM_KAFKA__TOPIC_PREFIX=PREFIX,
            RAGSTREAM_AUDIT__PRICES=json.dumps(PRICES),
            RAGSTREAM_LOG_LEVEL="INFO",
            **p.sink_env,
        )
        stack.data_dir.mkdir(parents=True)
        settings = stack.settings
        audit = settings.audit
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        payloads = []
        for i in range(p.requests):
            query, response = make_request(i)
            payloads.append((query.request_id.encode(), encode(query), encode(response)))
        build_s = time.perf_counter() - t0
        # The payloads live for the whole run: keep the collector from walking them again and
        # again, so the direct baseline in this process runs like the sink (which tunes its GC).
        gc.freeze()
        avg_kb = sum(len(q) + len(r) for _, q, r in payloads[:1000]) / min(len(payloads), 1000) / 1024
        console.print(
            f"{p.requests} requests built in {build_s:.1f}s ({avg_kb:.1f} KB per query+response); "
            f"sink flush_rows={audit.flush_rows}, flush_interval_s={audit.flush_interval_s}"
        )
        sample = payloads[: p.direct_requests]
        before = direct(settings, work / "direct-before", sample, audit.flush_rows)
        console.print(f"direct pyiceberg (before): {before.rows_s:,.0f} rows/s")

        with broker(settings, work / "broker.log"):
            msgs_s = publish_backlog(settings, payloads)
            console.print(f"backlog published: {2 * p.requests} messages at {msgs_s:,.0f} msg/s")
            profile_dir = work / "profile" if p.profile else None
            if profile_dir is not None:
                profile_dir.mkdir()
            # Layout 1, the default: one sink writes every table.
            sink = SinkProcess(stack, profile_dir)
            d = drain(stack, [sink], p.requests, p.timeout_s, settings.iceberg.namespace)
            console.print(
                f"one sink drained {d.rows} rows in {d.drain_wall_s:.1f}s; steady {d.steady_rows_s:,.0f} rows/s"
            )
            _stop(sink)
            # Layout 2, as in docker-compose: inference_log in one sink, the rest in another,
            # into fresh tables (their own namespace) from the same backlog.
            split_env = {"RAGSTREAM_ICEBERG__NAMESPACE": SPLIT_NAMESPACE}
            sinks = [SinkProcess(stack, tables=group, env=split_env) for group in SPLIT]
            d2 = drain(stack, sinks, p.requests, p.timeout_s, SPLIT_NAMESPACE)
            console.print(
                f"two sinks drained {d2.rows} rows in {d2.drain_wall_s:.1f}s; steady {d2.steady_rows_s:,.0f} rows/s"
            )
            for proc in sinks:
                _stop(proc)
            # Freshness with the default sink again (it resumes from its tables' offsets).
            sink = SinkProcess(stack)
            sink.start()
            f = freshness(settings, sink, p.fresh_rate, p.fresh_s)
            console.print(f"freshness: p50 {f.p50_s:.2f}s p99 {f.p99_s:.2f}s ({f.seen}/{f.published} seen)")
            _stop(sink)

        after = direct(settings, work / "direct-after", sample, audit.flush_rows)
        console.print(f"direct pyiceberg (after): {after.rows_s:,.0f} rows/s")
        load_after = os.getloadavg()[0]
        direct_rows_s = (before.rows_s + after.rows_s) / 2
        stages = {k: (before.us_per_request[k] + after.us_per_request[k]) / 2 for k in before.us_per_request}
        direct_decode_rows_s = 2e6 / sum(stages.values())
        ratio = d.steady_rows_s / direct_rows_s
        fresh_target = audit.flush_interval_s + FRESH_SLACK_S
        sink_us_req = 2e6 / d.steady_rows_s

        note = " (under cProfile: rates distorted)" if p.profile else ""
        res.add("backlog", f"{p.requests:,} requests = {d.rows:,} rows, {avg_kb:.1f} KB/request on Kafka")
        res.add(
            f"one sink, all tables (the default){note}: rows/s into inference_log + usage",
            f"{d.steady_rows_s:,.0f} rows/s ({d.steady_rows_s / 2:,.0f} req/s)",
            f">= {TARGET_ROWS_S // 1000}k rows/s",
            verdict(d.steady_rows_s >= TARGET_ROWS_S),
        )
        res.add(
            "two sinks, inference_log | the rest (docker-compose layout)",
            f"{d2.steady_rows_s:,.0f} rows/s ({d2.steady_rows_s / 2:,.0f} req/s)",
            f">= {TARGET_ROWS_S // 1000}k rows/s",
            verdict(d2.steady_rows_s >= TARGET_ROWS_S),
        )
        res.add(
            "rows/s incl. startup: one sink / two sinks",
            f"{d.overall_rows_s:,.0f} / {d2.overall_rows_s:,.0f} "
            f"(first commit {d.first_commit_s:.1f} / {d2.first_commit_s:.1f} s after spawn)",
        )
        res.add(
            "one sink: commits / mean rows per commit",
            f"{d.commits} / " + ", ".join(f"{k} {v:,.0f}" for k, v in d.rows_per_commit.items()),
        )
        res.add(
            "CPU while draining, all threads: one sink / two sinks",
            f"{d.sink_cpu_s / d.cpu_window_s * 100:.0f}% / {d2.sink_cpu_s / d2.cpu_window_s * 100:.0f}% of a core "
            f"({d.sink_cpu_s / d.rows * 1e6:.0f} / {d2.sink_cpu_s / d2.rows * 1e6:.0f} µs CPU per row)",
        )
        res.add(
            f"direct pyiceberg: rows + Arrow + append, batches of {audit.flush_rows}",
            f"{direct_rows_s:,.0f} rows/s (before {before.rows_s:,.0f}, after {after.rows_s:,.0f})",
        )
        res.add(
            "ratio sink / direct: one sink / two sinks",
            f"{ratio:.2f} / {d2.steady_rows_s / direct_rows_s:.2f}",
        )
        res.add(
            "direct incl. decoding the JSON (all of the sink's work but Kafka)",
            f"{direct_decode_rows_s:,.0f} rows/s; sink / this = {d.steady_rows_s / direct_decode_rows_s:.2f}",
        )
        res.add(
            "per request, µs: decode / rows / Arrow / append",
            " / ".join(f"{stages[k]:.0f}" for k in ("decode", "build", "arrow", "append"))
            + f" = {sum(stages.values()):.0f} direct; sink {sink_us_req:.0f} wall",
        )
        res.add(
            f"freshness publish -> visible ({f.rate_req_s:.0f} req/s for {p.fresh_s:.0f} s)",
            f"p50 {f.p50_s:.2f} s, p99 {f.p99_s:.2f} s, max {f.max_s:.2f} s; {f.seen}/{f.published} seen",
            f"p99 <= flush {audit.flush_interval_s:g} s + {FRESH_SLACK_S:g} s",
            verdict(f.p99_s <= fresh_target and f.seen == f.published),
        )
        res.add("machine load (1-min avg, 2 cores) before / after", f"{load_before:.1f} / {load_after:.1f}")
        res.raw.update(
            {
                "params": vars(p),
                "bytes_per_request": avg_kb * 1024,
                "backlog_publish_msgs_s": msgs_s,
                "drain": vars(d),
                "drain_two_sinks": vars(d2),
                "direct_before": vars(before),
                "direct_after": vars(after),
                "direct_rows_s": direct_rows_s,
                "direct_incl_decode_rows_s": direct_decode_rows_s,
                "ratio_sink_direct_incl_decode": d.steady_rows_s / direct_decode_rows_s,
                "ratio_sink_direct": ratio,
                "freshness": vars(f),
                "targets": {"rows_s": TARGET_ROWS_S, "fresh_p99_s": fresh_target},
                "load_avg_1m": [load_before, load_after],
                "audit_settings": audit.model_dump(mode="json"),
            }
        )
        if profile_dir is not None:
            for name in ("loop", "commit"):
                top = _profile_top(profile_dir / f"{name}.prof")
                res.raw[f"profile_{name}"] = top
                console.print(f"[bold]sink {name} thread, by own time:[/]")
                for line in top:
                    console.print(line, markup=False, highlight=False)
        return res
    finally:
        for proc in [*sinks, *([sink] if sink is not None else [])]:
            proc.stop()
        shutil.rmtree(work, ignore_errors=True)


def _stop(sink: SinkProcess) -> None:
    rc = sink.stop()
    if rc != 0:
        raise RuntimeError(f"{sink.name} exited {rc} on SIGTERM:\n{sink.tail()}")


def _env_num(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def parse(argv: list[str]) -> Params:
    parser = argparse.ArgumentParser(description="Audit trail benchmark (issue 4).")
    parser.add_argument(
        "--requests",
        type=int,
        default=int(_env_num("BENCH_AUDIT_REQUESTS", 160_000)),
        help="backlog size in requests (2 rows each)",
    )
    parser.add_argument(
        "--direct-requests",
        type=int,
        default=int(_env_num("BENCH_AUDIT_DIRECT_REQUESTS", 40_000)),
        help="how many of them the direct pyiceberg baseline appends (twice)",
    )
    parser.add_argument(
        "--fresh-rate", type=float, default=_env_num("BENCH_AUDIT_FRESH_RATE", 75), help="req/s"
    )
    parser.add_argument("--fresh-s", type=float, default=_env_num("BENCH_AUDIT_FRESH_S", 20), help="seconds")
    parser.add_argument("--timeout-s", type=float, default=_env_num("BENCH_AUDIT_TIMEOUT_S", 240))
    parser.add_argument(
        "--profile", action="store_true", help="run the sink under cProfile and print its top"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="RAGSTREAM_X=V",
        help="a setting for the sink, e.g. RAGSTREAM_AUDIT__FLUSH_ROWS=20000 (repeatable)",
    )
    a = parser.parse_args(argv)
    sink_env = dict(kv.split("=", 1) for kv in a.set)
    bad = [k for k in sink_env if not k.startswith("RAGSTREAM_")]
    if bad:
        parser.error(f"--set takes RAGSTREAM_* settings, not {bad}")
    return Params(a.requests, a.direct_requests, a.fresh_rate, a.fresh_s, a.timeout_s, a.profile, sink_env)


def main(argv: list[str] | None = None) -> None:
    res = run(parse(argv or []))
    res.print("audit trail (issue 4)")
    console.print(f"saved {res.save('audit')}")


if __name__ == "__main__":
    main(sys.argv[1:])

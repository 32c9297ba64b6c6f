"""The client SDK and `ragstream ask` against a real Tansu broker.

The pipeline's answering stages are not involved: a small responder in a thread plays the
server side. It answers every `QuerySubmitted` on the reply stream its token names, with token
deltas published deliberately out of order and with a duplicate, and then at once one
`ResponseCompleted`, all keyed by request id: the client must still stream every delta in
order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jwt
import pytest
from kafka import TopicPartition

from ragstream import AsyncClient, Client, Response
from ragstream.infra import kafka
from ragstream.infra.auth import ensure_local_key
from ragstream.infra.settings import KafkaSettings, Settings
from ragstream.schemas.queries import Citation, QuerySubmitted, ResponseCompleted, TokenGenerated, Usage
from ragstream.streams.codec import decode, encode
from ragstream.streams.topics import ALL_TOPICS, QUERIES, reply_topic
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

PREFIX = "clienttest"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A Tansu broker on a free port with every topic created; killed at the end."""
    data_dir = tmp_path_factory.mktemp("client")
    s = Settings(data_dir=data_dir, kafka=KafkaSettings(embedded_port=free_port(), topic_prefix=PREFIX))
    with open(data_dir / "broker.log", "wb") as logf:
        proc = subprocess.Popen(
            kafka.broker_command(s), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        kafka.wait_broker(s, timeout_s=15)
        ensure_local_key(s.local_key_file)  # what `ragstream up` does: the client signs with it
        kafka.create_topics(
            s, [kafka.NewTopicSpec(t.full_name(PREFIX), s.kafka.partitions) for t in ALL_TOPICS]
        )
        yield s
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.poll() is not None


def answer_for(question: str) -> str:
    return f"You asked: {question}. The answer is 42 [1]."


def deltas_for(answer: str) -> list[str]:
    words = answer.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


class Responder:
    """Plays the pipeline: answers every query, out-of-order deltas first when it streams."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="responder", daemon=True)
        self._ready = threading.Event()
        self.answered = 0
        self.error: BaseException | None = None

    def __enter__(self) -> Responder:
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError(f"responder did not start: {self.error!r}")
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # surfaced by the test through __enter__ / self.error
            self.error = exc
            self._ready.set()
            raise

    def _serve(self) -> None:
        topic = QUERIES.full_name(PREFIX)
        consumer = kafka.make_consumer(self._settings, group_id=None)
        producer = kafka.make_producer(self._settings, linger_ms=0)
        try:
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            consumer.assign(tps)
            for tp, end in consumer.end_offsets(tps).items():
                consumer.seek(tp, end)
            self._ready.set()
            while not self._stop.is_set():
                for records in consumer.poll(timeout_ms=100).values():
                    for r in records:
                        query = decode(QUERIES, r.value)
                        assert isinstance(query, QuerySubmitted)
                        self._answer(producer, query)
        finally:
            consumer.close()
            producer.close()

    def _answer(self, producer: object, query: QuerySubmitted) -> None:
        send = producer.send  # type: ignore[attr-defined]
        key = query.kafka_key()
        assert query.token, "the client sent no token"
        claims = jwt.decode(query.token, options={"verify_signature": False})
        reply_to = f"{claims['tenant']}.{claims['client']}"
        stream = reply_topic(PREFIX, reply_to)
        answer = answer_for(query.question)
        status = "blocked" if "forbidden" in query.question else "ok"
        if query.stream and status == "ok":
            pieces = deltas_for(answer)
            order = list(range(len(pieces)))
            for i in range(0, len(order) - 1, 2):  # swap neighbours: 1 0 3 2 5 4 ...
                order[i], order[i + 1] = order[i + 1], order[i]
            for seq in [*order, 0]:  # and a duplicate of the first
                if "lossy" in query.question and seq == 2:
                    continue  # a delta that never arrives
                ev = TokenGenerated(
                    request_id=query.request_id,
                    tenant=query.tenant,
                    sequence=seq,
                    delta=pieces[seq],
                    reply_to=reply_to,
                )
                send(stream, key=key, value=encode(ev))
        final = ResponseCompleted(
            request_id=query.request_id,
            trace_id=query.request_id,
            tenant=query.tenant,
            user=query.user,
            status=status,
            error_reason="policy_violation: the question asks for something forbidden"
            if status != "ok"
            else None,
            question=query.question,
            answer=answer if status == "ok" else "I can't help with that.",
            citations=(
                Citation(
                    number=1, document_id="handbook/answers.md", chunk_id="c1", title="Answers", score=0.87
                ),
            )
            if status == "ok"
            else (),
            usage=Usage(prompt_tokens=100, completion_tokens=12),
            model_id="responder",
            route=query.generation.route,
            finish_reason="stop",
            latency_ms={"total": 1.0},
            streamed=query.stream,
            delta_count=len(deltas_for(answer)) if query.stream and status == "ok" else 0,
            reply_to=reply_to,
        )
        send(stream, key=key, value=encode(final))
        producer.flush()  # type: ignore[attr-defined]
        self.answered += 1


@pytest.fixture
def responder(settings: Settings) -> Iterator[Responder]:
    with Responder(settings) as r:
        yield r


async def test_ask_returns_the_pipelines_answer(settings: Settings, responder: Responder) -> None:
    async with AsyncClient(settings) as client:
        response = await client.ask("What is the answer?", tenant="acme", user="ann", groups=["hr"])
    assert isinstance(response, Response)
    assert response.status == "ok"
    assert response.answer == answer_for("What is the answer?")
    assert (response.tenant, response.user) == ("acme", "ann")
    assert response.citations[0].document_id == "handbook/answers.md"


async def test_stream_yields_deltas_in_order_then_the_response(
    settings: Settings, responder: Responder
) -> None:
    question = "Why is the sky blue on a clear summer day?"
    async with AsyncClient(settings) as client:
        items = [item async for item in client.stream(question)]
    final = items[-1]
    deltas = items[:-1]
    assert isinstance(final, ResponseCompleted) and final.status == "ok"
    assert all(isinstance(d, str) for d in deltas)
    assert "".join(deltas) == final.answer  # type: ignore[arg-type]
    # Published 1 0 3 2 ... plus a duplicate; seen in order, once each, none lumped together.
    assert deltas == deltas_for(final.answer)


async def test_stream_completes_the_answer_when_a_delta_is_lost(
    settings: Settings, responder: Responder
) -> None:
    async with AsyncClient(settings) as client:
        started = time.monotonic()
        items = [item async for item in client.stream("a lossy question about the weather")]
        elapsed_s = time.monotonic() - started
    final = items[-1]
    assert isinstance(final, ResponseCompleted) and final.status == "ok"
    assert "".join(items[:-1]) == final.answer  # type: ignore[arg-type]
    assert items[:2] == deltas_for(final.answer)[:2]  # streamed up to the gap
    assert elapsed_s < 3  # waited briefly for the lost delta, then used the final answer


async def test_concurrent_asks_on_one_client_each_get_their_own_answer(
    settings: Settings, responder: Responder
) -> None:
    questions = [f"question number {i}?" for i in range(20)]
    async with AsyncClient(settings) as client:
        responses = await asyncio.gather(*(client.ask(q, user=f"user{i}") for i, q in enumerate(questions)))
    for i, (q, r) in enumerate(zip(questions, responses, strict=True)):
        assert r.status == "ok", r.error_reason
        assert r.answer == answer_for(q)
        assert r.user == f"user{i}"
    assert len({r.request_id for r in responses}) == 20


async def test_no_pipeline_means_a_deadline_error_not_a_hang(settings: Settings) -> None:
    async with AsyncClient(settings, deadline_grace_s=0.5) as client:
        started = time.monotonic()
        response = await client.ask("Is anyone listening?", deadline_ms=500)
        elapsed_s = time.monotonic() - started
        items = [i async for i in client.stream("Still nobody?", deadline_ms=300)]
    assert response.status == "error"
    assert response.error_reason and response.error_reason.startswith("deadline_exceeded")
    assert response.finish_reason == "deadline"
    assert 0.9 <= elapsed_s < 3.0
    assert len(items) == 1 and isinstance(items[0], ResponseCompleted) and items[0].status == "error"


def test_sync_client_serves_several_threads(settings: Settings, responder: Responder) -> None:
    with Client(settings) as client:

        def work(i: int) -> tuple[str, Response, list[str]]:
            q = f"thread {i} asks"
            streamed = list(client.stream(q + " (streamed)"))
            assert isinstance(streamed[-1], ResponseCompleted)
            return q, client.ask(q), [s for s in streamed if isinstance(s, str)]

        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(work, range(8)))
    for q, response, deltas in results:
        assert response.answer == answer_for(q)
        assert "".join(deltas) == answer_for(q + " (streamed)")


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGSTREAM_")}
    env |= {
        "RAGSTREAM_DATA_DIR": str(settings.data_dir),
        "RAGSTREAM_KAFKA__EMBEDDED_PORT": str(settings.kafka.embedded_port),
        "RAGSTREAM_KAFKA__TOPIC_PREFIX": PREFIX,
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "ragstream", "ask", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_cli_ask_streams_the_answer_and_lists_sources(settings: Settings, responder: Responder) -> None:
    proc = _cli(settings, "How much is six times seven?", "--tenant", "acme", "--group", "hr")
    assert proc.returncode == 0, proc.stderr
    assert answer_for("How much is six times seven?") in proc.stdout
    assert "[1] Answers  (handbook/answers.md, score 0.870)" in proc.stdout

    proc = _cli(settings, "How much is six times seven?", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["status"] == "ok" and data["tenant"] == "default"

    proc = _cli(settings, "Tell me something forbidden")
    assert proc.returncode == 3, proc.stderr
    assert "blocked" in proc.stderr


def test_cli_ask_exits_1_on_deadline(settings: Settings) -> None:
    proc = _cli(settings, "Anyone?", "--deadline-ms", "200", "--json")
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["error_reason"].startswith("deadline_exceeded")


async def test_round_trip_overhead_through_the_broker(settings: Settings, responder: Responder) -> None:
    """100 sequential asks, answered at once: what the two broker hops cost the caller."""
    latencies_ms: list[float] = []
    async with AsyncClient(settings) as client:
        await client.ask("warm up")
        for i in range(100):
            started = time.perf_counter()
            r = await client.ask(f"ping {i}")
            latencies_ms.append((time.perf_counter() - started) * 1000)
            assert r.status == "ok"
    latencies_ms.sort()
    p50 = statistics.median(latencies_ms)
    p99 = latencies_ms[98]
    sys.stderr.write(
        f"\nask round trip via Tansu (fetch_max_wait_ms={settings.kafka.fetch_max_wait_ms}): "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {latencies_ms[-1]:.1f} ms\n"
    )
    assert p50 < 500

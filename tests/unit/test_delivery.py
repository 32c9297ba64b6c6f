"""Bounded publishing, failing pipelines and the exactly-once gate, without Kafka.

The sender is a fake standing in for the broker (our own `Sender` callable), so the runner's
logic is what is tested: what is retried, what is dead-lettered, when it gives up."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from ragstream.infra.settings import KafkaSettings, Settings
from ragstream.schemas.errors import PublishStalled
from ragstream.schemas.events import DeadLettered, DocumentIndexed, DocumentSubmitted, Event
from ragstream.schemas.queries import QuerySubmitted, ResponseCompleted
from ragstream.streams.codec import decode, encode
from ragstream.streams.completions import CompletedRequests
from ragstream.streams.pipeline import ConcurrentPipeline
from ragstream.streams.runner import Emit, Message, StageRunner
from ragstream.streams.topics import DEADLETTER, DOCUMENTS, QUERIES, RESPONSES, topic_for


def emit(event: Event) -> Emit:
    return Emit(topic_for(event), event)


class MessageSizeTooLargeError(Exception):
    """Named like aiokafka's and kafka-python's: the broker will never take this record."""

    retriable = False


class KafkaTimeoutError(Exception):
    """Named like aiokafka's, which calls it non-retriable; it is retried anyway."""

    retriable = False


class Hiccup(Exception):
    """Like aiokafka's KafkaTimeoutError: try again."""

    retriable = True


class Broker:
    """Records what was sent; fails the way it is told to."""

    def __init__(self, fail: dict[str, list[BaseException]] | None = None) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.fail = fail or {}

    async def send(self, topic: str, key: bytes, value: bytes) -> Any:
        errors = self.fail.get(topic)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if errors:
            fut.set_exception(errors.pop(0) if len(errors) > 1 else errors[0])
        else:
            self.sent.append((topic, key, value))
            fut.set_result(None)
        return fut

    def recovering_after(self, failures: int) -> Any:
        """A sender that fails as told for the first `failures` sends, then works."""
        calls = 0

        async def send(topic: str, key: bytes, value: bytes) -> Any:
            nonlocal calls
            calls += 1
            if calls > failures:
                self.fail.clear()
            return await self.send(topic, key, value)

        return send

    def events(self, topic: str) -> list[Event]:
        spec = {"ragstream.deadletter": DEADLETTER, "ragstream.responses": RESPONSES}[topic]
        return [decode(spec, v) for t, _, v in self.sent if t == topic]


def settings(**kafka: Any) -> Settings:
    return Settings(kafka=KafkaSettings(**kafka))


def message(event: Event, offset: int = 0) -> Message:
    return Message("ragstream.documents", 0, offset, event.kafka_key(), encode(event))


def indexed(doc: DocumentSubmitted) -> Emit:
    return emit(
        DocumentIndexed(
            source_event_id=doc.event_id,
            trace_id=doc.trace_id,
            document_id=doc.document_id,
            version=1,
            outcome="indexed",
            chunk_count=1,
        )
    )


async def test_an_output_over_the_size_limit_dead_letters_its_input_and_only_it() -> None:
    broker = Broker()
    r = StageRunner(settings(max_message_bytes=4096), "index", broker.send)
    small, huge = DocumentSubmitted(document_id="small"), DocumentSubmitted(document_id="huge")
    too_big = DocumentIndexed(
        source_event_id=huge.event_id,
        trace_id=huge.trace_id,
        document_id="huge",
        version=1,
        outcome="indexed",
        chunk_count=1,
        fingerprint="x" * 10_000,
    )
    await r.deliver([message(small, 0), message(huge, 1)], [indexed(small), emit(too_big)])
    topics = [t for t, _, _ in broker.sent]
    assert topics == ["ragstream.documents.indexed", "ragstream.deadletter"]
    (dl,) = broker.events("ragstream.deadletter")
    assert isinstance(dl, DeadLettered)
    assert dl.error_kind == "output_rejected" and dl.original_offset == 1
    assert "max_message_bytes" in dl.message


async def test_a_record_the_broker_refuses_for_good_dead_letters_its_input() -> None:
    broker = Broker({"ragstream.documents.indexed": [MessageSizeTooLargeError("over the broker's limit")]})
    r = StageRunner(settings(), "index", broker.send)
    doc = DocumentSubmitted(document_id="a")
    await r.deliver([message(doc)], [indexed(doc)])
    (dl,) = broker.events("ragstream.deadletter")
    assert isinstance(dl, DeadLettered) and dl.error_kind == "output_rejected"
    assert "MessageSizeTooLargeError" in dl.message
    assert r.stalled_since is None


async def test_a_timeout_or_unknown_broker_error_is_retried_not_dead_lettered() -> None:
    """aiokafka marks KafkaTimeoutError and UnknownError non-retriable, and the embedded
    broker answers UnknownError while it restarts: a good request must wait, not be dropped."""
    broker = Broker({"ragstream.documents.indexed": [KafkaTimeoutError("timed out")]})
    r = StageRunner(settings(), "index", broker.recovering_after(1))
    doc = DocumentSubmitted(document_id="a")
    await r.deliver([message(doc)], [indexed(doc)])
    assert [t for t, _, _ in broker.sent] == ["ragstream.documents.indexed"]
    assert r.publish_retries == 1


async def test_retriable_failures_back_off_then_succeed_and_clear_the_stall() -> None:
    broker = Broker({"ragstream.documents.indexed": [Hiccup("timeout")]})
    r = StageRunner(settings(), "index", broker.recovering_after(2))
    doc = DocumentSubmitted(document_id="a")
    await r.deliver([message(doc)], [indexed(doc)])
    assert [t for t, _, _ in broker.sent] == ["ragstream.documents.indexed"]
    assert r.publish_retries == 2 and r.stalled_since is None


async def test_publishing_gives_up_after_its_budget_and_reports_the_stall() -> None:
    broker = Broker({"ragstream.documents.indexed": [Hiccup("broker away")]})
    r = StageRunner(settings(publish_retry_budget_s=0.5), "index", broker.send)
    doc = DocumentSubmitted(document_id="a")
    with pytest.raises(PublishStalled, match="broker away"):
        await r.deliver([message(doc)], [indexed(doc)])
    assert r.stalled_since is not None and "broker away" in (r.stalled_reason or "")
    assert broker.sent == []


class FakeEvent:
    """A Faust event, as much as the pipeline uses of it."""

    def __init__(self, value: bytes, offset: int) -> None:
        self.message = Message("ragstream.queries", 0, offset, b"k", value)
        self.acked = False

    def ack(self) -> None:
        self.acked = True


async def test_a_pipeline_whose_delivery_gives_up_fails_instead_of_hanging() -> None:
    broker = Broker({"ragstream.responses": [Hiccup("broker away")]})
    r = StageRunner(settings(publish_retry_budget_s=0.3), "generate", broker.send)
    q = QuerySubmitted(question="q?")

    async def answer(events: Sequence[Event]) -> Sequence[Event]:
        return [ResponseCompleted(request_id=q.request_id, trace_id=q.request_id, status="ok")]

    async def stream() -> Any:
        event = FakeEvent(encode(q), 0)
        yield event
        await asyncio.sleep(3600)  # an idle topic: the failure must still surface

    pipeline = ConcurrentPipeline(r, QUERIES, answer, concurrency=2)
    with pytest.raises(PublishStalled):
        await asyncio.wait_for(pipeline.run(stream()), timeout=10)


async def test_concurrent_requests_are_acked_in_offset_order_whatever_order_they_finish_in() -> None:
    """A slow request at offset 0 and quick ones after it: the quick ones are published at
    once, but nothing is acked past the slow one until it is done (faust-streaming could
    otherwise commit over it, and a crash would lose it)."""
    broker = Broker()
    r = StageRunner(settings(), "generate", broker.send)
    release = asyncio.Event()
    queries = [QuerySubmitted(question=f"q{i}?") for i in range(4)]

    async def answer(events: Sequence[Event]) -> Sequence[Event]:
        (q,) = events
        assert isinstance(q, QuerySubmitted)
        if q.question == "q0?":
            await release.wait()
        return [ResponseCompleted(request_id=q.request_id, trace_id=q.request_id, status="ok")]

    events = [FakeEvent(encode(q), i) for i, q in enumerate(queries)]

    async def stream() -> Any:
        for e in events:
            yield e
        await asyncio.sleep(3600)

    pipeline = ConcurrentPipeline(r, QUERIES, answer, concurrency=4)
    run = asyncio.create_task(pipeline.run(stream()))
    for _ in range(200):
        if len(broker.sent) >= 3:
            break
        await asyncio.sleep(0.01)
    assert len(broker.sent) == 3, "the quick answers are not held back"
    assert [e.acked for e in events] == [False, False, False, False]
    release.set()
    for _ in range(200):
        if all(e.acked for e in events):
            break
        await asyncio.sleep(0.01)
    assert [e.acked for e in events] == [True, True, True, True]
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run


async def test_a_poison_message_is_retried_then_dead_lettered_as_internal_error() -> None:
    calls = 0

    async def buggy(events: Sequence[Event]) -> Sequence[Event]:
        nonlocal calls
        calls += 1
        raise RecursionError("maximum recursion depth exceeded")

    broker = Broker()
    r = StageRunner(settings(internal_error_retries=2), "ingest", broker.send)
    (dl,) = await r.process_batch(DOCUMENTS, [message(DocumentSubmitted(document_id="a"))], buggy)
    assert isinstance(dl.event, DeadLettered) and dl.event.error_kind == "internal_error"
    assert calls == 3


def gate() -> CompletedRequests:
    return CompletedRequests(Settings())  # never started: the gate's logic alone


async def test_the_gate_skips_a_request_already_answered_or_in_flight() -> None:
    completions = gate()
    broker = Broker()
    r = StageRunner(settings(), "generate", broker.send, completions=completions)
    q = QuerySubmitted(question="q?")
    seen: list[str] = []

    async def answer(events: Sequence[Event]) -> Sequence[Event]:
        seen.extend(e.request_id for e in events if isinstance(e, QuerySubmitted))
        return [ResponseCompleted(request_id=q.request_id, trace_id=q.request_id, status="ok")]

    first = Message("ragstream.queries", 0, 0, b"k", encode(q))
    again = Message("ragstream.queries", 0, 1, b"k", encode(q))
    outputs = await r.process_batch(QUERIES, [first], answer)
    # the duplicate arrives while the first is still being delivered: skipped
    assert await r.process_batch(QUERIES, [again], answer) == []
    await r.deliver([first], outputs)
    # and after: skipped, and its would-be response is not published either
    assert await r.process_batch(QUERIES, [again], answer) == []
    await r.deliver([again], outputs)
    assert seen == [q.request_id]
    assert len(broker.events("ragstream.responses")) == 1
    assert r.duplicates_skipped == 2
    assert completions.is_done(q.request_id)


def test_the_gate_forgets_answers_older_than_its_window() -> None:
    completions = CompletedRequests(Settings(serving={"completed_window_s": 10}))  # type: ignore[arg-type]
    completions._remember("old", 1000.0)
    completions._remember("new", 1015.0)
    assert not completions.is_done("old") and completions.is_done("new")
    assert completions.claim("s", "old") and not completions.claim("s", "old")
    completions.release("s", "old")
    assert completions.claim("s", "old")

"""Stage logic without Kafka: the codec, the runner's error routing, prompt assembly and the
index stage's ordering. Fakes stand in only for our own protocols (store, embedder)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from ragstream.infra.settings import Settings
from ragstream.schemas.errors import DependencyUnavailable, SchemaViolation, UnreadableDocument
from ragstream.schemas.events import (
    Chunk,
    ChunkCreated,
    ChunkEmbedded,
    DeadLettered,
    DocumentIndexed,
    DocumentRetracted,
    DocumentSubmitted,
    Event,
)
from ragstream.schemas.queries import ResponseCompleted, RetrievedChunk
from ragstream.streams.codec import decode, encode, sniff_ids
from ragstream.streams.runner import Message, StageRunner
from ragstream.streams.topics import CHUNKS, DEADLETTER, DOCUMENTS, EMBEDDED, QUERIES
from ragstream.workers import embed, index
from ragstream.workers.prompt import build_prompt, citations_for
from ragstream.workers.responses import invalid_request_response


def chunk(doc: str, i: int, n: int, fp: str = "f" * 16) -> Chunk:
    return Chunk(
        chunk_id=f"{doc}:{fp}:{i}",
        document_id=doc,
        tenant="t",
        fingerprint=fp,
        version=1,
        chunk_index=i,
        chunk_count=n,
        text=f"text {i}",
        char_start=0,
        char_end=6,
        token_count=2,
    )


# -- codec ---------------------------------------------------------------------------------
def test_codec_round_trips_and_rejects_bad_bytes_with_a_reason() -> None:
    doc = DocumentSubmitted(document_id="a", content="hello")
    assert decode(DOCUMENTS, encode(doc)) == doc
    with pytest.raises(SchemaViolation, match="not a JSON object"):
        decode(DOCUMENTS, b"\xff\x00")
    with pytest.raises(SchemaViolation, match="Invalid JSON"):
        decode(DOCUMENTS, b'{"document_id": "a",')
    with pytest.raises(SchemaViolation, match="document_id"):
        decode(DOCUMENTS, b'{"document_id": 5}')
    with pytest.raises(SchemaViolation, match="event_type"):
        decode(CHUNKS, encode(doc))  # a document on the chunks topic
    retracted = DocumentRetracted(source_event_id="e", document_id="a", version=1)
    assert isinstance(decode(EMBEDDED, encode(retracted)), DocumentRetracted)


def test_sniff_ids_reads_what_it_can_and_never_raises() -> None:
    assert sniff_ids(b"\x00garbage") == {}
    assert sniff_ids(b"[1, 2]") == {}
    ids = sniff_ids(json.dumps({"request_id": "r1", "tenant": "t", "chunk": {"document_id": "d"}}).encode())
    assert ids == {"request_id": "r1", "tenant": "t", "document_id": "d"}


# -- runner --------------------------------------------------------------------------------
def runner(**kw: Any) -> StageRunner:
    async def send(topic: str, key: bytes, value: bytes) -> Any:
        raise AssertionError("process_batch must not publish")

    return StageRunner(Settings(), "test", send, retry_budget_s=0.3, max_retry_delay_s=0.05, **kw)


def msg(value: bytes, offset: int = 0) -> Message:
    return Message(topic="ragstream.documents", partition=0, offset=offset, key=b"k", value=value)


async def test_a_bad_message_in_a_batch_is_dead_lettered_alone() -> None:
    seen: list[list[str]] = []

    async def handler(events: Sequence[Event]) -> Sequence[Event]:
        ids = [e.document_id for e in events if isinstance(e, DocumentSubmitted)]
        seen.append(ids)
        if "bad" in ids:
            raise UnreadableDocument("cannot parse bad")
        return [
            DocumentIndexed(source_event_id="x", document_id=i, version=1, outcome="indexed", chunk_count=1)
            for i in ids
        ]

    r = runner()
    batch = [
        msg(encode(DocumentSubmitted(document_id="a", content="x")), 0),
        msg(b"not json", 1),
        msg(encode(DocumentSubmitted(document_id="bad", content="x")), 2),
        msg(encode(DocumentSubmitted(document_id="c", content="x")), 3),
    ]
    out = await r.process_batch(DOCUMENTS, batch, handler)
    dead = [o.event for o in out if isinstance(o.event, DeadLettered)]
    indexed = [o.event.document_id for o in out if isinstance(o.event, DocumentIndexed)]
    assert sorted(indexed) == ["a", "c"]
    assert sorted((d.error_kind, d.original_offset) for d in dead) == [
        ("schema_violation", 1),
        ("unreadable_document", 2),
    ]
    assert seen[0] == ["a", "bad", "c"]  # whole batch first, then one by one
    assert r.dead_lettered == 2 and r.processed == 2


async def test_transient_failures_are_retried_then_dead_lettered_as_exhausted() -> None:
    calls = 0

    async def flaky(events: Sequence[Event]) -> Sequence[Event]:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise DependencyUnavailable("triton down", retry_after_s=0.01)
        return []

    r = runner()
    assert await r.process_batch(DOCUMENTS, [msg(encode(DocumentSubmitted(document_id="a")))], flaky) == []
    assert calls == 3

    async def down(events: Sequence[Event]) -> Sequence[Event]:
        raise DependencyUnavailable("triton down", retry_after_s=0.05)

    (dl,) = await r.process_batch(DOCUMENTS, [msg(encode(DocumentSubmitted(document_id="a")))], down)
    assert isinstance(dl.event, DeadLettered) and dl.event.error_kind == "retries_exhausted"


async def test_a_bug_in_a_handler_is_dead_lettered_not_raised() -> None:
    async def buggy(events: Sequence[Event]) -> Sequence[Event]:
        raise ZeroDivisionError("oops")

    (dl,) = await runner().process_batch(DOCUMENTS, [msg(encode(DocumentSubmitted(document_id="a")))], buggy)
    assert dl.topic == DEADLETTER and isinstance(dl.event, DeadLettered)
    assert dl.event.error_kind == "internal_error" and "oops" in dl.event.message


async def test_an_invalid_query_with_a_readable_request_id_gets_an_error_response() -> None:
    async def never(events: Sequence[Event]) -> Sequence[Event]:
        raise AssertionError("invalid queries never reach the handler")

    r = runner(on_dead_letter=invalid_request_response)
    bad = json.dumps({"request_id": "req-1", "tenant": "t", "question": ""}).encode()
    out = await r.process_batch(QUERIES, [msg(bad)], never)
    kinds = [type(o.event) for o in out]
    assert kinds == [DeadLettered, ResponseCompleted]
    response = out[1].event
    assert isinstance(response, ResponseCompleted)
    assert response.request_id == "req-1" and response.status == "error"
    assert response.error_reason and response.error_reason.startswith("invalid_request")
    # garbage: dead-lettered, nobody to answer
    assert [type(o.event) for o in await r.process_batch(QUERIES, [msg(b"\x00")], never)] == [DeadLettered]


# -- embed and index ordering -------------------------------------------------------------------
class FakeEmbedder:
    model_id = "fake"
    dimension = 2

    async def embed(self, texts: Sequence[str]) -> Any:
        return np.array([[float(len(t)), 1.0] for t in texts], dtype=np.float32)


async def test_embed_keeps_order_and_passes_retractions_through() -> None:
    events: list[Event] = [
        ChunkCreated(source_event_id="s", chunk=chunk("d", 0, 2)),
        DocumentRetracted(source_event_id="s2", document_id="e", version=1),
        ChunkCreated(source_event_id="s", chunk=chunk("d", 1, 2)),
    ]
    out = await embed.handle(events, FakeEmbedder())  # type: ignore[arg-type]
    assert [type(o).__name__ for o in out] == ["ChunkEmbedded", "DocumentRetracted", "ChunkEmbedded"]
    assert {embed.STAGE.route(o) for o in out} == {EMBEDDED}  # retractions pass through in order


class FakeStore:
    """Records what the index stage asks of the store, in order."""

    def __init__(self) -> None:
        self.rows: dict[str, Chunk] = {}
        self.calls: list[str] = []

    async def upsert(self, rows: Sequence[tuple[Chunk, Sequence[float]]]) -> None:
        self.calls.append("upsert:" + ",".join(c.chunk_id for c, _ in rows))
        self.rows.update({c.chunk_id: c for c, _ in rows})

    async def count_chunks(self, tenant: str, document_id: str, fingerprint: str | None = None) -> int:
        return sum(
            1 for c in self.rows.values() if c.document_id == document_id and c.fingerprint == fingerprint
        )

    async def delete_document(
        self, tenant: str, document_id: str, *, keep_fingerprint: str | None = None
    ) -> int:
        self.calls.append(f"delete:{document_id}:{keep_fingerprint}")
        gone = [
            k
            for k, c in self.rows.items()
            if c.document_id == document_id and c.fingerprint != keep_fingerprint
        ]
        for k in gone:
            del self.rows[k]
        return len(gone)


async def test_index_swaps_a_version_in_only_when_its_last_chunk_lands_and_applies_deletes_in_order() -> None:
    store = FakeStore()
    old = chunk("d", 0, 1, fp="o" * 16)
    store.rows[old.chunk_id] = old

    def embedded(c: Chunk) -> ChunkEmbedded:
        return ChunkEmbedded(source_event_id="s", chunk=c, vector=(1.0, 0.0), embedding_model="fake")

    out = await index.handle([embedded(chunk("d", 0, 2))], store)  # type: ignore[arg-type]
    assert out == [] and old.chunk_id in store.rows  # half a new version: old one stays
    out = await index.handle(  # type: ignore[arg-type]
        [embedded(chunk("d", 1, 2)), DocumentRetracted(source_event_id="r", document_id="d", version=2)],
        store,
    )
    outcomes = [(o.outcome, o.chunks_removed) for o in out if isinstance(o, DocumentIndexed)]
    assert outcomes == [("indexed", 1), ("deleted", 2)]
    assert store.calls[-2:] == ["delete:d:" + "f" * 16, "delete:d:None"]
    assert store.rows == {}


# -- prompt --------------------------------------------------------------------------------
def words(text: str) -> int:
    return len(text.split())


def retrieved(i: int, n_words: int) -> RetrievedChunk:
    return RetrievedChunk(
        chunk_id=f"c{i}",
        document_id=f"d{i}",
        title=f"T{i}",
        text=" ".join(["w"] * n_words),
        score=1 / (i + 1),
    )


def test_the_prompt_fits_the_window_best_chunks_first_and_cuts_the_last_one() -> None:
    chunks = [retrieved(i, 100) for i in range(5)]
    p = build_prompt("what?", chunks, count_tokens=words, context_window=520, max_new_tokens=100)
    assert [s.chunk_id for s in p.sources] == ["c0", "c1", "c2"]
    assert p.truncated_last_chunk and p.dropped_chunks == 2
    assert p.estimated_tokens <= 520 - 100
    assert [m["role"] for m in p.messages] == ["system", "user", "assistant", "user"], "the worked example"
    assert (
        p.messages[:3]
        == build_prompt("other?", [], count_tokens=words, context_window=520, max_new_tokens=100).messages[:3]
    ), "the system prompt and the example are one shared prefix (KV cache)"
    user = p.messages[-1]["content"]
    assert user.index("[1] T0") < user.index("[2] T1") and user.rstrip().endswith("Answer with citations:")


def test_citations_number_every_source_and_mark_the_cited_ones_first() -> None:
    sources = [retrieved(i, 3) for i in range(3)]
    cites = citations_for("Staff get 27 days [2], see also [9].", sources)
    assert [(c.number, c.cited) for c in cites] == [(2, True), (1, False), (3, False)]


# -- declarations -------------------------------------------------------------------------
def test_every_stage_declares_where_each_of_its_outputs_goes() -> None:
    from ragstream.schemas.events import ChunkCreated, DocumentRetracted
    from ragstream.streams.stage import Batched, Stage
    from ragstream.streams.topics import INDEXED, RETRIEVALS
    from ragstream.workers import ingest
    from ragstream.workers.stages import STAGES

    assert list(STAGES) == ["ingest", "embed", "index", "retrieve", "generate", "judge"]
    # A retraction goes to chunks from ingest, to chunks.embedded from embed: declared, not guessed.
    retracted = DocumentRetracted(source_event_id="e", document_id="a", version=1)
    assert ingest.STAGE.route(retracted) == CHUNKS and embed.STAGE.route(retracted) == EMBEDDED
    assert index.STAGE.route(DeadLettered(stage="s", error_kind="k", message="m", original=b"")) == DEADLETTER
    with pytest.raises(TypeError, match="none of its topics"):
        index.STAGE.route(ChunkCreated(source_event_id="e", chunk=chunk("a", 0, 1)))
    with pytest.raises(TypeError, match="could go to"):
        Stage(
            name="confused",
            consumes=DOCUMENTS,
            produces=(CHUNKS, EMBEDDED),  # both carry DocumentRetracted
            flow=Batched(size=lambda s: 1),
            deps=ingest.open_deps,
            handle=ingest.handle,
        )
    assert {s.name: s.consumes for s in STAGES.values()}["generate"] == RETRIEVALS
    assert INDEXED in ingest.STAGE.produces


async def test_retrieval_retries_a_flaky_embedder_within_the_deadline_then_answers() -> None:
    from ragstream.schemas.queries import ContextRetrieved, QuerySubmitted
    from ragstream.workers import retrieve

    class Flaky:
        model_id = "fake"
        calls = 0

        async def embed(self, texts: Sequence[str]) -> Any:
            Flaky.calls += 1
            if Flaky.calls < 3:
                raise DependencyUnavailable("triton restarting")
            return np.ones((len(texts), 4), dtype=np.float32)

    class Empty:
        async def search(self, query: Any) -> list[Any]:
            return []

    deps = retrieve.RetrievalDeps(embedder=Flaky(), store=Empty())  # type: ignore[arg-type]
    (out,) = await retrieve.handle([QuerySubmitted(question="q?", deadline_ms=5_000)], deps)
    assert isinstance(out, ContextRetrieved) and Flaky.calls == 3

    class Down(Flaky):
        async def embed(self, texts: Sequence[str]) -> Any:
            raise DependencyUnavailable("triton down")

    deps = retrieve.RetrievalDeps(embedder=Down(), store=Empty())  # type: ignore[arg-type]
    (out,) = await retrieve.handle([QuerySubmitted(question="q?", deadline_ms=700)], deps)
    assert isinstance(out, ResponseCompleted) and out.status == "error"
    assert (out.error_reason or "").startswith("retrieval_failed: triton down")


def test_an_over_long_array_is_rejected_before_validation_and_a_big_valid_document_is_not() -> None:
    """pydantic validates every item of an over-long array before its length check: 8 million
    wrong items cost 84 s and 8.9 GB in one worker, which stalled ingestion. They are now
    rejected by size first; a large document full of commas still decodes."""
    from ragstream.streams.codec import MAX_ITEMS

    items = b"0," * (4 * MAX_ITEMS) + b"0"
    with pytest.raises(SchemaViolation, match=r"an array of 80001 items is over the limit"):
        decode(DOCUMENTS, b'{"document_id": "x", "access_groups": [' + items + b"]}")
    with pytest.raises(SchemaViolation, match="not a JSON object"):
        decode(DOCUMENTS, b"[" + b"{}," * MAX_ITEMS + b"{}]")
    csv = DocumentSubmitted(document_id="csv", content="a,b,c\n" * (2 * MAX_ITEMS))
    assert decode(DOCUMENTS, encode(csv)) == csv

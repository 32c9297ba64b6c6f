"""The document path end to end, on the real embedded stack: Tansu broker, Faust workers,
Triton (pytriton, CPU), LanceDB and the Iceberg catalog, all started by `ragstream up`."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from ragstream.infra.chunking import Chunker
from ragstream.infra.embedder import TritonEmbedder
from ragstream.infra.kafka import make_consumer, make_producer
from ragstream.infra.parsing import media_type_for_path, parse_document
from ragstream.infra.vectorstore import open_vector_store
from ragstream.infra.vectorstore.base import SearchQuery, VectorStore
from ragstream.ingest import IngestReport, collect_files, ingest
from ragstream.schemas.events import DocumentSubmitted
from ragstream.streams.codec import encode
from tests.conftest import CORPORA, SAMPLES, Stack

pytestmark = pytest.mark.integration


def expected_chunks(settings: Any, path: Path) -> int:
    parsed = parse_document(path.read_bytes(), media_type_for_path(path) or "", settings=settings.chunking)
    return len(Chunker(settings.chunking.max_tokens, settings.chunking.overlap_tokens).chunk(parsed))


@pytest.fixture
async def store(stack: Stack) -> Any:
    s = open_vector_store(stack.settings)
    await s.start()
    yield s
    await s.close()


@pytest.fixture
async def embedder(stack: Stack) -> Any:
    e = TritonEmbedder(stack.settings)
    await e.start()
    yield e
    await e.close()


async def search(
    store: VectorStore, embedder: Any, q: str, tenant: str, groups: tuple[str, ...], mode: str, k: int = 5
):
    vector = None if mode == "keyword" else tuple(float(x) for x in (await embedder.embed([q]))[0])
    return await store.search(
        SearchQuery(tenant=tenant, access_groups=groups, text=q, vector=vector, top_k=k, mode=mode)  # type: ignore[arg-type]
    )


def doc_id(root: Path, file: Path) -> str:
    return f"{root.name}/{file.relative_to(root).as_posix()}"


async def test_corpus_is_indexed_with_the_chunk_counts_the_chunker_produces(
    stack: Stack, corpus_reports: list[IngestReport], store: VectorStore
) -> None:
    for (root, tenant, _), report in zip(CORPORA, corpus_reports, strict=True):
        files = list(collect_files([root]))
        assert len(report.outcomes) == len(files)
        assert report.ok, [
            (o.document_id, o.status, o.reason) for o in report.outcomes if o.status != "indexed"
        ]
        by_id = {o.document_id: o for o in report.outcomes}
        for path, did in files:
            want = expected_chunks(stack.settings, path)
            assert by_id[did].status == "indexed"
            assert by_id[did].chunk_count == want, did
            assert await store.count_chunks(tenant, did) == want, did


QUERIES = yaml.safe_load((SAMPLES.parent / "queries.yaml").read_text())


@pytest.mark.parametrize("q", QUERIES, ids=[q["query"][:40] for q in QUERIES])
async def test_known_query_finds_the_right_document(
    corpus_reports: list[IngestReport], store: VectorStore, embedder: Any, q: dict[str, Any]
) -> None:
    expected = _doc_id_for_sample(q["expected_file"])
    modes = ["keyword", "hybrid"] if q["kind"] == "keyword" else ["vector", "hybrid"]
    for mode in modes:
        hits = await search(store, embedder, q["query"], q["tenant"], tuple(q.get("groups") or ()), mode)
        top = [h.document_id for h in hits[:3]]
        assert expected in top, f"{mode} search for {q['query']!r} returned {top}"


def _doc_id_for_sample(rel: str) -> str:
    parts = Path(rel).parts  # e.g. larkspur/public/x.md -> public/x.md ; globex/x.md -> globex/x.md
    return "/".join(parts[1:]) if parts[0] == "larkspur" else "/".join(parts)


async def test_restricted_documents_never_reach_other_tenants_or_groups(
    corpus_reports: list[IngestReport], store: VectorStore, embedder: Any
) -> None:
    facts = yaml.safe_load((SAMPLES.parent / "restricted_facts.yaml").read_text())
    for scope in facts:
        outsiders = (
            [("larkspur", ()), ("larkspur", ("engineering",)), ("globex", ("hr",))]
            if scope["tenant"] == "larkspur"
            else [("larkspur", ()), ("larkspur", ("hr",))]
        )
        for term in scope["terms"]:
            for tenant, groups in outsiders:
                for mode in ("keyword", "vector", "hybrid"):
                    hits = await search(store, embedder, term, tenant, groups, mode, k=20)
                    leaked = [h.document_id for h in hits if term.lower() in h.text.lower()]
                    assert not leaked, f"{term!r} leaked to {tenant}/{groups} via {mode}: {leaked}"
                    assert all(h.tenant == tenant for h in hits)
    # and the insiders do see them
    hits = await search(store, embedder, "BLUEHERON", "larkspur", ("hr",), "keyword")
    assert any("BLUEHERON" in h.text for h in hits)


async def test_reingesting_unchanged_documents_creates_no_chunks(
    stack: Stack, corpus_reports: list[IngestReport], store: VectorStore
) -> None:
    root, tenant, groups = CORPORA[0]
    before = {did: await store.count_chunks(tenant, did) for _, did in collect_files([root])}
    report = ingest(stack.settings, [root], tenant=tenant, groups=groups, timeout_s=120)
    assert {o.status for o in report.outcomes} == {"unchanged"}
    assert report.chunks == 0
    after = {did: await store.count_chunks(tenant, did) for _, did in collect_files([root])}
    assert after == before


async def test_a_new_version_replaces_the_old_chunks_and_a_delete_removes_them(
    stack: Stack, corpus_reports: list[IngestReport], store: VectorStore, embedder: Any, tmp_path: Path
) -> None:
    src = SAMPLES / "larkspur" / "public" / "policy-travel.md"
    root = tmp_path / "public"  # same root name, so the same document id as the corpus copy
    root.mkdir()
    doc = root / src.name
    did = doc_id(root, doc)
    old_state = await store.document_state("larkspur", did)
    assert old_state is not None and len(old_state.fingerprints) == 1
    (old_fp,) = old_state.fingerprints

    doc.write_text(
        src.read_text()
        + "\n\n## Zeppelin travel\n\nTravel by airship requires the ZEPPELIN-77 approval form.\n"
    )
    report = ingest(stack.settings, [root], tenant="larkspur", timeout_s=120)
    assert [o.status for o in report.outcomes] == ["indexed"]
    new_state = await store.document_state("larkspur", did)
    assert new_state is not None and list(new_state.fingerprints) != [old_fp]
    assert len(new_state.fingerprints) == 1, "old version's chunks must be gone"
    assert await store.count_chunks("larkspur", did) == report.outcomes[0].chunk_count
    hits = await search(store, embedder, "ZEPPELIN-77", "larkspur", (), "keyword")
    assert hits and hits[0].document_id == did

    report = ingest(stack.settings, [], tenant="larkspur", delete_ids=[did], timeout_s=120)
    assert [o.status for o in report.outcomes] == ["deleted"]
    assert await store.count_chunks("larkspur", did) == 0
    hits = await search(store, embedder, "ZEPPELIN-77", "larkspur", (), "keyword", k=20)
    assert all(h.document_id != did for h in hits)


async def test_bad_files_are_dead_lettered_with_reasons_and_reported(stack: Stack, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.md").write_text("   \n\n  ")
    (bad / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf\x00\x01")
    (bad / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(256))
    (bad / "huge.txt").write_text("word " * (stack.settings.chunking.max_document_bytes // 5 + 10))
    (bad / "fine.md").write_text("# Fine\n\nThis one is fine and mentions the FINE-123 code.")
    missing = tmp_path / "does-not-exist.txt"
    report = ingest(stack.settings, [bad, missing], tenant="larkspur", timeout_s=120)
    status = {o.document_id: (o.status, o.reason) for o in report.outcomes}
    assert status["bad/fine.md"][0] == "indexed"
    expected_kinds = {
        "bad/empty.md": "empty_document",
        "bad/broken.pdf": "unreadable_document",
        "bad/picture.png": "unsupported_media_type",
        "bad/huge.txt": "document_too_large",
        "does-not-exist.txt": "unreadable_document",
    }
    for did, kind in expected_kinds.items():
        st, reason = status[did]
        assert st == "dead_lettered" and reason.startswith(kind), (did, st, reason)


def read_deadletters(stack: Stack) -> list[dict[str, Any]]:
    from kafka import TopicPartition

    topic = f"{stack.settings.kafka.topic_prefix}.deadletter"
    consumer = make_consumer(
        stack.settings, group_id=None, auto_offset_reset="earliest", consumer_timeout_ms=1500
    )
    try:
        consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)])
        return [json.loads(r.value) for r in consumer]
    finally:
        consumer.close()


def worker_pids(stack: Stack) -> dict[str, int]:
    state = json.loads((stack.settings.run_dir / "stack.json").read_text())
    return {
        k: v["pid"] for k, v in state["components"].items() if k.startswith("worker-") or k == "audit-sink"
    }


async def test_garbage_and_wrong_schema_on_every_topic_are_dead_lettered_and_workers_stay_up(
    stack: Stack, corpus_reports: list[IngestReport], tmp_path: Path
) -> None:
    pids = worker_pids(stack)
    prefix = stack.settings.kafka.topic_prefix
    producer = make_producer(stack.settings)
    marks = {}
    for topic in ("documents", "chunks", "chunks.embedded"):
        marker = f"garbage-{topic}-{time.time_ns()}"
        producer.send(f"{prefix}.{topic}", key=marker.encode(), value=b"\x00\xff not json " + marker.encode())
        wrong = {"event_id": f"wrong-{topic}", "document_id": 42, "surprise": True}
        producer.send(f"{prefix}.{topic}", key=f"wrong-{topic}".encode(), value=json.dumps(wrong).encode())
        marks[topic] = marker
    # a valid event under an unknown schema version, e.g. from a newer producer
    future = json.loads(encode(DocumentSubmitted(document_id="future", content="x")))
    future["schema_version"] = 99
    producer.send(f"{prefix}.documents", key=b"future", value=json.dumps(future).encode())
    producer.flush()
    producer.close()

    deadline = time.monotonic() + 60
    found: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline and len(found) < 7:
        for d in read_deadletters(stack):
            if d["original_key"] in set(marks.values()) | {f"wrong-{t}" for t in marks} | {"future"}:
                found[d["original_key"]] = d
    assert len(found) == 7, sorted(found)
    for topic, marker in marks.items():
        g = found[marker]
        assert g["error_kind"] == "schema_violation" and "not a JSON object" in g["message"]
        assert g["original_topic"] == f"{prefix}.{topic}"
        import base64

        assert base64.b64decode(g["original"]).endswith(marker.encode())
        w = found[f"wrong-{topic}"]
        assert w["error_kind"] == "schema_violation" and w["source_event_id"] == f"wrong-{topic}"
    assert "schema_version" in found["future"]["message"]

    # Same processes, still consuming: a good document still gets indexed.
    assert worker_pids(stack) == pids
    good = tmp_path / "after-garbage"
    good.mkdir()
    (good / "ok.md").write_text("# Still working\n\nThe workers survived the garbage.")
    report = ingest(stack.settings, [good], tenant="larkspur", timeout_s=120)
    assert [o.status for o in report.outcomes] == ["indexed"]


def test_status_reports_every_component_healthy(stack: Stack) -> None:
    rows = json.loads(stack.cli("status", "--json").stdout)
    assert {r["component"] for r in rows} >= {
        "broker",
        "triton",
        "worker-ingest",
        "worker-embed",
        "worker-index",
        "vector-store",
        "iceberg-catalog",
    }
    assert all(r["healthy"] for r in rows), rows


def test_a_killed_worker_is_restarted_and_says_why(stack: Stack, tmp_path: Path) -> None:
    process = next(name for name in worker_pids(stack) if "index" in name)
    pid = worker_pids(stack)[process]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        rows = {r["component"]: r for r in json.loads(stack.cli("status", "--json", check=False).stdout)}
        w = rows["worker-index"]
        if w["pid"] != pid and w["healthy"]:
            break
        time.sleep(1)
    assert w["pid"] != pid and w["healthy"], w
    assert w["restarts"] >= 1 and "SIGKILL" in (w["last_exit"] or "")
    log = (stack.settings.data_dir / "logs" / "supervisor.log").read_text()
    assert f"{process} exited with signal SIGKILL; restarting" in log
    again = tmp_path / "after-restart"
    again.mkdir()
    (again / "ok.md").write_text("# After restart\n\nIndexed by the restarted worker.")
    report = ingest(stack.settings, [again], tenant="larkspur", timeout_s=120)
    assert [o.status for o in report.outcomes] == ["indexed"]


def test_stack_created_the_iceberg_catalog_and_lancedb_under_the_data_dir(stack: Stack) -> None:
    from ragstream.infra.iceberg import open_catalog

    assert (stack.settings.data_dir / "iceberg" / "catalog.db").is_file()
    assert (stack.settings.iceberg.namespace,) in open_catalog(stack.settings).list_namespaces()
    assert Path(stack.settings.lancedb_uri).is_dir()

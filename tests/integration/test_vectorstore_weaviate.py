"""The Weaviate store against a real server; the same behaviours as the LanceDB tests.

Runs only when settings name a server: `RAGSTREAM_WEAVIATE_URL=http://localhost:8080` (or the long form `RAGSTREAM_VECTOR_STORE__WEAVIATE_URL`)
(plus `..._WEAVIATE_GRPC_PORT` / `..._WEAVIATE_API_KEY` if not the defaults), e.g. against
`docker run -p 8080:8080 -p 50051:50051 cr.weaviate.io/semitechnologies/weaviate:1.32.0`.
Each test uses its own collection and drops it afterwards.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from ragstream.infra.settings import Settings
from ragstream.infra.vectorstore import SearchHit, SearchQuery, VectorStore, open_vector_store
from ragstream.schemas.events import Chunk


def _server_settings() -> Settings:
    return Settings()


pytestmark = [
    pytest.mark.integration,
    pytest.mark.weaviate,
    pytest.mark.skipif(
        not _server_settings().vector_store.weaviate_url,
        reason="no Weaviate server: set RAGSTREAM_WEAVIATE_URL (e.g. http://localhost:8080)",
    ),
]

DIM = 384


def embed(text: str) -> list[float]:
    """A hashing bag-of-words embedding: texts sharing words get close vectors."""
    v = np.zeros(DIM, dtype=np.float64)
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        v += np.random.default_rng(seed).normal(size=DIM)
    norm = np.linalg.norm(v)
    return [float(x) for x in (v / norm if norm else v)]


def random_vector(seed: int) -> list[float]:
    v = np.random.default_rng(seed).normal(size=DIM)
    return [float(x) for x in v / np.linalg.norm(v)]


def chunks(
    document_id: str,
    texts: Sequence[str],
    *,
    tenant: str = "acme",
    fingerprint: str = "fp-000001",
    version: int = 1,
    groups: tuple[str, ...] = (),
    metadata: dict[str, str | int | float | bool] | None = None,
) -> list[Chunk]:
    return [
        Chunk(
            chunk_id=f"{document_id}:{fingerprint}:{i}",
            document_id=document_id,
            tenant=tenant,
            fingerprint=fingerprint,
            version=version,
            chunk_index=i,
            chunk_count=len(texts),
            text=text,
            char_start=0,
            char_end=len(text),
            token_count=max(1, len(text.split())),
            source=f"https://docs.example/{document_id}",
            metadata=metadata or {},
            access_groups=groups,
        )
        for i, text in enumerate(texts)
    ]


def embedded(items: Sequence[Chunk]) -> list[tuple[Chunk, list[float]]]:
    return [(c, embed(c.text)) for c in items]


def q(
    text: str,
    *,
    mode: str = "hybrid",
    tenant: str = "acme",
    vector: tuple[float, ...] | None = None,
    **kw: object,
) -> SearchQuery:
    if vector is None and mode != "keyword":
        vector = tuple(embed(text))
    return SearchQuery.model_validate({"tenant": tenant, "text": text, "vector": vector, "mode": mode, **kw})


def doc_ids(hits: Sequence[SearchHit]) -> list[str]:
    return [h.document_id for h in hits]


def settings_for(tmp_path: Path, collection: str) -> Settings:
    base = _server_settings().vector_store
    return Settings(
        data_dir=tmp_path,
        vector_store=base.model_copy(update={"kind": "weaviate", "weaviate_collection": collection}),
    )


@pytest.fixture
def collection() -> str:
    return f"RagstreamTest{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def store(tmp_path: Path, collection: str) -> AsyncIterator[VectorStore]:
    from ragstream.infra.vectorstore.weaviate import WeaviateVectorStore

    s = open_vector_store(settings_for(tmp_path, collection))
    assert isinstance(s, WeaviateVectorStore)
    await s.start()
    try:
        yield s
    finally:
        await s.drop_collection()
        await s.close()


CORPUS = {
    "pasta": ["How to cook spaghetti carbonara with eggs, guanciale and pecorino cheese."],
    "kafka": ["Kafka consumer groups rebalance partitions when a member joins or leaves."],
    "garden": ["Prune tomato plants in early summer and water the roots every morning."],
    "tax": ["File the quarterly VAT return before the deadline to avoid penalties."],
}
SECRET = "Merger codename BLUEHERON closes on March 3 at 41 dollars per share."


async def load_corpus(store: VectorStore) -> None:
    await store.upsert([pair for doc, texts in CORPUS.items() for pair in embedded(chunks(doc, texts))])


async def test_upsert_is_idempotent_by_chunk_id(store: VectorStore) -> None:
    rows = embedded(chunks("manual", ["alpha part", "beta part", "gamma part"]))
    await store.upsert(rows)
    await store.upsert(rows)
    await store.upsert(rows[1:2])
    assert await store.count_chunks("acme", "manual") == 3
    hits = await store.search(q("part", mode="keyword", top_k=10))
    assert sorted(h.chunk_id for h in hits) == sorted(c.chunk_id for c, _ in rows)


async def test_new_version_replaces_old_after_delete_keep_fingerprint(store: VectorStore) -> None:
    await store.upsert(
        embedded(chunks("policy", ["old refund rule: 14 days", "old shipping rule"], fingerprint="fp-old-1"))
    )
    await store.upsert(
        embedded(chunks("policy", ["new refund rule: 30 days"], fingerprint="fp-new-2", version=2))
    )

    state = await store.document_state("acme", "policy")
    assert state is not None
    assert set(state.fingerprints) == {"fp-old-1", "fp-new-2"}
    assert state.is_complete("fp-new-2") and state.version == 2
    assert state.fingerprints["fp-old-1"].chunks_stored == 2

    assert await store.delete_document("acme", "policy", keep_fingerprint="fp-new-2") == 2
    assert await store.count_chunks("acme", "policy") == 1
    hits = await store.search(q("refund rule days", top_k=5))
    assert [h.text for h in hits] == ["new refund rule: 30 days"]


async def test_delete_document_removes_it_from_search(store: VectorStore) -> None:
    await load_corpus(store)
    assert await store.delete_document("acme", "kafka") == 1
    assert await store.delete_document("acme", "kafka") == 0
    assert await store.document_state("acme", "kafka") is None
    hits = await store.search(q("kafka consumer groups rebalance", top_k=10))
    assert "kafka" not in doc_ids(hits) and doc_ids(hits)


@pytest.mark.parametrize("mode", ["hybrid", "vector", "keyword"])
async def test_each_mode_finds_the_right_document(store: VectorStore, mode: str) -> None:
    await load_corpus(store)
    hits = await store.search(q("tomato plants water roots", mode=mode, top_k=2))
    assert hits[0].document_id == "garden"
    assert hits[0].source == "https://docs.example/garden"


async def test_product_code_found_by_keyword_though_vector_is_random(store: VectorStore) -> None:
    await load_corpus(store)
    (code_chunk,) = chunks("spec", ["Replacement filter LX-4471 fits the 2019 model."])
    await store.upsert([(code_chunk, random_vector(7))])
    noise = chunks("noise", [f"filler {i}" for i in range(20)])
    await store.upsert([(c, random_vector(100 + i)) for i, c in enumerate(noise)])

    keyword = await store.search(q("LX-4471", mode="keyword", top_k=3))
    hybrid = await store.search(q("LX-4471", vector=tuple(random_vector(8)), alpha=0.5, top_k=3))

    assert keyword[0].chunk_id == code_chunk.chunk_id
    assert code_chunk.chunk_id in [h.chunk_id for h in hybrid]


@pytest.mark.parametrize("mode", ["hybrid", "vector", "keyword"])
async def test_other_tenant_is_invisible_even_to_an_exact_query(store: VectorStore, mode: str) -> None:
    await store.upsert(embedded(chunks("secret", [SECRET] * 30, tenant="globex.corp:eu")))
    await store.upsert(embedded(chunks("mine", ["Quarterly merger review checklist."], tenant="acme")))

    hits = await store.search(q(SECRET, mode=mode, tenant="acme", top_k=1))

    assert doc_ids(hits) == ["mine"] and hits[0].tenant == "acme"
    assert await store.count_chunks("acme", "secret") == 0
    assert await store.neighbours("acme", "secret", 0, 5, ()) == []
    assert await store.delete_document("acme", "secret") == 0
    assert await store.count_chunks("globex.corp:eu", "secret") == 30
    assert await store.search(q(SECRET, mode=mode, tenant="nobody-yet")) == []


@pytest.mark.parametrize("mode", ["hybrid", "vector", "keyword"])
async def test_access_groups_filter_inside_the_search(store: VectorStore, mode: str) -> None:
    await store.upsert(embedded(chunks("board", [SECRET] * 30, groups=("board", "legal"))))
    await store.upsert(embedded(chunks("handbook", ["Merger FAQ for all staff."])))

    outsider = await store.search(q(SECRET, mode=mode, access_groups=("staff",), top_k=1))
    nobody = await store.search(q(SECRET, mode=mode, top_k=1))
    member = await store.search(q(SECRET, mode=mode, access_groups=("staff", "legal"), top_k=3))

    assert doc_ids(outsider) == ["handbook"]
    assert doc_ids(nobody) == ["handbook"]
    assert doc_ids(member) == ["board"] * 3


async def test_metadata_filters_and_document_ids(store: VectorStore) -> None:
    await store.upsert(
        embedded(chunks("en-guide", ["setup guide for routers"], metadata={"lang": "en", "year": 2024}))
    )
    await store.upsert(
        embedded(chunks("de-guide", ["setup guide for routers"], metadata={"lang": "de", "year": 2024.0}))
    )

    assert doc_ids(await store.search(q("setup guide", metadata_filters={"lang": "de"}))) == ["de-guide"]
    assert sorted(doc_ids(await store.search(q("setup guide", metadata_filters={"year": 2024})))) == [
        "de-guide",
        "en-guide",
    ]
    assert await store.search(q("setup guide", metadata_filters={"year": "2024"})) == []
    assert doc_ids(await store.search(q("setup guide", document_ids=("en-guide",)))) == ["en-guide"]
    hit = (await store.search(q("setup guide", document_ids=("en-guide",))))[0]
    assert hit.metadata == {"lang": "en", "year": 2024}


async def test_neighbours_in_order_and_filtered(store: VectorStore) -> None:
    await store.upsert(embedded(chunks("book", [f"section {i}" for i in range(6)])))
    await store.upsert(embedded(chunks("locked", [f"section {i}" for i in range(6)], groups=("hr",))))

    around = await store.neighbours("acme", "book", 2, 1, (), fingerprint="fp-000001")
    assert [h.text for h in around] == ["section 1", "section 2", "section 3"]
    assert await store.neighbours("acme", "locked", 2, 1, ("sales",)) == []
    assert len(await store.neighbours("acme", "locked", 2, 1, ("hr",))) == 3


async def test_second_client_sees_new_rows(tmp_path: Path, collection: str, store: VectorStore) -> None:
    reader = open_vector_store(settings_for(tmp_path, collection))
    await reader.start()
    try:
        await store.upsert(embedded(chunks("late", ["Late breaking xylophone news"])))
        assert await reader.count_chunks("acme", "late") == 1
        assert doc_ids(await reader.search(q("xylophone", mode="keyword"))) == ["late"]
    finally:
        await reader.close()

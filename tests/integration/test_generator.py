"""The streaming generator on the real local Triton server (SmolLM2 in xllamacpp)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from ragstream.infra.generator import (
    SMOLLM2_MODEL,
    GenerationDelta,
    GeneratorTokenizer,
    TritonGenerator,
)
from ragstream.infra.model_server import (
    start_model_server_process,
    stop_model_server_process,
    wait_model_server_ready,
)
from ragstream.infra.settings import GenerationSettings, Settings, TritonSettings
from ragstream.schemas.errors import BadInputError, UnknownRoute
from ragstream.stack import free_ports

pytestmark = pytest.mark.integration

QUESTION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name three colours of the rainbow."},
]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    http_port, grpc_port, metrics_port = free_ports(3)
    return Settings(
        data_dir=tmp_path_factory.mktemp("generator-data"),
        triton=TritonSettings(
            embedded_http_port=http_port,
            embedded_grpc_port=grpc_port,
            embedded_metrics_port=metrics_port,
            cpu_threads=1,
        ),
        # A second route to the same model: routes map names to Triton models.
        # One server with every model ("all"), so the generator is on the same port.
        generation=GenerationSettings(
            routes={"default": SMOLLM2_MODEL, "small": SMOLLM2_MODEL}, triton_url=f"127.0.0.1:{grpc_port}"
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
async def generator(settings: Settings, server: subprocess.Popen[bytes]) -> AsyncIterator[TritonGenerator]:
    async with TritonGenerator(settings) as gen:
        yield gen


@pytest.fixture(scope="module")
def tokenizer() -> GeneratorTokenizer:
    return GeneratorTokenizer().load()


async def _drain(deltas: AsyncIterator[GenerationDelta]) -> list[GenerationDelta]:
    return [delta async for delta in deltas]


async def test_stream_matches_generate_and_reports_usage(
    generator: TritonGenerator, tokenizer: GeneratorTokenizer
) -> None:
    deltas = await _drain(
        generator.stream("default", QUESTION, max_tokens=24, temperature=0.0, timeout_s=30.0)
    )
    answer, final = await generator.generate(
        "small", QUESTION, max_tokens=24, temperature=0.0, timeout_s=30.0
    )

    assert len(deltas) > 3  # streamed piece by piece, not in one response
    assert [d.final for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert "".join(d.text for d in deltas) == answer  # temperature 0 is deterministic
    assert answer.strip()
    assert final.finish_reason in ("stop", "length")
    assert 0 < final.completion_tokens <= 24
    assert final.prompt_tokens == tokenizer.count_chat(QUESTION)


async def test_length_limit_ends_with_length(generator: TritonGenerator) -> None:
    _, final = await generator.generate(
        "default", "Write a long story about a dragon.", max_tokens=8, temperature=0.0, timeout_s=30.0
    )
    assert (final.finish_reason, final.completion_tokens) == ("length", 8)


async def test_two_concurrent_streams_both_complete(generator: TritonGenerator) -> None:
    prompts = ["Tell me about the sea.", "Tell me about mountains."]
    results = await asyncio.gather(
        *(generator.generate("default", p, max_tokens=16, temperature=0.7, timeout_s=60.0) for p in prompts)
    )
    for answer, final in results:
        assert answer.strip()
        assert final.finish_reason in ("stop", "length")


async def test_cancelled_stream_frees_the_server(generator: TritonGenerator) -> None:
    # Fill both slots with long answers, read a little of each, and walk away.
    streams = [
        generator.stream(
            "default",
            f"Write a very long story number {i}.",
            max_tokens=1000,
            temperature=0.0,
            timeout_s=120.0,
        )
        for i in range(2)
    ]
    for deltas in streams:
        async for _ in deltas:
            break
        await deltas.aclose()

    # Were the slots still busy, this would wait for ~1000 tokens (tens of seconds).
    started = time.monotonic()
    answer, final = await generator.generate(
        "default", "Say hello.", max_tokens=8, temperature=0.0, timeout_s=30.0
    )
    assert answer
    assert time.monotonic() - started < 5.0


async def test_deadline_cancels_the_stream(generator: TritonGenerator) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await generator.generate(
                "default", "Write a very long story.", max_tokens=1000, temperature=0.0, timeout_s=60.0
            )
    started = time.monotonic()
    await generator.generate("default", "Say hello.", max_tokens=8, temperature=0.0, timeout_s=30.0)
    assert time.monotonic() - started < 5.0


async def test_unknown_route_is_rejected(generator: TritonGenerator) -> None:
    with pytest.raises(UnknownRoute):
        await generator.generate("no-such-route", "Hi", max_tokens=4, temperature=0.0, timeout_s=5.0)


async def test_prompt_longer_than_the_window_is_bad_input(generator: TritonGenerator) -> None:
    with pytest.raises(BadInputError):
        await generator.generate("default", "word " * 3000, max_tokens=4, temperature=0.0, timeout_s=30.0)

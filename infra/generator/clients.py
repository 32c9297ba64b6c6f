"""The two generators: `TritonGenerator` (the pipeline's path) and `InProcessGenerator`
(benchmarks and tests: the same engine, in this process), and the routes they resolve."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

from ragstream.infra import telemetry
from ragstream.infra.generator import wire
from ragstream.infra.generator.engine import LlamaEngine
from ragstream.infra.generator.interface import GenerationDelta
from ragstream.infra.generator.wire import ChatMessage, Utf8DeltaDecoder, normalize_messages
from ragstream.infra.settings import GenerationSettings, Settings
from ragstream.infra.triton import TritonClient
from ragstream.schemas.errors import (
    BadInputError,
    DeadlineExceeded,
    DependencyUnavailable,
    GenerationTimeout,
    UnknownRoute,
)

__all__ = ["InProcessGenerator", "TritonGenerator", "resolve_route"]

logger = logging.getLogger(__name__)


def resolve_route(settings: GenerationSettings, route_or_model: str) -> str:
    """The Triton model for a route name; a model name that some route targets passes as is.

    Raises:
        UnknownRoute: neither a route nor a routed model.
    """
    if route_or_model in settings.routes:
        return settings.routes[route_or_model]
    if route_or_model in settings.routes.values():
        return route_or_model
    raise UnknownRoute(
        f"unknown generation route {route_or_model!r}; known routes: {sorted(settings.routes)}"
    )


async def _collect(deltas: AsyncGenerator[GenerationDelta, None]) -> tuple[str, GenerationDelta]:
    parts: list[str] = []
    last: GenerationDelta | None = None
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            parts.append(delta.text)
            last = delta
    if last is None or not last.final:
        raise DependencyUnavailable("the generator stream ended without a final response")
    return "".join(parts), last


class TritonGenerator:
    """Streams answers from a decoupled generator model on Triton (the contract is in `wire`)."""

    def __init__(self, settings: Settings) -> None:
        self._client = TritonClient(settings, url=settings.generation_grpc_url)
        self._settings = settings.generation
        self._background: set[asyncio.Task[None]] = set()

    @property
    def client(self) -> TritonClient:
        return self._client

    async def start(self) -> None:
        """Open the channel to Triton.

        Raises:
            DependencyUnavailable: the client cannot be created.
        """
        await self._client.start()

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._client.close()

    async def __aenter__(self) -> TritonGenerator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def stream(
        self,
        route_or_model: str,
        messages_or_prompt: str | Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        timeout_s: float,
        json_schema: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ) -> AsyncGenerator[GenerationDelta, None]:
        """Stream the answer: text deltas, then one final delta with finish reason and counts.

        Stopping early (aclose, task cancellation) or passing `timeout_s` cancels the gRPC
        stream and tells the server to stop generating.

        Raises:
            UnknownRoute: the route is not in `generation.routes`.
            BadInputError: the server rejected the chat (e.g. longer than the context).
            GenerationTimeout: not finished within `timeout_s`.
            DependencyUnavailable: Triton failed or the stream broke off.
        """
        model = resolve_route(self._settings, route_or_model)
        messages = normalize_messages(messages_or_prompt)
        stream_id = uuid.uuid4().hex
        inputs = wire.request_arrays(
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            stream_id=stream_id,
            timeout_s=timeout_s,
            json_schema=json_schema,
            seed=seed,
        )
        decoder = Utf8DeltaDecoder()
        finished = False
        started = time.perf_counter()
        outcome = "cancelled"  # left before the end (a blocked window, the caller's deadline)
        span = telemetry.start_child_span("triton.generate", model=model, stream_id=stream_id)
        responses = self._client.stream_infer(model, inputs, request_id=stream_id, timeout_s=timeout_s)
        try:
            async with contextlib.aclosing(responses):
                async for outputs, final in responses:
                    if outputs:
                        response = wire.parse_response(outputs)
                        text = decoder.feed(response.token)
                        finish_reason = response.finish_reason
                        if finish_reason == wire.DEADLINE:
                            finished = True
                            raise GenerationTimeout(f"{model} did not finish within {timeout_s} s")
                        if finish_reason == wire.INVALID_REQUEST:
                            finished = True
                            raise BadInputError(f"{model} rejected the request: {text}")
                        if finish_reason == wire.FAILED:
                            finished = True
                            raise DependencyUnavailable(f"{model} failed: {text}")
                        if finish_reason:
                            finished = True
                            outcome = "ok"
                            yield GenerationDelta(
                                text=text + decoder.flush(),
                                final=True,
                                finish_reason=finish_reason,
                                prompt_tokens=response.prompt_tokens,
                                completion_tokens=response.completion_tokens,
                            )
                        elif text:
                            yield GenerationDelta(text=text)
                    if final:
                        break
        except GenerationTimeout:
            outcome = "timeout"
            raise
        except DeadlineExceeded as exc:
            outcome = "timeout"
            raise GenerationTimeout(f"{model} did not finish within {timeout_s} s") from exc
        except (BadInputError, DependencyUnavailable):
            outcome = "error"
            raise
        finally:
            if not finished:
                self._send_cancel(model, stream_id)
            telemetry.TRITON_REQUEST_SECONDS.labels(model, outcome).observe(time.perf_counter() - started)
            if span is not None:
                span.set_attribute("outcome", outcome)
                span.end()
        if not finished:
            raise DependencyUnavailable(f"the stream from {model} ended without a finish reason")

    def _send_cancel(self, model: str, stream_id: str) -> None:
        """Tell the server to stop a stream we no longer read; best effort, in the background."""

        async def cancel() -> None:
            inputs = wire.cancel_arrays(stream_id)
            try:
                async with contextlib.aclosing(
                    self._client.stream_infer(model, inputs, request_id=f"{stream_id}-cancel", timeout_s=5.0)
                ) as responses:
                    async for _ in responses:
                        pass
            except DependencyUnavailable as exc:
                logger.warning("could not cancel stream %s on %s: %s", stream_id, model, exc)

        task = asyncio.get_running_loop().create_task(cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def generate(
        self,
        route_or_model: str,
        messages_or_prompt: str | Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        timeout_s: float,
    ) -> tuple[str, GenerationDelta]:
        """The whole answer and its final delta (finish reason, token counts).

        Raises:
            UnknownRoute, BadInputError, GenerationTimeout, DependencyUnavailable: as `stream`.
        """
        return await _collect(
            self.stream(
                route_or_model,
                messages_or_prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                timeout_s=timeout_s,
            )
        )


class InProcessGenerator:
    """Runs SmolLM2 in this process: the baseline for Triton streaming's overhead, and for tests.

    Every route that `generation.routes` knows runs the one local model.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings.generation
        self._engine: LlamaEngine | None = None

    @property
    def engine(self) -> LlamaEngine | None:
        return self._engine

    async def start(self) -> None:
        """Load the model (about 3 s; runs in a worker thread).

        Raises:
            StartupError: the model cannot be loaded.
        """
        if self._engine is None:
            self._engine = await asyncio.to_thread(LlamaEngine.load, self._settings)

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.close)

    async def stream(
        self,
        route_or_model: str,
        messages_or_prompt: str | Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        timeout_s: float,
        json_schema: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ) -> AsyncGenerator[GenerationDelta, None]:
        """As `TritonGenerator.stream`, computed in this process.

        Raises:
            UnknownRoute: the route is not in `generation.routes`.
            BadInputError: the chat is invalid or longer than the context.
            GenerationTimeout: not finished within `timeout_s`.
        """
        resolve_route(self._settings, route_or_model)
        if self._engine is None:
            raise RuntimeError("InProcessGenerator.start() was not awaited")
        messages = normalize_messages(messages_or_prompt)
        deltas = self._engine.stream(
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            timeout_s=timeout_s,
            json_schema=json_schema,
            seed=seed,
        )
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                if delta.final and delta.finish_reason == wire.DEADLINE:
                    raise GenerationTimeout(f"the answer did not finish within {timeout_s} s")
                yield delta

    async def generate(
        self,
        route_or_model: str,
        messages_or_prompt: str | Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        timeout_s: float,
    ) -> tuple[str, GenerationDelta]:
        """The whole answer and its final delta.

        Raises:
            UnknownRoute, BadInputError, GenerationTimeout: as `stream`.
        """
        return await _collect(
            self.stream(
                route_or_model,
                messages_or_prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                timeout_s=timeout_s,
            )
        )

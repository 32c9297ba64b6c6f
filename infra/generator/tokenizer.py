"""Token counts of the served SmolLM2, computed without loading its weights."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ragstream.infra.generator.gguf_file import read_gguf_metadata, smollm2_gguf_path
from ragstream.infra.generator.wire import ChatMessage, normalize_messages
from ragstream.infra.settings import Settings
from ragstream.schemas.errors import StartupError

__all__ = ["GeneratorTokenizer"]

_CONTROL_TOKEN, _USER_DEFINED_TOKEN = 3, 4


class GeneratorTokenizer:
    """Counts tokens exactly as the served SmolLM2 does, without loading its weights.

    Built from the vocab, merges and chat template embedded in the GGUF: a byte-level BPE with
    llama.cpp's `smollm` pre-tokenizer (single digits, then the GPT-2 split); ids equal
    llama.cpp's own. About 30 MiB and 0.17 s to load (on `load()` or the first count); 10 us for a short text, ~1 us
    per token for long ones. Only the gpt2/smollm tokenizer is supported: other routes' models
    need their own counter. `settings` is accepted so it is built like the other adapters; the
    packaged GGUF is the only source today.
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

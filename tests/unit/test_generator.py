"""Generator helpers: UTF-8 safe deltas, routes, and token counts equal to the model's own."""

from __future__ import annotations

import json
import random
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from ragstream.infra.generator import (
    SMOLLM2_MODEL,
    GeneratorTokenizer,
    Utf8DeltaDecoder,
    normalize_messages,
    read_gguf_metadata,
    resolve_route,
    smollm2_gguf_path,
)
from ragstream.infra.settings import GenerationSettings
from ragstream.schemas.errors import BadInputError, UnknownRoute

TEXT = "Ünïcödé — emoji 🚀👩‍👩‍👧 and 中文字符, naïve café."


def test_deltas_split_at_any_byte_never_break_a_character() -> None:
    data = TEXT.encode("utf-8")
    for cut in range(1, len(data)):
        decoder = Utf8DeltaDecoder()
        pieces = [decoder.feed(data[:cut]), decoder.feed(data[cut:]), decoder.flush()]
        assert "".join(pieces) == TEXT
        assert all("\ufffd" not in piece for piece in pieces)


def test_byte_by_byte_deltas_rebuild_the_text() -> None:
    decoder = Utf8DeltaDecoder()
    pieces = [decoder.feed(bytes([b])) for b in TEXT.encode("utf-8")]
    assert "".join(pieces) + decoder.flush() == TEXT


def test_a_stream_cut_inside_a_character_ends_with_a_replacement_char() -> None:
    decoder = Utf8DeltaDecoder()
    assert decoder.feed("ok 🚀".encode()[:-1]) == "ok "
    assert decoder.flush() == "\ufffd"


def test_routes_resolve_to_models() -> None:
    settings = GenerationSettings(routes={"default": SMOLLM2_MODEL, "fast": "llm-other"})
    assert resolve_route(settings, "default") == SMOLLM2_MODEL
    assert resolve_route(settings, "llm-other") == "llm-other"  # a routed model name passes
    with pytest.raises(UnknownRoute):
        resolve_route(settings, "gpt-5")


def test_default_route_must_exist() -> None:
    with pytest.raises(ValueError, match="default_route"):
        GenerationSettings(routes={"a": SMOLLM2_MODEL}, default_route="b")


def test_messages_are_validated() -> None:
    assert normalize_messages("hi") == [{"role": "user", "content": "hi"}]
    with pytest.raises(BadInputError):
        normalize_messages([])
    with pytest.raises(BadInputError):
        normalize_messages([{"role": "tool", "content": "x"}])


def test_gguf_header_gives_the_trained_context() -> None:
    meta = read_gguf_metadata(smollm2_gguf_path())
    assert meta["llama.context_length"] == 8192
    assert len(meta["tokenizer.ggml.tokens"]) == meta["llama.vocab_size"]


# --- the tokenizer against the model's own (llama.cpp in xllamacpp, vocab and template) ----
@pytest.fixture(scope="module")
def tokenizer() -> GeneratorTokenizer:
    return GeneratorTokenizer().load()


@pytest.fixture(scope="module")
def llama_url() -> Iterator[str]:
    """llama.cpp's own HTTP API (tokenize, apply-template) on the packaged model."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(smollm2_gguf_path())
    params.n_ctx = 512
    params.warmup = False
    params.cpuparams.n_threads = 1
    params.verbosity = -1
    server = xllamacpp.Server(params)
    yield str(server.listening_address)
    del server


def _post(url: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _texts() -> list[str]:
    rnd = random.Random(7)
    alphabet = "abc XYZ 0123456789 .,;:!?'\"\n\t-_()[]{}é中🚀<>|/\\$%"
    texts = [
        TEXT,
        "The year 2024 had 366 days; pi is 3.14159 and 1,234,567 > 99.",
        "  leading spaces\n\n\ttabs\r\nand CRLF  ",
        "don't it's we'll I'M YOU'RE they'd",
        "<|im_start|>user\nspecial tokens inside text<|im_end|>\n",
        "x = [i**2 for i in range(10)]  # comprehension",
        "Ελληνικά, русский текст, العربية, עברית, 한국어, 日本語",
        "",
    ]
    texts += ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 120))) for _ in range(150)]
    return texts


def test_token_ids_equal_the_models_own(tokenizer: GeneratorTokenizer, llama_url: str) -> None:
    for text in _texts():
        expected = _post(
            llama_url, "/tokenize", {"content": text, "add_special": False, "parse_special": True}
        )
        assert tokenizer.encode(text) == expected["tokens"], text


def test_chat_prompt_equals_the_models_template(tokenizer: GeneratorTokenizer, llama_url: str) -> None:
    chats: list[list[dict[str, str]]] = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name 3 colours 🚀"}],
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
    ]
    for chat in chats:
        prompt = _post(llama_url, "/apply-template", {"messages": chat})["prompt"]
        assert tokenizer.apply_chat_template(chat) == prompt
        assert tokenizer.count_chat(chat) == tokenizer.count(prompt) > 0

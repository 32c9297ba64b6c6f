"""Generator helpers: the wire contract, UTF-8 safe deltas, routes, the GGUF header, and token
counts equal to the model's own."""

from __future__ import annotations

import json
import random
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ragstream.infra.generator import (
    SMOLLM2_MODEL,
    GeneratorTokenizer,
    Utf8DeltaDecoder,
    normalize_messages,
    read_gguf_metadata,
    resolve_route,
    smollm2_gguf_path,
    wire,
)
from ragstream.infra.settings import GenerationSettings
from ragstream.schemas.errors import BadInputError, StartupError, UnknownRoute

DEPLOY_CONFIG = (
    Path(__file__).resolve().parents[2]
    / "infra"
    / "deploy"
    / "triton"
    / "model_repository"
    / SMOLLM2_MODEL
    / "config.pbtxt"
)

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
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert len(meta["tokenizer.ggml.merges"]) > 0
    assert "<|im_start|>" in meta["tokenizer.chat_template"]


@pytest.mark.parametrize("content", [b"", b"not a model", b"GGUF\x03\x00\x00\x00" + b"\xff" * 16])
def test_a_file_that_is_not_a_gguf_model_fails_at_startup(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(StartupError, match="GGUF header"):
        read_gguf_metadata(path)


# --- the wire contract, as the client sends it and both servers read it ----------------
def test_a_request_reaches_the_server_as_sent() -> None:
    messages = normalize_messages([{"role": "user", "content": "Qu'est-ce qu'un arc-en-ciel ? 🌈"}])
    inputs = wire.request_arrays(messages, max_tokens=8, temperature=0.5, stream_id="s-1", timeout_s=3.0)
    assert wire.parse_call(inputs) == wire.GenerationCall(messages, 8, 0.5, "s-1", 3.0)


def test_a_cancel_names_the_stream_to_stop() -> None:
    call = wire.parse_call(wire.cancel_arrays("s-1"))
    assert (call.cancel, call.stream_id) == (True, "s-1")


def test_a_request_without_a_timeout_has_no_server_deadline() -> None:
    inputs = wire.request_arrays(
        normalize_messages("hi"), max_tokens=1, temperature=0.0, stream_id="", timeout_s=0.0
    )
    assert wire.parse_call(inputs).timeout_s is None
    del inputs[wire.TIMEOUT_S], inputs[wire.STREAM_ID]
    assert wire.parse_call(inputs).timeout_s is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (wire.MESSAGES, np.array([b"not json"], dtype=np.object_)),
        (wire.MESSAGES, np.array([b'{"role": "user"}'], dtype=np.object_)),
        (wire.MESSAGES, np.array([b"[]"], dtype=np.object_)),
        (wire.MAX_TOKENS, np.array([0], dtype=np.int32)),
        (wire.TEMPERATURE, np.array([-1.0], dtype=np.float32)),
        (wire.MAX_TOKENS, None),
    ],
)
def test_a_malformed_request_is_bad_input(name: str, value: Any) -> None:
    inputs = wire.request_arrays(
        normalize_messages("hi"), max_tokens=4, temperature=0.0, stream_id="s", timeout_s=1.0
    )
    if value is None:
        del inputs[name]
    else:
        inputs[name] = value
    with pytest.raises(BadInputError):
        wire.parse_call(inputs)


def test_a_response_reaches_the_client_as_sent() -> None:
    arrays = wire.response_arrays("café 🚀", wire.STOP, 12, 3)
    assert wire.parse_response(arrays) == wire.GenerationResponse("café 🚀".encode(), "stop", 12, 3)
    assert wire.parse_response({}) == wire.GenerationResponse(b"", "", 0, 0)


def test_the_production_model_config_declares_the_wire_tensors() -> None:
    # The deploy model.py reads tensors by wire's names; config.pbtxt must declare the same ones.
    triton_type = {
        bytes: "TYPE_STRING",
        np.int32: "TYPE_INT32",
        np.float32: "TYPE_FP32",
        np.bool_: "TYPE_BOOL",
    }
    text = DEPLOY_CONFIG.read_text()
    inputs_text, outputs_text = text.split("\noutput [", 1)
    pattern = re.compile(r'name: "(\w+)"\s*data_type: (\w+)\s*dims: \[ 1 \](\s*optional: true)?')

    def declared(section: str) -> list[tuple[str, str, bool]]:
        return [(name, kind, bool(optional)) for name, kind, optional in pattern.findall(section)]

    assert declared(inputs_text) == [(t.name, triton_type[t.dtype], t.optional) for t in wire.INPUTS]
    assert declared(outputs_text) == [(t.name, triton_type[t.dtype], t.optional) for t in wire.OUTPUTS]


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

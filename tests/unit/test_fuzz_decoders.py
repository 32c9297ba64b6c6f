"""Property-based fuzzing of every topic's decoder and of the paths that bad input takes.

Anyone who can write to a topic can put any bytes on it. Whatever they are, a stage must
end with either a valid event or a dead-letter record, and that record (and the error
response sent to the caller) must be bounded and publishable. A worker that crashes, hangs
or cannot publish on one message stops its whole partition (STYLE rule 12).

The hostile inputs are valid events of each topic with one thing broken (a cut, a flipped
byte, a field swapped for a wrong type, deep nesting, a huge string, invalid UTF-8, a lone
surrogate, NaN, a duplicate or unknown key, a future schema version) and raw garbage. Huge
values are built from a drawn size, so Hypothesis itself never generates megabytes.
"""

from __future__ import annotations

import asyncio
import json
import operator
import re
import string
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from functools import cache
from typing import Any

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from ragstream.infra.settings import Settings
from ragstream.schemas.alerts import AlertChanged
from ragstream.schemas.errors import SchemaViolation
from ragstream.schemas.events import (
    Chunk,
    ChunkCreated,
    ChunkEmbedded,
    DeadLettered,
    DocumentIndexed,
    DocumentRetracted,
    DocumentSubmitted,
    Event,
)
from ragstream.schemas.judge import JudgementRecorded
from ragstream.schemas.queries import (
    Citation,
    ContextRetrieved,
    ConversationTurn,
    GenerationOptions,
    Passage,
    PromptMessage,
    QuerySubmitted,
    ResponseCompleted,
    RetrievalOptions,
    RetrievedChunk,
    TokenGenerated,
    Usage,
)
from ragstream.streams.codec import decode, encode, sniff_ids
from ragstream.streams.runner import Message, StageRunner, dead_letter_record
from ragstream.streams.topics import ALL_TOPICS, DEADLETTER, DOCUMENTS, EMBEDDED, RESPONSES, TopicSpec
from ragstream.workers.responses import invalid_request_response
from ragstream.workers.stages import STAGES

# The dead-letter record keeps at most 1 MB of the original (`_MAX_ORIGINAL_BYTES`), which
# is 1.34 MB as base64; ids, key and reason must stay small next to it. Measured on the
# encoded value plus the Kafka key, i.e. what the producer sends.
MAX_DEAD_LETTER_BYTES = 3_000_000
MAX_SNIFFED_CHARS = 256
IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,255}")
PREFIX = "ragstream"

# Sized for well under a minute on two cores once the properties hold (a failure's shrinking
# takes longer). No deadline: one example may build megabytes.
# derandomize: CI runs the same examples every time (a property that fails, fails on every
# run, and a fresh clone does not spend minutes shrinking a new find); database=None: no
# .hypothesis/ folder. Explore with HYPOTHESIS_SEED or more max_examples by hand.
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None)


def _name(spec: TopicSpec) -> str:
    return spec.name


# -- labelled samples ------------------------------------------------------------------------
_SHOWN = 2_000
"""How much of a sample a failure report prints: all of a near-valid event, not megabytes."""


@dataclass(frozen=True)
class Hostile:
    """Bytes (or no value) with a label saying how they were made."""

    what: str
    raw: bytes | None

    def __repr__(self) -> str:
        if self.raw is None:
            return f"<{self.what}: None>"
        more = f" ... ({len(self.raw):,} bytes)" if len(self.raw) > _SHOWN else ""
        return f"<{self.what}: {self.raw[:_SHOWN]!r}{more}>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # Hypothesis's failure report
        p.text(repr(self))


@dataclass(frozen=True)
class HostileText:
    what: str
    text: str

    def __repr__(self) -> str:
        more = f" ... ({len(self.text):,} chars)" if len(self.text) > _SHOWN else ""
        return f"<{self.what}: {self.text[:_SHOWN]!r}{more}>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def _fixed(what: str, raw: bytes | None) -> st.SearchStrategy[Hostile]:
    return st.just(Hostile(what, raw))


# -- valid events ------------------------------------------------------------------------------
# Short ids most of the time, and ids near the 256-character limit the contract allows.
_ID_HEAD = string.ascii_letters + string.digits
_ID_TAIL = _ID_HEAD + "._:/@+=-"


def _ids(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    return st.builds(
        operator.add, st.sampled_from(_ID_HEAD), st.text(_ID_TAIL, min_size=min_size, max_size=max_size)
    )


ident = _ids(0, 20) | _ids(120, 255)
text = st.text(max_size=30)
nonempty = st.text(min_size=1, max_size=30)
finite = st.floats(allow_nan=False, allow_infinity=False)
natural = st.integers(min_value=0)
positive = st.integers(min_value=1)
metadata = st.dictionaries(
    st.text(max_size=10), st.one_of(text, st.integers(), finite, st.booleans()), max_size=3
)
groups = st.lists(ident, max_size=3).map(tuple)
texts = st.lists(text, max_size=3).map(tuple)
latencies = st.dictionaries(st.text(max_size=10), finite, max_size=3)
produced_at = st.datetimes(
    min_value=datetime(1970, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]),
)
envelope: dict[str, st.SearchStrategy[Any]] = {
    "event_id": st.text(min_size=1, max_size=64),
    "trace_id": st.text(min_size=1, max_size=128),
    "tenant": ident,
    "produced_at": produced_at,
}

chunks = st.builds(
    Chunk,
    chunk_id=st.text(min_size=1, max_size=40),
    document_id=ident,
    tenant=ident,
    fingerprint=st.text(min_size=8, max_size=64),
    version=positive,
    chunk_index=natural,
    chunk_count=positive,
    text=nonempty,
    headings=texts,
    char_start=natural,
    char_end=natural,
    page=st.none() | natural,
    token_count=positive,
    title=text,
    source=text,
    media_type=text,
    metadata=metadata,
    access_groups=groups,
)
queries = st.builds(
    QuerySubmitted,
    **envelope,
    request_id=ident,
    user=st.text(min_size=1, max_size=40),
    access_groups=groups,
    question=st.text(min_size=1, max_size=100),
    conversation_id=st.none() | text,
    history=st.lists(
        st.builds(ConversationTurn, role=st.sampled_from(["user", "assistant"]), content=text), max_size=3
    ).map(tuple),
    retrieval=st.builds(
        RetrievalOptions,
        top_k=st.integers(1, 50),
        alpha=st.floats(0.0, 1.0),
        mode=st.sampled_from(["hybrid", "vector", "keyword"]),
        metadata_filters=metadata,
        document_ids=st.none() | texts,
        neighbours=st.integers(0, 3),
    ),
    generation=st.builds(
        GenerationOptions,
        route=st.text(min_size=1, max_size=20),
        max_tokens=st.integers(1, 4096),
        temperature=st.floats(0.0, 2.0),
    ),
    deadline_ms=st.integers(1, 600_000),
    stream=st.booleans(),
)
retrieved_chunks = st.builds(
    RetrievedChunk,
    chunk_id=text,
    document_id=text,
    title=text,
    text=text,
    headings=texts,
    chunk_index=st.integers(),
    source=text,
    score=finite,
    vector_score=st.none() | finite,
    keyword_score=st.none() | finite,
    neighbour_of=st.none() | text,
)

EVENTS: dict[type[Event], st.SearchStrategy[Event]] = {
    DocumentSubmitted: st.builds(
        DocumentSubmitted,
        **envelope,
        document_id=ident,
        source=text,
        title=text,
        content=st.text(max_size=200),
        content_encoding=st.sampled_from(["utf-8", "base64"]),
        media_type=text,
        metadata=metadata,
        access_groups=groups,
        version=positive,
        deleted=st.booleans(),
    ),
    ChunkCreated: st.builds(ChunkCreated, **envelope, source_event_id=text, chunk=chunks),
    ChunkEmbedded: st.builds(
        ChunkEmbedded,
        **envelope,
        source_event_id=text,
        chunk=chunks,
        vector=st.lists(finite, min_size=1, max_size=8).map(tuple),
        embedding_model=text,
    ),
    DocumentRetracted: st.builds(
        DocumentRetracted, **envelope, source_event_id=text, document_id=ident, version=positive
    ),
    DocumentIndexed: st.builds(
        DocumentIndexed,
        **envelope,
        source_event_id=text,
        document_id=ident,
        version=positive,
        fingerprint=text,
        outcome=st.sampled_from(["indexed", "unchanged", "deleted", "stale"]),
        chunk_count=natural,
        chunks_removed=natural,
    ),
    DeadLettered: st.builds(
        DeadLettered,
        **envelope,
        stage=text,
        error_kind=text,
        message=text,
        original=st.binary(max_size=100),
        original_topic=st.none() | text,
        original_partition=st.none() | natural,
        original_offset=st.none() | natural,
        original_key=st.none() | text,
        original_truncated=st.booleans(),
        source_event_id=st.none() | text,
        request_id=st.none() | text,
        document_id=st.none() | text,
    ),
    QuerySubmitted: queries,
    ContextRetrieved: st.builds(
        ContextRetrieved,
        **envelope,
        request_id=ident,
        query=queries,
        chunks=st.lists(retrieved_chunks, max_size=3).map(tuple),
        latency_ms=latencies,
    ),
    TokenGenerated: st.builds(TokenGenerated, **envelope, request_id=ident, sequence=natural, delta=text),
    ResponseCompleted: st.builds(
        ResponseCompleted,
        **envelope,
        request_id=ident,
        user=text,
        status=st.sampled_from(["ok", "error", "blocked"]),
        error_reason=st.none() | text,
        question=text,
        answer=text,
        citations=st.lists(
            st.builds(
                Citation,
                number=positive,
                document_id=text,
                chunk_id=text,
                title=text,
                score=finite,
                source=text,
                cited=st.booleans(),
            ),
            max_size=3,
        ).map(tuple),
        usage=st.builds(Usage, prompt_tokens=natural, completion_tokens=natural),
        model_id=st.none() | text,
        route=st.none() | text,
        finish_reason=st.none() | text,
        prompt_template_version=st.none() | text,
        prompt_messages=st.lists(
            st.builds(PromptMessage, role=st.sampled_from(["system", "user", "assistant"]), content=text),
            max_size=3,
        ).map(tuple),
        retrieved_chunk_ids=texts,
        retrieved_scores=st.lists(finite, max_size=3).map(tuple),
        latency_ms=latencies,
        streamed=st.booleans(),
        delta_count=natural,
        passages=st.lists(
            st.builds(Passage, number=positive, chunk_id=text, document_id=text, text=text), max_size=3
        ).map(tuple),
    ),
    JudgementRecorded: st.builds(
        JudgementRecorded,
        **envelope,
        request_id=ident,
        judge=st.from_regex(r"\A[a-z][a-z0-9_]{0,20}\Z"),
        judge_version=st.text(min_size=1, max_size=20),
        implementation=text,
        model=st.none() | text,
        rating=st.none() | st.sampled_from(["yes", "no"]),
        score=st.none() | st.floats(min_value=0.0, max_value=1.0),
        rationale=text,
        error=st.none() | text,
        latency_ms=st.floats(min_value=0.0, max_value=1e6),
        chunk_ratings=st.lists(st.sampled_from(["yes", "no"]), max_size=3).map(tuple),
        root_cause=st.none() | st.text(max_size=20),
        user=st.none() | text,
        route=st.none() | text,
        source=st.sampled_from(["stream", "backfill", "eval"]),
        source_ref=text,
        response_event_id=st.none() | st.text(max_size=20),
    ),
    AlertChanged: st.builds(
        AlertChanged,
        **envelope,
        alert_id=st.text(min_size=1, max_size=40),
        rule=st.text(min_size=1, max_size=20),
        state=st.sampled_from(["firing", "resolved"]),
        severity=st.sampled_from(["info", "warning", "critical"]),
        slice_tenant=st.text(min_size=1, max_size=20),
        slice_route=st.text(min_size=1, max_size=20),
        metric=st.text(min_size=1, max_size=20),
        stat=st.text(min_size=1, max_size=20),
        label=text,
        window_id=st.text(min_size=1, max_size=40),
        value=st.none() | st.floats(allow_nan=False, allow_infinity=False),
        threshold=st.floats(allow_nan=False, allow_infinity=False),
        condition=text,
        message=text,
        since=produced_at,
    ),
}


@cache
def valid_events(spec: TopicSpec) -> st.SearchStrategy[Event]:
    return st.one_of(*(EVENTS[t] for t in spec.value_types))


def _event_type(t: type[Event]) -> str:
    return str(t.model_fields["event_type"].default)


# -- hostile fragments: what goes where a JSON value would -------------------------------------
wrong_types = st.sampled_from(
    [
        b"null",
        b"0",
        b"-1",
        b"1.5",
        b"true",
        b'""',
        b'"x"',
        b"[]",
        b"[{}]",
        b"{}",
        b'{"k": []}',
        b"1" + b"0" * 40,
    ]
).map(lambda raw: Hostile("wrong type", raw))
non_finite = st.sampled_from(
    [b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf", b"1e999", b"-1e999", b"[NaN]", b'{"x": Infinity}']
).map(lambda raw: Hostile("non-finite number", raw))
lone_surrogates = st.sampled_from(
    [rb'"\ud800"', rb'"\udfff"', rb'"a\ud83d"', rb'"\udc00\ud800"', rb'"\ud800\u0041"', rb'"\udbff"']
).map(lambda raw: Hostile("lone surrogate escape", raw))
invalid_utf8 = st.sampled_from(
    [
        b"\xff",
        b"\xfe",
        b"\xc3\x28",
        b"\xa0\xa1",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"\xc0\xaf",
        b"\xe2\x82",
    ]
).flatmap(
    lambda bad: st.sampled_from(
        [Hostile("invalid UTF-8 in a string", b'"ok' + bad + b'ok"'), Hostile("invalid UTF-8", bad)]
    )
)
raw_controls = st.one_of(  # not JSON: control characters must be escaped in strings
    st.integers(0, 0x1F).map(
        lambda c: Hostile(f"raw control {c:#04x} in a string", b'"a' + bytes([c]) + b'b"')
    ),
    _fixed("bare NUL", b"\x00"),
)
escaped_controls = st.one_of(  # valid JSON
    st.integers(0, 0x1F).map(lambda c: Hostile(f"escaped control \\u{c:04x}", b'"a\\u%04xb"' % c)),
    _fixed("DEL in a string", b'"\x7f"'),
)
control_chars = raw_controls | escaped_controls


@st.composite
def deep_nesting(draw: st.DrawFn) -> Hostile:
    depth = draw(st.integers(1, 100_000))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a": ', b"}")]))
    if draw(st.booleans()):
        return Hostile(f"nested {opener.decode()} x {depth}", opener * depth + b"1" + closer * depth)
    return Hostile(f"unclosed {opener.decode()} x {depth}", opener * depth)


@st.composite
def huge_string(draw: st.DrawFn) -> Hostile:
    size = draw(st.integers(1_000_000, 4_000_000))
    unit = draw(st.sampled_from([b"a", "\u00e9".encode(), "\U0001f600".encode(), b"\\n", b"\\u0000"]))
    return Hostile(f"string of {unit!r} x {size // len(unit):,}", b'"' + unit * (size // len(unit)) + b'"')


@st.composite
def huge_array(draw: st.DrawFn) -> Hostile:
    length = draw(st.integers(100_000, 500_000))
    item = draw(st.sampled_from([b"0", b"1.5", b'""', b'"x"', b"null", b"{}", b"[]"]))
    return Hostile(f"array of {item!r} x {length:,}", b"[" + b",".join([item] * length) + b"]")


@st.composite
def huge_object(draw: st.DrawFn) -> Hostile:
    keys = draw(st.integers(100_000, 300_000))
    return Hostile(f"object with {keys:,} keys", b"{" + b",".join(b'"k%d":0' % i for i in range(keys)) + b"}")


huge = st.one_of(deep_nesting(), huge_string(), huge_array(), huge_object())
fragments = st.one_of(wrong_types, non_finite, lone_surrogates, invalid_utf8, control_chars, huge)


# -- hostile values built from a valid event -------------------------------------------------------
_HOLE = "@@fuzz-hole@@"
_HOLE_JSON = json.dumps(_HOLE).encode()
Path = tuple[str | int, ...]


def _paths(node: Any, prefix: Path = ()) -> Iterator[Path]:
    """Every value below the root, depth first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield (*prefix, k)
        yield from _paths(v, (*prefix, k))


def _objects(node: Any, prefix: Path = ()) -> Iterator[Path]:
    if isinstance(node, dict):
        yield prefix
    for path in _paths(node, prefix):
        at = _at(node, path[len(prefix) :])
        if isinstance(at, dict):
            yield path


def _at(node: Any, path: Path) -> Any:
    for p in path:
        node = node[p]
    return node


def _dotted(path: Path) -> str:
    return ".".join(str(p) for p in path) or "<root>"


def splice(event: Event, path: Path, fragment: bytes) -> bytes:
    """The event's JSON with the value at `path` replaced by raw bytes."""
    doc = json.loads(encode(event))
    _at(doc, path[:-1])[path[-1]] = _HOLE
    return json.dumps(doc).encode().replace(_HOLE_JSON, fragment, 1)


def add_key(event: Event, path: Path, key: str, fragment: bytes) -> bytes:
    """The event's JSON with `"key": fragment` appended to the object at `path`, so a
    duplicate key comes last and wins in most parsers."""
    doc = json.loads(encode(event))
    _at(doc, path)[_HOLE] = None
    return (
        json.dumps(doc)
        .encode()
        .replace(_HOLE_JSON + b": null", json.dumps(key).encode() + b": " + fragment, 1)
    )


@st.composite
def spliced(draw: st.DrawFn, events: st.SearchStrategy[Event], what: st.SearchStrategy[Hostile]) -> Hostile:
    event = draw(events)
    path = draw(st.sampled_from(list(_paths(json.loads(encode(event))))))
    frag = draw(what)
    assert frag.raw is not None
    return Hostile(f"{type(event).__name__}.{_dotted(path)} <- {frag.what}", splice(event, path, frag.raw))


@st.composite
def truncated(draw: st.DrawFn, events: st.SearchStrategy[Event]) -> Hostile:
    raw = encode(draw(events))
    cut = draw(st.integers(0, len(raw) - 1))
    return Hostile(f"cut at {cut} of {len(raw)}", raw[:cut])


@st.composite
def flipped(draw: st.DrawFn, events: st.SearchStrategy[Event]) -> Hostile:
    raw = bytearray(encode(draw(events)))
    at = draw(st.integers(0, len(raw) - 1))
    raw[at] = draw(st.integers(0, 255))
    return Hostile(f"byte {at} set to {raw[at]:#04x}", bytes(raw))


@st.composite
def future_version(draw: st.DrawFn, events: st.SearchStrategy[Event]) -> Hostile:
    version = draw(st.sampled_from([b"0", b"2", b"99", b'"2"', b"-1", b"18446744073709551616"]))
    return Hostile(f"schema_version {version.decode()}", splice(draw(events), ("schema_version",), version))


@st.composite
def unknown_event_type(draw: st.DrawFn, spec: TopicSpec) -> Hostile:
    own = {_event_type(t) for t in spec.value_types}
    others = sorted({_event_type(t) for t in EVENTS} - own)
    name = draw(st.sampled_from(others) | st.text(max_size=30).filter(lambda s: s not in own))
    fragment = json.dumps(name).encode()
    return Hostile(f"event_type {name!r}", splice(draw(valid_events(spec)), ("event_type",), fragment))


@st.composite
def extra_field(draw: st.DrawFn, events: st.SearchStrategy[Event], *, root_only: bool = False) -> Hostile:
    """An unknown key; no event or part has a field with a dash in its name."""
    event = draw(events)
    path = () if root_only else draw(st.sampled_from(list(_objects(json.loads(encode(event))))))
    key = "x-" + draw(st.text(max_size=10))
    value = draw(wrong_types)
    assert value.raw is not None
    return Hostile(f"extra key {key!r} at {_dotted(path)}", add_key(event, path, key, value.raw))


@st.composite
def duplicate_key(draw: st.DrawFn, events: st.SearchStrategy[Event]) -> Hostile:
    event = draw(events)
    doc = json.loads(encode(event))
    path = draw(st.sampled_from([p for p in _objects(doc) if _at(doc, p)]))
    key = draw(st.sampled_from(sorted(_at(doc, path))))
    value = draw(st.one_of(wrong_types, non_finite, lone_surrogates))
    assert value.raw is not None
    return Hostile(f"duplicate {_dotted((*path, key))} <- {value.what}", add_key(event, path, key, value.raw))


@cache
def hostile(spec: TopicSpec) -> st.SearchStrategy[Hostile]:
    """Anything at all, mostly near-valid events of the topic."""
    events = valid_events(spec)
    return st.one_of(
        _fixed("no value", None),
        _fixed("empty", b""),
        st.binary(max_size=256).map(lambda raw: Hostile("random bytes", raw)),
        fragments,
        truncated(events),
        flipped(events),
        spliced(events, fragments),
        future_version(events),
        unknown_event_type(spec),
        extra_field(events),
        duplicate_key(events),
    )


@cache
def undecodable(spec: TopicSpec) -> st.SearchStrategy[Hostile]:
    """Values no correct decoder may accept: not a JSON object, cut short, invalid JSON, an
    unknown root key, a wrong version or event type."""
    events = valid_events(spec)
    not_json = invalid_utf8 | raw_controls
    return st.one_of(
        _fixed("no value", None),
        _fixed("empty", b""),
        st.binary(max_size=256)
        .filter(lambda raw: not raw.lstrip().startswith(b"{"))
        .map(lambda raw: Hostile("random bytes", raw)),
        st.one_of(wrong_types, non_finite, huge_string(), huge_array()),  # valid JSON, not an object
        deep_nesting(),
        truncated(events),
        spliced(events, not_json),
        future_version(events),
        unknown_event_type(spec),
        extra_field(events, root_only=True),
    )


extreme_numbers = st.sampled_from([b"1e308", b"-0.0", b"1.0", b"1" + b"0" * 40]).map(
    lambda raw: Hostile("extreme number", raw)
)


@st.composite
def _swapped_leaf(draw: st.DrawFn, spec: TopicSpec) -> Hostile:
    event = draw(valid_events(spec))
    doc = json.loads(encode(event))
    numbers = [p for p in _paths(doc) if type(_at(doc, p)) in (int, float)]
    strings = [p for p in _paths(doc) if isinstance(_at(doc, p), str)]
    if draw(st.booleans()) and strings:
        path = draw(st.sampled_from(strings))
        frag = draw(escaped_controls | lone_surrogates | _fixed("surrogate pair", rb'"\ud83d\ude00"'))
    else:
        path = draw(st.sampled_from(numbers))
        frag = draw(non_finite | extreme_numbers)
    assert frag.raw is not None
    return Hostile(f"{type(event).__name__}.{_dotted(path)} <- {frag.what}", splice(event, path, frag.raw))


@cache
def near_valid(spec: TopicSpec) -> st.SearchStrategy[Hostile]:
    """Valid JSON that a lenient decoder may accept: one number swapped for NaN, Infinity or
    a huge literal, one string for escapes, or a key given twice."""
    return _swapped_leaf(spec) | duplicate_key(valid_events(spec))


surrogate_chars = st.characters() | st.characters(categories=["Cs"])
hostile_keys = st.one_of(
    _fixed("no key", None),
    st.binary(max_size=64).map(lambda raw: Hostile("random key", raw)),
    _fixed("UTF-8-encoded surrogate key", b"\xed\xa0\x80"),
    _fixed("1 MB ASCII key", b"k" * 1_000_000),
    _fixed("1 MB invalid UTF-8 key", b"\xff" * 1_000_000),
)
hostile_reasons = st.one_of(
    st.text(surrogate_chars, max_size=50).map(lambda s: HostileText("any text", s)),
    st.just(HostileText("lone surrogate", "\ud800")),
    st.just(HostileText("NUL and controls", "\x00\x01\x1b[31m\x7f")),
    st.just(5_000_000).map(lambda n: HostileText("5 MB reason", "r" * n)),  # built when drawn
    st.just(5_000_000).map(lambda n: HostileText("5 MB of surrogates", "\udc80" * n)),
)
error_kinds = st.sampled_from(["schema_violation", "bad_input", "internal_error", "retries_exhausted"])


def message(spec: TopicSpec, value: bytes | None, key: bytes | None = b"k", offset: int = 0) -> Message:
    return Message(spec.full_name(PREFIX), 0, offset, key, value)


# -- 1. decode: an event of the topic or a SchemaViolation --------------------------------------
@pytest.mark.parametrize("spec", ALL_TOPICS, ids=_name)
@FUZZ
@given(data=st.data())
def test_decode_returns_a_topic_event_or_raises_schema_violation(
    spec: TopicSpec, data: st.DataObject
) -> None:
    """Anything else (RecursionError, UnicodeDecodeError, MemoryError...) escapes the
    runner's dead-letter path and kills the partition."""
    value = data.draw(hostile(spec), label="value")
    try:
        event = decode(spec, value.raw)
    except SchemaViolation:
        return
    assert isinstance(event, spec.value_types)


# -- 2. sniff_ids: never raises, short and printable ids ---------------------------------------
@pytest.mark.parametrize("spec", ALL_TOPICS, ids=_name)
@FUZZ
@given(data=st.data())
def test_sniff_ids_never_raises_and_returns_short_writable_ids(spec: TopicSpec, data: st.DataObject) -> None:
    """It runs on input that already failed, to fill the dead-letter record; an id it
    returns must fit that record and be writable as UTF-8 JSON."""
    value = data.draw(hostile(spec), label="value")
    ids = sniff_ids(value.raw)
    assert isinstance(ids, dict)
    for name, id_ in ids.items():
        assert isinstance(name, str) and isinstance(id_, str)
        assert 0 < len(id_) <= MAX_SNIFFED_CHARS
        id_.encode("utf-8")  # no lone surrogates


# -- 3. the dead-letter record: bounded, publishable, faithful ---------------------------------------
@pytest.mark.parametrize("spec", ALL_TOPICS, ids=_name)
@FUZZ
@given(data=st.data())
def test_dead_letter_record_is_bounded_and_round_trips(spec: TopicSpec, data: st.DataObject) -> None:
    """The record is the only trace a bad message leaves: building it must not fail, it must
    fit a Kafka message, and a consumer of the dead-letter topic must read it back whole."""
    value = data.draw(hostile(spec), label="value")
    key = data.draw(hostile_keys, label="key")
    reason = data.draw(hostile_reasons, label="reason")
    kind = data.draw(error_kinds, label="kind")

    record = dead_letter_record("ingest", message(spec, value.raw, key.raw, offset=7), kind, reason.text)
    wire = encode(record)
    assert len(wire) + len(record.kafka_key()) < MAX_DEAD_LETTER_BYTES

    back = decode(DEADLETTER, wire)
    assert isinstance(back, DeadLettered)
    assert back == record
    assert (back.stage, back.error_kind, back.original_offset) == ("ingest", kind, 7)
    original = value.raw or b""
    assert original.startswith(back.original)
    assert back.original_truncated == (len(back.original) < len(original))


# -- 4. the caller's error response -------------------------------------------------------------------
@pytest.mark.parametrize("spec", ALL_TOPICS, ids=_name)
@FUZZ
@given(data=st.data())
def test_invalid_request_response_answers_any_readable_request_id(
    spec: TopicSpec, data: st.DataObject
) -> None:
    """A caller whose request id is readable (and valid) hears back once; otherwise nobody is
    answered. Either way it never raises, and the response can be published."""
    value = data.draw(hostile(spec), label="value")
    reason = data.draw(hostile_reasons, label="reason")
    try:
        record = dead_letter_record("retrieve", message(spec, value.raw), "schema_violation", reason.text)
    except Exception:  # noqa: BLE001 - the record builder's failures are property 3's
        reject()

    out = invalid_request_response(record)

    rid = record.request_id
    if rid is not None and IDENTIFIER.fullmatch(rid):
        assert [type(e) for e in out] == [ResponseCompleted]
    for event in out:
        assert isinstance(event, ResponseCompleted) and event.request_id == rid
        assert event.status == "error" and (event.error_reason or "").startswith("invalid_request")
        assert decode(RESPONSES, encode(event)) == event


# -- 5. valid events round-trip ------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ALL_TOPICS, ids=_name)
@FUZZ
@given(data=st.data())
def test_valid_events_round_trip(spec: TopicSpec, data: st.DataObject) -> None:
    """Whatever a producer may build, the next stage reads back unchanged."""
    event = data.draw(valid_events(spec), label="event")
    assert decode(spec, encode(event)) == event


@pytest.mark.parametrize("spec", ALL_TOPICS, ids=_name)
@settings(FUZZ, suppress_health_check=[HealthCheck.filter_too_much])  # most hostile input is rejected
@given(data=st.data())
def test_what_decode_accepts_re_encodes_to_the_same_bytes(spec: TopicSpec, data: st.DataObject) -> None:
    """An input a stage accepts is passed on (re-encoded) to the next stage, which must
    accept it too: NaN written back as `null` would be dead-lettered one stage later."""
    value = data.draw(near_valid(spec), label="value")
    try:
        event = decode(spec, value.raw)
    except SchemaViolation:
        reject()
    wire = encode(event)
    assert encode(decode(spec, wire)) == wire


# -- 6. ten megabytes of hostile input are handled to the end ---------------------------------------
TEN_MB = 10_000_000
TEN_MB_VALUES: dict[str, Callable[[], bytes]] = {
    "unclosed arrays": lambda: b"[" * TEN_MB,
    "nested arrays": lambda: b"[" * (TEN_MB // 2) + b"]" * (TEN_MB // 2),
    "nested objects": lambda: b'{"a":' * (TEN_MB // 6) + b"1" + b"}" * (TEN_MB // 6),
    "string": lambda: b'"' + b"a" * TEN_MB + b'"',
    "escapes": lambda: b'"' + b"\\u0000" * (TEN_MB // 6) + b'"',
    "array": lambda: b"[" + b"0," * (TEN_MB // 2) + b"0]",
    "unknown keys": lambda: b"{" + b",".join(b'"k%d":0' % i for i in range(TEN_MB // 12)) + b"}",
    "deep tenant": lambda: b'{"document_id": "d", "tenant": ' + b"[" * TEN_MB + b"]" * TEN_MB + b"}",
    "huge content": lambda: json.dumps({"document_id": "d", "content": "x" * TEN_MB}).encode(),
}
# One validation error per item, aimed at the topic that has the field: the decoder's work
# must not grow with the number of errors.
TEN_MB_AIMED: dict[str, tuple[TopicSpec, Callable[[], bytes]]] = {
    "metadata of wrong types": (
        DOCUMENTS,
        lambda: (
            b'{"document_id": "d", "metadata": {'
            + b",".join(b'"k%d":[]' % i for i in range(TEN_MB // 12))
            + b"}}"
        ),
    ),
    "vector of strings": (
        EMBEDDED,
        lambda: b'{"event_type": "chunk.embedded", "vector": [' + b",".join([b'"x"'] * (TEN_MB // 4)) + b"]}",
    ),
}
TEN_MB_CASES = [
    *(pytest.param(ALL_TOPICS, build, id=name) for name, build in TEN_MB_VALUES.items()),
    *(pytest.param((spec,), build, id=name) for name, (spec, build) in TEN_MB_AIMED.items()),
]


@pytest.mark.parametrize(("specs", "build"), TEN_MB_CASES)
def test_ten_megabytes_of_hostile_input_are_handled_to_the_end(
    specs: tuple[TopicSpec, ...], build: Callable[[], bytes]
) -> None:
    """No timing here: the test completing at all is the property (no hang, no crash)."""
    raw = build()
    for spec in specs:
        try:
            decode(spec, raw)
        except SchemaViolation:
            pass
    record = dead_letter_record("ingest", message(specs[0], raw), "schema_violation", "too big")
    assert record.original_truncated
    assert len(encode(record)) < MAX_DEAD_LETTER_BYTES


# -- the runner: one dead letter per bad message, and it can publish them ---------------------------
Sent = list[tuple[str, bytes, bytes]]


@cache
def _settings() -> Settings:
    return Settings()


def recording_runner(stage: str, sent: Sent) -> StageRunner:
    """The stage's real runner, with a fake broker that records what is sent."""

    async def send(topic: str, key: bytes, value: bytes) -> Awaitable[None]:
        sent.append((topic, key, value))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    sdef = STAGES[stage]
    return StageRunner(_settings(), sdef.name, send, on_dead_letter=sdef.on_dead_letter, route=sdef.route)


def bad_batch(spec: TopicSpec) -> st.SearchStrategy[list[tuple[Hostile, Hostile]]]:
    """Up to four (value, key) pairs, none of which may decode."""
    return st.lists(st.tuples(undecodable(spec), hostile_keys), min_size=1, max_size=4)


def messages(spec: TopicSpec, batch: list[tuple[Hostile, Hostile]]) -> list[Message]:
    return [message(spec, value.raw, key.raw, offset=i) for i, (value, key) in enumerate(batch)]


@pytest.mark.parametrize("stage", sorted(STAGES))
@settings(FUZZ, max_examples=15)
@given(data=st.data())
async def test_runner_dead_letters_each_undecodable_message_once(stage: str, data: st.DataObject) -> None:
    """Bad input never reaches the handler and never takes the batch down with it."""
    spec = STAGES[stage].consumes
    batch = messages(spec, data.draw(bad_batch(spec), label="batch"))
    reached: list[Sequence[Event]] = []

    async def handler(events: Sequence[Event]) -> Sequence[Event]:
        reached.append(events)
        return []

    runner = recording_runner(stage, [])
    out = await runner.process_batch(spec, batch, handler)

    assert reached == []
    dead = [o.event for o in out if isinstance(o.event, DeadLettered)]
    assert sorted(d.original_offset or 0 for d in dead) == list(range(len(batch)))
    assert {d.error_kind for d in dead} == {"schema_violation"}
    assert all(o.topic is DEADLETTER for o in out if isinstance(o.event, DeadLettered))
    assert runner.dead_lettered == len(batch)


@pytest.mark.parametrize("stage", sorted(STAGES))
@settings(FUZZ, max_examples=15)
@given(data=st.data())
async def test_runner_can_publish_what_it_dead_letters(stage: str, data: st.DataObject) -> None:
    """Every record the runner returns for bad input goes out (one dead letter per message),
    within the size bound, and reads back on its topic."""
    spec = STAGES[stage].consumes
    batch = messages(spec, data.draw(bad_batch(spec), label="batch"))

    async def handler(events: Sequence[Event]) -> Sequence[Event]:
        return []

    sent: Sent = []
    runner = recording_runner(stage, sent)
    out = await runner.process_batch(spec, batch, handler)
    await runner.deliver(batch, out)

    topics = {t.full_name(PREFIX): t for t in ALL_TOPICS}
    dead = [decode(DEADLETTER, value) for topic, _, value in sent if topic == DEADLETTER.full_name(PREFIX)]
    assert sorted(d.original_offset or 0 for d in dead if isinstance(d, DeadLettered)) == list(
        range(len(batch))
    )
    for topic, key, value in sent:
        assert len(key) + len(value) < MAX_DEAD_LETTER_BYTES
        assert isinstance(decode(topics[topic], value), topics[topic].value_types)

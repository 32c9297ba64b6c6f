"""Issue 8: hostile input and faults on the real embedded stack. Nothing stalls, nothing
vanishes, nothing dies silently, exactly one answer per request.

Each scenario runs on its own stack (`ragstream up --detach` on a fresh data dir, then
`ragstream down`) and returns a results dataclass; `tests/integration/test_chaos.py` asserts
on them and `main()` prints them as a table.

- `fuzz`: a seeded corpus of hostile messages (`hostile_corpus`) published with kafka-python to
  `documents` and `queries`. Each must come back as a dead-letter record naming its original
  topic, partition and offset, or as an error `ResponseCompleted` (a query whose request id
  is readable gets both), counted by a reader of the whole topics. A valid document and a
  valid question per partition, published after the corpus, must still go through, and no
  worker may restart or crash.
- `kills`: `kill -9` of each worker process and of the audit sink, repeatedly, while
  documents and questions flow. Every document's chunks are then in the store exactly once,
  every request has exactly one final response on the topic and one `inference_log` row, and
  the supervisor counted one restart per kill.
- `fresh_starts`: `ragstream up` on new data dirs, N times; each time every stage processes a
  document and a question, no agent crashed and nothing restarted.
- `broker_restart`: SIGKILL of the broker while questions flow. The supervisor restarts it and
  the workers (memory storage loses everything); every caller hears back within its deadline
  plus the SDK's grace, and the stack answers again by itself.

Quick run: `python -m bench.reliability` (env `BENCH_RELIABILITY_FRESH_STARTS`, default 10).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.common import BenchStack, Results, console, verdict
from ragstream.client import AsyncClient
from ragstream.infra import kafka
from ragstream.infra.settings import Settings
from ragstream.schemas.events import DocumentSubmitted
from ragstream.schemas.queries import GenerationOptions, QuerySubmitted
from ragstream.streams.codec import encode
from ragstream.streams.topics import DEADLETTER, DOCUMENTS, INDEXED, QUERIES, RESPONSES

__all__ = [
    "BrokerResult",
    "FreshResult",
    "FuzzResult",
    "Hostile",
    "KillResult",
    "TopicTally",
    "broker_restart",
    "fresh_starts",
    "fuzz",
    "hostile_corpus",
    "kill_component",
    "kills",
    "main",
    "running_stack",
]

TENANT = "chaos"
SEED = 8
CHEAP_ROUTE = "no-such-route"
"""Questions on this route are retrieved (Triton + LanceDB) and answered with an error by the
generate stage at once: load that exercises both query stages without the model's cost."""
LOCAL_DEADLINE = "no response from the pipeline"
"""In the reason of an error the SDK built itself because nothing came back in time."""
SDK_GRACE_S = 2.0


# -- the hostile corpus --------------------------------------------------------------------
@dataclass(frozen=True)
class Hostile:
    """One hostile message and what the stack owes its sender."""

    topic: str
    """`documents` or `queries` (the name under the prefix)."""
    kind: str
    key: bytes | None
    value: bytes | None
    request_id: str | None = None
    """The request id any response to it would carry (None: nobody to answer)."""
    must_dead_letter: bool = True
    must_answer: bool = False
    """A query whose request id is readable (or a valid query on an unknown route): its caller
    must get an error response."""


_Made = tuple[bytes | None, bytes | None, str | None, bool, bool]
"""key, value, request_id, must_dead_letter, must_answer"""
_Maker = Callable[[random.Random, str, int], _Made]
"""(rng, uid, how many of this kind this topic has so far) -> the message"""

_DEPTHS = (100_000, 2_000, 10_000, 50_000, 5_000, 20_000, 3_000)
_INVALID_UTF8 = (b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80abc", b"\xe2\x82")
_PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"


def _j(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _deep(rng: random.Random, depth: int) -> bytes:
    if rng.random() < 0.5:
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def _with_raw_field(obj: dict[str, Any], name: str, raw: bytes) -> bytes:
    """`obj` as JSON with one more field whose value is the raw JSON text `raw`."""
    head = _j(obj)
    return head[:-1] + b", " + _j(name) + b": " + raw + b"}"


_TOKEN: dict[str, str] = {}
"""The token every bench message carries, signed with the stack's local key once it is up."""


def _sign_for(settings: Settings) -> str:
    """A token for the bench tenant (query and ingest), kept for the messages built after."""
    from ragstream.infra.auth import issue_token, load_signing_key

    key = load_signing_key(settings.local_key_file)
    _TOKEN["token"] = issue_token(
        key, tenant=TENANT, user="bench", scopes=("query", "ingest"), ttl_s=6 * 3600
    )
    return _TOKEN["token"]


def _token() -> str | None:
    return _TOKEN.get("token")


def _doc(uid: str, **fields: Any) -> dict[str, Any]:
    return {
        "token": _token(),
        "document_id": f"fuzz/{uid}",
        "tenant": TENANT,
        "title": f"Fuzz {uid}",
        "content": "Forklifts are inspected every morning before the first shift.",
        "media_type": "text/plain",
        **fields,
    }


def _query(uid: str, **fields: Any) -> dict[str, Any]:
    return {
        "token": _token(),
        "request_id": f"fuzz-{uid}",
        "tenant": TENANT,
        "question": "When are forklifts inspected?",
        "generation": {"max_tokens": 8},
        "deadline_ms": 120_000,
        "stream": False,
        **fields,
    }


def _rid(uid: str) -> str:
    return f"fuzz-{uid}"


def _makers(limit: int) -> tuple[dict[str, _Maker], dict[str, _Maker], dict[str, int]]:
    """(document makers, query makers, caps per kind and topic). `limit` is the largest value
    a message may have; the huge kinds come close to it."""
    huge = limit - 64 * 1024  # under the limit with the record's overhead and key

    def random_bytes(rng: random.Random, uid: str, n: int) -> _Made:
        return (
            None if rng.random() < 0.2 else uid.encode(),
            rng.randbytes(rng.randint(1, 4096)),
            None,
            True,
            False,
        )

    def empty(rng: random.Random, uid: str, n: int) -> _Made:
        return uid.encode(), b"", None, True, False

    def tombstone(rng: random.Random, uid: str, n: int) -> _Made:
        return uid.encode(), None, None, True, False

    def json_scalar(rng: random.Random, uid: str, n: int) -> _Made:
        value = rng.choice([b"null", b"true", b"0", b'"hello"', b"[]", b"{}", b"1e999", b"NaN", b"-"])
        return uid.encode(), value, None, True, False

    def deep_whole(rng: random.Random, uid: str, n: int) -> _Made:
        depth = _DEPTHS[n % len(_DEPTHS)]
        return uid.encode(), _deep(rng, depth), None, True, False

    # -- documents
    def d_truncated(rng: random.Random, uid: str, n: int) -> _Made:
        full = _j(_doc(uid, content="Forklift safety. " * rng.randint(1, 200)))
        return uid.encode(), full[: rng.randint(1, len(full) - 1)], None, True, False

    def d_deep_field(rng: random.Random, uid: str, n: int) -> _Made:
        depth = _DEPTHS[n % len(_DEPTHS)]
        field_name = rng.choice(["metadata", "access_groups", "title"])
        doc = _doc(uid)
        doc.pop(field_name, None)
        return uid.encode(), _with_raw_field(doc, field_name, _deep(rng, depth)), None, True, False

    def d_huge_string(rng: random.Random, uid: str, n: int) -> _Made:
        # Valid-shaped, far over chunking.max_document_bytes: dead-lettered as too large.
        return uid.encode(), _j(_doc(uid, content="A" * huge)), None, True, False

    def d_huge_array(rng: random.Random, uid: str, n: int) -> _Made:
        if n % 2 == 0:
            items = huge // 2
            value = _with_raw_field(_doc(uid), "access_groups", b"[" + b"0," * (items - 1) + b"0]")
        else:
            value = b"[" + b"{}," * (huge // 3 - 1) + b"{}]"
        return uid.encode(), value, None, True, False

    def d_invalid_utf8(rng: random.Random, uid: str, n: int) -> _Made:
        bad = rng.choice(_INVALID_UTF8)
        value = (
            b'{"document_id": "fuzz/' + uid.encode() + b'", "tenant": "chaos", "content": "x' + bad + b'"}'
        )
        return uid.encode(), value, None, True, False

    def d_wrong_types(rng: random.Random, uid: str, n: int) -> _Made:
        override: dict[str, Any] = rng.choice(
            [
                {"document_id": 123},
                {"document_id": ""},
                {"document_id": "bad\u0000id"},
                {"document_id": "x" * 300},
                {"document_id": "has space"},
                {"version": "one"},
                {"version": 0},
                {"version": 1.5},
                {"metadata": {"k": [1, 2]}},
                {"metadata": "flat"},
                {"access_groups": "hr"},
                {"access_groups": [None]},
                {"deleted": "maybe"},  # "yes" would pass: pydantic reads it as true
                {"content": 42},
                {"content_encoding": "rot13"},
                {"tenant": "has space"},
                {"title": "t" * 5000},
                {"produced_at": "yesterday"},
                {"event_id": ""},
            ]
        )
        return uid.encode(), _j(_doc(uid, **override)), None, True, False

    def d_future_schema(rng: random.Random, uid: str, n: int) -> _Made:
        return uid.encode(), _j(_doc(uid, schema_version=rng.choice([0, 2, 3, 99]))), None, True, False

    def d_unknown_event_type(rng: random.Random, uid: str, n: int) -> _Made:
        et = rng.choice(["document.exploded", "chunk.created", "query.submitted", "", "DOCUMENT.SUBMITTED"])
        return uid.encode(), _j(_doc(uid, event_type=et)), None, True, False

    def d_extra_fields(rng: random.Random, uid: str, n: int) -> _Made:
        extra: dict[str, Any] = rng.choice(
            [{"surprise": 1}, {"__proto__": {"admin": True}}, {"Document_ID": "x"}, {"": ""}]
        )
        return uid.encode(), _j(_doc(uid, **extra)), None, True, False

    def d_huge_number(rng: random.Random, uid: str, n: int) -> _Made:
        digits = b"9" * rng.choice([5_000, 50_000])
        doc = _doc(uid)
        return uid.encode(), _with_raw_field(doc, "version", digits), None, True, False

    def d_unsupported_media(rng: random.Random, uid: str, n: int) -> _Made:
        media, data = rng.choice(
            [
                ("image/png", _PNG + rng.randbytes(64)),
                ("application/x-msdownload", b"MZ" + rng.randbytes(128)),
                ("application/zip", b"PK\x03\x04" + rng.randbytes(64)),
                ("video/mp4", rng.randbytes(256)),
            ]
        )
        doc = _doc(uid, media_type=media, content=base64.b64encode(data).decode(), content_encoding="base64")
        return uid.encode(), _j(doc), None, True, False

    def d_empty_text(rng: random.Random, uid: str, n: int) -> _Made:
        content = rng.choice(["", " ", "\n\n\t  \n", "\u00a0\u2003"])
        media = rng.choice(["text/plain", "text/markdown"])
        return uid.encode(), _j(_doc(uid, content=content, media_type=media)), None, True, False

    def d_bad_base64(rng: random.Random, uid: str, n: int) -> _Made:
        content = rng.choice(["!!not base64!!", "abc", "====", "QUJD\x00", "\u00e9\u00e9\u00e9\u00e9"])
        doc = _doc(uid, content=content, content_encoding="base64", media_type="application/pdf")
        return uid.encode(), _j(doc), None, True, False

    def d_corrupt_pdf(rng: random.Random, uid: str, n: int) -> _Made:
        data = rng.choice([b"%PDF-1.7\n", b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog", b"%PDF"]) + rng.randbytes(
            rng.randint(0, 4096)
        )
        doc = _doc(uid, content=base64.b64encode(data).decode(), content_encoding="base64")
        doc["media_type"] = "application/pdf"
        return uid.encode(), _j(doc), None, True, False

    def hostile_key(rng: random.Random, uid: str, n: int) -> _Made:
        key = rng.choice(
            [
                rng.randbytes(64),
                b"",
                b"\x00" * 16,
                "\u00e9t\u00e9".encode("latin-1"),
                b"k" * 100_000,
                rng.choice(_INVALID_UTF8),
                None,
            ]
        )
        value = rng.choice([rng.randbytes(rng.randint(1, 512)), b"{", b"", None, b"[" * 5000])
        if key is None and value is None:  # Kafka clients refuse a record with neither
            value = b""
        return key, value, None, True, False

    # -- queries
    def q_truncated(rng: random.Random, uid: str, n: int) -> _Made:
        full = _j(_query(uid, question="How do I? " * rng.randint(1, 100)))
        # Cut before the request id is complete half the time; either way the JSON is broken.
        return _rid(uid).encode(), full[: rng.randint(1, len(full) - 1)], _rid(uid), True, False

    def q_deep_field(rng: random.Random, uid: str, n: int) -> _Made:
        depth = _DEPTHS[n % len(_DEPTHS)]
        field_name = rng.choice(["history", "retrieval", "access_groups"])
        q = _query(uid)
        q.pop(field_name, None)
        # The request id precedes the deep field: an answer is welcome, a dead letter is owed.
        return _rid(uid).encode(), _with_raw_field(q, field_name, _deep(rng, depth)), _rid(uid), True, False

    def q_huge_string(rng: random.Random, uid: str, n: int) -> _Made:
        return _rid(uid).encode(), _j(_query(uid, question="Q" * huge)), _rid(uid), True, True

    def q_huge_array(rng: random.Random, uid: str, n: int) -> _Made:
        turn = b'{"role":"user","content":"x"},'
        turns = b"[" + turn * (huge // len(turn) - 1) + turn[:-1] + b"]"
        return _rid(uid).encode(), _with_raw_field(_query(uid), "history", turns), _rid(uid), True, True

    def q_invalid_utf8(rng: random.Random, uid: str, n: int) -> _Made:
        bad = rng.choice(_INVALID_UTF8)
        value = (
            b'{"request_id": "' + _rid(uid).encode() + b'", "tenant": "chaos", "question": "why' + bad + b'"}'
        )
        return _rid(uid).encode(), value, _rid(uid), True, False

    def q_wrong_types(rng: random.Random, uid: str, n: int) -> _Made:
        override: dict[str, Any] = rng.choice(
            [
                {"question": 123},
                {"question": None},
                {"deadline_ms": "soon"},
                {"deadline_ms": 1.5},
                {"retrieval": {"top_k": 10_000}},
                {"retrieval": "fast"},
                {"retrieval": {"mode": "psychic"}},
                {"access_groups": "hr"},
                {"stream": "sometimes"},
                {"history": [{"role": "system", "content": "obey"}]},
                {"history": "none"},
                {"generation": {"max_tokens": 0}},
                {"generation": {"temperature": 9}},
                {"generation": {"route": ""}},
                {"user": ""},
                {"tenant": "bad tenant"},
                {"produced_at": "tomorrow"},
            ]
        )
        return _rid(uid).encode(), _j(_query(uid, **override)), _rid(uid), True, True

    def q_future_schema(rng: random.Random, uid: str, n: int) -> _Made:
        value = _j(_query(uid, schema_version=rng.choice([0, 2, 3, 99])))
        return _rid(uid).encode(), value, _rid(uid), True, True

    def q_unknown_event_type(rng: random.Random, uid: str, n: int) -> _Made:
        et = rng.choice(["query.exploded", "response.completed", "document.submitted", "", "QUERY.SUBMITTED"])
        return _rid(uid).encode(), _j(_query(uid, event_type=et)), _rid(uid), True, True

    def q_extra_fields(rng: random.Random, uid: str, n: int) -> _Made:
        extra: dict[str, Any] = rng.choice(
            [{"surprise": 1}, {"__proto__": {"admin": True}}, {"Request_ID": "x"}, {"sql": "1;"}]
        )
        return _rid(uid).encode(), _j(_query(uid, **extra)), _rid(uid), True, True

    def q_invalid_body(rng: random.Random, uid: str, n: int) -> _Made:
        q = _query(uid)
        variant = n % 6
        if variant == 0:
            q.update(question="", deadline_ms=-5)
        elif variant == 1:
            q.pop("question")
        elif variant == 2:
            q["question"] = "why? " * 2000  # over 8000 characters
        elif variant == 3:
            q["history"] = [{"role": "user", "content": "hi"}] * 51
        elif variant == 4:
            q["deadline_ms"] = 0
        else:
            q["deadline_ms"] = 10**9
        return _rid(uid).encode(), _j(q), _rid(uid), True, True

    def q_unknown_route(rng: random.Random, uid: str, n: int) -> _Made:
        q = _query(uid, generation={"route": f"no-such-route-{uid}", "max_tokens": 8})
        return _rid(uid).encode(), _j(q), _rid(uid), False, True

    def q_bad_request_id(rng: random.Random, uid: str, n: int) -> _Made:
        rid = rng.choice(["has space", "x" * 300, "", "-leading-dash", "semi;colon", "\u00e9t\u00e9"])
        return uid.encode(), _j(_query(uid, request_id=rid)), None, True, False

    def q_huge_number(rng: random.Random, uid: str, n: int) -> _Made:
        digits = b"9" * rng.choice([5_000, 50_000])
        value = _with_raw_field(_query(uid), "top_k_hint", digits)
        return _rid(uid).encode(), value, _rid(uid), True, False

    shared: dict[str, _Maker] = {
        "random_bytes": random_bytes,
        "empty_value": empty,
        "null_value": tombstone,
        "json_scalar": json_scalar,
        "deep_whole": deep_whole,
        "hostile_key": hostile_key,
    }
    docs: dict[str, _Maker] = {
        **shared,
        "truncated_json": d_truncated,
        "deep_in_field": d_deep_field,
        "huge_string": d_huge_string,
        "huge_array": d_huge_array,
        "invalid_utf8": d_invalid_utf8,
        "wrong_types": d_wrong_types,
        "future_schema_version": d_future_schema,
        "unknown_event_type": d_unknown_event_type,
        "extra_fields": d_extra_fields,
        "huge_number": d_huge_number,
        "unsupported_media_type": d_unsupported_media,
        "empty_text": d_empty_text,
        "bad_base64": d_bad_base64,
        "corrupt_pdf": d_corrupt_pdf,
    }
    queries: dict[str, _Maker] = {
        **shared,
        "truncated_json": q_truncated,
        "deep_in_field": q_deep_field,
        "huge_string": q_huge_string,
        "huge_array": q_huge_array,
        "invalid_utf8": q_invalid_utf8,
        "wrong_types": q_wrong_types,
        "future_schema_version": q_future_schema,
        "unknown_event_type": q_unknown_event_type,
        "extra_fields": q_extra_fields,
        "huge_number": q_huge_number,
        "readable_id_invalid_body": q_invalid_body,
        "unknown_route": q_unknown_route,
        "bad_request_id": q_bad_request_id,
    }
    caps = {"huge_string": 2, "huge_array": 2}
    return docs, queries, caps


def hostile_corpus(max_message_bytes: int, *, seed: int = SEED, per_topic: int = 600) -> list[Hostile]:
    """A deterministic corpus of hostile messages, `per_topic` for each of `documents` and
    `queries`: every kind at least once, then round-robin (the huge kinds capped, and last),
    with the variants of each kind drawn from a `random.Random(seed)`."""
    rng = random.Random(seed)
    docs, queries, caps = _makers(max_message_bytes)
    out: list[Hostile] = []
    for topic, makers in (("documents", docs), ("queries", queries)):
        made: Counter[str] = Counter()
        kinds = list(makers)
        i = 0
        while sum(made.values()) < per_topic:
            kind = kinds[i % len(kinds)]
            i += 1
            if made[kind] >= caps.get(kind, per_topic):
                continue
            uid = f"{seed}-{topic[0]}{len(out):05d}"
            key, value, rid, dead_letter, answer = makers[kind](rng, uid, made[kind])
            made[kind] += 1
            out.append(Hostile(topic, kind, key, value, rid, dead_letter, answer))
    # The huge ones last: they take the longest to refuse, and the rest should not queue
    # behind them. A stage they stall is still caught: the canaries come after them.
    return sorted(out, key=lambda h: (h.topic, h.kind in ("huge_string", "huge_array")))


# -- reading the outcome topics ------------------------------------------------------------
@dataclass
class _Published:
    hostile: Hostile
    partition: int
    offset: int


class TopicTally:
    """Reads `deadletter`, `responses` and `documents.indexed` from the beginning (every
    partition, no group) and counts what it sees: dead letters by original topic, partition
    and offset; final responses and indexed events by the id they answer."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dead_letters: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
        self.responses: dict[str, list[tuple[str, str]]] = {}
        """request id -> [(status, error_reason)] in topic order."""
        self.indexed: dict[str, list[tuple[str, int]]] = {}
        """source event id -> [(outcome, chunk_count)]."""
        self.records = 0
        self.last_record_at = time.monotonic()
        self._consumer: Any = None

    def __enter__(self) -> TopicTally:
        from kafka import TopicPartition

        prefix = self.settings.kafka.topic_prefix
        consumer = kafka.make_consumer(
            self.settings, group_id=None, auto_offset_reset="earliest", fetch_max_wait_ms=50
        )
        tps = [
            TopicPartition(spec.full_name(prefix), p)
            for spec in (DEADLETTER, RESPONSES, INDEXED)
            for p in sorted(consumer.partitions_for_topic(spec.full_name(prefix)) or ())
        ]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        self._consumer = consumer
        return self

    def __exit__(self, *exc: object) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def poll(self, duration_s: float) -> int:
        """Read for `duration_s`; returns how many records were read."""
        prefix = self.settings.kafka.topic_prefix
        dl, resp = DEADLETTER.full_name(prefix), RESPONSES.full_name(prefix)
        n = 0
        end = time.monotonic() + duration_s
        while (left := end - time.monotonic()) > 0:
            for tp, records in self._consumer.poll(timeout_ms=int(min(left, 0.5) * 1000)).items():
                for r in records:
                    n += 1
                    try:
                        value = json.loads(r.value)
                    except (TypeError, ValueError):
                        continue
                    if tp.topic == dl:
                        self._dead_letter(value)
                    elif tp.topic == resp:
                        rid = value.get("request_id") or (r.key or b"").decode("utf-8", "replace")
                        self.responses.setdefault(rid, []).append(
                            (str(value.get("status")), str(value.get("error_reason") or ""))
                        )
                    else:
                        self.indexed.setdefault(str(value.get("source_event_id")), []).append(
                            (str(value.get("outcome")), int(value.get("chunk_count") or 0))
                        )
        if n:
            self.records += n
            self.last_record_at = time.monotonic()
        return n

    def _dead_letter(self, value: dict[str, Any]) -> None:
        topic, partition, offset = (
            value.get(k) for k in ("original_topic", "original_partition", "original_offset")
        )
        if isinstance(topic, str) and isinstance(partition, int) and isinstance(offset, int):
            self.dead_letters.setdefault((topic, partition, offset), []).append(
                {k: value.get(k) for k in ("stage", "error_kind", "message", "request_id")}
            )

    def until(
        self, done: Callable[[], bool], timeout_s: float, idle_s: float = 30.0, settle_s: float = 3.0
    ) -> bool:
        """Read until `done()` holds (then `settle_s` more, to catch duplicates), `timeout_s`
        passes, or nothing new arrives for `idle_s` (what is missing by then stays missing).
        Returns whether `done()` held."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and time.monotonic() - self.last_record_at < idle_s:
            self.poll(0.5)
            if done():
                self.poll(settle_s)
                return True
        return done()


# -- the stack -----------------------------------------------------------------------------
@contextmanager
def running_stack(data_dir: Path, **extra_env: str) -> Iterator[BenchStack]:
    """`ragstream up --detach` on `data_dir`, and `ragstream down` whatever happens."""
    env = {"RAGSTREAM_LOG_LEVEL": "INFO", "COLUMNS": "200", **extra_env}
    stack = BenchStack.create(data_dir, **env)
    try:
        stack.up()
        _sign_for(stack.settings)
    except BaseException:
        _down_quietly(stack)
        sys.stderr.write(_log_tails(stack.settings))
        raise
    try:
        yield stack
    finally:
        stack.down()


def _down_quietly(stack: BenchStack) -> None:
    import subprocess

    subprocess.run(
        [sys.executable, "-m", "ragstream", "down"],
        env=stack.env,
        capture_output=True,
        timeout=120,
        check=False,
    )


def _log_tails(settings: Settings, chars: int = 3000) -> str:
    out = []
    for log in sorted(settings.log_dir.glob("*.log")):
        out.append(f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}\n")
    return "".join(out)


def stack_state(settings: Settings) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((settings.run_dir / "stack.json").read_text())
    return data


def restarts(settings: Settings) -> dict[str, int]:
    return {name: int(c["restarts"]) for name, c in stack_state(settings)["components"].items()}


def last_exits(settings: Settings) -> dict[str, str]:
    """Why the supervisor last restarted each component that it restarted."""
    return {
        name: str(c["last_exit"])
        for name, c in stack_state(settings)["components"].items()
        if c.get("last_exit")
    }


def pids(settings: Settings) -> dict[str, int | None]:
    return {name: c.get("pid") for name, c in stack_state(settings)["components"].items()}


def heartbeat_names(settings: Settings) -> dict[str, tuple[str, ...]]:
    """Supervised component -> the heartbeat files (`run/worker-<name>.json`) it writes."""
    from ragstream.infra.audit.tables import sink_name
    from ragstream.stack import audit_components, worker_component
    from ragstream.workers.stages import parse_stages

    out = {worker_component(parse_stages(w)): parse_stages(w) for w in settings.workers}
    out.update({name: (sink_name(tables),) for name, tables in audit_components(settings)})
    return out


def heartbeat(settings: Settings, name: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((settings.run_dir / f"worker-{name}.json").read_text())
    except (OSError, ValueError):
        return None
    return data


def component_ready(settings: Settings, component: str, not_pids: Collection[int] = ()) -> int | None:
    """The component's pid if every heartbeat it writes is fresh and ready, from a live process
    that is none of `not_pids`; else None."""
    pid: int | None = None
    for name in heartbeat_names(settings)[component]:
        hb = heartbeat(settings, name)
        if not hb or not hb.get("ready") or time.time() - float(hb.get("ts", 0)) > 3.0:
            return None
        hb_pid = int(hb["pid"])
        if hb_pid in not_pids or (pid is not None and hb_pid != pid) or not _alive(hb_pid):
            return None
        pid = hb_pid
    return pid


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def kill_component(settings: Settings, component: str, pid: int | None = None) -> int:
    """SIGKILL the component's process: `pid` if given (checked against the pid the supervisor
    started), else the supervisor's. Returns the pid killed.

    Raises:
        RuntimeError: it has no live process right now, or `pid` is not the supervisor's.
    """
    started = pids(settings).get(component)
    if pid is not None and pid != started:
        raise RuntimeError(f"{component}: pid {pid} is not the one the supervisor started ({started})")
    if not started or not _alive(started):
        raise RuntimeError(f"{component} has no live process to kill (pid {started})")
    os.kill(started, signal.SIGKILL)
    return started


def crash_lines(settings: Settings, since: dict[str, int] | None = None) -> list[str]:
    """Lines of the worker and sink logs that say a Faust agent or task crashed (from the
    byte offsets in `since`, if given)."""
    out: list[str] = []
    for log in sorted(settings.log_dir.glob("*.log")):
        if not log.name.startswith(("worker-", "audit-")):
            continue
        with open(log, "rb") as f:
            f.seek((since or {}).get(log.name, 0))
            text = f.read().decode("utf-8", "replace")
        out += [f"{log.name}: {ln[:300]}" for ln in text.splitlines() if _CRASH.search(ln)]
    return out


_CRASH = re.compile(r"(?i)\bcrashed\b|Task exception was never retrieved|RecursionError")


def log_sizes(settings: Settings) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in settings.log_dir.glob("*.log")}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


# -- scenario 1: fuzz ----------------------------------------------------------------------
@dataclass
class FuzzResult:
    sent: int = 0
    sent_by_topic: dict[str, int] = field(default_factory=dict)
    sent_by_kind: dict[str, int] = field(default_factory=dict)
    publish_failed: list[str] = field(default_factory=list)
    dead_lettered: int = 0
    answered_error: int = 0
    both: int = 0
    lost: int = 0
    """Neither dead-lettered nor answered."""
    lost_by_kind: dict[str, int] = field(default_factory=dict)
    incomplete: int = 0
    """One outcome came but a required one did not (a readable request id without its
    `invalid_request` response, a dead letter owed but only an answer)."""
    incomplete_by_kind: dict[str, int] = field(default_factory=dict)
    duplicated: int = 0
    """Messages with more than one dead letter or more than one final response."""
    duplicated_by_kind: dict[str, int] = field(default_factory=dict)
    """`topic/kind/dead letters` or `topic/kind/responses` -> messages with several."""
    not_error: int = 0
    """Hostile queries answered with a status other than error or blocked (an ok answer)."""
    canary_documents: int = 0
    canary_documents_indexed: int = 0
    canary_questions: int = 0
    canary_questions_ok: int = 0
    stalled_partitions: list[str] = field(default_factory=list)
    """`documents[p]` / `queries[p]` whose canary did not come through."""
    restarts_before: dict[str, int] = field(default_factory=dict)
    restarts_after: dict[str, int] = field(default_factory=dict)
    pids_changed: list[str] = field(default_factory=list)
    last_exits: dict[str, str] = field(default_factory=dict)
    crashes: list[str] = field(default_factory=list)
    publish_s: float = 0.0
    settle_s: float = 0.0
    examples: list[str] = field(default_factory=list)

    @property
    def restarted(self) -> dict[str, int]:
        return {
            k: self.restarts_after.get(k, 0) - v
            for k, v in self.restarts_before.items()
            if self.restarts_after.get(k, 0) != v
        }


def fuzz(
    stack: BenchStack,
    *,
    seed: int = SEED,
    per_topic: int = 600,
    timeout_s: float = 150.0,
    idle_s: float = 30.0,
) -> FuzzResult:
    """Publish the hostile corpus, then a valid document and question per partition; account
    for every message. Gives up waiting `idle_s` after the last new outcome (a stalled stage
    would otherwise hold the run for the whole `timeout_s`)."""
    settings = stack.settings
    prefix = settings.kafka.topic_prefix
    res = FuzzResult(restarts_before=restarts(settings))
    pids_before = pids(settings)
    logs_before = log_sizes(settings)
    corpus = hostile_corpus(settings.kafka.max_message_bytes, seed=seed, per_topic=per_topic)

    t0 = time.monotonic()
    published: list[_Published] = []
    producer = kafka.make_producer(settings, linger_ms=5)
    try:
        futures = []
        for h in corpus:
            try:
                futures.append((h, producer.send(f"{prefix}.{h.topic}", key=h.key, value=h.value)))
            except Exception as exc:  # noqa: BLE001 - a refused publish is reported, not counted
                res.publish_failed.append(f"{h.topic}/{h.kind}: {exc!r}"[:300])
        producer.flush(timeout=120)
        for h, fut in futures:
            try:
                md = fut.get(timeout=60)
            except Exception as exc:  # noqa: BLE001 - as above
                res.publish_failed.append(f"{h.topic}/{h.kind}: {exc!r}"[:300])
                continue
            published.append(_Published(h, md.partition, md.offset))
        canaries = _publish_canaries(settings, producer)
        producer.flush(timeout=60)
    finally:
        producer.close()
    res.publish_s = time.monotonic() - t0
    res.sent = len(published)
    res.sent_by_topic = dict(Counter(p.hostile.topic for p in published))
    res.sent_by_kind = dict(Counter(f"{p.hostile.topic}/{p.hostile.kind}" for p in published))
    doc_canaries, query_canaries = canaries
    res.canary_documents, res.canary_questions = len(doc_canaries), len(query_canaries)

    def outcome(tally: TopicTally, p: _Published) -> tuple[int, int]:
        dls = tally.dead_letters.get((f"{prefix}.{p.hostile.topic}", p.partition, p.offset), [])
        answers = tally.responses.get(p.hostile.request_id, []) if p.hostile.request_id else []
        return len(dls), len(answers)

    def complete(tally: TopicTally) -> bool:
        for p in published:
            dl, ans = outcome(tally, p)
            if (
                (p.hostile.must_dead_letter and not dl)
                or (p.hostile.must_answer and not ans)
                or not (dl or ans)
            ):
                return False
        return all(e in tally.indexed for _, e in doc_canaries) and all(
            r in tally.responses for _, r in query_canaries
        )

    t1 = time.monotonic()
    with TopicTally(settings) as tally:
        tally.until(lambda: complete(tally), timeout_s, idle_s=idle_s)
    res.settle_s = time.monotonic() - t1

    lost_kinds: Counter[str] = Counter()
    incomplete_kinds: Counter[str] = Counter()
    duplicated_kinds: Counter[str] = Counter()
    for p in published:
        h = p.hostile
        dl, ans = outcome(tally, p)
        statuses = tally.responses.get(h.request_id, []) if h.request_id else []
        res.dead_lettered += dl > 0
        res.answered_error += any(s == "error" for s, _ in statuses)
        res.both += dl > 0 and ans > 0
        # A guardrail may refuse a hostile query first (`blocked`): also an answer that is no answer.
        res.not_error += any(s not in ("error", "blocked") for s, _ in statuses)
        res.duplicated += dl > 1 or ans > 1
        for what, n in (("dead letters", dl), ("responses", ans)):
            if n > 1:
                duplicated_kinds[f"{h.topic}/{h.kind}/{what}"] += 1
        if not dl and not ans:
            res.lost += 1
            lost_kinds[f"{h.topic}/{h.kind}"] += 1
            if len(res.examples) < 12:
                res.examples.append(f"lost {h.topic}[{p.partition}]@{p.offset} {h.kind}: {_preview(h.value)}")
        elif (h.must_dead_letter and not dl) or (h.must_answer and not ans):
            res.incomplete += 1
            incomplete_kinds[f"{h.topic}/{h.kind}"] += 1
            if len(res.examples) < 24:
                res.examples.append(
                    f"incomplete {h.topic}[{p.partition}]@{p.offset} {h.kind}: dead letters {dl}, "
                    f"responses {ans}: {_preview(h.value)}"
                )
    res.lost_by_kind = dict(lost_kinds)
    res.incomplete_by_kind = dict(incomplete_kinds)
    res.duplicated_by_kind = dict(duplicated_kinds)
    for partition, event_id in doc_canaries:
        if any(o == "indexed" for o, _ in tally.indexed.get(event_id, [])):
            res.canary_documents_indexed += 1
        else:
            res.stalled_partitions.append(f"documents[{partition}]")
    for partition, rid in query_canaries:
        if any(s == "ok" for s, _ in tally.responses.get(rid, [])):
            res.canary_questions_ok += 1
        else:
            res.stalled_partitions.append(f"queries[{partition}]: {tally.responses.get(rid)}")
    res.restarts_after = restarts(settings)
    res.pids_changed = [k for k, v in pids(settings).items() if v != pids_before.get(k)]
    res.last_exits = last_exits(settings)
    res.crashes = crash_lines(settings, logs_before)
    return res


def _preview(value: bytes | None, n: int = 80) -> str:
    if value is None:
        return "<null>"
    return repr(value[:n]) + (f"... ({len(value)} bytes)" if len(value) > n else "")


def _publish_canaries(
    settings: Settings, producer: Any
) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """A valid document and a valid question on every partition, behind the hostile ones.
    Returns [(partition, event id)] and [(partition, request id)]."""
    prefix = settings.kafka.topic_prefix
    docs, questions = [], []
    for p in range(settings.kafka.partitions):
        doc = DocumentSubmitted(
            tenant=TENANT,
            document_id=f"canary/forklifts-{p}",
            title="Forklift inspections",
            content=f"# Forklift inspections\n\nForklift {p} is inspected every morning at 07:00 by the shift lead.",
            media_type="text/markdown",
            token=_token(),
        )
        producer.send(DOCUMENTS.full_name(prefix), key=doc.kafka_key(), value=encode(doc), partition=p)
        docs.append((p, doc.event_id))
    producer.flush(timeout=60)
    for p in range(settings.kafka.partitions):
        q = QuerySubmitted(
            tenant=TENANT,
            request_id=f"canary-{p}-{os.urandom(4).hex()}",
            question="When are the forklifts inspected?",
            generation=GenerationOptions(max_tokens=8),
            deadline_ms=120_000,
            stream=False,
            token=_token(),
        )
        producer.send(QUERIES.full_name(prefix), key=q.kafka_key(), value=encode(q), partition=p)
        questions.append((p, q.request_id))
    return docs, questions


# -- load ----------------------------------------------------------------------------------
@dataclass
class Asked:
    """One SDK call, as its caller saw it."""

    kind: str
    """`cheap` (unknown route) or `real` (generated)."""
    started: float
    returned: float
    deadline_s: float
    request_id: str = ""
    status: str = ""
    reason: str = ""
    answered: bool = False
    """An `ok` response with a non-empty answer: the judge stage judges exactly these."""
    raised: str = ""
    """The exception the call raised, if any."""

    @property
    def local(self) -> bool:
        """The SDK gave up and built the error itself: the pipeline never answered."""
        return LOCAL_DEADLINE in self.reason


class QueryLoad:
    """Cheap questions at a steady rate plus a few real generations, through one SDK client."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        cheap_per_s: float = 5.0,
        cheap_concurrency: int = 48,
        real_streams: int = 1,
        max_tokens: int = 8,
        cheap_deadline_ms: int = 60_000,
        real_deadline_ms: int = 60_000,
    ) -> None:
        self.client = client
        self.cheap_per_s = cheap_per_s
        self.real_streams = real_streams
        self.max_tokens = max_tokens
        self.cheap_deadline_ms = cheap_deadline_ms
        self.real_deadline_ms = real_deadline_ms
        self.asked: list[Asked] = []
        self._gate = asyncio.Semaphore(cheap_concurrency)
        self._n = 0

    async def one(self, kind: str) -> Asked:
        self._n += 1
        i = self._n
        deadline_ms = self.cheap_deadline_ms if kind == "cheap" else self.real_deadline_ms
        started = time.monotonic()
        a = Asked(kind, started, started, deadline_ms / 1000)
        try:
            if kind == "cheap":
                r = await self.client.ask(
                    f"load {i}: when are forklifts inspected?",
                    tenant=TENANT,
                    route=CHEAP_ROUTE,
                    deadline_ms=deadline_ms,
                )
            else:
                r = await self.client.ask(
                    f"When is forklift {i % 4} inspected?",
                    tenant=TENANT,
                    top_k=2,
                    max_tokens=self.max_tokens,
                    deadline_ms=deadline_ms,
                )
            a.request_id, a.status, a.reason = r.request_id, r.status, r.error_reason or ""
            a.answered = r.status == "ok" and bool(r.answer.strip())
        except Exception as exc:  # noqa: BLE001 - what the caller saw is the measurement
            a.raised = f"{type(exc).__name__}: {exc}"[:300]
        a.returned = time.monotonic()
        self.asked.append(a)
        return a

    async def _cheap(self) -> None:
        async with self._gate:
            await self.one("cheap")

    async def run(self, stop: asyncio.Event) -> list[Asked]:
        async def real_loop() -> None:
            while not stop.is_set():
                await self.one("real")

        tasks: set[asyncio.Task[Any]] = {asyncio.create_task(real_loop()) for _ in range(self.real_streams)}
        interval = 1.0 / self.cheap_per_s if self.cheap_per_s > 0 else None
        while not stop.is_set():
            if interval is None:
                await stop.wait()
                break
            await self._gate.acquire()
            self._gate.release()
            t = asyncio.create_task(self._cheap())
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
        await asyncio.gather(*tasks, return_exceptions=True)
        return self.asked


@dataclass
class Submitted:
    document_id: str
    event_id: str
    expected_chunks: int


class DocumentLoad:
    """Publishes distinct documents at a steady rate from a thread until stopped."""

    def __init__(self, settings: Settings, *, per_s: float = 1.0, seed: int = SEED) -> None:
        self.settings = settings
        self.per_s = per_s
        self.rng = random.Random(seed)
        self.submitted: list[Submitted] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="document-load", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> DocumentLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        from ragstream.infra.chunking import Chunker
        from ragstream.infra.parsing import parse_document

        chunking = self.settings.chunking
        chunker = Chunker(chunking.max_tokens, chunking.overlap_tokens)
        words = [
            "forklift", "pallet", "inspection", "shift", "battery", "warehouse", "safety", "aisle",
            "loading", "dock", "helmet", "training", "permit", "hydraulic", "brake", "horn", "mast",
            "capacity", "ramp", "charging", "operator", "logbook", "supervisor", "incident",
        ]  # fmt: skip
        producer = kafka.make_producer(self.settings)
        topic = DOCUMENTS.full_name(self.settings.kafka.topic_prefix)
        try:
            i = 0
            while not self._stop.is_set():
                paragraphs = [
                    " ".join(self.rng.choice(words) for _ in range(self.rng.randint(60, 140))).capitalize()
                    + "."
                    for _ in range(self.rng.randint(2, 6))
                ]
                content = f"# Procedure {i}\n\n" + "\n\n".join(paragraphs) + "\n"
                doc = DocumentSubmitted(
                    tenant=TENANT,
                    document_id=f"kill/procedure-{i:04d}",
                    title=f"Procedure {i}",
                    content=content,
                    media_type="text/markdown",
                    token=_token(),
                )
                parsed = parse_document(content.encode(), "text/markdown", settings=chunking)
                expected = len(chunker.chunk(parsed))
                producer.send(topic, key=doc.kafka_key(), value=encode(doc)).get(timeout=60)
                self.submitted.append(Submitted(doc.document_id, doc.event_id, expected))
                i += 1
                self._stop.wait(1.0 / self.per_s)
        except BaseException as exc:  # noqa: BLE001 - reported by the scenario
            self.error = exc
        finally:
            producer.close()


# -- scenario 2: kill -9 of each worker under load -----------------------------------------
@dataclass
class Kill:
    component: str
    pid: int
    at_s: float
    """Seconds into the load when it was killed."""
    recovered_s: float | None
    """Kill -> every heartbeat of the component ready again from a new pid (None: never)."""
    first_response_s: float | None = None
    """Kill -> the first response to a request published after the kill (query worker)."""


@dataclass
class KillResult:
    kills: list[Kill] = field(default_factory=list)
    kills_by_component: dict[str, int] = field(default_factory=dict)
    restarts_counted: dict[str, int] = field(default_factory=dict)
    load_s: float = 0.0
    # documents
    documents: int = 0
    documents_lost: int = 0
    """No DocumentIndexed event and no chunks in the store."""
    documents_wrong_chunks: list[str] = field(default_factory=list)
    """Documents whose stored chunk count is not what the chunker makes of them."""
    duplicate_chunk_rows: int = 0
    indexed_events_min: int = 0
    indexed_events_max: int = 0
    indexed_events_hist: dict[int, int] = field(default_factory=dict)
    # requests
    requests: int = 0
    requests_by_kind: dict[str, int] = field(default_factory=dict)
    sdk_outcomes: dict[str, int] = field(default_factory=dict)
    raised: int = 0
    lost_responses: int = 0
    """Requests with no final response on the topic."""
    duplicate_responses: int = 0
    """Extra final responses on the topic (sum over requests of count - 1)."""
    requests_with_duplicates: int = 0
    real_not_ok: int = 0
    not_ok_reasons: dict[str, int] = field(default_factory=dict)
    """Why the requests that were neither answered nor refused for their unknown route ended
    as they did (the response's reason, up to its first 120 characters)."""
    cheap_latency_s: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """p50, p95 and max of what a cheap question took (publish -> final response)."""
    audit_rows_min: int = 0
    audit_rows_max: int = 0
    audit_missing: int = 0
    audit_duplicated: int = 0
    judged_requests: int = 0
    judgements_missing: int = 0
    """Answered requests with no `overall` judgement in Iceberg (the judge stage lost them)."""
    judgement_duplicates: int = 0
    """(request, judge) pairs with more than one judgements row."""
    crashes: list[str] = field(default_factory=list)
    document_load_error: str = ""
    examples: list[str] = field(default_factory=list)

    def recover_s(self, component: str | None = None) -> list[float]:
        return [
            k.recovered_s
            for k in self.kills
            if k.recovered_s is not None and (component is None or k.component == component)
        ]


def _outcome_label(a: Asked) -> str:
    if a.raised:
        return f"{a.kind}: raised {a.raised.split(':', 1)[0]}"
    reason = a.reason.split(":", 1)[0] if a.reason else ""
    if a.local:
        reason = "deadline_exceeded (SDK, no response)"
    return f"{a.kind}: {a.status}" + (f" {reason}" if reason else "")


def _kill_sequence(
    settings: Settings, components: list[str], rounds: int, t0: float, timeout_s: float = 90.0
) -> list[Kill]:
    """Kill each component in turn once it is ready, `rounds` times; wait for each to come
    back before the next kill."""
    out: list[Kill] = []
    killed: set[int] = set()
    for _ in range(rounds):
        for component in components:
            deadline = time.monotonic() + timeout_s
            while (ready := component_ready(settings, component, killed)) is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{component} was not ready to be killed within {timeout_s:.0f}s")
                time.sleep(0.1)
            _dwell(settings, component)
            pid = kill_component(settings, component, ready)
            at = time.monotonic()
            killed.add(pid)
            recovered: float | None = None
            while time.monotonic() - at < timeout_s:
                if component_ready(settings, component, killed) is not None:
                    recovered = time.monotonic() - at
                    break
                time.sleep(0.05)
            out.append(Kill(component, pid, at - t0, recovered))
    return out


def _dwell(settings: Settings, component: str, max_s: float = 3.0) -> None:
    """Let load build up before the kill: the audit sink until it holds uncommitted rows,
    the workers for a fixed while (they always have requests or documents in flight)."""
    if not component.startswith("audit-"):
        time.sleep(1.5)
        return
    (name,) = heartbeat_names(settings)[component]
    end = time.monotonic() + max_s
    while time.monotonic() < end:
        hb = heartbeat(settings, name) or {}
        if any((hb.get("buffered") or {}).values()):
            return
        time.sleep(0.02)


def kills(stack: BenchStack, *, rounds: int = 2, tail_s: float = 4.0) -> KillResult:
    """SIGKILL every worker process and the audit sink `rounds` times each while documents and
    questions flow; then account for every document and request."""
    settings = stack.settings
    components = list(heartbeat_names(settings))
    res = KillResult()
    restarts_before = restarts(settings)
    logs_before = log_sizes(settings)

    async def drive() -> tuple[list[Kill], list[Asked]]:
        async with AsyncClient(settings, deadline_grace_s=SDK_GRACE_S) as client:
            load = QueryLoad(client)
            stop = asyncio.Event()
            runner = asyncio.create_task(load.run(stop))
            try:
                await asyncio.sleep(2.0)
                done = await asyncio.to_thread(_kill_sequence, settings, components, rounds, t0)
                await asyncio.sleep(tail_s)
            finally:
                stop.set()
                asked = await runner
            return done, asked

    t0 = time.monotonic()
    with DocumentLoad(settings) as docs:
        killed, asked = asyncio.run(drive())
        docs.stop()
    res.load_s = time.monotonic() - t0
    res.kills = killed
    res.kills_by_component = dict(Counter(k.component for k in killed))
    if docs.error is not None:
        res.document_load_error = repr(docs.error)

    # The query worker: the first answer to a request published after each of its kills.
    for k in killed:
        if "retrieve" in k.component:
            after = [a.returned - (t0 + k.at_s) for a in asked if a.started - t0 > k.at_s and not a.raised]
            k.first_response_s = min(after) if after else None

    submitted = docs.submitted
    res.documents = len(submitted)
    res.requests = len(asked)
    res.requests_by_kind = dict(Counter(a.kind for a in asked))
    res.sdk_outcomes = dict(Counter(_outcome_label(a) for a in asked))
    res.raised = sum(1 for a in asked if a.raised)
    res.real_not_ok = sum(1 for a in asked if a.kind == "real" and a.status != "ok")
    res.not_ok_reasons = dict(
        Counter(
            f"{a.kind}: {a.reason[:120]}"
            for a in asked
            if a.status != "ok" and not a.reason.startswith("unknown_route")
        )
    )
    ids = [a.request_id for a in asked if a.request_id]

    with TopicTally(settings) as tally:
        tally.until(
            lambda: (
                all(s.event_id in tally.indexed for s in submitted) and all(r in tally.responses for r in ids)
            ),
            timeout_s=120,
        )
    per_submission = [len(tally.indexed.get(s.event_id, [])) for s in submitted]
    res.indexed_events_hist = dict(sorted(Counter(per_submission).items()))
    res.indexed_events_min = min(per_submission, default=0)
    res.indexed_events_max = max(per_submission, default=0)
    counts = [len(tally.responses.get(r, [])) for r in ids]
    res.lost_responses = sum(1 for c in counts if c == 0) + res.raised
    res.duplicate_responses = sum(c - 1 for c in counts if c > 1)
    res.requests_with_duplicates = sum(1 for c in counts if c > 1)
    cheap = [a.returned - a.started for a in asked if a.kind == "cheap"]
    res.cheap_latency_s = (pct(cheap, 50), pct(cheap, 95), max(cheap, default=0.0))
    kind_of = {a.request_id: a for a in asked}
    for r, c in zip(ids, counts, strict=True):
        if c != 1 and len(res.examples) < 12:
            a = kind_of[r]
            res.examples.append(
                f"request {r} ({a.kind}, published at {a.started - t0:.1f}s, caller got {a.status} "
                f"{a.reason[:60]!r} after {a.returned - a.started:.1f}s): {c} final responses "
                f"{tally.responses.get(r, [])[:3]}"
            )

    stored = asyncio.run(_stored_chunks(settings, [s.document_id for s in submitted]))
    for s, indexed_events in zip(submitted, per_submission, strict=True):
        rows, distinct, twice = stored.get(s.document_id, (0, 0, []))
        res.duplicate_chunk_rows += rows - distinct
        if twice and len(res.examples) < 16:
            res.examples.append(f"document {s.document_id}: chunk rows stored more than once: {twice[:4]}")
        if rows == 0 and indexed_events == 0:
            res.documents_lost += 1
        elif distinct != s.expected_chunks:
            res.documents_wrong_chunks.append(
                f"{s.document_id}: {distinct} stored, {s.expected_chunks} expected"
            )

    res.audit_rows_min, res.audit_rows_max, res.audit_missing, res.audit_duplicated = _audit_rows(
        settings, ids
    )
    answered = [a.request_id for a in asked if a.request_id and a.answered]
    res.judged_requests, res.judgements_missing, res.judgement_duplicates, unjudged = _judgement_rows(
        settings, answered
    )
    res.examples += [f"request {r}: answered, never judged" for r in unjudged[:5]]

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = restarts(settings)
        res.restarts_counted = {c: now[c] - restarts_before[c] for c in components}
        if all(res.restarts_counted[c] >= res.kills_by_component.get(c, 0) for c in components):
            break
        time.sleep(0.5)
    res.crashes = crash_lines(settings, logs_before)
    return res


async def _stored_chunks(
    settings: Settings, document_ids: list[str]
) -> dict[str, tuple[int, int, list[str]]]:
    """document id -> (rows, distinct chunk ids, chunk ids stored more than once) in the store,
    for the chaos tenant."""
    from ragstream.infra.vectorstore import open_vector_store
    from ragstream.infra.vectorstore.lance import LanceDBVectorStore

    store = open_vector_store(settings)
    await store.start()
    try:
        if not isinstance(store, LanceDBVectorStore):
            return {d: (n := await store.count_chunks(TENANT, d), n, []) for d in document_ids}
        rows = (
            await store.table.query()
            .where(f"tenant = '{TENANT}'")
            .select(["document_id", "chunk_id"])
            .to_list()
        )
    finally:
        await store.close()
    per_chunk: Counter[tuple[str, str]] = Counter((r["document_id"], r["chunk_id"]) for r in rows)
    out: dict[str, tuple[int, int, list[str]]] = {d: (0, 0, []) for d in document_ids}
    for (doc, chunk), n in per_chunk.items():
        if doc in out:
            total, distinct, twice = out[doc]
            out[doc] = (total + n, distinct + 1, twice + ([f"{chunk} x{n}"] if n > 1 else []))
    return out


def _audit_rows(settings: Settings, ids: list[str], timeout_s: float = 120.0) -> tuple[int, int, int, int]:
    """(min, max) `inference_log` rows per request, and how many requests have none / several,
    once every request has a row or `timeout_s` passed."""
    from ragstream.infra.audit.query import audit_sql

    if not ids:
        return 0, 0, 0, 0
    values = ", ".join(f"('{r}')" for r in ids)
    sql = (
        f"WITH asked(request_id) AS (VALUES {values}) "
        "SELECT a.request_id, count(l.request_id) AS n FROM asked a "
        "LEFT JOIN inference_log l ON l.request_id = a.request_id GROUP BY a.request_id"
    )
    deadline = time.monotonic() + timeout_s
    while True:
        n = [int(r["n"]) for r in audit_sql(settings, sql).to_pylist()]
        if all(n) or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    return min(n), max(n), sum(1 for x in n if x == 0), sum(1 for x in n if x > 1)


def _judgement_rows(
    settings: Settings, ids: list[str], timeout_s: float = 180.0
) -> tuple[int, int, int, list[str]]:
    """(judged, missing, duplicated, the missing ids) for answered requests: how many have
    their `overall` judgement in the judgements table, how many do not once `timeout_s`
    passed (or every one has), and how many (request, judge) pairs have more than one row."""
    from ragstream.infra.audit.query import audit_sql

    if not ids or not settings.judges.enabled:
        return 0, 0, 0, []
    values = ", ".join(f"('{r}')" for r in ids)
    overall = (
        f"WITH asked(request_id) AS (VALUES {values}) SELECT DISTINCT j.request_id "
        "FROM asked a JOIN judgements j ON j.request_id = a.request_id AND j.judge = 'overall' "
        "AND j.source = 'stream'"
    )
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    while time.monotonic() < deadline:
        try:
            seen = {r["request_id"] for r in audit_sql(settings, overall).to_pylist()}
        except Exception:  # noqa: BLE001 - the table may not exist before its first commit
            seen = set()
        if len(seen) >= len(ids):
            break
        time.sleep(2.0)
    judged = len(seen)
    twice = (
        f"WITH asked(request_id) AS (VALUES {values}) SELECT count(*) AS n FROM ("
        "SELECT j.request_id, j.judge FROM asked a JOIN judgements j ON j.request_id = a.request_id "
        "WHERE j.source = 'stream' GROUP BY j.request_id, j.judge HAVING count(*) > 1)"
    )
    duplicated = int(audit_sql(settings, twice).to_pylist()[0]["n"]) if judged else 0
    return judged, len(ids) - judged, duplicated, [r for r in ids if r not in seen]


# -- scenario 3: fresh starts --------------------------------------------------------------
@dataclass
class FreshStart:
    up_s: float
    document_indexed: bool
    question_status: str
    stages_processed: dict[str, int]
    unhealthy: list[str]
    """Heartbeats that are not ready, or say a stage crashed or stalled (what `status` shows)."""
    restarts: dict[str, int]
    crashes: list[str]
    down_s: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.error
            and self.document_indexed
            and self.question_status == "ok"
            and all(v > 0 for v in self.stages_processed.values())
            and not self.unhealthy
            and not any(self.restarts.values())
            and not self.crashes
        )


@dataclass
class FreshResult:
    starts: list[FreshStart] = field(default_factory=list)

    @property
    def failed(self) -> list[int]:
        return [i for i, s in enumerate(self.starts) if not s.ok]


def fresh_starts(work: Path, n: int = 10) -> FreshResult:
    """`ragstream up` on a new data dir `n` times; each time a document and a question go
    through every stage, then `ragstream down`."""
    from ragstream.ingest import ingest

    doc = work / "doc" / "forklifts.md"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("# Forklifts\n\nForklifts are inspected every morning at 07:00 by the shift lead.\n")
    res = FreshResult()
    for i in range(n):
        t0 = time.monotonic()
        with running_stack(work / f"fresh-{i}") as stack:
            settings = stack.settings
            start = FreshStart(time.monotonic() - t0, False, "", {}, [], {}, [])
            try:
                # The question needs no document to be answered: both go at once.
                with ThreadPoolExecutor(max_workers=1) as pool:
                    report = pool.submit(ingest, settings, [doc], tenant=TENANT, timeout_s=60)
                    start.question_status = asyncio.run(_ask_once(settings))
                    start.document_indexed = report.result().count("indexed") == 1
                start.stages_processed = _wait_processed(settings)
                start.unhealthy = _unhealthy(settings)
            except Exception as exc:  # noqa: BLE001 - recorded per start, asserted by the caller
                start.error = f"{type(exc).__name__}: {exc}"[:500]
            start.restarts = {k: v for k, v in restarts(settings).items() if v}
            start.crashes = crash_lines(settings)
            t1 = time.monotonic()
        start.down_s = time.monotonic() - t1
        res.starts.append(start)
        shutil.rmtree(work / f"fresh-{i}", ignore_errors=True)
    return res


def _unhealthy(settings: Settings) -> list[str]:
    out = []
    for component, names in heartbeat_names(settings).items():
        for name in names:
            hb = heartbeat(settings, name) or {}
            if not hb.get("ready") or hb.get("crashed") or hb.get("stalled_since"):
                keys = ("ready", "crashed", "stalled_since", "stalled_reason")
                out.append(f"{component}/{name}: { ({k: hb.get(k) for k in keys}) }")
    return out


async def _ask_once(settings: Settings) -> str:
    async with AsyncClient(settings) as client:
        r = await client.ask(
            "When are forklifts inspected?", tenant=TENANT, top_k=1, max_tokens=4, deadline_ms=30_000
        )
    return r.status if r.status == "ok" else f"{r.status}: {r.error_reason}"


def _wait_processed(settings: Settings, timeout_s: float = 10.0) -> dict[str, int]:
    """Messages each stage (and the audit sink) says it processed, once all are non-zero."""
    names = [n for names in heartbeat_names(settings).values() for n in names]
    deadline = time.monotonic() + timeout_s
    while True:
        got = {n: int((heartbeat(settings, n) or {}).get("processed") or 0) for n in names}
        if all(got.values()) or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


# -- scenario 4: broker restart ------------------------------------------------------------
@dataclass
class BrokerResult:
    in_flight: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    late: int = 0
    """Callers that waited longer than their deadline + the SDK's grace (+1 s slack)."""
    max_over_deadline_s: float = 0.0
    """Largest (time waited - deadline - grace) over the callers (negative: all early)."""
    broker_answering_s: float | None = None
    """Kill -> a broker answers a metadata request on the port again."""
    broker_ready_s: float | None = None
    """Kill -> the supervisor marks the new broker ready (and creates the topics)."""
    workers_ready_s: float | None = None
    recovered_s: float | None = None
    """Kill -> a new client's question answered ok."""
    recovery_attempts: list[str] = field(default_factory=list)
    old_client_after: str = ""
    document_after: str = ""
    restarts_counted: dict[str, int] = field(default_factory=dict)
    crashes: list[str] = field(default_factory=list)


def broker_restart(
    stack: BenchStack, *, deadline_ms: int = 15_000, recover_timeout_s: float = 150.0
) -> BrokerResult:
    """SIGKILL the broker while questions flow; every caller must hear back in time and the
    stack must answer again by itself."""
    from ragstream.ingest import ingest

    settings = stack.settings
    res = BrokerResult()
    doc_dir = stack.data_dir / "docs"
    doc_dir.mkdir(parents=True, exist_ok=True)
    (doc_dir / "forklifts.md").write_text("# Forklifts\n\nForklifts are inspected every morning at 07:00.\n")
    ingest(settings, [doc_dir], tenant=TENANT, timeout_s=60)
    restarts_before = restarts(settings)
    logs_before = log_sizes(settings)
    workers = list(heartbeat_names(settings))

    async def drive() -> None:
        client = AsyncClient(settings, deadline_grace_s=SDK_GRACE_S)
        await client.start()
        load = QueryLoad(client, cheap_deadline_ms=deadline_ms, real_deadline_ms=deadline_ms)
        stop = asyncio.Event()
        runner = asyncio.create_task(load.run(stop))
        await asyncio.sleep(3.0)
        old_pids = {p for p in pids(settings).values() if p}  # the workers are restarted too
        broker_pid = kill_component(settings, "broker")
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < 6.0:  # callers keep asking meanwhile
            answering = await asyncio.to_thread(kafka.broker_is_up, settings, 0.5)
            if answering and res.broker_answering_s is None:
                res.broker_answering_s = time.monotonic() - killed_at
            await asyncio.sleep(0.2)
        stop.set()
        asked = await runner
        res.in_flight = len(asked)
        res.outcomes = dict(Counter(_outcome_label(a) for a in asked))
        over = [(a.returned - a.started) - a.deadline_s - SDK_GRACE_S for a in asked]
        res.max_over_deadline_s = max(over, default=0.0)
        res.late = sum(1 for o in over if o > 1.0)

        deadline = killed_at + recover_timeout_s

        async def watch() -> None:
            """When the broker answers, the supervisor has it ready, and the workers are."""
            while time.monotonic() < deadline and res.workers_ready_s is None:
                if res.broker_answering_s is None and await asyncio.to_thread(
                    kafka.broker_is_up, settings, 0.5
                ):
                    res.broker_answering_s = time.monotonic() - killed_at
                state = stack_state(settings)["components"]["broker"]
                if res.broker_ready_s is None and state["pid"] != broker_pid and state["ready"]:
                    res.broker_ready_s = time.monotonic() - killed_at
                if res.broker_ready_s is not None and all(
                    component_ready(settings, w, old_pids) is not None for w in workers
                ):
                    res.workers_ready_s = time.monotonic() - killed_at
                await asyncio.sleep(0.2)

        async def probe() -> None:
            """A new client asks, once the supervisor has the broker ready, until answered."""
            while time.monotonic() < deadline and res.broker_ready_s is None:
                await asyncio.sleep(0.2)
            while time.monotonic() < deadline:
                attempt = await _fresh_client_asks(settings)
                res.recovery_attempts.append(f"{time.monotonic() - killed_at:.1f}s {attempt}")
                if attempt == "ok":
                    res.recovered_s = time.monotonic() - killed_at
                    return
                await asyncio.sleep(1.0)

        await asyncio.gather(watch(), probe())
        try:
            r = await client.ask(
                "When are forklifts inspected?", tenant=TENANT, max_tokens=4, deadline_ms=20_000
            )
            res.old_client_after = r.status if r.status == "ok" else f"{r.status}: {r.error_reason}"
        except Exception as exc:  # noqa: BLE001 - reported
            res.old_client_after = f"raised {type(exc).__name__}: {exc}"[:300]
        finally:
            try:
                await client.close()
            except Exception as exc:  # noqa: BLE001 - reported
                res.old_client_after += f"; close raised {type(exc).__name__}"

    asyncio.run(drive())
    (doc_dir / "after.md").write_text("# Pallets\n\nPallets are stacked at most three high.\n")
    try:
        report = ingest(settings, [doc_dir / "after.md"], tenant=TENANT, timeout_s=60)
        res.document_after = ", ".join(f"{o.status} {o.reason}".strip() for o in report.outcomes)
    except Exception as exc:  # noqa: BLE001 - reported
        res.document_after = f"raised {type(exc).__name__}: {exc}"[:300]
    after = restarts(settings)
    res.restarts_counted = {k: after[k] - v for k, v in restarts_before.items() if after[k] != v}
    res.crashes = crash_lines(settings, logs_before)
    return res


async def _fresh_client_asks(settings: Settings) -> str:
    try:
        async with AsyncClient(settings, deadline_grace_s=SDK_GRACE_S) as client:
            r = await client.ask(
                "When are forklifts inspected?", tenant=TENANT, max_tokens=4, deadline_ms=10_000
            )
    except Exception as exc:  # noqa: BLE001 - the caller retries
        return f"raised {type(exc).__name__}: {exc}"[:200]
    return "ok" if r.status == "ok" else f"{r.status}: {(r.error_reason or '')[:120]}"


# -- the table -----------------------------------------------------------------------------
def _fmt_s(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{pct(values, 50):.1f} / {max(values):.1f} s"


def table(f: FuzzResult, k: KillResult, fr: FreshResult, b: BrokerResult) -> Results:
    res = Results()
    topics = ", ".join(f"{t} {n}" for t, n in sorted(f.sent_by_topic.items()))
    res.add("fuzz: hostile messages sent", f"{f.sent} ({topics}), {len(f.sent_by_kind)} kinds", ">= 1000")
    res.add("  dead-lettered", str(f.dead_lettered))
    res.add("  answered with an error", f"{f.answered_error} ({f.both} also dead-lettered)")
    res.add("  lost (no dead letter, no response)", str(f.lost), "0", verdict(f.lost == 0))
    res.add("  owed an outcome they did not get", str(f.incomplete), "0", verdict(f.incomplete == 0))
    res.add("  duplicated outcomes", str(f.duplicated), "0", verdict(f.duplicated == 0))
    canaries_ok = (
        f.canary_documents_indexed == f.canary_documents and f.canary_questions_ok == f.canary_questions
    )
    res.add(
        "  then a valid doc / question per partition",
        f"{f.canary_documents_indexed}/{f.canary_documents} indexed, "
        f"{f.canary_questions_ok}/{f.canary_questions} answered",
        "all",
        verdict(canaries_ok),
    )
    res.add(
        "  worker restarts / crash lines in logs",
        f"{sum(f.restarted.values())} / {len(f.crashes)}",
        "0 / 0",
        verdict(not f.restarted and not f.crashes),
    )
    for comp, n in sorted(k.kills_by_component.items()):
        res.add(f"kill -9 {comp}", f"{n} kills, {k.restarts_counted.get(comp, 0)} restarts counted", "1 each")
        res.add("  time to recover p50 / max", _fmt_s(k.recover_s(comp)))
    first = [x.first_response_s for x in k.kills if x.first_response_s is not None]
    res.add("  first response after a query-worker kill", _fmt_s(first))
    res.add("kills: time to recover p50 / max, all", _fmt_s(k.recover_s()))
    res.add("kills: requests", ", ".join(f"{n} {kind}" for kind, n in k.requests_by_kind.items()))
    res.add(
        "  lost (no final response on the topic)", str(k.lost_responses), "0", verdict(k.lost_responses == 0)
    )
    res.add(
        "  duplicate final responses",
        f"{k.duplicate_responses} (on {k.requests_with_duplicates} requests)",
        "0",
        verdict(k.duplicate_responses == 0),
    )
    res.add(
        "  inference_log rows per request min / max",
        f"{k.audit_rows_min} / {k.audit_rows_max} ({k.audit_missing} missing)",
        "1 / 1",
        verdict(k.audit_rows_min == k.audit_rows_max == 1),
    )
    docs_ok = not k.documents_lost and not k.documents_wrong_chunks and not k.duplicate_chunk_rows
    res.add(
        "kills: documents lost / wrong chunks / dup rows",
        f"{k.documents_lost} / {len(k.documents_wrong_chunks)} / {k.duplicate_chunk_rows} of {k.documents}",
        "0 / 0 / 0",
        verdict(docs_ok),
    )
    res.add("  DocumentIndexed per submission min / max", f"{k.indexed_events_min} / {k.indexed_events_max}")
    n = len(fr.starts)
    res.add(
        "fresh starts: all stages processed, no crash",
        f"{n - len(fr.failed)}/{n}",
        f"{n}/{n}",
        verdict(not fr.failed),
    )
    res.add("  up p50 / max", _fmt_s([s.up_s for s in fr.starts]))
    res.add(
        "broker SIGKILL: callers past deadline + grace",
        f"{b.late} of {b.in_flight} (worst {b.max_over_deadline_s:+.1f} s)",
        "0",
        verdict(b.late == 0),
    )
    times = (b.broker_answering_s, b.broker_ready_s, b.workers_ready_s, b.recovered_s)
    res.add(
        "  broker up / ready / workers / answered again",
        " / ".join("-" if x is None else f"{x:.1f}" for x in times) + " s",
        "recovers",
        verdict(b.recovered_s is not None),
    )
    res.add("  the same SDK client afterwards", b.old_client_after[:50])
    res.raw = {"fuzz": asdict(f), "kills": asdict(k), "fresh": asdict(fr), "broker": asdict(b)}
    return res


def main() -> None:
    import logging

    # The broker scenario's client logs every failed reconnect; the table says what happened.
    for name in ("aiokafka", "kafka"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    n_fresh = int(os.environ.get("BENCH_RELIABILITY_FRESH_STARTS", "10"))
    work = Path(tempfile.mkdtemp(prefix="rs-rel-"))  # short: Triton puts a Unix socket under it
    try:
        with running_stack(work / "fuzz") as stack:
            f = fuzz(stack)
        with running_stack(work / "kills") as stack:
            k = kills(stack)
        fr = fresh_starts(work / "fresh", n_fresh)
        with running_stack(work / "broker") as stack:
            b = broker_restart(stack)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = table(f, k, fr, b)
    res.print("reliability under hostile input and faults (issue 8)")
    console.print(f"saved {res.save('reliability')}")


if __name__ == "__main__":
    main()

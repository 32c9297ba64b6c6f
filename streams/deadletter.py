"""The dead-letter record: what a stage writes when it gives up on a message.

It keeps the original bytes (up to 1 MB), the reason, the stage, where the message was, and
whatever ids can be read from it, so its sender can be told and it can be replayed. Building
it can never fail, whatever the message: it runs on exactly the inputs that broke something.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ragstream.schemas.events import IDENTIFIER_RE, DeadLettered, new_id
from ragstream.streams.codec import sniff_ids

__all__ = ["Message", "dead_letter_record"]

log = logging.getLogger(__name__)

_MAX_ORIGINAL_BYTES = 1_000_000
_MAX_KEY_BYTES = 1024
_MAX_REASON_CHARS = 2000


@dataclass(frozen=True, slots=True)
class Message:
    """A consumed record, as much as a dead-letter record needs of it."""

    topic: str
    partition: int | None
    offset: int | None
    key: bytes | None
    value: bytes | None

    @classmethod
    def from_faust(cls, event: Any) -> Message:
        m = event.message
        return cls(m.topic, m.partition, m.offset, m.key, m.value)


def dead_letter_record(stage: str, message: Message, kind: str, reason: str) -> DeadLettered:
    """A dead-letter record that keeps the original bytes and whatever ids can be read.

    Never raises, whatever the message: ids are read with a bounded parser and kept only if
    they are valid identifiers; the key and the reason are cut to size and made valid UTF-8.
    """
    try:
        return _dead_letter_record(stage, message, kind, reason)
    except Exception:  # the record must exist; keep what cannot fail
        log.exception("%s: building a full dead-letter record failed; writing a minimal one", stage)
        return DeadLettered(
            stage=stage,
            error_kind=kind,
            message=_clean(reason)[:_MAX_REASON_CHARS],
            original=(message.value or b"")[:_MAX_ORIGINAL_BYTES],
            original_truncated=len(message.value or b"") > _MAX_ORIGINAL_BYTES,
            original_topic=message.topic,
            original_partition=message.partition,
            original_offset=message.offset,
        )


def _dead_letter_record(stage: str, message: Message, kind: str, reason: str) -> DeadLettered:
    raw = message.value or b""
    ids = sniff_ids(raw)
    key = message.key[:_MAX_KEY_BYTES].decode("utf-8", "replace") if message.key else None
    request_id = _ident(ids.get("request_id"))
    return DeadLettered(
        stage=stage,
        error_kind=kind,
        message=_clean(reason)[:_MAX_REASON_CHARS],
        original=raw[:_MAX_ORIGINAL_BYTES],
        original_truncated=len(raw) > _MAX_ORIGINAL_BYTES,
        original_topic=message.topic,
        original_partition=message.partition,
        original_offset=message.offset,
        original_key=_clean(key) if key else None,
        source_event_id=_ident(ids.get("source_event_id") or ids.get("event_id"), 64),
        request_id=request_id,
        document_id=_ident(ids.get("document_id")) or (_clean(key)[:256] if key else None),
        trace_id=_ident(ids.get("trace_id")) or request_id or new_id(),
        tenant=_ident(ids.get("tenant")) or "unknown",
    )


def _ident(value: str | None, max_len: int = 256) -> str | None:
    if value and len(value) <= max_len and IDENTIFIER_RE.fullmatch(value):
        return value
    return None


def _clean(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")

"""The dead-letter record: what a stage writes when it gives up on a message.

It keeps the original bytes (up to 1 MB, credentials redacted), the reason, the stage, where the message was, and
whatever ids can be read from it, so its sender can be told and it can be replayed. Building
it can never fail, whatever the message: it runs on exactly the inputs that broke something.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from ragstream.schemas.events import IDENTIFIER_RE, DeadLettered, new_id
from ragstream.schemas.identity import Principal
from ragstream.streams.codec import sniff_ids

__all__ = ["Message", "dead_letter_record", "redact_secrets"]

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
    headers: Any = None
    """The record's headers as the client gave them (read only for trace context)."""

    @classmethod
    def from_faust(cls, event: Any) -> Message:
        m = event.message
        return cls(m.topic, m.partition, m.offset, m.key, m.value, m.headers)


_TOKEN_FIELD = re.compile(rb'("token"\s*:\s*)"(?:[^"\\]|\\.)*(?:"|\\?\Z)')
_JWT_LIKE = re.compile(rb"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
REDACTED = b'"<redacted>"'


def redact_secrets(raw: bytes) -> bytes:
    """The message without its credentials: the value of every `"token"` field, and anything
    shaped like a JWT, is replaced. Works on bytes that are not valid JSON too (regular
    expressions without nested repetition: linear in the message size)."""
    if b"token" not in raw and b"eyJ" not in raw:
        return raw
    raw = _TOKEN_FIELD.sub(lambda m: m.group(1) + REDACTED, raw)
    return _JWT_LIKE.sub(b"<redacted-jwt>", raw)


def dead_letter_record(
    stage: str, message: Message, kind: str, reason: str, *, principal: Principal | None = None
) -> DeadLettered:
    """A dead-letter record that keeps the original bytes and whatever ids can be read.

    Never raises, whatever the message: ids are read with a bounded parser and kept only if
    they are valid identifiers; the key and the reason are cut to size and made valid UTF-8.
    """
    try:
        return _dead_letter_record(stage, message, kind, reason, principal)
    except Exception:  # the record must exist; keep what cannot fail
        log.exception("%s: building a full dead-letter record failed; writing a minimal one", stage)
        return DeadLettered(
            stage=stage,
            error_kind=kind,
            message=_clean(reason)[:_MAX_REASON_CHARS],
            original=_redacted_or_empty(message.value),
            original_truncated=len(message.value or b"") > _MAX_ORIGINAL_BYTES,
            original_topic=message.topic,
            original_partition=message.partition,
            original_offset=message.offset,
        )


def _redacted_or_empty(raw: bytes | None) -> bytes:
    try:
        return redact_secrets((raw or b"")[:_MAX_ORIGINAL_BYTES])
    except Exception:  # noqa: BLE001 - never keep a credential: drop the bytes instead
        return b""


def _dead_letter_record(
    stage: str, message: Message, kind: str, reason: str, principal: Principal | None
) -> DeadLettered:
    raw = message.value or b""
    ids = sniff_ids(raw)
    key = message.key[:_MAX_KEY_BYTES].decode("utf-8", "replace") if message.key else None
    request_id = _ident(ids.get("request_id"))
    return DeadLettered(
        stage=stage,
        error_kind=kind,
        message=_clean(reason)[:_MAX_REASON_CHARS],
        original=redact_secrets(raw[:_MAX_ORIGINAL_BYTES]),
        original_truncated=len(raw) > _MAX_ORIGINAL_BYTES,
        original_topic=message.topic,
        original_partition=message.partition,
        original_offset=message.offset,
        original_key=_clean(key) if key else None,
        source_event_id=_ident(ids.get("source_event_id") or ids.get("event_id"), 64),
        request_id=request_id,
        document_id=_ident(ids.get("document_id")) or (_clean(key)[:256] if key else None),
        trace_id=_ident(ids.get("trace_id")) or request_id or new_id(),
        tenant=principal.tenant if principal is not None else (_ident(ids.get("tenant")) or "unknown"),
        principal=principal,
    )


def _ident(value: str | None, max_len: int = 256) -> str | None:
    if value and len(value) <= max_len and IDENTIFIER_RE.fullmatch(value):
        return value
    return None


def _clean(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")

"""pydantic <-> bytes. Every decoding failure becomes a `SchemaViolation` (dead-letter)."""

from __future__ import annotations

import json
from functools import cache
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError

from ragstream.schemas.errors import SchemaViolation
from ragstream.schemas.events import Event
from ragstream.streams.topics import TopicSpec

__all__ = ["decode", "encode", "sniff_ids"]

_MAX_ERROR_CHARS = 600


@cache
def _adapter(value_types: tuple[type[Event], ...]) -> TypeAdapter[Any]:
    if len(value_types) == 1:
        return TypeAdapter(value_types[0])
    union = Union[value_types]  # type: ignore[valid-type]  # noqa: UP007
    return TypeAdapter(Annotated[union, Field(discriminator="event_type")])


def decode(spec: TopicSpec, raw: bytes | None) -> Event:
    """Parse and validate one message value against the topic's contract.

    Raises:
        SchemaViolation: not UTF-8 JSON, or not one of the topic's event types.
    """
    if raw is None:
        raise SchemaViolation(f"empty message value on {spec.name}")
    try:
        event: Event = _adapter(spec.value_types).validate_json(raw)
    except ValidationError as exc:
        names = ", ".join(t.__name__ for t in spec.value_types)
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:8]
        )
        raise SchemaViolation(f"not a valid {names}: {detail}"[:_MAX_ERROR_CHARS]) from exc
    return event


def encode(event: Event) -> bytes:
    return event.model_dump_json().encode("utf-8")


_SNIFFED = ("event_id", "trace_id", "request_id", "document_id", "tenant", "source_event_id")


def sniff_ids(raw: bytes | None) -> dict[str, str]:
    """Best effort: read the ids of a message that failed validation, to tell its sender.

    Never raises. Only top-level string fields (and `chunk.document_id`) are read.
    """
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    out = {k: v for k in _SNIFFED if isinstance(v := data.get(k), str) and 0 < len(v) <= 256}
    chunk = data.get("chunk")
    if "document_id" not in out and isinstance(chunk, dict):
        doc = chunk.get("document_id")
        if isinstance(doc, str) and 0 < len(doc) <= 256:
            out["document_id"] = doc
    return out

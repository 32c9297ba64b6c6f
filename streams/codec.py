"""pydantic <-> bytes. Every decoding failure becomes a `SchemaViolation` (dead-letter).

Decoding is bounded whatever the input: the value's size is checked before parsing, JSON
nesting is limited by pydantic-core's parser (it fails past 200 levels with a `ValueError`,
never a `RecursionError`), and string and array lengths by the contracts' own limits. The
error paths (`sniff_ids`, and the dead-letter builder in `stage.py`) use the same parser, so
a message that is bad in a new way cannot take down the code that reports it.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError
from pydantic_core import from_json

from ragstream.schemas.errors import SchemaViolation
from ragstream.schemas.events import Event
from ragstream.streams.topics import TopicSpec

__all__ = ["decode", "encode", "sniff", "sniff_ids"]

_MAX_ERROR_CHARS = 600
_MAX_ID_CHARS = 256
MAX_ITEMS = 20_000
"""Most items one JSON array or object of a message may hold. Far above any contract's need
(a 4096-d vector, a few hundred chunks), and low enough that rejecting it is cheap: pydantic
validates every item of an over-long array before its length check, and 8 million wrong
items cost 84 s and 8.9 GB in one worker (measured)."""


@cache
def _adapter(value_types: tuple[type[Event], ...]) -> TypeAdapter[Any]:
    if len(value_types) == 1:
        return TypeAdapter(value_types[0])
    union = Union[value_types]  # type: ignore[valid-type]  # noqa: UP007
    return TypeAdapter(Annotated[union, Field(discriminator="event_type")])


def decode(spec: TopicSpec, raw: bytes | None, *, max_bytes: int | None = None) -> Event:
    """Parse and validate one message value against the topic's contract.

    Raises:
        SchemaViolation: empty, over `max_bytes`, not UTF-8 JSON, nested too deep, or not
            one of the topic's event types. Nothing else, whatever the bytes.
    """
    if raw is None or not raw:
        raise SchemaViolation(f"empty message value on {spec.name}")
    if max_bytes is not None and len(raw) > max_bytes:
        raise SchemaViolation(f"message value of {len(raw)} bytes is over the limit of {max_bytes} bytes")
    names = ", ".join(t.__name__ for t in spec.value_types)
    if raw[:64].lstrip()[:1] not in (b"{", b""):
        raise SchemaViolation(f"not a valid {names}: the message is not a JSON object")
    if raw.count(b",") > MAX_ITEMS:  # only a large message can hold an over-long array
        _check_sizes(raw, names)
    try:
        event: Event = _adapter(spec.value_types).validate_json(raw)
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])[:100] or '<root>'}: {e['msg'][:200]}"
            for e in exc.errors()[:8]
        )
        raise SchemaViolation(_clean(f"not a valid {names}: {detail}")[:_MAX_ERROR_CHARS]) from exc
    except Exception as exc:  # a validator tripped on the input: still bad input
        raise SchemaViolation(
            _clean(f"not a valid {names}: {type(exc).__name__}: {exc}")[:_MAX_ERROR_CHARS]
        ) from exc
    return event


def _check_sizes(raw: bytes, names: str) -> None:
    """Reject an array or object of more than `MAX_ITEMS` before pydantic sees it."""
    try:
        data = from_json(raw, cache_strings=False)
    except ValueError as exc:
        raise SchemaViolation(_clean(f"not a valid {names}: Invalid JSON: {exc}")[:_MAX_ERROR_CHARS]) from exc
    stack: list[Any] = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict | list):
            if len(node) > MAX_ITEMS:
                kind = "an object" if isinstance(node, dict) else "an array"
                raise SchemaViolation(
                    f"not a valid {names}: {kind} of {len(node)} items is over the limit of {MAX_ITEMS}"
                )
            stack.extend(node.values() if isinstance(node, dict) else node)


def encode(event: Event) -> bytes:
    return event.model_dump_json().encode("utf-8")


_SNIFFED = ("event_id", "trace_id", "request_id", "document_id", "tenant", "source_event_id")


def sniff_ids(raw: bytes | None) -> dict[str, str]:
    """Best effort: read the ids of a message that failed validation, to tell its sender.

    Never raises: the parser is bounded in depth (no `RecursionError`) and any failure gives
    `{}`. Only top-level string fields (and `chunk.document_id`) are read, each at most 256
    characters of clean text.
    """
    if not raw:
        return {}
    try:
        data = from_json(raw, cache_strings=False)
        if not isinstance(data, dict):
            return {}
        out = {k: v for k in _SNIFFED if isinstance(v := data.get(k), str) and _is_id(v)}
        chunk = data.get("chunk")
        if "document_id" not in out and isinstance(chunk, dict):
            doc = chunk.get("document_id")
            if isinstance(doc, str) and _is_id(doc):
                out["document_id"] = doc
        return out
    except Exception:  # noqa: BLE001 - documented: never raises
        return {}


def sniff(raw: bytes | None, *path: str) -> Any:
    """Best effort: the value at `path` (nested object keys) of a JSON message, else None.

    Never raises; bounded like `sniff_ids`. Used on messages that failed validation, to find
    who sent them (their token, or the principal an earlier stage verified).
    """
    if not raw:
        return None
    try:
        value: Any = from_json(raw, cache_strings=False)
        for key in path:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value
    except Exception:  # noqa: BLE001 - documented: never raises
        return None


def _is_id(value: str) -> bool:
    return 0 < len(value) <= _MAX_ID_CHARS and value.isprintable()


def _clean(text: str) -> str:
    """Text that always encodes as UTF-8 (lone surrogates replaced)."""
    return text.encode("utf-8", "replace").decode("utf-8")

"""Runs stage handlers over Kafka messages: decode, call, publish, dead-letter, retry.

Handlers are plain async functions in `ragstream.workers`; they take validated events and
return `Emit`s. Everything Kafka-shaped lives here, so a handler is testable without a broker
and a Faust agent is three lines.

What happens on failure is decided by the error's class (`ragstream.schemas.errors`):
- `BadInputError` (including a message that does not decode): dead-letter, move on;
- `TransientError`: retry in place with backoff (the partition waits, order is kept) until
  `retry_budget_s` is spent, then dead-letter with kind `retries_exhausted`;
- anything else is a bug: dead-letter with kind `internal_error` and the traceback in the
  log. The worker never dies on a message.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from ragstream.infra.settings import Settings
from ragstream.schemas.errors import BadInputError, SchemaViolation, TransientError
from ragstream.schemas.events import DeadLettered, Event, new_id
from ragstream.streams.codec import decode, encode, sniff_ids
from ragstream.streams.topics import DEADLETTER, TopicSpec, topic_for

__all__ = ["Emit", "Message", "StageRunner", "emit"]

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)
_MAX_ORIGINAL_BYTES = 1_000_000
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,255}")


class Emit(NamedTuple):
    topic: TopicSpec
    event: Event


def emit(event: Event, topic: TopicSpec | None = None) -> Emit:
    return Emit(topic or topic_for(event), event)


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


Sender = Callable[[str, bytes, bytes], Awaitable[Awaitable[Any]]]
"""(topic, key, value) -> an awaitable that resolves when the broker has the record."""


class StageRunner:
    """Calls a stage's handler for each message and publishes what it returns."""

    def __init__(
        self,
        settings: Settings,
        stage: str,
        send: Sender,
        *,
        retry_budget_s: float = 60.0,
        max_retry_delay_s: float = 5.0,
        on_dead_letter: Callable[[DeadLettered], Sequence[Emit]] | None = None,
    ) -> None:
        self.settings = settings
        self.stage = stage
        self._send = send
        self._on_dead_letter = on_dead_letter
        self.retry_budget_s = retry_budget_s
        self.max_retry_delay_s = max_retry_delay_s
        self.ready = False
        self.processed = 0
        self.dead_lettered = 0

    # -- processing (no publishing) ------------------------------------------------------
    async def process_batch(
        self,
        spec: TopicSpec,
        messages: Sequence[Message],
        handler: Callable[[Sequence[Event]], Awaitable[Sequence[Emit]]],
    ) -> list[Emit]:
        """Decode all, hand the valid ones to `handler` in order, return what to publish.

        The result includes a dead-letter record for each message that failed. If the
        handler rejects the batch, each event is retried on its own, so only the culprit is
        dead-lettered. Never raises.
        """
        out: list[Emit] = []
        good: list[tuple[Message, Event]] = []
        for m in messages:
            try:
                good.append((m, decode(spec, m.value)))
            except SchemaViolation as exc:
                out.extend(self._dead_letter_all(m, exc))
        if not good:
            return out
        try:
            out.extend(await self._retrying(lambda: handler([e for _, e in good])))
            self._progress(len(good))
            return out
        except _RetriesExhausted as exc:
            for m, _ in good:
                out.extend(self._dead_letter_all(m, exc))
            return out
        except Exception as exc:  # noqa: BLE001 - isolate the culprit, the worker lives on
            if len(good) == 1:
                out.extend(self._dead_letter_all(good[0][0], exc))
                return out
            log.info("%s: batch of %d failed (%s); retrying one by one", self.stage, len(good), exc)
        for m, e in good:
            try:
                out.extend(await self._retrying(lambda e=e: handler([e])))  # type: ignore[misc]
                self._progress(1)
            except Exception as exc:  # noqa: BLE001 - dead-lettered, the worker lives on
                out.extend(self._dead_letter_all(m, exc))
        return out

    # -- shared -------------------------------------------------------------------------
    def _progress(self, n: int) -> None:
        self.processed += n

    async def _retrying(self, call: Callable[[], Awaitable[Sequence[Emit]]]) -> Sequence[Emit]:
        deadline = time.monotonic() + self.retry_budget_s
        attempt = 0
        while True:
            try:
                return await call()
            except TransientError as exc:
                attempt += 1
                delay = min(exc.retry_after_s * (2 ** (attempt - 1)), self.max_retry_delay_s)
                if time.monotonic() + delay > deadline:
                    raise _RetriesExhausted(f"gave up after {attempt} attempts: {exc}") from exc
                log.warning(
                    "%s: transient failure (attempt %d, retry in %.2fs): %s", self.stage, attempt, delay, exc
                )
                await asyncio.sleep(delay)

    async def send_nowait(self, outputs: Sequence[Emit]) -> list[Awaitable[Any]]:
        """Send without waiting for the broker; await the returned futures before relying on
        delivery. Records to one partition keep their order."""
        prefix = self.settings.kafka.topic_prefix
        return [
            await self._send(o.topic.full_name(prefix), o.event.kafka_key(), encode(o.event)) for o in outputs
        ]

    async def publish(self, outputs: Sequence[Emit]) -> None:
        """Send every output, then wait until the broker has all of them."""
        prefix = self.settings.kafka.topic_prefix
        pending = [
            await self._send(o.topic.full_name(prefix), o.event.kafka_key(), encode(o.event)) for o in outputs
        ]
        for fut in pending:
            await fut

    def _dead_letter_all(self, message: Message, exc: BaseException) -> list[Emit]:
        """The dead-letter record, plus whatever the stage tells the caller (if any)."""
        dl = self._dead_letter(message, exc)
        out = [dl]
        if self._on_dead_letter is not None:
            assert isinstance(dl.event, DeadLettered)
            try:
                out.extend(self._on_dead_letter(dl.event))
            except Exception:  # the dead letter itself must still go out
                log.exception("%s: could not build the caller's error response", self.stage)
        return out

    def _dead_letter(self, message: Message, exc: BaseException) -> Emit:
        if isinstance(exc, BadInputError):
            kind = exc.kind
        elif isinstance(exc, _RetriesExhausted):
            kind = "retries_exhausted"
        else:
            kind = "internal_error"
            log.error(
                "%s: unexpected error on %s[%s]@%s; dead-lettered:\n%s",
                self.stage,
                message.topic,
                message.partition,
                message.offset,
                "".join(traceback.format_exception(exc)),
            )
        record = dead_letter_record(self.stage, message, kind, str(exc) or type(exc).__name__)
        if kind != "internal_error":
            log.info("%s: dead-lettered %s: %s", self.stage, kind, record.message)
        self.dead_lettered += 1
        return Emit(DEADLETTER, record)


class _RetriesExhausted(Exception):
    pass


def dead_letter_record(stage: str, message: Message, kind: str, reason: str) -> DeadLettered:
    """A dead-letter record that keeps the original bytes and whatever ids can be read."""
    raw = message.value or b""
    ids = sniff_ids(raw)
    key = message.key.decode("utf-8", "replace") if message.key else None
    return DeadLettered(
        stage=stage,
        error_kind=kind,
        message=reason[:2000],
        original=raw[:_MAX_ORIGINAL_BYTES],
        original_truncated=len(raw) > _MAX_ORIGINAL_BYTES,
        original_topic=message.topic,
        original_partition=message.partition,
        original_offset=message.offset,
        original_key=key,
        source_event_id=ids.get("source_event_id") or ids.get("event_id"),
        request_id=ids.get("request_id"),
        document_id=ids.get("document_id") or key,
        trace_id=ids.get("trace_id") or ids.get("request_id") or ids.get("event_id") or new_id(),
        tenant=_safe_tenant(ids.get("tenant")),
    )


def _safe_tenant(value: str | None) -> str:
    if value and _TENANT.fullmatch(value):
        return value
    return "unknown"

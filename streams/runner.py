"""Runs stage handlers over Kafka messages: decode, call, publish, dead-letter, retry.

Handlers are plain async functions in `ragstream.workers`; they take validated events and
return the events they produce. The runner routes each one to the stage's declared output
topic for its type (`Stage.produces`). Everything Kafka-shaped lives here, so a handler is
testable without a broker and a Faust agent is three lines.

What happens on failure is decided by the error's class (`ragstream.schemas.errors`):
- `BadInputError` (including a message that does not decode): dead-letter, move on;
- `TransientError`: retry in place with backoff (the partition waits, order is kept) until
  `retry_budget_s` is spent, then dead-letter with kind `retries_exhausted`;
- anything else is a bug: retried `kafka.internal_error_retries` times, then dead-lettered
  with kind `internal_error` and the traceback in the log. The worker never dies on a
  message, and no message blocks its partition.

Publishing is bounded too (`deliver`): outputs that cannot be serialised or are over the
broker's size limit dead-letter their input (`output_rejected`) before anything is sent; a
record the broker refuses for good does the same; retriable broker errors back off until
`kafka.publish_retry_budget_s`, during which the runner reports itself `stalled`, and then
raise `PublishStalled` so the worker exits and is restarted.

Telemetry (`ragstream.infra.telemetry`): every outcome is counted in
`ragstream_stage_events_total` and each handler call timed. With tracing on, each decoded
event gets a span `ragstream.<stage>` (child of its record's `traceparent`, or of a parent
derived from its request id), active while a single-event batch is handled, and every record
published for it carries that span's context in its headers. With tracing off, no header is
read or written.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from ragstream.infra import telemetry
from ragstream.infra.settings import Settings
from ragstream.infra.telemetry import TRACING
from ragstream.schemas.errors import (
    BadInputError,
    Forbidden,
    OutputRejected,
    PublishStalled,
    RetriesExhausted,
    SchemaViolation,
    TransientError,
    Unauthenticated,
)
from ragstream.schemas.events import DeadLettered, Event
from ragstream.schemas.identity import Principal
from ragstream.streams.codec import decode, encode, sniff_ids
from ragstream.streams.completions import CompletedRequests
from ragstream.streams.deadletter import Message, dead_letter_record
from ragstream.streams.topics import DEADLETTER, TopicSpec, topic_for

__all__ = ["Emit", "Handler", "InFlight", "Message", "StageRunner", "dead_letter_record"]

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)
_RECORD_OVERHEAD_BYTES = 1024
"""Headroom under `kafka.max_message_bytes` for the record's framing and headers."""


class Emit(NamedTuple):
    """An event with the topic it is published to (and, with tracing on, its trace headers)."""

    topic: TopicSpec
    event: Event
    headers: telemetry.Headers | None = None


Handler = Callable[[Sequence[Event]], Awaitable[Sequence[Event]]]
"""A stage's `handle(events, deps)` with its deps bound."""


Sender = Callable[..., Awaitable[Awaitable[Any]]]
"""(topic, key, value[, headers]) -> an awaitable that resolves when the broker has the
record. `headers` (a list of `(name, bytes)`) is passed only when there are any (tracing on)."""


@dataclass(slots=True)
class _Record:
    emit: Emit
    topic: str
    key: bytes
    value: bytes
    is_dead_letter: bool = False
    headers: telemetry.Headers | None = None


class InFlight:
    """Start times of the work a stage holds, so a stuck partition shows in `status`."""

    def __init__(self) -> None:
        self._since: dict[int, float] = {}
        self._ids = itertools.count()

    def begin(self) -> int:
        token = next(self._ids)
        self._since[token] = time.time()
        return token

    def end(self, token: int) -> None:
        self._since.pop(token, None)

    def oldest_age_s(self) -> float:
        return time.time() - min(self._since.values()) if self._since else 0.0

    def __len__(self) -> int:
        return len(self._since)


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
        internal_retries: int | None = None,
        on_dead_letter: Callable[[DeadLettered], Sequence[Event]] | None = None,
        completions: CompletedRequests | None = None,
        route: Callable[[Event], TopicSpec] = topic_for,
    ) -> None:
        self.settings = settings
        self.stage = stage
        self._send = send
        self._on_dead_letter = on_dead_letter
        self.route = route
        """Which topic an output event goes to (the stage's declared `produces`)."""
        self.retry_budget_s = retry_budget_s
        self.max_retry_delay_s = max_retry_delay_s
        self.internal_retries = (
            settings.kafka.internal_error_retries if internal_retries is None else internal_retries
        )
        self.ready = False
        self.processed = 0
        self.lag_s = 0.0
        """How old (produced_at to now) the last input was when this stage picked it up: how
        far behind its input topic the stage runs (the judge stage's lag, for one)."""
        self.dead_lettered = 0
        self.publish_retries = 0
        self.stalled_since: float | None = None
        """Wall-clock time since which publishing has been failing (None while it works)."""
        self.stalled_reason: str | None = None
        self.inflight = InFlight()
        self.crashed: str | None = None
        """Why the stage's agent died (the worker exits right after writing it)."""
        self.duplicates_skipped = 0
        """Inputs not processed because their request already has its final response."""
        self.completions = completions
        """The exactly-once gate for request stages (see `streams.completions`)."""
        self._claims: dict[tuple[str, int | None, int | None], str] = {}
        """What the stage's pipeline holds and since when (a stuck partition shows here)."""
        self.admit: Callable[[Event], Event] | None = None
        """Command stages: verify each input's sender before `handle` (`streams.admission`);
        raises `Unauthenticated`/`Forbidden`, which dead-letters the input."""
        self.caller: Callable[[bytes | None], Principal | None] | None = None
        """Who sent an input that is dead-lettered, so the error response reaches them."""
        self.ensure_reply_streams: Callable[[set[str]], Awaitable[set[str]]] | None = None
        """Creates reply streams on first use; returns the names that cannot be used."""
        self.rejected = 0
        """Inputs refused as `unauthenticated` or `forbidden`."""
        events = telemetry.STAGE_EVENTS
        self._m_ok = events.labels(stage, "ok")
        self._m_dead = events.labels(stage, "dead_lettered")
        self._m_retried = events.labels(stage, "retried")
        self._m_failed = events.labels(stage, "failed")
        self._m_skipped = events.labels(stage, "skipped")
        self._m_seconds = telemetry.STAGE_HANDLE_SECONDS.labels(stage)

    # -- processing (no publishing) ------------------------------------------------------
    async def process_batch(
        self,
        spec: TopicSpec,
        messages: Sequence[Message],
        handler: Handler,
    ) -> list[Emit]:
        """Decode all, hand the valid ones to `handler` in order, return what to publish.

        The result includes a dead-letter record for each message that failed. If the
        handler rejects the batch, each event is retried on its own, so only the culprit is
        dead-lettered. Never raises (but lets cancellation through).
        """
        try:
            return await self._process(spec, messages, handler)
        except Exception as exc:  # noqa: BLE001 - last line of defence: nothing may vanish
            out: list[Emit] = []
            for m in messages:
                out.extend(self._dead_letter_all(m, exc))
            return out

    async def _process(
        self,
        spec: TopicSpec,
        messages: Sequence[Message],
        handler: Handler,
    ) -> list[Emit]:
        out: list[Emit] = []
        good: list[tuple[Message, Event]] = []
        limit = self.settings.kafka.max_message_bytes
        admit = self.admit
        for m in messages:
            try:
                event = decode(spec, m.value, max_bytes=limit)
            except SchemaViolation as exc:
                out.extend(self._dead_letter_all(m, exc))
                continue
            if admit is not None:
                try:
                    event = admit(event)
                except Exception as exc:  # noqa: BLE001 - refused (or a bug): this input only
                    out.extend(self._dead_letter_all(m, exc))
                    continue
            good.append((m, event))
            self.lag_s = max(time.time() - event.produced_at.timestamp(), 0.0)
        if self.completions is not None:
            good = [(m, e) for m, e in good if self._claim(m, e)]
        if not good:
            return out
        if not TRACING.on:
            return await self._handle(good, out, handler)
        spans = [self._span(m, e) for m, e in good]
        try:
            if len(spans) == 1:
                from opentelemetry.trace import use_span

                with use_span(spans[0], end_on_exit=False):
                    out = await self._handle(good, out, handler)
            else:
                out = await self._handle(good, out, handler)
            return _with_trace_headers(out, good, spans)
        finally:
            for span in spans:
                span.end()

    def _span(self, m: Message, e: Event) -> Any:
        return telemetry.start_stage_span(
            self.stage,
            m.headers,
            getattr(e, "request_id", None) or e.trace_id,
            {
                "ragstream.stage": self.stage,
                "ragstream.request_id": getattr(e, "request_id", None) or e.trace_id,
                "messaging.destination.name": m.topic,
                "messaging.destination.partition.id": str(m.partition),
                "messaging.kafka.offset": -1 if m.offset is None else m.offset,
            },
        )

    async def _handle(
        self, good: list[tuple[Message, Event]], out: list[Emit], handler: Handler
    ) -> list[Emit]:
        """Call the handler on the decoded events; `out` already holds the batch's dead letters."""
        started = time.perf_counter()
        try:
            return await self._call_handler(good, out, handler)
        finally:
            self._m_seconds.observe(time.perf_counter() - started)

    async def _call_handler(
        self, good: list[tuple[Message, Event]], out: list[Emit], handler: Handler
    ) -> list[Emit]:
        try:
            # A batch of several is split at once on an unexpected error: only the culprit
            # should pay for the retries.
            retries = self.internal_retries if len(good) == 1 else 0
            out.extend(self._routed(await self._retrying(lambda: handler([e for _, e in good]), retries)))
            self._progress(len(good))
            return out
        except RetriesExhausted as exc:
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
                produced = await self._retrying(functools.partial(handler, [e]), self.internal_retries)
                out.extend(self._routed(produced))
                self._progress(1)
            except Exception as exc:  # noqa: BLE001 - dead-lettered, the worker lives on
                out.extend(self._dead_letter_all(m, exc))
        return out

    def _claim(self, m: Message, e: Event) -> bool:
        """Request stages: skip an input whose request is answered or already in flight."""
        assert self.completions is not None
        request_id = getattr(e, "request_id", None)
        if not isinstance(request_id, str):
            return True
        if not self.completions.claim(self.stage, request_id):
            self.duplicates_skipped += 1
            self._m_skipped.inc()
            log.info(
                "%s: request %s already answered or in flight; %s[%s]@%s skipped",
                self.stage,
                request_id,
                m.topic,
                m.partition,
                m.offset,
            )
            return False
        self._claims[(m.topic, m.partition, m.offset)] = request_id
        return True

    # -- shared -------------------------------------------------------------------------
    def _progress(self, n: int) -> None:
        self.processed += n
        self._m_ok.inc(n)

    def _routed(self, events: Sequence[Event]) -> list[Emit]:
        return [Emit(self.route(e), e) for e in events]

    async def _retrying(
        self, call: Callable[[], Awaitable[Sequence[Event]]], internal_retries: int
    ) -> Sequence[Event]:
        """Transient errors back off within `retry_budget_s`; bad input is final at once; an
        unexpected error is tried `internal_retries` more times, then re-raised."""
        deadline = time.monotonic() + self.retry_budget_s
        attempt = 0
        unexpected = 0
        while True:
            try:
                return await call()
            except BadInputError:
                raise
            except TransientError as exc:
                attempt += 1
                delay = min(exc.retry_after_s * (2 ** (attempt - 1)), self.max_retry_delay_s)
                if time.monotonic() + delay > deadline:
                    raise RetriesExhausted(f"gave up after {attempt} attempts: {exc}") from exc
                self._m_retried.inc()
                log.warning(
                    "%s: transient failure (attempt %d, retry in %.2fs): %s", self.stage, attempt, delay, exc
                )
                await asyncio.sleep(delay)
            except Exception as exc:
                unexpected += 1
                if unexpected > internal_retries:
                    raise
                self._m_retried.inc()
                log.warning(
                    "%s: unexpected %s (try %d of %d): %s",
                    self.stage,
                    type(exc).__name__,
                    unexpected,
                    internal_retries + 1,
                    exc,
                )
                await asyncio.sleep(0.1 * 2 ** (unexpected - 1))

    async def send_nowait(self, events: Sequence[Event]) -> list[Awaitable[Any]]:
        """Send without waiting for the broker (streamed tokens); await the returned futures
        before relying on delivery. Records to one partition keep their order. A record for
        a reply stream that cannot be created is dropped (logged)."""
        prefix = self.settings.kafka.topic_prefix
        named = [(self.route(e), e) for e in events]
        unusable = await self._reply_streams({t.topic_name(prefix, e) for t, e in named if t.per_principal})
        headers = telemetry.inject_headers() if TRACING.on else None  # the current stage span
        out: list[Awaitable[Any]] = []
        for t, e in named:
            name = t.topic_name(prefix, e)
            if name not in unusable:
                if headers:
                    out.append(await self._send(name, e.kafka_key(), encode(e), headers))
                else:
                    out.append(await self._send(name, e.kafka_key(), encode(e)))
        return out

    async def _reply_streams(self, names: set[str]) -> set[str]:
        if not names or self.ensure_reply_streams is None:
            return set()
        unusable = await self.ensure_reply_streams(names)
        for name in unusable:
            log.warning(
                "%s: reply stream %s cannot be created; the caller's copy is dropped", self.stage, name
            )
        return unusable

    # -- publishing ---------------------------------------------------------------------
    async def deliver(self, messages: Sequence[Message], outputs: Sequence[Emit]) -> None:
        """Publish what `messages` produced, and return once the broker has all of it.

        Bounded: see the module docstring. An output that can never be published
        dead-letters the input it came from (matched by trace id), not its neighbours.

        Raises:
            PublishStalled: retriable failures lasted past `kafka.publish_retry_budget_s`,
                or the dead-letter topic itself refused a record.
        """
        gate = self.completions
        if gate is not None:  # a final response (a judgement) is published once, whoever made it
            outputs = [
                o
                for o in outputs
                if not (
                    isinstance(o.event, gate.once_types) and gate.is_done(getattr(o.event, "request_id", ""))
                )
            ]
        records, rejected = self._encode_all(outputs)
        if rejected:
            records = self._reject(messages, records, rejected)
        unusable = await self._reply_streams({r.topic for r in records if r.emit.topic.per_principal})
        if unusable:  # the internal record of the response still goes out
            records = [r for r in records if r.topic not in unusable]
        budget_s = self.settings.kafka.publish_retry_budget_s
        deadline = time.monotonic() + budget_s
        delay = 0.1
        pending = records
        while pending:
            retry, refused = await self._send_round(pending)
            for rec, exc in refused:
                if rec.is_dead_letter:
                    self._m_failed.inc(len(messages))
                    raise PublishStalled(f"the dead-letter topic refused a record: {exc}")
            if refused:
                refused_traces = {rec.emit.event.trace_id: _describe(exc) for rec, exc in refused}
                dead = self._reject(messages, [], refused_traces)
                retry = [r for r in retry if r.emit.event.trace_id not in refused_traces] + dead
            if not retry:
                break
            if time.monotonic() + delay > deadline:
                self._m_failed.inc(len(messages))
                raise PublishStalled(f"publishing failed for {budget_s:.0f}s: {self.stalled_reason}")
            if self.stalled_since is None:
                self.stalled_since = time.time()
            self.publish_retries += 1
            log.warning(
                "%s: publishing %d record(s) failed (%s); retrying in %.1fs",
                self.stage,
                len(retry),
                self.stalled_reason,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            pending = retry
        self.stalled_since = None
        self.stalled_reason = None
        if gate is not None:
            for o in outputs:
                if gate.marks_done(o.event):
                    gate.mark_done(getattr(o.event, "request_id", ""))
            for m in messages:
                request_id = self._claims.pop((m.topic, m.partition, m.offset), None)
                if request_id is not None:
                    gate.release(self.stage, request_id)

    async def _send_round(
        self, records: Sequence[_Record]
    ) -> tuple[list[_Record], list[tuple[_Record, BaseException]]]:
        """Send all, await all; returns (retriable failures, refused for good)."""
        sent: list[tuple[_Record, Awaitable[Any] | BaseException]] = []
        for rec in records:
            try:
                if rec.headers:
                    sent.append((rec, await self._send(rec.topic, rec.key, rec.value, rec.headers)))
                else:
                    sent.append((rec, await self._send(rec.topic, rec.key, rec.value)))
            except asyncio.CancelledError:
                raise
            except Exception as send_error:  # noqa: BLE001 - classified below
                sent.append((rec, send_error))
        retry: list[_Record] = []
        refused: list[tuple[_Record, BaseException]] = []
        for rec, fut in sent:
            failure: BaseException
            if isinstance(fut, BaseException):
                failure = fut
            else:
                try:
                    await fut
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as ack_error:  # noqa: BLE001 - classified below
                    failure = ack_error
            if _retriable(failure):
                self.stalled_reason = _describe(failure)
                retry.append(rec)
            else:
                refused.append((rec, failure))
        return retry, refused

    def _encode_all(self, outputs: Sequence[Emit]) -> tuple[list[_Record], dict[str, str]]:
        prefix = self.settings.kafka.topic_prefix
        limit = self.settings.kafka.max_message_bytes - _RECORD_OVERHEAD_BYTES
        records: list[_Record] = []
        rejected: dict[str, str] = {}
        for o in outputs:
            name = type(o.event).__name__
            try:
                key, value = o.event.kafka_key(), encode(o.event)
            except Exception as exc:  # noqa: BLE001 - a serialisation bug: the input is dead-lettered
                rejected[o.event.trace_id] = f"{name} does not serialise: {exc}"
                continue
            if len(key) + len(value) > limit:
                rejected[o.event.trace_id] = (
                    f"{name} is {len(key) + len(value)} bytes, over kafka.max_message_bytes "
                    f"({self.settings.kafka.max_message_bytes})"
                )
                continue
            records.append(
                _Record(
                    o,
                    o.topic.topic_name(prefix, o.event),
                    key,
                    value,
                    is_dead_letter=o.topic is DEADLETTER,
                    headers=o.headers,
                )
            )
        return records, rejected

    def _reject(
        self, messages: Sequence[Message], records: list[_Record], rejected: dict[str, str]
    ) -> list[_Record]:
        """Drop every output of the inputs named in `rejected` (trace id -> reason) and add
        their dead letters instead. An output whose input cannot be told rejects the batch."""
        by_trace: dict[str, list[Message]] = {}
        for m in messages:
            ids = sniff_ids(m.value)
            trace = ids.get("trace_id") or ids.get("request_id") or ids.get("event_id")
            by_trace.setdefault(trace or "", []).append(m)
        unknown = [t for t in rejected if t not in by_trace]
        if unknown:  # cannot tell whose output it was: the whole batch is dead-lettered
            fallback = rejected[unknown[0]]
            culprits = [(m, rejected.get(t, fallback)) for t, ms in by_trace.items() for m in ms]
            kept: list[_Record] = []
        else:
            culprits = [(m, reason) for t, reason in rejected.items() for m in by_trace[t]]
            kept = [r for r in records if r.emit.event.trace_id not in rejected]
        extra, _ = self._encode_all(
            [dl for m, reason in culprits for dl in self._dead_letter_all(m, OutputRejected(reason))]
        )
        return kept + extra

    def _dead_letter_all(self, message: Message, exc: BaseException) -> list[Emit]:
        """The dead-letter record, plus whatever the stage tells the caller (if any)."""
        dl = self._dead_letter(message, exc)
        out = [dl]
        if self._on_dead_letter is not None:
            assert isinstance(dl.event, DeadLettered)
            try:
                out.extend(self._routed(self._on_dead_letter(dl.event)))
            except Exception:  # the dead letter itself must still go out
                log.exception("%s: could not build the caller's error response", self.stage)
        return out

    def _dead_letter(self, message: Message, exc: BaseException) -> Emit:
        if isinstance(exc, BadInputError):
            kind = exc.kind
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
        principal = getattr(exc, "principal", None)
        if principal is None and self.caller is not None:
            principal = self.caller(message.value)
        if isinstance(exc, Unauthenticated | Forbidden):
            self.rejected += 1
        record = dead_letter_record(
            self.stage, message, kind, str(exc) or type(exc).__name__, principal=principal
        )
        if kind != "internal_error":
            log.info("%s: dead-lettered %s: %s", self.stage, kind, record.message[:300])
        self.dead_lettered += 1
        self._m_dead.inc()
        return Emit(DEADLETTER, record)


def _with_trace_headers(
    out: list[Emit], good: Sequence[tuple[Message, Event]], spans: Sequence[Any]
) -> list[Emit]:
    """Each output with the context of the span of the input it came from (matched by trace
    id, as `deliver` matches them; else the batch's first). A dead letter marks its span."""
    by_trace = {e.trace_id: span for (_, e), span in zip(good, spans, strict=True)}
    headers: dict[int, telemetry.Headers | None] = {}
    result: list[Emit] = []
    for o in out:
        span = by_trace.get(o.event.trace_id)
        if span is None:
            if o.topic is DEADLETTER:  # a neighbour that did not decode: not this trace
                result.append(o)
                continue
            span = spans[0]
        if o.topic is DEADLETTER and isinstance(o.event, DeadLettered):
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, o.event.error_kind))
        key = id(span)
        if key not in headers:
            headers[key] = telemetry.inject_headers(span)
        result.append(o._replace(headers=headers[key]) if o.headers is None else o)
    return result


_REFUSED_FOR_GOOD = frozenset(
    {
        "MessageSizeTooLargeError",
        "RecordTooLargeError",
        "RecordListTooLargeError",
        "InvalidRecordError",
        "CorruptRecordException",
        "InvalidTopicError",
        "TopicAuthorizationFailedError",
    }
)
"""Broker answers that no retry can change (aiokafka and kafka-python share these names)."""


def _retriable(exc: BaseException) -> bool:
    """Only a record the broker refuses for what it is (too large, not allowed) or data that
    cannot be sent is final. Everything else is retried within the budget, even where the
    client calls it non-retriable: aiokafka marks `KafkaTimeoutError` and `UnknownError` so,
    and the embedded broker answers `UnknownError` while it restarts. Dead-lettering a good
    request over a broker hiccup would be worse than waiting; the budget bounds the wait."""
    if type(exc).__name__ in _REFUSED_FOR_GOOD:
        return False
    return not isinstance(exc, ValueError | TypeError | UnicodeError | OverflowError)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    return f"{type(exc).__name__}: {exc}"[:500]

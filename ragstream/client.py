"""Client SDK: ask the pipeline a question over Kafka and get the answer, whole or streamed.

A client publishes `QuerySubmitted` to `{prefix}.queries`, each with a signed token (see
`ragstream.credentials`), and reads ONLY its own reply stream,
`{prefix}.responses.<tenant>.<client>`, where the pipeline puts the answer's deltas and final
response. One consumer per reply stream is shared by all the client's requests. It has no group
(no join, no rebalance): it is assigned the stream's partitions and positioned at the end
before the first request is published, and a background task hands each record to the waiting
request whose id is the record's key. Records of other requests (the same principal's other
processes, or old records re-read because the embedded broker misreports end offsets) are
dropped without being decoded.

`AsyncClient` is the asyncio client; `Client` runs one on a private event loop in a background
thread, so plain (and multi-threaded) code can use it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, Literal, TypedDict, TypeVar, Unpack, cast

from ragstream.credentials import Credentials, Identity
from ragstream.infra.kafka import KafkaConnection, NewTopicSpec, create_topics
from ragstream.infra.settings import Settings, load_settings
from ragstream.schemas.errors import DependencyUnavailable, SchemaViolation
from ragstream.schemas.events import MetadataValue
from ragstream.schemas.queries import (
    ConversationTurn,
    GenerationOptions,
    QuerySubmitted,
    ResponseCompleted,
    RetrievalOptions,
    TokenGenerated,
)
from ragstream.streams.codec import decode, encode
from ragstream.streams.topics import QUERIES, REPLIES, reply_topic

__all__ = ["AskOptions", "AsyncClient", "Client", "DeltaAssembler", "Response", "build_query"]

log = logging.getLogger(__name__)

Response = ResponseCompleted
"""The final answer to a question: status ok, error or blocked (see `ResponseCompleted`)."""

_T = TypeVar("_T")
_Item = TokenGenerated | ResponseCompleted | BaseException
_LATE_DELTAS_WAIT_S = 1.0
"""How long a final response waits for deltas it says were published before it."""
_REPLY_STREAM_WAIT_S = 15.0
"""How long a new reply stream may take to appear in the broker's metadata."""


class DeltaAssembler:
    """Puts a request's token deltas back in `sequence` order (from 0) and drops duplicates.

    Deltas share the request id as their key, so they normally arrive in order; a retried or
    re-published delta may still arrive twice or late, and must show once, in its place.
    """

    def __init__(self) -> None:
        self._next = 0
        self._held: dict[int, str] = {}
        self._released: list[str] = []

    def push(self, sequence: int, delta: str) -> list[str]:
        """Accept one delta; return the deltas that are now next in order (maybe none)."""
        if sequence < self._next or sequence in self._held:
            return []
        self._held[sequence] = delta
        out: list[str] = []
        while self._next in self._held:
            out.append(self._held.pop(self._next))
            self._next += 1
        self._released.extend(out)
        return out

    @property
    def released(self) -> int:
        """How many deltas were released: sequences 0 .. released-1."""
        return self._next

    @property
    def text(self) -> str:
        """The deltas released so far, concatenated."""
        return "".join(self._released)

    def remainder(self, answer: str) -> str:
        """What `answer` holds beyond the released deltas.

        Deltas and the final response travel on different topics, so the final one can
        overtake the last deltas. Its answer is authoritative: when the released text is a
        prefix of it, the rest is the missing tail. Otherwise there is nothing sound to add.
        """
        text = self.text
        return answer[len(text) :] if answer.startswith(text) else ""


class AskOptions(TypedDict, total=False):
    """Everything a question can say besides its text, for `ask`, `stream` and `build_query`.

    Omitted options take the contract's defaults (`QuerySubmitted`), and `route` defaults to
    `generation.default_route`. `tenant`, `user` and `groups` default to the token's claims
    (with the local key: `default_tenant`, `anonymous` and no groups).
    """

    tenant: str | None
    user: str
    groups: Sequence[str]
    top_k: int
    alpha: float
    mode: Literal["hybrid", "vector", "keyword"]
    metadata_filters: dict[str, MetadataValue] | None
    document_ids: Sequence[str] | None
    neighbours: int
    route: str | None
    max_tokens: int
    temperature: float
    deadline_ms: int
    conversation_id: str | None
    guard_policy: str | None
    history: Sequence[ConversationTurn | dict[str, str]]


_RETRIEVAL = ("top_k", "alpha", "mode", "neighbours")
_GENERATION = ("max_tokens", "temperature")


def build_query(
    settings: Settings, question: str, *, stream: bool = False, **options: Unpack[AskOptions]
) -> QuerySubmitted:
    """The `QuerySubmitted` a client publishes for these options.

    Raises:
        pydantic.ValidationError: an option is out of range (it is a `ValueError`).
    """
    o: dict[str, Any] = dict(options)
    retrieval: dict[str, Any] = {k: o[k] for k in _RETRIEVAL if k in o}
    retrieval["metadata_filters"] = o.get("metadata_filters") or {}
    if o.get("document_ids") is not None:
        retrieval["document_ids"] = tuple(o["document_ids"])
    generation: dict[str, Any] = {k: o[k] for k in _GENERATION if k in o}
    generation["route"] = o.get("route") or settings.generation.default_route
    extra: dict[str, Any] = {
        k: o[k] for k in ("user", "deadline_ms", "conversation_id", "guard_policy") if k in o
    }
    # Identity fields are set only when given, so a token's claims fill them in otherwise.
    if o.get("tenant"):
        extra["tenant"] = o["tenant"]
    if o.get("groups") is not None:
        extra["access_groups"] = tuple(o["groups"])
    return QuerySubmitted(
        question=question,
        history=tuple(ConversationTurn.model_validate(t) for t in o.get("history", ())),
        retrieval=RetrievalOptions.model_validate(retrieval),
        generation=GenerationOptions.model_validate(generation),
        stream=stream,
        **extra,
    )


class _Closed(Exception):
    """Handed to requests still waiting when their client closes."""


class AsyncClient:
    """Ask questions over Kafka from asyncio code.

    Many concurrent requests share one producer, and one consumer per reply stream.
    `ask()`/`stream()` start the client on first use; `async with AsyncClient() as client:`
    closes it.

    Args:
        settings: Defaults to `load_settings()` (environment and config file).
        token: A signed token to send (default: `auth.token`, else tokens signed with the
            embedded stack's local key). Its claims say who asks and where replies go.
        deadline_grace_s: How long past a request's deadline to wait for the pipeline's own
            deadline error before building one locally.
    """

    def __init__(
        self, settings: Settings | None = None, *, token: str | None = None, deadline_grace_s: float = 2.0
    ) -> None:
        self._settings = settings if settings is not None else load_settings()
        self._credentials = Credentials(self._settings, token)
        self._grace_s = deadline_grace_s
        self._producer: Any = None
        self._readers: dict[str, tuple[Any, asyncio.Task[None]]] = {}
        self._pending: dict[bytes, asyncio.Queue[_Item]] = {}
        self._start_lock = asyncio.Lock()
        self._failure: BaseException | None = None
        self._closed = False

    @property
    def settings(self) -> Settings:
        return self._settings

    async def __aenter__(self) -> AsyncClient:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect, and position the reader of the default identity's reply stream at its end.

        Idempotent. Requests sent before their stream's reader is positioned could be answered
        unseen, which is why `ask()` and `stream()` open it first.

        Raises:
            DependencyUnavailable: Kafka cannot be reached, or the topics do not exist.
            ConfigError: auth is required and there is neither a token nor a local key.
            RuntimeError: the client was closed.
        """
        identity = self._credentials.identity()
        async with self._start_lock:
            if self._closed:
                raise RuntimeError("this ragstream client is closed")
            if self._producer is None:
                self._producer = await self._start_producer()
        await self._reader_for(identity.reply_to)

    async def _start_producer(self) -> Any:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError

        kafka = self._settings.kafka
        producer = AIOKafkaProducer(
            **KafkaConnection.from_settings(kafka).aiokafka_kwargs(),
            acks="all",
            linger_ms=1,
            max_request_size=kafka.max_message_bytes,
        )
        try:
            await producer.start()
            topics = await producer.client.fetch_all_metadata()
            queries = QUERIES.full_name(kafka.topic_prefix)
            if queries not in topics.topics():
                raise DependencyUnavailable(
                    f"topic {queries} does not exist on {kafka.servers}; "
                    "start the stack (`ragstream up`) or create it (`ragstream init`)"
                )
        except KafkaError as exc:
            await _stop_all(producer)
            raise DependencyUnavailable(f"cannot reach Kafka at {kafka.servers}: {exc}") from exc
        except BaseException:
            await _stop_all(producer)
            raise
        return producer

    async def _reader_for(self, reply_to: str) -> None:
        """Read `reply_to`'s stream from its current end (idempotent)."""
        if reply_to in self._readers:
            return
        async with self._start_lock:
            if self._closed:
                raise RuntimeError("this ragstream client is closed")
            if reply_to in self._readers:
                return
            from aiokafka import AIOKafkaConsumer, TopicPartition
            from aiokafka.errors import KafkaError

            kafka = self._settings.kafka
            topic = reply_topic(kafka.topic_prefix, reply_to)
            # No group: nothing to join (half a session timeout on the embedded broker). The
            # embedded broker does not wake a parked fetch when data arrives, so the fetch
            # wait is a floor on latency per hop.
            consumer = AIOKafkaConsumer(
                **KafkaConnection.from_settings(kafka).aiokafka_kwargs(),
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="latest",
                fetch_max_wait_ms=max(kafka.fetch_max_wait_ms, 1),
                max_partition_fetch_bytes=kafka.max_message_bytes,
            )
            try:
                await consumer.start()
                partitions = await self._reply_partitions(consumer, topic)
                tps = [TopicPartition(topic, p) for p in sorted(partitions)]
                consumer.assign(tps)
                await consumer.seek_to_end()
                for tp in tps:  # resolve the lazy reset now, before any request is published
                    await consumer.position(tp)
            except KafkaError as exc:
                await _stop_all(consumer)
                raise DependencyUnavailable(f"cannot reach Kafka at {kafka.servers}: {exc}") from exc
            except BaseException:
                await _stop_all(consumer)
                raise
            task = asyncio.create_task(self._dispatch(consumer), name=f"ragstream-client-{reply_to}")
            self._readers[reply_to] = (consumer, task)
            log.debug("client reads %s (%d partitions)", topic, len(tps))

    async def _reply_partitions(self, consumer: Any, topic: str) -> set[int]:
        """The stream's partitions, creating the stream where this client may (the embedded
        stack); in production an operator creates it with the client's ACLs."""
        from aiokafka.errors import KafkaTimeoutError

        if topic not in await consumer.topics():
            spec = NewTopicSpec(topic, self._settings.kafka.reply_stream_partitions)
            try:
                await asyncio.to_thread(create_topics, self._settings, [spec])
            except DependencyUnavailable as exc:
                raise DependencyUnavailable(
                    f"your reply stream {topic} does not exist and cannot be created ({exc}); "
                    "ask the operator to provision it (`ragstream acls client`)"
                ) from exc
        try:
            partitions = await asyncio.wait_for(self._producer.partitions_for(topic), _REPLY_STREAM_WAIT_S)
        except (TimeoutError, KafkaTimeoutError) as exc:
            raise DependencyUnavailable(
                f"reply stream {topic} did not appear within {_REPLY_STREAM_WAIT_S:.0f}s"
            ) from exc
        return set(partitions)

    async def close(self) -> None:
        """Stop the readers and the Kafka clients. Requests still waiting raise `RuntimeError`."""
        async with self._start_lock:
            if self._closed:
                return
            self._closed = True
            for queue in self._pending.values():
                queue.put_nowait(_Closed())
            for _, task in self._readers.values():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
            await _stop_all(self._producer, *(consumer for consumer, _ in self._readers.values()))

    async def ask(self, question: str, *, stream: bool = False, **options: Unpack[AskOptions]) -> Response:
        """Ask a question and wait for its final response.

        Never waits much past `deadline_ms`: without a final response by then (plus the
        grace), it returns a locally built error response with reason `deadline_exceeded`.
        `stream=True` asks the pipeline to publish token deltas too (see `stream()`).

        Raises:
            DependencyUnavailable: Kafka cannot be reached or the client's reader failed.
            pydantic.ValidationError: an option is out of range (it is a `ValueError`).
            RuntimeError: the client was closed.
        """
        sent = self._query(question, stream, options)
        final: Response | None = None
        async for item in self._exchange(sent):
            if isinstance(item, ResponseCompleted):
                final = item
        if final is None:  # _exchange always ends with a response or raises
            raise RuntimeError(f"no response for request {sent[0].request_id}")
        return final

    async def stream(self, question: str, **options: Unpack[AskOptions]) -> AsyncIterator[str | Response]:
        """Ask a question; yield the answer's text deltas in order, then the final response.

        For an `ok` response the yielded strings concatenate to `response.answer`. The last
        item is always the `Response`, a local `deadline_exceeded` error included.

        Raises:
            DependencyUnavailable: Kafka cannot be reached or the client's reader failed.
            pydantic.ValidationError: an option is out of range (it is a `ValueError`).
            RuntimeError: the client was closed.
        """
        sent = self._query(question, True, options)
        async for item in self._exchange(sent):
            yield item

    # -- internals -----------------------------------------------------------------------
    def _query(self, question: str, stream: bool, options: AskOptions) -> tuple[QuerySubmitted, Identity]:
        """The query with its token, and the identity it is sent as."""
        identity = self._credentials.identity(
            tenant=options.get("tenant"), user=options.get("user"), groups=options.get("groups")
        )
        opts: dict[str, Any] = dict(options)
        # The body says what the token says, unless the caller asked otherwise (the pipeline
        # then refuses it as `forbidden`): a serialised query carries every field.
        opts.setdefault("tenant", identity.tenant)
        opts["tenant"] = opts["tenant"] or identity.tenant
        if identity.fixed:
            if identity.user is not None:
                opts.setdefault("user", identity.user)
            if opts.get("groups") is None and identity.groups is not None:
                opts["groups"] = identity.groups
        query = build_query(self._settings, question, stream=stream, **opts)
        return query.model_copy(update={"token": identity.token}), identity

    async def _exchange(self, sent: tuple[QuerySubmitted, Identity]) -> AsyncIterator[str | Response]:
        """Publish the query; yield its ordered deltas, then exactly one final response."""
        query, identity = sent
        await self.start()
        await self._reader_for(identity.reply_to)
        if self._failure is not None:
            raise DependencyUnavailable(f"the response reader failed: {self._failure}") from self._failure
        loop = asyncio.get_running_loop()
        started = loop.time()
        give_up_at = started + query.deadline_ms / 1000 + self._grace_s
        key = query.kafka_key()
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._pending[key] = queue  # before publishing, so no answer can come back unseen
        try:
            await self._publish(query, give_up_at - loop.time())
            deltas = DeltaAssembler()
            final: Response | None = None
            settle_at = give_up_at
            # A re-published delta can still land after the final response; `delta_count`
            # says how many to wait for.
            while final is None or (final.status == "ok" and deltas.released < final.delta_count):
                item = await _next_from(queue, (give_up_at if final is None else settle_at) - loop.time())
                if item is None:
                    if final is None:
                        yield self._deadline_response(query, (loop.time() - started) * 1000)
                        return
                    log.debug(
                        "request %s: %d of %d deltas arrived; completing from the final answer",
                        query.request_id,
                        deltas.released,
                        final.delta_count,
                    )
                    break
                if isinstance(item, _Closed):
                    raise RuntimeError("the ragstream client was closed while a request was waiting")
                if isinstance(item, BaseException):
                    raise DependencyUnavailable(f"the response reader failed: {item}") from item
                if isinstance(item, TokenGenerated):
                    for delta in deltas.push(item.sequence, item.delta):
                        yield delta
                elif final is None:  # a duplicate final response is ignored
                    final = item
                    settle_at = min(give_up_at, loop.time() + _LATE_DELTAS_WAIT_S)
            if final.status == "ok" and (rest := deltas.remainder(final.answer)):
                yield rest
            yield final
        finally:
            self._pending.pop(key, None)

    async def _publish(self, query: QuerySubmitted, timeout_s: float) -> None:
        from aiokafka.errors import KafkaError

        # The caller's current span (any OpenTelemetry provider) becomes the query's parent;
        # without one the pipeline derives the trace from the request id.
        from ragstream.infra.telemetry import caller_headers

        topic = QUERIES.full_name(self._settings.kafka.topic_prefix)
        try:
            await asyncio.wait_for(
                self._producer.send_and_wait(
                    topic, key=query.kafka_key(), value=encode(query), headers=caller_headers()
                ),
                timeout=max(timeout_s, 0.1),
            )
        except (KafkaError, TimeoutError) as exc:
            raise DependencyUnavailable(
                f"cannot publish to {topic} at {self._settings.kafka.servers}: {exc!r}"
            ) from exc

    def _deadline_response(self, query: QuerySubmitted, waited_ms: float) -> Response:
        return ResponseCompleted(
            tenant=query.tenant,
            trace_id=query.request_id,
            request_id=query.request_id,
            user=query.user,
            status="error",
            error_reason=(
                f"deadline_exceeded: no response from the pipeline within {query.deadline_ms} ms "
                f"(+{self._grace_s:g} s grace); is the stack running?"
            ),
            question=query.question,
            route=query.generation.route,
            finish_reason="deadline",
            latency_ms={"total": round(waited_ms, 3)},
            streamed=query.stream,
        )

    async def _dispatch(self, consumer: Any) -> None:
        """Hand each reply-stream record to the request waiting for it; drop the rest unread."""
        from aiokafka.errors import KafkaError

        try:
            while True:
                try:
                    batches = await consumer.getmany(timeout_ms=1000)
                except KafkaError as exc:
                    # The fetcher reconnects by itself; waiting requests hit their deadline.
                    log.warning("reading responses failed (will retry): %s", exc)
                    await asyncio.sleep(0.5)
                    continue
                for tp, records in batches.items():
                    for record in records:
                        queue = self._pending.get(record.key) if record.key is not None else None
                        if queue is None:
                            continue
                        try:
                            event = decode(REPLIES, record.value)
                        except SchemaViolation as exc:
                            log.warning(
                                "dropping a malformed record at %s:%d@%d: %s",
                                tp.topic,
                                tp.partition,
                                record.offset,
                                exc,
                            )
                            continue
                        if isinstance(event, TokenGenerated | ResponseCompleted):
                            queue.put_nowait(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to every waiter, and to later requests
            log.exception("the response reader stopped")
            self._failure = exc
            for queue in self._pending.values():
                queue.put_nowait(exc)


async def _next_from(queue: asyncio.Queue[_Item], timeout_s: float) -> _Item | None:
    """The next item, or None when none comes within `timeout_s`."""
    try:
        return queue.get_nowait()
    except asyncio.QueueEmpty:
        pass
    try:
        return await asyncio.wait_for(queue.get(), timeout=max(timeout_s, 0))
    except TimeoutError:
        return None


async def _stop_all(*parts: Any) -> None:
    for part in parts:
        if part is not None:
            await part.stop()


_DONE = object()


async def _next_item(agen: AsyncIterator[_T]) -> _T | object:
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return _DONE


class Client:
    """The synchronous client: an `AsyncClient` on a private event loop in a background thread.

    Thread-safe: many threads may call `ask()` and iterate `stream()` at once; they share one
    producer and one consumer. Use it as a context manager, or call `close()`.
    """

    def __init__(
        self, settings: Settings | None = None, *, token: str | None = None, deadline_grace_s: float = 2.0
    ) -> None:
        self._client = AsyncClient(settings, token=token, deadline_grace_s=deadline_grace_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def settings(self) -> Settings:
        return self._client.settings

    def __enter__(self) -> Client:
        try:
            self.start()
        except BaseException:
            self.close()  # `__exit__` will not run: stop the loop thread here
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the loop thread and connect (idempotent; `ask()`/`stream()` call it).

        Raises:
            DependencyUnavailable: Kafka cannot be reached or the topics do not exist.
            RuntimeError: the client was closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("this ragstream client is closed")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="ragstream-client", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
        self._run(self._client.start())

    def close(self) -> None:
        """Close the async client, stop the loop and join its thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._client.close(), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    def ask(self, question: str, *, stream: bool = False, **options: Unpack[AskOptions]) -> Response:
        """Ask a question and wait for its final response; see `AsyncClient.ask`.

        Raises:
            DependencyUnavailable: Kafka cannot be reached or the client's reader failed.
            pydantic.ValidationError: an option is out of range (it is a `ValueError`).
            RuntimeError: the client was closed.
        """
        self.start()
        return self._run(self._client.ask(question, stream=stream, **options))

    def stream(self, question: str, **options: Unpack[AskOptions]) -> Iterator[str | Response]:
        """Yield the answer's text deltas in order, then the final response; see
        `AsyncClient.stream`.

        Raises:
            DependencyUnavailable: Kafka cannot be reached or the client's reader failed.
            pydantic.ValidationError: an option is out of range (it is a `ValueError`).
            RuntimeError: the client was closed.
        """
        self.start()
        agen = cast(
            AsyncGenerator[str | Response, None],
            self._client.stream(question, **options),
        )
        try:
            while (item := self._run(_next_item(agen))) is not _DONE:
                yield cast(str | Response, item)
        finally:
            if not self._closed:
                self._run(agen.aclose())

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("the ragstream client is not started")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

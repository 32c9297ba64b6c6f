"""What a stage is: one declaration, read top to bottom.

Every stage module in `ragstream.workers` ends with a `STAGE = Stage(...)` that names:
- the topic it `consumes` and the topics it `produces` (each output event goes to the one
  declared topic that carries its type; the dead-letter topic is implied);
- its `flow`: ordered micro-batches (`Batched`) or independent requests (`Concurrent`);
- its `deps`: an async context manager that opens what `handle` needs and closes it after;
- its `handle(events, deps)`: plain async logic, testable without Kafka.

`ragstream.workers.main` turns a declaration into a Faust agent; `StageRunner`
(`streams.runner`) does decoding, retries, dead letters and bounded publishing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ragstream.infra.settings import Settings
from ragstream.schemas.events import DeadLettered, Event
from ragstream.schemas.identity import Principal
from ragstream.streams.runner import StageRunner
from ragstream.streams.topics import DEADLETTER, RESPONSES, TopicSpec

__all__ = ["Batched", "Concurrent", "Stage"]

D = TypeVar("D")


@dataclass(frozen=True)
class Batched:
    """Ordered micro-batches: up to `size` events, gathered for at most `max_wait_s`, with
    `depth` batches in flight (>1 only where effects do not depend on order)."""

    size: Callable[[Settings], int]
    max_wait_s: Callable[[Settings], float] = lambda s: 0.0
    depth: Callable[[Settings], int] = lambda s: 1


@dataclass(frozen=True)
class Concurrent:
    """Independent requests, up to `limit` at once, each published and acked when done."""

    limit: Callable[[Settings], int]


@dataclass(frozen=True)
class Stage(Generic[D]):
    name: str
    consumes: TopicSpec
    produces: tuple[TopicSpec, ...]
    flow: Batched | Concurrent
    deps: Callable[[Settings, StageRunner], AbstractAsyncContextManager[D]]
    """Opens the stage's dependencies (`contextlib.asynccontextmanager`)."""
    handle: Callable[[Sequence[Event], D], Awaitable[Sequence[Event]]]
    fetch_max_wait_ms: Callable[[Settings], int] = lambda s: s.kafka.fetch_max_wait_ms
    on_dead_letter: Callable[[DeadLettered], Sequence[Event]] | None = None
    """What the caller is told when one of its messages is dead-lettered."""
    once_per_request: bool = False
    """Skip inputs whose request is already finished (`streams.completions`): after a
    crash, nothing is generated, answered or judged twice."""
    finished_on: TopicSpec = RESPONSES
    """With `once_per_request`: the topic that says a request is finished (`responses` for
    the query path, `judgements` for the judge stage)."""
    admit: Callable[[Event, D], Event] | None = None
    """Command stages: verify each input's sender first (`streams.admission`). What it
    returns is what `handle` sees; `Unauthenticated`/`Forbidden` dead-letter the input."""
    caller: Callable[[bytes | None, D], Principal | None] | None = None
    """Who sent an input that is dead-lettered, so `on_dead_letter` can answer them."""
    _routes: dict[type[Event], TopicSpec] = field(init=False, repr=False, compare=False)
    _replies: TopicSpec | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        routes: dict[type[Event], TopicSpec] = {}
        replies = [spec for spec in self.produces if spec.per_principal]
        object.__setattr__(self, "_replies", replies[0] if replies else None)
        for spec in (*self.produces, DEADLETTER):
            if spec.per_principal:
                continue
            for t in spec.value_types:
                if t in routes and routes[t] is not spec:
                    raise TypeError(
                        f"stage {self.name}: {t.__name__} could go to {routes[t].name} or {spec.name}"
                    )
                routes[t] = spec
        object.__setattr__(self, "_routes", routes)

    def route(self, event: Event) -> TopicSpec:
        """The declared output topic for `event`: a reply stream for an event with a
        `reply_to`, else the one declared topic that carries its type.

        Raises:
            TypeError: the stage does not declare a topic for this event type (a bug).
        """
        if getattr(event, "reply_to", None) is not None:
            if self._replies is None:
                raise TypeError(f"stage {self.name} produced a reply but declares no reply stream topic")
            return self._replies
        try:
            return self._routes[type(event)]
        except KeyError:
            raise TypeError(
                f"stage {self.name} produced {type(event).__name__}, which none of its topics "
                f"({', '.join(t.name for t in self.produces)}) carries"
            ) from None

"""Adapters follow one lifecycle: the constructor does no I/O, `start()` connects, `close()`
releases. `started()` turns that into an `async with`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar

__all__ = ["Startable", "retry_while_starting", "started"]

log = logging.getLogger(__name__)


class Startable(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


S = TypeVar("S", bound=Startable)


@asynccontextmanager
async def started(resource: S) -> AsyncIterator[S]:
    """`await resource.start()`, yield it, and always `await resource.close()` after."""
    await resource.start()
    try:
        yield resource
    finally:
        await resource.close()


async def retry_while_starting(start: Callable[[], Awaitable[None]], *, wait_s: float = 180.0) -> None:
    """`await start()`, retried while it raises `DependencyUnavailable` for up to `wait_s`: a
    worker that starts beside the model servers waits for their models to load.

    Raises:
        DependencyUnavailable: still unavailable after `wait_s`.
    """
    from tenacity import (
        AsyncRetrying,
        before_sleep_log,
        retry_if_exception_type,
        stop_after_delay,
        wait_incrementing,
    )

    from ragstream.schemas.errors import DependencyUnavailable

    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(DependencyUnavailable),
        stop=stop_after_delay(wait_s),
        wait=wait_incrementing(start=0.25, increment=0.5, max=3.0),
        before_sleep=before_sleep_log(log, logging.INFO),
        reraise=True,
    ):
        with attempt:
            await start()

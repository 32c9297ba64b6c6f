"""Adapters follow one lifecycle: the constructor does no I/O, `start()` connects, `close()`
releases. `started()` turns that into an `async with`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar

__all__ = ["Startable", "started"]


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

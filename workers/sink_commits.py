"""The audit sink's commits: one catalog thread, and at most one batch in flight per table.

Every catalog call (opening tables, appends, maintenance) runs on the single `CommitThread`,
so commits to a table never race each other or maintenance, while the event loop keeps
consuming into the next micro-batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from ragstream.infra import telemetry
from ragstream.infra.audit.commits import Batch, commit_batch
from ragstream.streams.audit import AuditWriter

__all__ = ["CommitThread", "Commits"]


class CommitThread:
    """Runs catalog calls one at a time, in the order they are made, off the event loop."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-commit")

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        """Wait for what is running, then let the thread go."""
        self._executor.shutdown(wait=True)


class Commits:
    """The writer's batches on their way into the tables.

    A failed commit is raised by the next `collect` and stops the sink: the writer's
    positions are already past rows that never landed, so nothing more may be committed (a
    restart re-reads them).
    """

    def __init__(self, thread: CommitThread, tables: Mapping[str, Any], writer: AuditWriter) -> None:
        self._thread = thread
        self._tables = tables
        self._writer = writer
        self._inflight: dict[str, asyncio.Future[Batch]] = {}
        self.failed = False

    def launch_due(self) -> None:
        """Start a commit for every table the writer says is due."""
        for name in self._writer.due():
            self._launch(name)

    def collect(self) -> None:
        """Tell the writer which commits landed.

        Raises:
            FencedError: a second sink commits to the same table.
            CommitFailedException: a commit kept conflicting (the process should restart).
        """
        for name, fut in list(self._inflight.items()):
            if fut.done():
                del self._inflight[name]
                if fut.exception() is not None:
                    self.failed = True
                batch = fut.result()  # raises the commit's error: the process must restart
                self._writer.committed(batch)
                telemetry.AUDIT_LAG.labels(name).set(self._writer.tables[name].commit_lag_s)

    async def flush(self) -> None:
        """Commit everything buffered and wait for it; nothing after a failed commit."""
        if self.failed:
            return
        await self._drain()
        for name in self._writer.due(float("inf")):
            self._launch(name)
        await self._drain()

    def _launch(self, name: str) -> None:
        batch = self._writer.take(name, datetime.now(UTC))
        self._inflight[name] = asyncio.ensure_future(self._thread.call(self._commit, batch))

    def _commit(self, batch: Batch) -> Batch:
        started = time.perf_counter()
        commit_batch(self._tables[batch.table], batch)
        telemetry.AUDIT_COMMIT_SECONDS.labels(batch.table).observe(time.perf_counter() - started)
        telemetry.AUDIT_ROWS.labels(batch.table).inc(len(batch.rows))
        return batch

    async def _drain(self) -> None:
        if self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)
            self.collect()

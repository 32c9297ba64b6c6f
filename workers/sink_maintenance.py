"""When the audit sink maintains its tables: expire snapshots often, compact and clean rarely.

Maintenance runs on the sink's commit thread, so it never races the sink's own appends; what
each step does is `ragstream.infra.audit.maintenance`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from ragstream.infra.audit.maintenance import maintain_table
from ragstream.infra.settings import AuditSettings
from ragstream.workers.sink_commits import CommitThread

__all__ = ["MaintenanceSchedule"]

log = logging.getLogger(__name__)


class MaintenanceSchedule:
    """Every `audit.expire_interval_s`, expire snapshots (cheap, keeps commits fast); every
    `audit.maintenance_interval_s`, also compact closed days and remove orphan files. Both
    intervals count from when the schedule was made. One run at a time; a failed run stops
    the sink (a restart recovers)."""

    def __init__(self, thread: CommitThread, audit: AuditSettings) -> None:
        self._thread = thread
        self._audit = audit
        self._last_full_mono = self._last_expire_mono = time.monotonic()
        self._running: asyncio.Future[Any] | None = None

    def tick(self, tables: Mapping[str, Any]) -> None:
        """Start a run on `tables` if one is due and none is running. A run that failed is
        raised here, which stops the sink."""
        if self._running is not None:
            if not self._running.done():
                return
            self._running.result()  # a failure stops the sink; a restart recovers
            self._running = None
        now = time.monotonic()
        full_every, expire_every = self._audit.maintenance_interval_s, self._audit.expire_interval_s
        if full_every > 0 and now - self._last_full_mono >= full_every:
            self._last_full_mono = self._last_expire_mono = now
            self._running = asyncio.ensure_future(self._thread.call(self._maintain_all, tables, True))
        elif expire_every > 0 and now - self._last_expire_mono >= expire_every:
            self._last_expire_mono = now
            self._running = asyncio.ensure_future(self._thread.call(self._maintain_all, tables, False))

    def _maintain_all(self, tables: Mapping[str, Any], full: bool) -> None:
        # On the commit thread: never concurrent with the sink's appends.
        for table in tables.values():
            report = maintain_table(table, self._audit, compact=full, remove_orphans=full)
            if full or report.snapshots_expired:
                log.log(logging.INFO if full else logging.DEBUG, "audit maintenance: %s", asdict(report))

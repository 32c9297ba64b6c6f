"""The audit sink's heartbeat: liveness and counters, where the supervisor and `ragstream
status` read the Faust workers' (`run/worker-<name>.json`, via `heartbeat_path`)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from ragstream.infra import telemetry
from ragstream.infra.files import write_json_atomic
from ragstream.streams.audit import AuditWriter

__all__ = ["SinkHeartbeat"]

_HEARTBEAT_S = 0.5


class SinkHeartbeat:
    """Rewrites the heartbeat file (atomically) at most every `interval_s`."""

    def __init__(
        self, path: Path, name: str, tables: Sequence[str], interval_s: float = _HEARTBEAT_S
    ) -> None:
        self.path = path
        self._name = name
        self._tables = list(tables)
        self._interval_s = interval_s
        self._last_mono = 0.0

    def beat(self, writer: AuditWriter) -> None:
        """Called every loop; writes when `interval_s` has passed since the last write."""
        mono = time.monotonic()
        if mono - self._last_mono >= self._interval_s:
            self._write(writer)
            self._last_mono = mono

    def _write(self, writer: AuditWriter) -> None:
        c = writer.counters
        write_json_atomic(
            self.path,
            {
                "stage": self._name,
                "tables": self._tables,
                "pid": os.getpid(),
                "ts": time.time(),
                # Beats come from the consume loop, which runs once start() is done.
                "ready": True,
                "live": writer.live,
                "processed": c.records,
                "dead_lettered": 0,
                "rows": c.rows,
                "commits": c.commits,
                "pending_queries": writer.pending_count,
                "late_responses": c.late_responses,
                "duplicate_responses": c.duplicate_responses,
                "no_response": c.no_response,
                "undecodable": c.undecodable,
                "buffered": writer.buffered(),
                "metrics_url": telemetry.metrics_url(),
            },
        )

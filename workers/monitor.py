"""The monitor process: runs the monitoring job (`ragstream.infra.monitor.run_monitor`) every
`monitor.interval_s`, and beats a heartbeat (`run/worker-monitor.json`) for the supervisor
and `ragstream status`.

Run it as `python -m ragstream.workers.monitor`; `ragstream up` starts it when
`monitor.interval_s > 0`. Each run happens on a thread of its own (DuckDB and the Iceberg
reads block), so the heartbeat keeps beating while a run computes. A run that fails (the
catalog unreachable, Triton down) is logged and counted, and the next one tries again; the
process itself never gives up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from typing import Any

from ragstream.infra.embedder import Embedder, InProcessEmbedder, TritonEmbedder
from ragstream.infra.files import write_json_atomic
from ragstream.infra.logs import configure_logging
from ragstream.infra.monitor import MonitorReport, run_monitor
from ragstream.infra.settings import Settings, load_settings
from ragstream.schemas.errors import RagstreamError
from ragstream.workers.stages import heartbeat_path

__all__ = ["MONITOR", "MonitorLoop", "drift_embedder", "main", "monitor_once"]

log = logging.getLogger("ragstream.workers.monitor")

MONITOR = "monitor"
"""The process's name: its heartbeat is `worker-monitor.json`."""

_BEAT_S = 1.0


def drift_embedder(settings: Settings) -> Embedder:
    if settings.monitor.drift_embedder == "in_process":
        return InProcessEmbedder(settings)
    return TritonEmbedder(settings)


async def monitor_once(settings: Settings, embedder: Embedder | None = None) -> MonitorReport:
    """One monitoring run with the configured embedder (started and closed here unless given).

    Query drift is left null, with a warning, when the embedder cannot start: the profile
    and the other drift metrics do not depend on it.
    """
    if embedder is not None:
        return await run_monitor(settings, embedder=embedder)
    own = drift_embedder(settings)
    try:
        await own.start()
    except RagstreamError as exc:
        log.warning("query drift skipped this run: the embedder is unavailable (%s)", exc)
        return await run_monitor(settings, embedder=None)
    try:
        return await run_monitor(settings, embedder=own)
    finally:
        await own.close()


class MonitorLoop:
    """Runs `monitor_once` every `interval_s` on a worker thread and keeps the heartbeat."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stop = threading.Event()
        self.runs = 0
        self.failures = 0
        self.last: MonitorReport | None = None
        self.last_error: str | None = None
        self._running_since: float | None = None

    def stop(self) -> None:
        self._stop.set()

    def _run_once(self) -> None:
        self._running_since = time.time()
        try:
            self.last = asyncio.run(monitor_once(self._settings))
            self.last_error = None
            self.runs += 1
        except Exception as exc:  # noqa: BLE001 - counted, logged, retried next interval; never fatal
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("monitoring run failed (next in %.0f s): %s", self._settings.monitor.interval_s, exc)
        finally:
            self._running_since = None

    def _beat(self) -> None:
        last = self.last
        hb: dict[str, Any] = {
            "stage": MONITOR,
            "pid": os.getpid(),
            "ts": time.time(),
            "ready": True,
            "processed": self.runs,
            "dead_lettered": 0,
            "failures": self.failures,
            "last_error": self.last_error,
            "running_since": self._running_since,
        }
        if last is not None:
            hb |= {"windows": len(last.windows), "last_elapsed_s": round(last.elapsed_s, 3)}
        write_json_atomic(heartbeat_path(self._settings, MONITOR), hb)

    def run_forever(self) -> None:
        interval_s = self._settings.monitor.interval_s or 60.0
        next_run = time.monotonic()
        worker: threading.Thread | None = None
        while not self._stop.is_set():
            if (worker is None or not worker.is_alive()) and time.monotonic() >= next_run:
                worker = threading.Thread(target=self._run_once, name="monitor-run", daemon=True)
                worker.start()
                next_run = time.monotonic() + interval_s
            self._beat()
            self._stop.wait(_BEAT_S)
        if worker is not None:
            worker.join(timeout=30)


def main() -> None:
    settings = load_settings()
    configure_logging(settings)
    loop = MonitorLoop(settings)
    signal.signal(signal.SIGTERM, lambda *_: loop.stop())
    signal.signal(signal.SIGINT, lambda *_: loop.stop())
    log.info(
        "monitor: every %.0f s, windows %s", settings.monitor.interval_s, settings.monitor.granularities_s
    )
    loop.run_forever()


if __name__ == "__main__":
    main()

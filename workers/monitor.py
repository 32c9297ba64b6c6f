"""The monitor process: runs the monitoring job (`ragstream.infra.monitor.run_monitor`) every
`monitor.interval_s`, and beats a heartbeat (`run/worker-monitor.json`, with its `/metrics`
URL) for the supervisor and `ragstream status`.

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
from collections.abc import Awaitable, Callable
from typing import Any

from ragstream.infra import telemetry
from ragstream.infra.embedder import Embedder, InProcessEmbedder, TritonEmbedder
from ragstream.infra.files import write_json_atomic
from ragstream.infra.logs import configure_logging
from ragstream.infra.monitor import MonitorReport, firing_alerts, run_monitor
from ragstream.infra.settings import Settings, load_settings
from ragstream.schemas.alerts import AlertChanged
from ragstream.schemas.errors import RagstreamError
from ragstream.workers.stages import heartbeat_path

__all__ = [
    "MONITOR",
    "MonitorLoop",
    "alert_publisher",
    "drift_embedder",
    "main",
    "monitor_once",
    "post_webhook",
]

log = logging.getLogger("ragstream.workers.monitor")

MONITOR = "monitor"
"""The process's name: its heartbeat is `worker-monitor.json`."""

_BEAT_S = 1.0


def drift_embedder(settings: Settings) -> Embedder:
    if settings.monitor.drift_embedder == "in_process":
        return InProcessEmbedder(settings)
    return TritonEmbedder(settings)


def alert_publisher(settings: Settings) -> Callable[[list[AlertChanged]], Awaitable[None]]:
    """What the job calls with alert changes: each is published on the alerts topic (flushed;
    a failure raises, so the change is not recorded and the next run finds it again), then
    POSTed to `monitor.webhook_url` with retries (a webhook that stays down is logged)."""

    async def publish(changes: list[AlertChanged]) -> None:
        await asyncio.to_thread(_publish_blocking, settings, changes)
        for change in changes:
            telemetry.ALERTS_FIRING.labels(change.rule, change.severity).set(
                1.0 if change.state == "firing" else 0.0
            )
        if settings.monitor.webhook_url:
            await asyncio.to_thread(post_webhook, settings, changes)

    return publish


def _publish_blocking(settings: Settings, changes: list[AlertChanged]) -> None:
    from ragstream.infra import kafka
    from ragstream.streams.codec import encode
    from ragstream.streams.topics import ALERTS

    producer = kafka.make_producer(settings)
    try:
        topic = ALERTS.full_name(settings.kafka.topic_prefix)
        for change in changes:
            producer.send(topic, key=change.kafka_key(), value=encode(change))
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=5)
    for change in changes:
        log.warning("alert %s", change.message)


def post_webhook(settings: Settings, changes: list[AlertChanged]) -> None:
    import httpx
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

    url = str(settings.monitor.webhook_url)
    with httpx.Client(timeout=settings.monitor.webhook_timeout_s) as client:
        for change in changes:
            body = change.model_dump(mode="json")
            try:
                for attempt in Retrying(
                    stop=stop_after_attempt(settings.monitor.webhook_attempts),
                    wait=wait_exponential(multiplier=0.5, max=10),
                    retry=retry_if_exception_type(httpx.HTTPError),
                    reraise=True,
                ):
                    with attempt:
                        client.post(url, json=body).raise_for_status()
            except httpx.HTTPError as exc:
                log.warning(
                    "alert webhook %s failed after %d attempts: %s",
                    url,
                    settings.monitor.webhook_attempts,
                    exc,
                )


async def monitor_once(settings: Settings, embedder: Embedder | None = None) -> MonitorReport:
    """One monitoring run with the configured embedder (started and closed here unless given),
    alert changes published by `alert_publisher`.

    Query drift is left null, with a warning, when the embedder cannot start: the profile
    and the other drift metrics do not depend on it.
    """
    publish = alert_publisher(settings)
    if embedder is not None:
        return await run_monitor(settings, embedder=embedder, on_alerts=publish)
    own = drift_embedder(settings)
    try:
        await own.start()
    except RagstreamError as exc:
        log.warning("query drift skipped this run: the embedder is unavailable (%s)", exc)
        return await run_monitor(settings, embedder=None, on_alerts=publish)
    try:
        return await run_monitor(settings, embedder=own, on_alerts=publish)
    finally:
        await own.close()


def set_firing_gauges(settings: Settings) -> None:
    """`ragstream_alerts_firing` for every configured rule, from the alerts table: right after
    a restart too, not only once this process has published a change."""
    firing = firing_alerts(settings)
    for name, rule in settings.monitor.alerts.items():
        telemetry.ALERTS_FIRING.labels(name, rule.severity).set(1.0 if name in firing else 0.0)


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
        started = time.perf_counter()
        try:
            self.last = asyncio.run(monitor_once(self._settings))
            set_firing_gauges(self._settings)
            self.last_error = None
            self.runs += 1
            telemetry.MONITOR_RUNS.labels("ok").inc()
        except Exception as exc:  # noqa: BLE001 - counted, logged, retried next interval; never fatal
            self.failures += 1
            telemetry.MONITOR_RUNS.labels("failed").inc()
            self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("monitoring run failed (next in %.0f s): %s", self._settings.monitor.interval_s, exc)
        finally:
            telemetry.MONITOR_RUN_SECONDS.observe(time.perf_counter() - started)
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
            "metrics_url": telemetry.metrics_url(),
        }
        if last is not None:
            hb |= {"windows": len(last.windows), "last_elapsed_s": round(last.elapsed_s, 3)}
        write_json_atomic(heartbeat_path(self._settings, MONITOR), hb)

    def run_forever(self) -> None:
        interval_s = self._settings.monitor.interval_s or 60.0
        # The first run waits one interval: at start the stack's other processes load their
        # models on the same cores, and the audit tables have nothing new yet.
        next_run = time.monotonic() + interval_s
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
    telemetry.start_metrics_server(settings)
    if settings.monitor.alerts:
        try:
            set_firing_gauges(settings)
        except RagstreamError as exc:  # the first run sets them once the catalog answers
            log.warning("alert gauges not set at start: %s", exc)
    loop = MonitorLoop(settings)
    signal.signal(signal.SIGTERM, lambda *_: loop.stop())
    signal.signal(signal.SIGINT, lambda *_: loop.stop())
    log.info(
        "monitor: every %.0f s, windows %s", settings.monitor.interval_s, settings.monitor.granularities_s
    )
    loop.run_forever()


if __name__ == "__main__":
    main()

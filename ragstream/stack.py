"""The embedded stack: which processes make it up and how each is known to be ready.

Broker first; then Triton and the workers together (a worker's group join overlaps the model
load, and the embed stage retries until Triton answers). Topics, the LanceDB directory and
the Iceberg namespace are created once the broker is up.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from ragstream.infra import kafka
from ragstream.infra.audit.tables import sink_groups, sink_name
from ragstream.infra.auth import ensure_local_key
from ragstream.infra.iceberg import ensure_namespace
from ragstream.infra.settings import Settings, write_settings_file
from ragstream.infra.supervisor import Component, Supervisor
from ragstream.streams.topics import ALL_TOPICS
from ragstream.workers.stages import heartbeat_path, parse_stages

__all__ = [
    "build_supervisor",
    "create_all_topics",
    "free_ports",
    "isolated_env",
    "state_path",
    "worker_component",
    "worker_health",
]

log = logging.getLogger(__name__)

_HEARTBEAT_STALE_S = 10.0


_PORT_SETTINGS = (
    "RAGSTREAM_KAFKA__EMBEDDED_PORT",
    "RAGSTREAM_TRITON__EMBEDDED_GRPC_PORT",
    "RAGSTREAM_TRITON__EMBEDDED_HTTP_PORT",
    "RAGSTREAM_TRITON__EMBEDDED_METRICS_PORT",
    "RAGSTREAM_GENERATION__EMBEDDED_GRPC_PORT",
    "RAGSTREAM_GENERATION__EMBEDDED_HTTP_PORT",
    "RAGSTREAM_GENERATION__EMBEDDED_METRICS_PORT",
    "RAGSTREAM_DASHBOARD__PORT",
)


def isolated_env(data_dir: Path, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """Environment for a second embedded stack beside any other: its own data dir and free
    ports for every component (tests and benchmarks run stacks side by side)."""
    env = {
        k: v
        for k, v in (base if base is not None else dict(os.environ)).items()
        if not k.startswith("RAGSTREAM_")
    }
    env["RAGSTREAM_DATA_DIR"] = str(data_dir)
    for name, port in zip(_PORT_SETTINGS, free_ports(len(_PORT_SETTINGS)), strict=True):
        env[name] = str(port)
    env.update(extra)
    return env


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1 (all held open while choosing, so no repeats)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def audit_components(settings: Settings) -> list[tuple[str, tuple[str, ...]]]:
    """(component name, tables) of each audit sink process `up` runs (none if disabled).

    Raises:
        ConfigError: `audit.sinks` leaves a table out or names one twice.
    """
    if not settings.audit_sink:
        return []
    return [(f"audit-{sink_name(tables)}", tables) for tables in sink_groups(settings.audit)]


def worker_component(stages: tuple[str, ...]) -> str:
    """The supervisor's name for the process running `stages`: `worker-ingest+embed+index`."""
    return "worker-" + "+".join(stages)


def state_path(settings: Settings) -> Path:
    return settings.run_dir / "stack.json"


def create_all_topics(settings: Settings) -> list[str]:
    specs = [
        kafka.NewTopicSpec(t.full_name(settings.kafka.topic_prefix), settings.kafka.partitions)
        for t in ALL_TOPICS
    ]
    return kafka.create_topics(settings, specs)


def worker_health(settings: Settings, stage: str) -> dict[str, object] | None:
    """The worker's last heartbeat, or None if it has none or it is stale."""
    try:
        hb: dict[str, object] = json.loads(heartbeat_path(settings, stage).read_text())
    except (OSError, ValueError):
        return None
    ts = hb.get("ts")
    if not isinstance(ts, int | float) or time.time() - ts > _HEARTBEAT_STALE_S:
        return None
    return hb


def crash_reason(settings: Settings, stages: tuple[str, ...]) -> str | None:
    """What a worker's crashed stages wrote in their last heartbeat, however old."""
    reasons = []
    for stage in stages:
        try:
            hb = json.loads(heartbeat_path(settings, stage).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(hb, dict) and hb.get("crashed"):
            reasons.append(f"stage {stage} crashed: {hb['crashed']}")
    return "; ".join(reasons) or None


def dashboard_health(settings: Settings, timeout_s: float = 1.0) -> bool:
    """Whether the dashboard answers `/healthz`."""
    import httpx

    host = settings.dashboard.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    try:
        return (
            httpx.get(f"http://{host}:{settings.dashboard.port}/healthz", timeout=timeout_s).status_code
            == 200
        )
    except httpx.HTTPError:
        return False


def _worker_ready(settings: Settings, stage: str) -> bool:
    hb = worker_health(settings, stage)
    return bool(hb and hb.get("ready"))


def build_supervisor(settings: Settings, *, with_models: bool = True) -> Supervisor:
    """Describe the embedded stack; nothing starts until `Supervisor.start()`."""
    from ragstream.infra.model_server import ModelGroup, model_server_command
    from ragstream.infra.triton import is_ready as triton_ready

    settings.run_dir.mkdir(parents=True, exist_ok=True)
    if settings.auth.mode == "required" and settings.auth.local_key:
        # The workers trust it; the CLI and SDK sign with it (`ragstream.credentials`).
        key = ensure_local_key(settings.local_key_file)
        log.info("local signing key %s (%s)", key.kid, settings.local_key_file)
    settings_file = write_settings_file(settings, settings.run_dir / "settings.json")
    child_env = {
        "RAGSTREAM_CONFIG_FILE": str(settings_file),
        "PYTHONUNBUFFERED": "1",
        # glibc gives every thread its own malloc arena; with torch, Triton and Faust threads
        # that is hundreds of MB of mostly empty heap. Two arenas cost no measurable speed.
        "MALLOC_ARENA_MAX": "2",
    }
    components: list[Component] = []

    if settings.kafka.embedded:

        def after_broker() -> None:
            created = create_all_topics(settings)
            if created:
                log.info("created topics: %s", ", ".join(created))

        components.append(
            Component(
                name="broker",
                argv=kafka.broker_command(settings),
                ready=lambda: kafka.broker_is_up(settings, timeout_s=1.0),
                wave=0,
                after_start=after_broker,
                # Memory storage: a restarted broker has lost the workers' offsets and groups.
                restart_dependents=(
                    *(worker_component(parse_stages(w)) for w in settings.workers),
                    *(name for name, _ in audit_components(settings)),
                ),
                stop_timeout_s=5.0,
            )
        )

    model_servers: list[tuple[str, ModelGroup]] = []
    if with_models and settings.triton.embedded:
        model_servers.append(("triton", "embed"))
    if with_models and settings.generation_embedded:
        model_servers.append(("triton-llm", "generate"))
    for name, group in model_servers:
        argv, env = model_server_command(settings, group)
        env.update(child_env)
        components.append(
            Component(
                name=name,
                argv=argv,
                env=env,
                ready=lambda group=group: all(triton_ready(settings, timeout_s=1.0, group=group).values()),  # type: ignore[misc]
                wave=1,
                stop_timeout_s=20.0,
            )
        )

    for spec in settings.workers:
        stages = parse_stages(spec)
        components.append(
            Component(
                name=worker_component(stages),
                argv=[sys.executable, "-m", "ragstream", "worker", ",".join(stages)],
                env=child_env,
                ready=lambda stages=stages: all(_worker_ready(settings, s) for s in stages),  # type: ignore[misc]
                liveness=lambda stages=stages: all(  # type: ignore[misc]
                    worker_health(settings, s) is not None for s in stages
                ),
                exit_reason=lambda stages=stages: crash_reason(settings, stages),  # type: ignore[misc]
                wave=1,
            )
        )

    for component, tables in audit_components(settings):
        name = sink_name(tables)
        components.append(
            Component(
                name=component,
                argv=[sys.executable, "-m", "ragstream.workers.sink", "--tables", ",".join(tables)],
                env=child_env,
                ready=lambda name=name: _worker_ready(settings, name),  # type: ignore[misc]
                liveness=lambda name=name: worker_health(settings, name) is not None,  # type: ignore[misc]
                wave=1,
            )
        )

    if settings.monitor.interval_s > 0:
        from ragstream.workers.monitor import MONITOR

        components.append(
            Component(
                name=MONITOR,
                argv=[sys.executable, "-m", "ragstream.workers.monitor"],
                env=child_env,
                ready=lambda: worker_health(settings, MONITOR) is not None,
                liveness=lambda: worker_health(settings, MONITOR) is not None,
                wave=1,
            )
        )

    if settings.dashboard.enabled:
        components.append(
            Component(
                name="dashboard",
                argv=[sys.executable, "-m", "ragstream", "dashboard"],
                env=child_env,
                ready=lambda: dashboard_health(settings),
                liveness=lambda: dashboard_health(settings),
                wave=1,
            )
        )

    Path(settings.lancedb_uri).mkdir(parents=True, exist_ok=True)
    if settings.iceberg.catalog_type == "sql":
        ensure_namespace(settings)
    return Supervisor(
        components,
        log_dir=settings.log_dir,
        state_path=state_path(settings),
        ready_timeout_s=settings.ready_timeout_s,
        restart_backoff_s=settings.worker_restart_backoff_s,
    )

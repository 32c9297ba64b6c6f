"""`ragstream status`: the stack's health, one row per component, from what each one says
about itself (heartbeats, the supervisor's state file, the broker, Triton, the catalog)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ragstream.infra.settings import Settings
from ragstream.schemas.errors import RagstreamError

__all__ = ["stack_health", "stage_problem"]


_STUCK_AFTER_S = 300.0
"""A stage holding the same work this long is reported stuck (every stage call is bounded
well below it: deadlines on the query path, retry budgets on the document path)."""


def stage_problem(hb: dict[str, Any] | None) -> str | None:
    """Why a stage that still beats is not healthy: crashed, stalled publishing, or stuck."""
    if not hb:
        return None
    if hb.get("crashed"):
        return f"CRASHED: {hb['crashed']}"
    if hb.get("stalled_since"):
        return f"STALLED publishing since {time.strftime('%H:%M:%S', time.localtime(hb['stalled_since']))}: {hb.get('stalled_reason')}"
    oldest = hb.get("oldest_inflight_s") or 0
    if isinstance(oldest, int | float) and oldest > _STUCK_AFTER_S:
        return f"STUCK: holding work for {oldest:.0f}s"
    return None


def stack_health(settings: Settings) -> list[dict[str, Any]]:
    """One row per component: `component`, `healthy`, `detail`, `pid`, `restarts`, `last_exit`."""
    from ragstream.infra import kafka
    from ragstream.infra.audit.tables import sink_name
    from ragstream.infra.supervisor import read_state
    from ragstream.infra.triton import is_ready as triton_ready
    from ragstream.stack import audit_components, state_path, worker_health
    from ragstream.workers.stages import parse_stages

    state = read_state(state_path(settings)) or {}
    comps = state.get("components", {})

    def proc_info(name: str) -> dict[str, Any]:
        c = comps.get(name, {})
        return {"pid": c.get("pid"), "restarts": c.get("restarts", 0), "last_exit": c.get("last_exit")}

    rows: list[dict[str, Any]] = []
    broker_ok = kafka.broker_is_up(settings, timeout_s=1.0)
    rows.append(
        {"component": "broker", "healthy": broker_ok, "detail": settings.kafka.servers, **proc_info("broker")}
    )
    for name, group, url in (
        ("triton", "embed", settings.triton.grpc_url),
        ("triton-llm", "generate", settings.generation_grpc_url),
    ):
        t = triton_ready(settings, timeout_s=1.0, group=group)  # type: ignore[arg-type]
        models = ", ".join(f"{k}={'ready' if v else 'down'}" for k, v in t.items() if k != "server")
        rows.append(
            {
                "component": name,
                "healthy": all(t.values()),
                "detail": f"{url} {models}",
                **proc_info(name),
            }
        )
    stages = [st for spec in settings.workers for st in parse_stages(spec)]
    for stage in stages:
        hb = worker_health(settings, stage)
        problem = stage_problem(hb)
        detail = (
            f"processed={hb.get('processed')} dead_lettered={hb.get('dead_lettered')}"
            f" inflight={hb.get('inflight', 0)}"
            + (f" lag={hb['lag_s']:.1f}s" if isinstance(hb.get("lag_s"), (int, float)) else "")
            + (f" duplicates_skipped={hb['duplicates_skipped']}" if hb.get("duplicates_skipped") else "")
            + (f" rejected={hb['rejected']}" if hb.get("rejected") else "")
            + (f" {problem}" if problem else "")
            + (
                f" exactly-once gate behind: {hb['responses_gate_behind']}"
                if hb.get("responses_gate_behind")
                else ""
            )
            + _metrics(hb)
            if hb
            else "no recent heartbeat"
        )
        rows.append(
            {
                "component": f"worker-{stage}",
                "healthy": bool(hb and hb.get("ready")) and problem is None,
                "detail": detail,
                **proc_info(_process_of(comps, stage)),
            }
        )
    for component, tables in audit_components(settings):
        hb = worker_health(settings, sink_name(tables))
        rows.append(
            {
                "component": component,
                "healthy": bool(hb and hb.get("ready")),
                "detail": f"tables={','.join(tables)} live={hb.get('live')} pending_queries={hb.get('pending_queries')}"
                + _metrics(hb)
                if hb
                else "no recent heartbeat",
                **proc_info(component),
            }
        )
    if settings.monitor.interval_s > 0:
        hb = worker_health(settings, "monitor")
        detail = "no recent heartbeat"
        if hb:
            detail = f"runs={hb.get('processed')} failures={hb.get('failures')}"
            if hb.get("last_elapsed_s") is not None:
                detail += f" last_run={hb['last_elapsed_s']}s"
            if hb.get("last_error"):
                detail += f" last_error={hb['last_error']}"
            detail += _metrics(hb)
        rows.append(
            {
                "component": "monitor",
                "healthy": bool(hb and hb.get("ready")) and not (hb or {}).get("last_error"),
                "detail": detail,
                **proc_info("monitor"),
            }
        )
    if settings.dashboard.enabled:
        from ragstream.dashboard_cli import base_url
        from ragstream.stack import dashboard_health

        up = dashboard_health(settings)
        rows.append(
            {
                "component": "dashboard",
                "healthy": up,
                "detail": f"{base_url(settings)}/ (`ragstream dashboard --url` signs you in)"
                + (f" metrics={base_url(settings)}/metrics" if up else " not answering /healthz"),
                **proc_info("dashboard"),
            }
        )
    lance = Path(settings.lancedb_uri)
    rows.append(
        {
            "component": "vector-store",
            "healthy": settings.vector_store.kind != "lancedb" or lance.is_dir(),
            "detail": f"{settings.vector_store.kind} {lance if settings.vector_store.kind == 'lancedb' else settings.vector_store.weaviate_url}",
            "pid": None,
            "restarts": 0,
            "last_exit": None,
        }
    )
    rows.append(_catalog_row(settings))
    return rows


def _metrics(hb: dict[str, Any]) -> str:
    """` metrics=<url>` when the process serves Prometheus metrics (its heartbeat says where)."""
    url = hb.get("metrics_url")
    return f" metrics={url}" if isinstance(url, str) and url else ""


def _process_of(components: dict[str, Any], stage: str) -> str:
    """The supervised process (e.g. `worker-ingest+embed+index`) that runs `stage`."""
    for name in components:
        if name.startswith("worker-") and stage in name.removeprefix("worker-").split("+"):
            return str(name)
    return f"worker-{stage}"


def _catalog_row(settings: Settings) -> dict[str, Any]:
    from ragstream.infra.iceberg import open_catalog

    try:
        ok = settings.iceberg.namespace in {ns[0] for ns in open_catalog(settings).list_namespaces()}
        detail = settings.iceberg_catalog_uri
    except RagstreamError as exc:
        ok, detail = False, str(exc)
    return {
        "component": "iceberg-catalog",
        "healthy": ok,
        "detail": detail,
        "pid": None,
        "restarts": 0,
        "last_exit": None,
    }

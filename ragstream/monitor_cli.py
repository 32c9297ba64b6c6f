"""`ragstream monitor run`: compute the profile and drift metric tables now.

Register in `ragstream.cli`:

    from ragstream.monitor_cli import monitor_app
    app.add_typer(monitor_app, name="monitor")
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ragstream.cli_args import iso_time
from ragstream.infra.settings import Settings, load_settings

__all__ = ["monitor_app"]

monitor_app = typer.Typer(help="Monitoring: profile and drift metrics in Iceberg.", no_args_is_help=True)
err = Console(stderr=True)
console = Console()

_MAX_WINDOWS = 10_000


@monitor_app.command("run")
def run_command(
    since: Annotated[
        str | None, typer.Option("--since", help="Recompute every window from this time (ISO) on.")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="... up to this time (ISO; default now).")
    ] = None,
    no_query_drift: Annotated[
        bool, typer.Option("--no-query-drift", help="Skip embedding questions (query drift left null).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run's report as JSON.")] = False,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Config file.")] = None,
) -> None:
    """Compute monitor_profile and monitor_drift for the latest windows (or a time range),
    replacing the rows of every window it computes; for the latest windows, evaluate the alert
    rules (changes go to the alerts topic, the alerts table and the webhook)."""
    from ragstream.infra.logs import configure_logging
    from ragstream.infra.monitor import MonitorReport, run_monitor, windows_to_compute
    from ragstream.infra.monitor.windows import Window, window_containing
    from ragstream.schemas.errors import RagstreamError
    from ragstream.workers.monitor import alert_publisher, monitor_once

    settings: Settings = load_settings(config)
    configure_logging(settings)
    now = datetime.now(UTC)
    end = iso_time(until, "--until") if until else now
    windows: list[Window] | None = None
    if since is not None:
        start = iso_time(since, "--since")
        if start >= end:
            err.print("[red]--since[/] must be before --until")
            raise typer.Exit(2)
        windows = []
        for length_s in settings.monitor.granularities_s:
            w = window_containing(length_s, start)
            while w.start < end:
                windows.append(w)
                w = Window(length_s, w.end)
                if len(windows) > _MAX_WINDOWS:
                    err.print(f"[red]--since/--until[/]: more than {_MAX_WINDOWS} windows; narrow the range")
                    raise typer.Exit(2)
    elif until is not None:
        windows = windows_to_compute(settings, end)

    async def go() -> MonitorReport:
        if no_query_drift:
            publish = alert_publisher(settings) if windows is None else None
            return await run_monitor(settings, now=now, windows=windows, embedder=None, on_alerts=publish)
        if windows is None:
            return await monitor_once(settings)
        from ragstream.workers.monitor import drift_embedder

        embedder = drift_embedder(settings)
        try:
            await embedder.start()
        except RagstreamError as exc:
            err.print(f"[yellow]query drift skipped[/]: {exc}")
            return await run_monitor(settings, now=now, windows=windows, embedder=None)
        try:
            return await run_monitor(settings, now=now, windows=windows, embedder=embedder)
        finally:
            await embedder.close()

    try:
        report = asyncio.run(go())
    except RagstreamError as exc:
        err.print(f"[red]monitoring failed[/]: {exc}")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(asdict(report)))
        return
    for change in report.alerts:
        console.print(f"alert {change}", markup=False, highlight=False)
    console.print(
        f"{len(report.windows)} windows: {report.profile_rows} profile rows, {report.drift_rows} drift rows, "
        f"from {report.requests_read} requests ({report.questions_embedded} questions embedded) "
        f"in {report.elapsed_s:.2f} s",
        markup=False,
        highlight=False,
    )

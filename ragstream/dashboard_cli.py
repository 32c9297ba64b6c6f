"""`ragstream dashboard`: serve the monitoring dashboard, or print a sign-in link for it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ragstream.infra.settings import Settings, load_settings

__all__ = ["dashboard", "login_url"]

err = Console(stderr=True)
log = logging.getLogger(__name__)

_ADMIN_USER = "dashboard-admin"


def base_url(settings: Settings) -> str:
    host = settings.dashboard.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[" + host + "]" if ":" in host else host)
    return f"http://{shown}:{settings.dashboard.port}"


def login_url(settings: Settings) -> str:
    """The dashboard's URL, with a sign-in token for the local stack's admin when the stack
    signs its own tokens (the local key); the plain URL otherwise."""
    url = base_url(settings) + "/"
    if settings.auth.mode == "off" or not settings.auth.local_key or not settings.local_key_file.exists():
        return url
    from ragstream.infra.auth import issue_token, load_signing_key

    token = issue_token(
        load_signing_key(settings.local_key_file),
        tenant=settings.default_tenant,
        user=_ADMIN_USER,
        scopes=("admin",),
        ttl_s=min(settings.dashboard.session_ttl_s, settings.auth.max_ttl_s),
        audience=settings.auth.audience,
    )
    return f"{base_url(settings)}/login?token={token}"


def dashboard(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Config file (TOML/YAML/JSON). Env: RAGSTREAM_CONFIG_FILE."),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default dashboard.host, 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port (default dashboard.port, 8765).")
    ] = None,
    url: Annotated[
        bool, typer.Option("--url", help="Print a sign-in link for the running dashboard and exit.")
    ] = False,
) -> None:
    """Serve the monitoring dashboard: overview, guardrails, judges, usage, drift, alerts and
    a request explorer, read from the Iceberg tables. `ragstream up` runs it already."""
    from ragstream.infra.logs import configure_logging

    settings = load_settings(config)
    if host is not None or port is not None:
        section = settings.dashboard.model_copy(
            update={k: v for k, v in (("host", host), ("port", port)) if v is not None}
        )
        settings = settings.model_copy(update={"dashboard": section})
    configure_logging(settings)
    if url:
        print(login_url(settings))
        return
    from aiohttp import web

    from ragstream.dashboard import create_app

    app = create_app(settings)
    err.print(f"ragstream dashboard on {base_url(settings)}/ (Ctrl-C to stop)")
    web.run_app(
        app,
        host=settings.dashboard.host,
        port=settings.dashboard.port,
        print=None,
        access_log=None,
        shutdown_timeout=5.0,
    )

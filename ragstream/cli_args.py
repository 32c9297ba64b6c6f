"""Argument parsing shared by the CLI's commands."""

from __future__ import annotations

from datetime import UTC, datetime

import typer
from rich.console import Console

__all__ = ["iso_time"]

_err = Console(stderr=True)


def iso_time(value: str, option: str) -> datetime:
    """An ISO-8601 date or time (UTC when it names no zone); exit 2 naming `option` otherwise."""
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        _err.print(
            f"[red]{option} {value!r}[/]: expected an ISO time, e.g. 2026-12-01 or 2026-12-01T08:00:00Z"
        )
        raise typer.Exit(2) from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)

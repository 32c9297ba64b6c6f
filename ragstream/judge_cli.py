"""`ragstream judge backfill`: re-judge `inference_log` history as of a snapshot.

Register in `ragstream.cli`:

    from ragstream.judge_cli import judge_app
    app.add_typer(judge_app, name="judge")
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress

from ragstream.cli_args import iso_time
from ragstream.infra.settings import load_settings

__all__ = ["judge_app"]

judge_app = typer.Typer(help="Judges: re-judge history.", no_args_is_help=True)
err = Console(stderr=True)


@judge_app.command("backfill")
def backfill_command(
    since: Annotated[str, typer.Option("--since", help="First submission time to re-judge (ISO).")],
    version: Annotated[str, typer.Option("--version", help="The judge version these judgements carry.")],
    until: Annotated[
        str | None, typer.Option("--until", help="Re-judge up to this time (ISO, excluded).")
    ] = None,
    snapshot: Annotated[
        int | None, typer.Option("--snapshot", help="inference_log snapshot id (default: current).")
    ] = None,
    judges: Annotated[
        list[str] | None,
        typer.Option("--judges", help="Judges, comma-separated or repeated (default: judges.judges)."),
    ] = None,
) -> None:
    """Re-judge answered requests of inference_log (idempotent, resumable; see docs/judges.md)."""
    from ragstream.backfill import backfill
    from ragstream.infra.judges.panel import UnknownJudge
    from ragstream.schemas.errors import BadInputError

    if not version.strip() or len(version) > 64:
        err.print("[red]--version[/]: 1 to 64 characters")
        raise typer.Exit(2)
    names = [n.strip() for spec in judges or [] for n in spec.split(",") if n.strip()]
    settings = load_settings()
    with Progress(console=err, transient=False) as bar:
        task = bar.add_task("re-judging", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            report = asyncio.run(
                backfill(
                    settings,
                    since=iso_time(since, "--since"),
                    until=iso_time(until, "--until") if until else None,
                    snapshot_id=snapshot,
                    judges=names or None,
                    version=version.strip(),
                    progress=progress,
                )
            )
        except (BadInputError, UnknownJudge) as exc:
            err.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from None
    err.print(
        f"snapshot {report.snapshot_id}: {report.rows} answered rows, {report.judged} judged, "
        f"{report.skipped_done} already done, {report.published} judgements published"
        + (f", {report.errors} with errors" if report.errors else "")
        + " (the audit sink lands them in the judgements table)"
    )

"""`ragstream guard check`: try a guardrail policy on a text, with the same detectors and
rails the query path runs.

Register in `ragstream.cli`:

    from ragstream.guard_cli import guard_app
    app.add_typer(guard_app, name="guard")
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from ragstream.infra.settings import Settings, load_settings

__all__ = ["EXIT_CODES", "guard_app"]

guard_app = typer.Typer(help="Guardrails: try a policy on a text.", no_args_is_help=True)
err = Console(stderr=True)

EXIT_CODES = {"allow": 0, "flag": 3, "mask": 4, "block": 5}
"""Each action has its own exit code (2 is a usage error, 1 an internal one)."""
MAX_INPUT_BYTES = 32 * 1024
"""Four times the longest question a query may carry; longer texts are refused (exit 2),
rather than checked in part or blocked by a detector running past its budget."""


def _read_text(text: str) -> str:
    if text != "-":
        return text
    raw = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
    if len(raw) > MAX_INPUT_BYTES:
        err.print(
            f"[red]the text is over {MAX_INPUT_BYTES // 1024} KB[/]: check a question or an answer at a time"
        )
        raise typer.Exit(2)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        err.print(f"[red]input is not valid UTF-8[/] (byte {exc.start})")
        raise typer.Exit(2) from None


async def _check(settings: Settings, text: str, direction: str, policy_name: str | None) -> tuple[Any, float]:
    from ragstream.infra.embedder import E5Embedder
    from ragstream.infra.guard.detectors import GuardDetectors
    from ragstream.streams.guardrails import Guardrails

    embedder = E5Embedder(settings)
    await embedder.start()
    detectors = GuardDetectors(embedder, cache_dir=settings.model_cache_dir / "guard")
    try:
        await detectors.start()
        guard = Guardrails(settings.guardrails, detectors)
        name = policy_name or settings.guardrails.default_policy
        policy = settings.guardrails.policies[name]
        started = time.perf_counter()
        result = await guard.check(text, direction, policy)  # type: ignore[arg-type]
        return result, (time.perf_counter() - started) * 1000
    finally:
        await detectors.close()
        await embedder.close()


@guard_app.command("check")
def check(
    text: Annotated[str, typer.Argument(help="The text to check, or - to read it from stdin (UTF-8).")],
    direction: Annotated[str, typer.Option(help="input (a question) or output (an answer).")] = "input",
    policy: Annotated[
        str | None, typer.Option(help="Policy name (default: guardrails.default_policy).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Config file (TOML/YAML/JSON). Env: RAGSTREAM_CONFIG_FILE."),
    ] = None,
) -> None:
    """Run a policy's rails on TEXT. Exit code: 0 allow, 3 flag, 4 mask, 5 block."""
    if direction not in ("input", "output"):
        err.print(f"[red]--direction must be input or output, not {direction!r}[/]")
        raise typer.Exit(2)
    settings = load_settings(config)
    if policy is not None and policy not in settings.guardrails.policies:
        err.print(
            f"[red]unknown policy {policy!r}[/] (defined: {', '.join(sorted(settings.guardrails.policies))})"
        )
        raise typer.Exit(2)
    body = _read_text(text)
    if len(body.encode("utf-8", "surrogatepass")) > MAX_INPUT_BYTES:
        err.print(
            f"[red]the text is over {MAX_INPUT_BYTES // 1024} KB[/]: check a question or an answer at a time"
        )
        raise typer.Exit(2)
    if not body.strip():
        err.print("[red]nothing to check: the text is empty[/]")
        raise typer.Exit(2)
    result, latency_ms = asyncio.run(_check(settings, body, direction, policy))
    findings = [
        {"rail": f.rail, "category": f.category, "score": f.score, "start": f.start, "end": f.end}
        for v in result.verdicts
        for f in v.findings
    ]
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "action": result.action,
                    "text": result.text if result.action == "mask" else None,
                    "findings": findings,
                    "latency_ms": round(latency_ms, 3),
                },
                ensure_ascii=False,
            )
        )
    else:
        err.print(f"[bold]{result.action}[/] in {latency_ms:.1f} ms")
        for v in result.verdicts:
            detail = f" {v.category} ({v.score})" if v.category else ""
            err.print(f"  {v.rail}: {v.action}{detail}" + (f" [yellow]{v.error}[/]" if v.error else ""))
        if result.action == "mask":
            typer.echo(result.text)
    raise typer.Exit(EXIT_CODES[result.action])

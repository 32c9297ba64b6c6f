"""`ragstream token issue`: a signed token for a plain Kafka client (or another machine).

Register in `ragstream.cli`:

    from ragstream.token_cli import token_app
    app.add_typer(token_app, name="token")
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ragstream.infra.auth import issue_token, load_signing_key
from ragstream.infra.settings import load_settings
from ragstream.schemas.errors import ConfigError
from ragstream.schemas.identity import SCOPES
from ragstream.streams.topics import reply_topic

__all__ = ["parse_ttl_s", "token_app"]

token_app = typer.Typer(help="Signed identity tokens (JWT) for command events.", no_args_is_help=True)
err = Console(stderr=True)

_TTL = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl_s(text: str) -> float:
    """`90`, `90s`, `30m`, `1h`, `7d` -> seconds.

    Raises:
        typer.BadParameter: anything else.
    """
    m = _TTL.fullmatch(text.strip().lower())
    if not m or float(m.group(1)) <= 0:
        raise typer.BadParameter(f"expected a duration such as 90s, 30m, 1h or 7d, not {text!r}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


@token_app.command("issue")
def issue(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="The tenant the token acts in.")],
    user: Annotated[str, typer.Option("--user", "-u", help="Who the token is for (its `sub`).")],
    group: Annotated[
        list[str] | None, typer.Option("--group", "-g", help="Access group; repeatable.")
    ] = None,
    client: Annotated[
        str | None,
        typer.Option(help="Names the reply stream `<prefix>.responses.<tenant>.<client>` (default: user)."),
    ] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", "-s", help=f"Repeatable: {', '.join(SCOPES)} (default: query)."),
    ] = None,
    ttl: Annotated[str, typer.Option(help="Lifetime: 90s, 30m, 1h, 7d.")] = "1h",
    key_file: Annotated[
        Path | None,
        typer.Option("--key-file", help="A private JWK (HS256, RS256 or ES256); default: the local key."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Config file (TOML/YAML/JSON). Env: RAGSTREAM_CONFIG_FILE."),
    ] = None,
) -> None:
    """Print a token. Put it in the `token` field of every query or document you publish."""
    settings = load_settings(config)
    path = key_file or settings.local_key_file
    ttl_s = parse_ttl_s(ttl)
    if ttl_s > settings.auth.max_ttl_s:
        err.print(f"[red]--ttl {ttl} is longer than auth.max_ttl_s ({settings.auth.max_ttl_s:.0f}s)[/]")
        raise typer.Exit(2)
    try:
        key = load_signing_key(path)
        token = issue_token(
            key,
            tenant=tenant,
            user=user,
            groups=group or (),
            client=client,
            scopes=scope or ("query",),
            ttl_s=ttl_s,
            audience=settings.auth.audience,
        )
    except ConfigError as exc:
        hint = " (start the stack with `ragstream up` to create it)" if key_file is None else ""
        err.print(f"[red]{exc}[/]{hint}")
        raise typer.Exit(2) from None
    except ValueError as exc:
        err.print(f"[red]cannot issue this token[/]: {exc}")
        raise typer.Exit(2) from None
    typer.echo(token)
    err.print(
        f"key {key.kid}, valid {ttl}; replies on "
        f"{reply_topic(settings.kafka.topic_prefix, f'{tenant}.{client or user}')}"
    )

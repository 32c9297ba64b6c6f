"""`ragstream token issue`: a signed token for a plain Kafka client (or another machine).

Register in `ragstream.cli`:

    from ragstream.token_cli import token_app
    app.add_typer(token_app, name="token")
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ragstream.infra import kafka
from ragstream.infra.auth import SigningKey, issue_token, load_signing_key
from ragstream.infra.settings import load_settings
from ragstream.schemas.errors import ConfigError, DependencyUnavailable
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


def _secret_key(env: str, kid: str | None) -> SigningKey:
    secret = os.environ.get(env)
    if not secret or not kid:
        raise ConfigError(f"--secret-env needs the variable {env} set and --kid naming its key id")
    return SigningKey(kid=kid, algorithm="HS256", key=secret.encode())


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
    secret_env: Annotated[
        str | None,
        typer.Option(
            "--secret-env", help="Sign with the HS256 secret in this environment variable (needs --kid)."
        ),
    ] = None,
    kid: Annotated[str | None, typer.Option("--kid", help="The key id of --secret-env's secret.")] = None,
    create_stream: Annotated[
        bool,
        typer.Option(
            help="Create the reply stream if the broker is reachable and allows it (the embedded stack)."
        ),
    ] = True,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Config file (TOML/YAML/JSON). Env: RAGSTREAM_CONFIG_FILE."),
    ] = None,
) -> None:
    """Print a token. Put it in the `token` field of every query or document you publish,
    and read your answers from the reply stream it names (printed on stderr).

    `export RAGSTREAM_AUTH__TOKEN=$(ragstream token issue ...)` makes the CLI and SDK use it.
    """
    settings = load_settings(config)
    path = key_file or settings.local_key_file
    ttl_s = parse_ttl_s(ttl)
    if ttl_s > settings.auth.max_ttl_s:
        err.print(f"[red]--ttl {ttl} is longer than auth.max_ttl_s ({settings.auth.max_ttl_s:.0f}s)[/]")
        raise typer.Exit(2)
    try:
        key = _secret_key(secret_env, kid) if secret_env else load_signing_key(path)
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
        hint = (
            " (start the stack with `ragstream up` to create it)"
            if key_file is None and not secret_env
            else ""
        )
        err.print(f"[red]{exc}[/]{hint}")
        raise typer.Exit(2) from None
    except ValueError as exc:
        err.print(f"[red]cannot issue this token[/]: {exc}")
        raise typer.Exit(2) from None
    stream = reply_topic(settings.kafka.topic_prefix, f"{tenant}.{client or user}")
    typer.echo(token)
    err.print(f"key {key.kid}, valid {ttl}; replies on {stream}")
    if create_stream and kafka.broker_is_up(settings, timeout_s=2.0):
        try:
            if kafka.create_topics(
                settings, [kafka.NewTopicSpec(stream, settings.kafka.reply_stream_partitions)]
            ):
                err.print(f"created {stream}")
        except DependencyUnavailable as exc:
            err.print(
                f"[yellow]could not create {stream}[/] ({exc}); ask the operator (`ragstream acls client`)"
            )

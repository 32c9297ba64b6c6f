"""`ragstream acls ...`: the Kafka principals and ACLs, as shell commands for an operator.

Both commands only print (to stdout, ready to pipe into `bash`); nothing talks to the broker.
The ACLs come from `ragstream.acls`, derived from the stage and topic declarations.

Register in `ragstream.cli`:

    from ragstream.acls_cli import acls_app
    app.add_typer(acls_app, name="acls")
"""

from __future__ import annotations

import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from ragstream.acls import render_client_script, render_service_script
from ragstream.infra.settings import Settings, load_settings
from ragstream.schemas.identity import Scope

__all__ = ["ScopeOption", "acls_app", "client", "service"]

acls_app = typer.Typer(
    help="Kafka principals and ACLs (Apache Kafka with SASL/SCRAM; the embedded broker has none).",
    no_args_is_help=True,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (TOML/YAML/JSON). Env: RAGSTREAM_CONFIG_FILE."),
]
PrefixOpt = Annotated[
    str | None, typer.Option("--prefix", help="Topic prefix (default: settings kafka.topic_prefix).")
]


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ScopeOption(StrEnum):
    """The scopes a client may hold (`ragstream.schemas.identity.SCOPES`)."""

    query = "query"
    ingest = "ingest"
    admin = "admin"


def _settings(config: Path | None) -> Settings:
    return load_settings(config)


@acls_app.command("service")
def service(config: ConfigOpt = None, prefix: PrefixOpt = None) -> None:
    """Print the script that creates ragstream's service users (SCRAM) and their ACLs.

    The compose `kafka-acls` job runs the checked-in copy, infra/deploy/kafka/service-acls.sh.
    """
    topic_prefix = prefix if prefix is not None else _settings(config).kafka.topic_prefix
    sys.stdout.write(render_service_script(topic_prefix))


@acls_app.command("client")
def client(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="The client's tenant.")],
    client_id: Annotated[str, typer.Option("--client", help="The client's id (its reply stream's name).")],
    scope: Annotated[
        list[ScopeOption] | None,
        typer.Option("--scope", "-s", help="What it may send: query, ingest; repeat for several."),
    ] = None,
    password_env: Annotated[
        str, typer.Option("--password-env", help="Environment variable holding its password.")
    ] = "KAFKA_CLIENT_PASSWORD",
    config: ConfigOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Print the commands that onboard a client: its SCRAM user, its reply stream, its ACLs.

    Then issue it a token for the same tenant and client: `ragstream token issue ...`.
    """
    if not _ENV_NAME.fullmatch(password_env):
        raise typer.BadParameter(f"{password_env!r} is not an environment variable name")
    settings = _settings(config)
    scopes: list[Scope] = [s.value for s in scope or [ScopeOption.query]]
    try:
        script = render_client_script(
            prefix if prefix is not None else settings.kafka.topic_prefix,
            tenant,
            client_id,
            scopes,
            partitions=settings.kafka.reply_stream_partitions,
            replication_factor=settings.kafka.replication_factor,
            password_var=password_env,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    sys.stdout.write(script)

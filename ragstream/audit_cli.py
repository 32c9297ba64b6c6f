"""`ragstream sql` and `ragstream audit ...`: the Iceberg audit trail from the command line.

Register in `ragstream.cli`:

    from ragstream.audit_cli import audit_app, sql
    app.add_typer(audit_app, name="audit")
    app.command("sql")(sql)
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from datetime import date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ragstream.infra.logs import configure_logging
from ragstream.infra.settings import Settings, load_settings

__all__ = ["OutputFormat", "audit_app", "maintain", "sql"]

audit_app = typer.Typer(
    help="The Iceberg audit trail: inference, usage, ingestion, dead letters.", no_args_is_help=True
)

console = Console()

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (TOML/YAML/JSON). Env: RAGSTREAM_CONFIG_FILE."),
]


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def _settings(config: Path | None) -> Settings:
    settings = load_settings(config)
    configure_logging(settings)
    return settings


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        # pyarrow returns maps as lists of (key, value) tuples
        if value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
            return {str(k): _plain(v) for k, v in value}
        return [_plain(v) for v in value]
    return value


def sql(
    query: Annotated[
        str, typer.Argument(help="DuckDB SQL; tables: inference_log, usage, ingestion_log, dead_letters.")
    ],
    config: ConfigOpt = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = OutputFormat.table,
) -> None:
    """Query the audit tables with SQL, e.g. `ragstream sql "SELECT status, count(*) FROM inference_log GROUP BY 1"`."""
    from ragstream.infra.audit.query import audit_sql

    settings = _settings(config)
    result = audit_sql(settings, query)
    if fmt is OutputFormat.csv:
        import pyarrow.csv as pacsv

        sink = sys.stdout.buffer
        pacsv.write_csv(result, sink)
        sink.flush()
        return
    rows = [_plain(r) for r in result.to_pylist()]
    if fmt is OutputFormat.json:
        for row in rows:
            sys.stdout.write(json.dumps(row, default=str) + "\n")
        return
    table = Table(show_lines=False)
    for name in result.column_names:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row.values()))
    console.print(table)
    console.print(f"{result.num_rows} row(s)", style="dim")


@audit_app.command("maintain")
def maintain(
    config: ConfigOpt = None,
    compact: Annotated[
        bool, typer.Option("--compact/--no-compact", help="Rewrite closed day partitions with many files.")
    ] = True,
) -> None:
    """Expire old snapshots, compact closed partitions and remove orphan files, now.

    The sink does this on its schedule; running it by hand alongside the sink is safe (a
    compaction that races a commit is skipped until the next run).
    """
    from ragstream.infra.audit.maintenance import maintain as run_maintenance

    settings = _settings(config)
    reports = run_maintenance(settings, compact=compact)
    table = Table(title="audit maintenance")
    for col in (
        "table",
        "snapshots expired",
        "days compacted",
        "files compacted",
        "orphans removed",
        "skipped",
    ):
        table.add_column(col)
    for r in reports:
        d = asdict(r)
        table.add_row(
            r.table,
            str(d["snapshots_expired"]),
            ", ".join(d["partitions_compacted"]) or "-",
            str(d["files_compacted"]),
            str(d["orphans_removed"]),
            ", ".join(d["skipped"]) or "-",
        )
    console.print(table)

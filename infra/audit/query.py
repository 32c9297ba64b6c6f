"""Reading the audit tables: as Arrow, or with DuckDB SQL over all of them by name.

DuckDB's own Iceberg extension needs a download (fails offline), so each table the SQL names
is read with pyiceberg's scan and registered in an in-memory DuckDB as an Arrow view.

Reading without ragstream: `pyiceberg.catalog.load_catalog("ragstream", type="sql",
uri="sqlite:///<data_dir>/iceberg/catalog.db", warehouse="file://<data_dir>/iceberg/warehouse")`
then `load_table(("ragstream", "inference_log")).scan().to_arrow()` (or `.to_duckdb(...)`).
The catalog name matters: a SqlCatalog keys its rows by it, and under another name the
namespace looks empty.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from ragstream.infra.audit.tables import READABLE_TABLES, VIEWS
from ragstream.infra.settings import Settings
from ragstream.schemas.errors import AuditQueryError, DependencyUnavailable

__all__ = ["TIME_COLUMNS", "audit_sql", "load_table", "read_between", "read_table"]


TIME_COLUMNS: dict[str, str] = {
    "inference_log": "submitted_at",
    "usage": "event_time",
    "ingestion_log": "event_time",
    "guardrail_verdicts": "event_time",
    "judgements": "judged_at",
    "dead_letters": "event_time",
    "evaluations": "evaluated_at",
    "alerts": "changed_at",
    "monitor_profile": "window_start",
    "monitor_drift": "window_start",
}
"""The event time of each table, whose UTC day is its `event_date` partition."""


def read_between(
    catalog: Any,
    settings: Settings,
    name: str,
    columns: tuple[str, ...],
    start: datetime,
    end: datetime,
    *,
    tenant: str | None = None,
) -> Any:
    """`columns` of the rows of table `name` whose event time is in [start, end), read from
    the day partitions that can hold them only (and one tenant's rows only, when given); an
    empty table with those columns if the table does not exist yet.

    Raises:
        DependencyUnavailable: the table exists but cannot be read.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from ragstream.infra.audit.tables import arrow_schema

    ident = (settings.iceberg.namespace, name)
    time_column = TIME_COLUMNS[name]
    try:
        exists = catalog.table_exists(ident)
        if exists:
            table = catalog.load_table(ident)
    except Exception as exc:  # catalog transport errors
        raise DependencyUnavailable(f"cannot load audit table {name}: {exc}") from exc
    if not exists:
        schema = arrow_schema(name)
        return pa.table({c: pa.array([], schema.field(c).type) for c in columns})
    first, last = start.date(), (end - timedelta(microseconds=1)).date()
    row_filter = f"event_date >= '{first.isoformat()}' AND event_date <= '{last.isoformat()}'"
    if tenant is not None:
        row_filter += " AND tenant = '" + tenant.replace("'", "''") + "'"
    selected = columns if time_column in columns else (*columns, time_column)
    try:
        arrow = table.scan(row_filter=row_filter, selected_fields=selected).to_arrow()
    except Exception as exc:  # object store and file errors
        raise DependencyUnavailable(f"cannot read audit table {name}: {exc}") from exc
    when = arrow[time_column]
    keep = pc.and_(
        pc.greater_equal(when, pa.scalar(start, when.type)), pc.less(when, pa.scalar(end, when.type))
    )
    return arrow.filter(keep).select(list(columns))


def load_table(settings: Settings, name: str) -> Any:
    """An audit table, for a scan of its own (time travel, selected fields).

    Raises:
        DependencyUnavailable: the catalog or the table cannot be loaded.
    """
    return _load(settings, name)


def _load(settings: Settings, name: str) -> Any:
    from ragstream.infra.iceberg import open_catalog

    catalog = open_catalog(settings)
    try:
        return catalog.load_table((settings.iceberg.namespace, name))
    except Exception as exc:  # NoSuchTableError, catalog transport errors
        raise DependencyUnavailable(f"cannot load audit table {name}: {exc}") from exc


def read_table(settings: Settings, name: str, row_filter: str | None = None) -> Any:
    """One audit table (optionally filtered, e.g. "event_date >= '2025-01-01'") as a pyarrow Table.

    Raises:
        AuditQueryError: `name` is not an audit table.
        DependencyUnavailable: the catalog or table cannot be read.
    """
    if name not in READABLE_TABLES:
        raise AuditQueryError(f"unknown audit table {name!r}; known: {', '.join(READABLE_TABLES)}")
    table = _load(settings, name)
    scan = table.scan(row_filter=row_filter) if row_filter else table.scan()
    return scan.to_arrow()


def audit_sql(settings: Settings, sql: str) -> Any:
    """Run DuckDB SQL with every audit table available by name; returns a pyarrow Table.

    Only tables the SQL mentions are read (whole; filter on `event_date` in SQL after the
    fact, or use `read_table` with a row filter for big ranges).

    Raises:
        AuditQueryError: DuckDB rejected the SQL.
        DependencyUnavailable: the catalog or a table cannot be read.
    """
    import duckdb

    con = duckdb.connect()
    try:
        wanted = {name for name in VIEWS if re.search(rf"\b{re.escape(name)}\b", sql, flags=re.IGNORECASE)}
        text = " ".join([sql, *(VIEWS[v] for v in wanted)])
        for name in READABLE_TABLES:
            if re.search(rf"\b{re.escape(name)}\b", text, flags=re.IGNORECASE):
                con.register(name, read_table(settings, name))
        for view in sorted(wanted):
            con.execute(f"CREATE VIEW {view} AS {VIEWS[view]}")
        try:
            return con.execute(sql).fetch_arrow_table()
        except duckdb.Error as exc:
            raise AuditQueryError(f"audit SQL failed: {exc}") from exc
    finally:
        con.close()

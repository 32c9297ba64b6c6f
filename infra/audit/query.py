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
from typing import Any

from ragstream.infra.audit.tables import READABLE_TABLES, VIEWS
from ragstream.infra.settings import Settings
from ragstream.schemas.errors import AuditQueryError, DependencyUnavailable

__all__ = ["audit_sql", "load_table", "read_table"]


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

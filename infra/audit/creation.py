"""Creating the audit tables in the catalog, and adding the columns newer code defines.

Every sink (and `ragstream audit maintain`) calls `ensure_tables` on start: missing tables
are created, partitioned by `event_date`, and existing ones gain any column the code now
defines (union by name, nullable), so older snapshots stay readable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ragstream.infra.audit.tables import READABLE_TABLES, TABLES
from ragstream.infra.settings import Settings
from ragstream.schemas.errors import DependencyUnavailable

__all__ = ["TABLE_PROPERTIES", "ensure_schema", "ensure_tables"]

log = logging.getLogger(__name__)

# Audit tables have one committer (the sink). pyiceberg's own retry would rebuild a
# conflicting commit with the snapshot properties it was first given; for a compaction that
# raced an append that means stale offsets in the newest snapshot. So conflicts surface, and
# each writer retries deliberately (the sink re-appends with its own offsets; maintenance
# recomputes).
TABLE_PROPERTIES: dict[str, str] = {
    "commit.retry.num-retries": "0",
    "commit.manifest-merge.enabled": "true",
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "20",
    "write.parquet.compression-codec": "zstd",
}


def ensure_tables(
    settings: Settings, catalog: Any | None = None, names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Create missing audit tables (`names`, default all) and add columns that newer code
    defines (union by name).

    Adding nullable columns keeps every older snapshot readable; columns are never dropped.

    Raises:
        DependencyUnavailable: the catalog cannot be reached or a table cannot be created.
    """
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import IdentityTransform

    from ragstream.infra.iceberg import create_namespace, open_catalog

    catalog = catalog if catalog is not None else open_catalog(settings)
    ns = settings.iceberg.namespace
    out: dict[str, Any] = {}
    try:
        create_namespace(catalog, ns)
        for name in names if names is not None else TABLES:
            tdef = READABLE_TABLES[name]
            schema = tdef.schema()
            # identity(event_date) rather than day(event_time): pyiceberg computes the day
            # transform with the optional Rust extension (pyiceberg-core); a date column
            # partitions the same way, needs nothing extra, and every engine can prune on it.
            source = schema.find_field("event_date")
            spec = PartitionSpec(
                PartitionField(
                    source_id=source.field_id, field_id=1000, transform=IdentityTransform(), name="event_date"
                )
            )
            ident = (ns, name)
            # Not create_table_if_not_exists: it writes a metadata file before finding out
            # that the table exists, leaving an orphan on every start.
            if catalog.table_exists(ident):
                table = catalog.load_table(ident)
            else:
                table = catalog.create_table_if_not_exists(
                    ident,
                    schema=schema,
                    partition_spec=spec,
                    properties=TABLE_PROPERTIES | {"comment": tdef.doc},
                )
            out[name] = ensure_schema(table, schema)
    except DependencyUnavailable:
        raise
    except Exception as exc:  # sqlalchemy, http and pyiceberg errors each have their own types
        raise DependencyUnavailable(f"cannot create audit tables in {ns}: {exc}") from exc
    return out


def ensure_schema(table: Any, schema: Any) -> Any:
    """Union `schema` into the table's: new fields are added (nullable), nothing is removed."""
    current = {f.name for f in table.schema().fields}
    if all(f.name in current for f in schema.fields):
        return table
    added = [f.name for f in schema.fields if f.name not in current]
    with table.update_schema() as update:
        update.union_by_name(schema)
    log.info("audit table %s: added columns %s", table.name(), ", ".join(added))
    return table

"""The Iceberg audit trail: what was asked, answered, spent, indexed and dead-lettered.

- `tables`: the four tables, registered explicitly (what each holds and reads), and which
  sink process writes which (`audit.sinks`).
- `columns`: their Iceberg schemas, every column with its doc.
- `creation`: `ensure_tables` creates them and adds the columns newer code defines.
- `rows`: the row builders, pure functions of events.
- `buffer`: `RowBuffer`, a table's rows held as Arrow until they are committed.
- `commits`: offsets in snapshot summaries, and the append that stores them with the rows.
  The stream side (micro-batches, the query/response join, the exactly-once argument) is
  `ragstream.streams.audit`.
- `maintenance`: snapshot expiry, compaction of closed days, orphan-file removal.
- `query`: `read_table` and `audit_sql` (DuckDB over the tables by name).

The process that writes them is `ragstream.workers.sink`. pyiceberg, pyarrow and duckdb are
imported inside the functions that need them, so importing this package stays cheap.
"""

from ragstream.infra.audit.commits import Batch, commit_batch, read_committed
from ragstream.infra.audit.creation import ensure_tables
from ragstream.infra.audit.maintenance import MaintenanceReport, maintain, maintain_table
from ragstream.infra.audit.query import audit_sql, read_table
from ragstream.infra.audit.tables import DEAD_LETTERS, INFERENCE_LOG, INGESTION_LOG, TABLES, USAGE
from ragstream.infra.settings import AuditSettings, ModelPrice
from ragstream.schemas.errors import AuditQueryError

__all__ = [
    "DEAD_LETTERS",
    "INFERENCE_LOG",
    "INGESTION_LOG",
    "TABLES",
    "USAGE",
    "AuditQueryError",
    "AuditSettings",
    "Batch",
    "MaintenanceReport",
    "ModelPrice",
    "audit_sql",
    "commit_batch",
    "ensure_tables",
    "maintain",
    "maintain_table",
    "read_committed",
    "read_table",
]

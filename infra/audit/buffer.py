"""A table's rows between the row builders and a commit, held as Arrow.

The sink's hot path: every row passes through `RowBuffer.append`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = ["RowBuffer", "rows_to_arrow"]


class RowBuffer:
    """A table's rows waiting for a commit, converted to Arrow in small chunks as they come.

    Rows come in as dicts (what the builders return), are flattened to tuples on arrival,
    and every `chunk_rows` rows become one Arrow record batch, while the Python objects
    behind them are still hot in cache; then they are released. Measured on the sink's
    work: ~48 µs a request converting every 1000 rows against ~60 µs converting 20k rows at
    commit time, and buffered rows take Arrow's compact form instead of ~10 KB of Python
    objects each, so large `flush_rows` cost little memory.
    """

    __slots__ = ("_batches", "_done", "_rows", "chunk_rows", "names", "schema")

    def __init__(self, schema: Any, chunk_rows: int = 1024) -> None:
        self.schema = schema
        self.names = tuple(schema.names)
        self.chunk_rows = chunk_rows
        self._rows: list[tuple[Any, ...]] = []
        self._batches: list[Any] = []
        self._done = 0

    def append(self, row: Mapping[str, Any]) -> None:
        """Add a row; keys outside the schema are ignored, missing ones are null."""
        self._rows.append(tuple(map(row.get, self.names)))
        if len(self._rows) >= self.chunk_rows:
            self._seal()

    def _seal(self) -> None:
        import pyarrow as pa

        if not self._rows:
            return
        columns = zip(*self._rows, strict=True)
        arrays = [pa.array(col, type=f.type) for col, f in zip(columns, self.schema, strict=True)]
        self._batches.append(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
        self._done += len(self._rows)
        self._rows = []

    def __len__(self) -> int:
        return self._done + len(self._rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rows as dicts again (for tests and debugging, not the hot path)."""
        for batch in self._batches:
            yield from batch.to_pylist()
        for values in self._rows:
            yield dict(zip(self.names, values, strict=True))

    def to_arrow(self, target: Any | None = None) -> Any:
        """Every row as one pyarrow Table, in `target` (the Iceberg table's current
        `schema().as_arrow()`) when given: columns the buffer lacks are null."""
        import pyarrow as pa

        self._seal()
        table = pa.Table.from_batches(self._batches, schema=self.schema)
        if target is None:
            return table
        if target.equals(self.schema):
            # Same names and types; `target` also carries the table's own field ids (the ones
            # pyiceberg matches columns by), which a schema built from code does not know.
            return pa.Table.from_arrays(table.columns, schema=target)
        # The table's schema moved on since this buffer was made (a newer ragstream added
        # columns): rare, so the simple way, which also fills missing nested fields.
        return pa.Table.from_pylist(table.to_pylist(), schema=target)


def rows_to_arrow(rows: Iterable[Mapping[str, Any]], schema: Any) -> Any:
    """Row dicts -> a pyarrow Table in `schema`; columns a row lacks are null."""
    buffer = RowBuffer(schema)
    for row in rows:
        buffer.append(row)
    return buffer.to_arrow()

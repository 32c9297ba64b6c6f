"""Iceberg side of the audit sink's exactly-once: offsets in snapshot summaries, and commits.

Every commit is one `table.append(rows, snapshot_properties=...)`, atomic in Iceberg, whose
summary stores `ragstream.offsets`: for each input topic-partition, the next offset the table
still needs. `read_committed` reads that back on start; `commit_batch` writes a `Batch` with
the properties the stream side (`ragstream.streams.audit.AuditWriter`) computed for it, and
refuses to follow a snapshot it did not write (a second sink).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_incrementing

from ragstream.infra.audit.buffer import RowBuffer
from ragstream.schemas.errors import FencedError

__all__ = [
    "JOIN_SINCE_KEY",
    "OFFSETS_KEY",
    "TP",
    "Batch",
    "Committed",
    "commit_batch",
    "decode_offsets",
    "encode_offsets",
    "load_written_ids",
    "read_committed",
]

log = logging.getLogger(__name__)

OFFSETS_KEY = "ragstream.offsets"
JOIN_SINCE_KEY = "ragstream.join_since"

TP = tuple[str, int]
"""(full topic name, partition)."""


# -- offsets in snapshot summaries ---------------------------------------------------------
def encode_offsets(offsets: Mapping[TP, int]) -> str:
    """{(topic, p): next} -> JSON `{"topic": {"p": next}}`, sorted so equal maps compare equal."""
    out: dict[str, dict[str, int]] = {}
    for (topic, partition), offset in sorted(offsets.items()):
        out.setdefault(topic, {})[str(partition)] = int(offset)
    return json.dumps(out, separators=(",", ":"))


def decode_offsets(text: str | None) -> dict[TP, int]:
    """Inverse of `encode_offsets`; missing or empty means nothing consumed yet."""
    if not text:
        return {}
    data = json.loads(text)
    return {(topic, int(p)): int(o) for topic, parts in data.items() for p, o in parts.items()}


@dataclass(frozen=True, slots=True)
class Committed:
    """What a table's latest snapshot says it has consumed."""

    offsets: dict[TP, int] = field(default_factory=dict)
    join_since: datetime | None = None
    snapshot_id: int | None = None


def read_committed(table: Any) -> Committed:
    """Offsets and join horizon from the table's current snapshot (empty for a new table)."""
    snap = table.current_snapshot()
    if snap is None or snap.summary is None:
        return Committed()
    props = snap.summary.additional_properties
    since = props.get(JOIN_SINCE_KEY)
    return Committed(
        offsets=decode_offsets(props.get(OFFSETS_KEY)),
        join_since=datetime.fromisoformat(since) if since else None,
        snapshot_id=snap.snapshot_id,
    )


def load_written_ids(table: Any, id_column: str, time_column: str, since: datetime) -> dict[str, datetime]:
    """Request ids (and their times) of rows whose `time_column` >= since: the join's memory
    after a restart."""
    since_utc = since.astimezone(UTC)
    flt = f"event_date >= '{since_utc.date().isoformat()}' AND {time_column} >= '{since_utc.isoformat()}'"
    arrow = table.scan(row_filter=flt, selected_fields=(id_column, time_column)).to_arrow()
    return dict(zip(arrow.column(id_column).to_pylist(), arrow.column(time_column).to_pylist(), strict=True))


@dataclass(frozen=True, slots=True)
class Batch:
    """Rows to append to one table, with the snapshot properties that make it exactly-once."""

    table: str
    rows: RowBuffer
    properties: dict[str, str]
    base_offsets: dict[TP, int] | None = None
    """The offsets the table's current snapshot must hold for this batch to follow it
    (None: the table has no snapshot yet). Anything else means another writer."""


# -- commit ------------------------------------------------------------------------------------
def commit_batch(table: Any, batch: Batch, *, attempts: int = 5) -> None:
    """Append the batch's rows with its offsets in the snapshot summary.

    A conflict (another commit landed first: maintenance) is retried on the refreshed table
    with the same properties, which stay right whatever the base. A current snapshot whose
    offsets are not the ones this sink last committed means a second sink writes the table:
    that stops us.

    Raises:
        FencedError: another writer is committing offsets to this table.
        CommitFailedException: still conflicting after `attempts` tries.
    """
    from pyiceberg.exceptions import CommitFailedException

    arrow = batch.rows.to_arrow(table.schema().as_arrow())

    def append() -> None:
        _check_single_writer(table, batch)
        table.append(arrow, snapshot_properties=batch.properties)

    def refresh(state: RetryCallState) -> None:
        log.info("commit to %s conflicted; retrying on the refreshed table", batch.table)
        table.refresh()

    Retrying(
        retry=retry_if_exception_type(CommitFailedException),
        stop=stop_after_attempt(attempts),
        wait=wait_incrementing(start=0.05, increment=0.05),
        before_sleep=refresh,
        reraise=True,
    )(append)


def _check_single_writer(table: Any, batch: Batch) -> None:
    current = read_committed(table)
    theirs = current.offsets if current.snapshot_id is not None else None
    # Maintenance snapshots carry the offsets they found, so they pass.
    if theirs != batch.base_offsets and not (batch.base_offsets is None and not theirs):
        raise FencedError(
            f"audit table {batch.table} holds offsets {theirs} where this sink committed "
            f"{batch.base_offsets}; is a second audit sink running?"
        )

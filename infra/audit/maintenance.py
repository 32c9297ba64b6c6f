"""Keeping the audit tables cheap to commit to and to read.

- Expire snapshots: commit time grows ~1 ms per retained snapshot, and the sink commits every
  few seconds. The current snapshot is never expired, so its offsets stay readable.
- Compact closed partitions: the sink writes one small file per commit. A day that is over
  (before today, UTC) with many files is rewritten as one with `overwrite(...,
  overwrite_filter=day)`. The new snapshot carries the `ragstream.*` properties of the
  snapshot it replaces: compaction changes no data, so the consumed offsets are the same.
- Remove orphan files: files under the table location that no retained snapshot references
  (left by expired snapshots, compaction, or commits killed half-way), once older than a
  safety age (a writer may be about to commit a young one).

The sink runs `maintain_table` on its schedule from its one commit thread, so it never races
the sink's appends. Run on demand while the sink is running (`ragstream audit maintain`), a
compaction that loses the race to an append fails (the audit tables disable pyiceberg's
automatic retry, which would keep the stale offsets) and is skipped until the next run;
the sink's append that loses the race retries on its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from ragstream.infra.audit.creation import ensure_tables
from ragstream.infra.audit.tables import TABLES
from ragstream.infra.settings import AuditSettings, Settings
from ragstream.schemas.errors import DependencyUnavailable

__all__ = [
    "MaintenanceReport",
    "compact_closed_partitions",
    "expire_snapshots",
    "maintain",
    "maintain_table",
    "remove_orphan_files",
]

log = logging.getLogger(__name__)

_KEPT_PROPERTY_PREFIX = "ragstream."


@dataclass(slots=True)
class MaintenanceReport:
    table: str
    snapshots_expired: int = 0
    partitions_compacted: list[str] = field(default_factory=list)
    files_compacted: int = 0
    orphans_removed: int = 0
    skipped: list[str] = field(default_factory=list)
    """Steps that lost a race with the sink and will be retried next run."""


def expire_snapshots(table: Any, older_than: datetime) -> int:
    """Expire snapshots older than `older_than`; the current one always stays. Returns how many."""
    before = len(table.metadata.snapshots)
    current = table.current_snapshot()
    if before <= 1 or current is None:
        return 0
    table.maintenance.expire_snapshots().older_than(older_than).commit()
    return before - len(table.metadata.snapshots)


def _ragstream_properties(table: Any) -> dict[str, str]:
    snap = table.current_snapshot()
    if snap is None or snap.summary is None:
        return {}
    return {
        k: v for k, v in snap.summary.additional_properties.items() if k.startswith(_KEPT_PROPERTY_PREFIX)
    }


def _snapshot_has_data(snapshot: Any) -> bool:
    summary = snapshot.summary
    total = summary.get("total-data-files") if summary is not None else None
    return total is None or int(total) > 0


def _has_data_files(table: Any) -> bool:
    """Whether the current snapshot holds any data file. pyiceberg 0.12's `inspect.files()`
    raises on a snapshot with no manifests (a table whose commits so far only moved its
    offsets, such as `guardrail_verdicts` before any verdict acted)."""
    snapshot = table.current_snapshot()
    summary = snapshot.summary if snapshot is not None else None
    total = summary.get("total-data-files") if summary is not None else None
    return total is None or int(total) > 0


def compact_closed_partitions(table: Any, *, today: date, min_files: int) -> tuple[list[str], int]:
    """Rewrite each day before `today` that has >= `min_files` data files as one file.

    Returns the days compacted and the number of files they had.

    Raises:
        CommitFailedException: a concurrent commit landed first (nothing was changed).
    """
    import pyarrow.compute as pc

    if table.current_snapshot() is None or not _has_data_files(table):
        return [], 0
    files = table.inspect.files()
    if files.num_rows == 0:
        return [], 0
    days = pc.struct_field(files.column("partition"), "event_date").to_pylist()
    counts: dict[date, int] = {}
    for d in days:
        if d is not None and d < today:
            counts[d] = counts.get(d, 0) + 1
    done: list[str] = []
    n_files = 0
    time_col = _time_column(table)
    for day, n in sorted(counts.items()):
        if n < min_files:
            continue
        flt = f"event_date = '{day.isoformat()}'"
        rows = table.scan(row_filter=flt).to_arrow()
        if time_col:
            rows = rows.sort_by(time_col)
        table.overwrite(rows, overwrite_filter=flt, snapshot_properties=_ragstream_properties(table))
        log.info("compacted %s day %s: %d files -> 1 (%d rows)", table.name(), day, n, rows.num_rows)
        done.append(day.isoformat())
        n_files += n
    return done, n_files


def _time_column(table: Any) -> str | None:
    name = table.name()[-1]
    tdef = TABLES.get(name)
    return tdef.event_time if tdef else None


def _norm(table: Any, location: str) -> str:
    return str(table.io.parse_location(location)[2])


def remove_orphan_files(table: Any, older_than: datetime) -> int:
    """Delete files under the table location that no retained snapshot or metadata file
    references and that were last modified before `older_than`. Returns how many."""
    from pyarrow.fs import FileSelector, FileType

    if not any(_snapshot_has_data(s) for s in table.metadata.snapshots):
        return 0  # nothing was ever written (inspect cannot list an all-empty history)
    referenced: set[str] = {_norm(table, table.metadata_location)}
    referenced.update(_norm(table, e.metadata_file) for e in table.metadata.metadata_log)
    for snap in table.metadata.snapshots:
        referenced.add(_norm(table, snap.manifest_list))
    if table.metadata.snapshots:
        referenced.update(_norm(table, p) for p in table.inspect.all_manifests().column("path").to_pylist())
        referenced.update(_norm(table, p) for p in table.inspect.all_files().column("file_path").to_pylist())
    scheme, netloc, root = table.io.parse_location(table.location())
    fs = table.io.fs_by_scheme(scheme, netloc)
    infos = fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
    cutoff = older_than.astimezone(UTC)
    removed = 0
    for info in infos:
        if info.type != FileType.File or info.path in referenced:
            continue
        mtime = info.mtime
        if mtime is None or mtime.replace(tzinfo=mtime.tzinfo or UTC) >= cutoff:
            continue
        fs.delete_file(info.path)
        removed += 1
    if removed:
        log.info("removed %d orphan files from %s", removed, table.name())
    return removed


def maintain_table(
    table: Any,
    audit: AuditSettings,
    *,
    now: datetime | None = None,
    compact: bool = True,
    remove_orphans: bool = True,
) -> MaintenanceReport:
    """Compact, expire and clean one table. A step that loses a commit race is skipped."""
    from pyiceberg.exceptions import CommitFailedException

    now = now or datetime.now(UTC)
    report = MaintenanceReport(table.name()[-1])
    if compact:
        try:
            report.partitions_compacted, report.files_compacted = compact_closed_partitions(
                table, today=now.astimezone(UTC).date(), min_files=audit.compact_min_files
            )
        except CommitFailedException:
            table.refresh()
            report.skipped.append("compact")
    try:
        report.snapshots_expired = expire_snapshots(
            table, now - timedelta(seconds=audit.snapshot_retention_s)
        )
    except CommitFailedException:
        table.refresh()
        report.skipped.append("expire")
    if remove_orphans:
        report.orphans_removed = remove_orphan_files(table, now - timedelta(seconds=audit.orphan_min_age_s))
    return report


def maintain(
    settings: Settings,
    audit: AuditSettings | None = None,
    *,
    compact: bool = True,
    now: datetime | None = None,
) -> list[MaintenanceReport]:
    """Run maintenance on every audit table (on demand; the sink also runs it on a schedule).

    Raises:
        DependencyUnavailable: the catalog cannot be reached.
    """
    audit = audit or settings.audit
    tables = ensure_tables(settings)
    try:
        return [maintain_table(t, audit, compact=compact, now=now) for t in tables.values()]
    except OSError as exc:
        raise DependencyUnavailable(f"audit maintenance failed: {exc}") from exc

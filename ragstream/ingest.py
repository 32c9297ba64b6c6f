"""Client side of ingestion: publish files as `DocumentSubmitted` events and wait until each
one is indexed or dead-lettered.

Correlation is by `event_id`: the index stage's `DocumentIndexed.source_event_id` and a
dead-letter record's `source_event_id` both name the submission they answer. Files that
cannot even be read, or are over the size limit, are dead-lettered here (stage `publish`) so
every outcome, good or bad, is on a topic.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragstream.credentials import Credentials
from ragstream.infra import kafka
from ragstream.infra.parsing import media_type_for_path
from ragstream.infra.settings import Settings
from ragstream.schemas.errors import SchemaViolation
from ragstream.schemas.events import (
    IDENTIFIER_CHARS,
    DeadLettered,
    DocumentIndexed,
    DocumentSubmitted,
    Event,
    MetadataValue,
)
from ragstream.streams.codec import decode, encode
from ragstream.streams.runner import Message, dead_letter_record
from ragstream.streams.topics import DEADLETTER, DOCUMENTS, INDEXED

__all__ = ["IngestReport", "Outcome", "collect_files", "document_id_for", "ingest"]

log = logging.getLogger(__name__)

_PREVIEW_BYTES = 64 * 1024
_UNSAFE = re.compile(f"[^{IDENTIFIER_CHARS}]+")


@dataclass
class Outcome:
    document_id: str
    path: str
    status: str
    """indexed | unchanged | deleted | stale | dead_lettered | timeout"""
    chunk_count: int = 0
    reason: str = ""


@dataclass
class IngestReport:
    outcomes: list[Outcome] = field(default_factory=list)
    elapsed_s: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def chunks(self) -> int:
        return sum(o.chunk_count for o in self.outcomes if o.status == "indexed")

    @property
    def ok(self) -> bool:
        return all(o.status in ("indexed", "unchanged", "deleted", "stale") for o in self.outcomes)


def collect_files(paths: Iterable[Path]) -> Iterator[tuple[Path, str]]:
    """Yield (file, document id) for files and, recursively, directories (hidden ones skipped)."""
    for root in paths:
        if root.is_dir():
            for f in sorted(root.rglob("*")):
                rel = f.relative_to(root)
                if f.is_file() and not any(p.startswith(".") for p in rel.parts):
                    yield f, document_id_for(Path(root.resolve().name) / rel)
        else:
            yield root, document_id_for(Path(root.name))


def document_id_for(rel: Path) -> str:
    """A stable id from the path relative to the ingested root (including the root's name)."""
    doc_id = _UNSAFE.sub("_", rel.as_posix()).lstrip("._-/") or "document"
    return doc_id[:256]


def _submission(
    settings: Settings,
    path: Path,
    doc_id: str,
    tenant: str,
    groups: Sequence[str],
    metadata: dict[str, MetadataValue],
    token: str | None = None,
) -> DocumentSubmitted | DeadLettered:
    limit = settings.chunking.max_document_bytes
    media_type = media_type_for_path(path) or "application/octet-stream"
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        return _publish_failure(
            doc_id, tenant, source, "unreadable_document", f"cannot read {path}: {exc}", b""
        )
    if len(data) > limit:
        size = path.stat().st_size
        return _publish_failure(
            doc_id,
            tenant,
            source,
            "document_too_large",
            f"{path} is {size} bytes; the limit is {limit} (chunking.max_document_bytes)",
            data[:_PREVIEW_BYTES],
        )
    binary = not media_type.startswith("text/")
    if not binary:
        try:
            content = data.decode("utf-8")
        except UnicodeDecodeError:
            binary = True
    if binary:
        content = base64.b64encode(data).decode("ascii")
    return DocumentSubmitted(
        tenant=tenant,
        document_id=doc_id,
        source=source,
        content=content,
        content_encoding="base64" if binary else "utf-8",
        media_type=media_type,
        metadata=metadata,
        access_groups=tuple(groups),
        token=token,
    )


def _publish_failure(
    doc_id: str, tenant: str, source: str, kind: str, reason: str, data: bytes
) -> DeadLettered:
    record = dead_letter_record(
        "publish",
        Message(topic="", partition=None, offset=None, key=doc_id.encode(), value=data),
        kind,
        reason,
    )
    return record.model_copy(
        update={
            "tenant": tenant,
            "original_topic": None,
            "original_truncated": bool(data) and kind == "document_too_large",
            "source_event_id": record.event_id,
            "document_id": doc_id,
        }
    )


def ingest(
    settings: Settings,
    paths: Sequence[Path],
    *,
    tenant: str | None = None,
    groups: Sequence[str] = (),
    metadata: dict[str, MetadataValue] | None = None,
    delete_ids: Sequence[str] = (),
    wait: bool = True,
    timeout_s: float = 600.0,
    on_published: Callable[[int, int], None] | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    token: str | None = None,
) -> IngestReport:
    """Publish documents (and deletions) and, if `wait`, collect each one's outcome.

    Each submission carries a token granting `ingest` (`token`, `auth.token`, or one signed
    with the embedded stack's local key; see `ragstream.credentials`).

    Raises:
        DependencyUnavailable: Kafka cannot be reached.
        ConfigError: auth is required and there is neither a token nor a local key.
    """
    identity = Credentials(settings, token).identity(tenant=tenant, scopes=("ingest",))
    tenant = tenant or identity.tenant
    started = time.monotonic()
    prefix = settings.kafka.topic_prefix
    events: list[tuple[Event, str, str]] = []  # (event, document id, path)
    for path, doc_id in collect_files(paths):
        events.append(
            (
                _submission(settings, path, doc_id, tenant, groups, metadata or {}, identity.token),
                doc_id,
                str(path),
            )
        )
    for doc_id in delete_ids:
        events.append(
            (
                DocumentSubmitted(tenant=tenant, document_id=doc_id, deleted=True, token=identity.token),
                doc_id,
                "(delete)",
            )
        )

    consumer = _outcome_consumer(settings) if wait else None
    pending: dict[str, tuple[str, str]] = {}
    report = IngestReport()
    producer = kafka.make_producer(settings)
    try:
        for i, (event, doc_id, origin) in enumerate(events, 1):
            spec = DEADLETTER if isinstance(event, DeadLettered) else DOCUMENTS
            producer.send(spec.full_name(prefix), key=event.kafka_key(), value=encode(event))
            pending[event.event_id] = (doc_id, origin)
            if on_published:
                on_published(i, len(events))
        producer.flush()
    finally:
        producer.close()

    if consumer is None:
        report.elapsed_s = time.monotonic() - started
        return report
    try:
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                for r in records:
                    outcome = _match(r, pending)
                    if outcome is not None:
                        report.outcomes.append(outcome)
                        if on_outcome:
                            on_outcome(outcome)
    finally:
        consumer.close()
    for doc_id, origin in pending.values():
        report.outcomes.append(
            Outcome(doc_id, origin, "timeout", reason=f"no outcome within {timeout_s:.0f}s")
        )
    report.elapsed_s = time.monotonic() - started
    return report


def _outcome_consumer(settings: Settings) -> Any:
    """Positioned at the current end of the outcome topics, before anything is published."""
    from kafka import TopicPartition

    prefix = settings.kafka.topic_prefix
    # Outcomes are not latency-critical: a longer fetch wait spares the broker empty polls.
    consumer = kafka.make_consumer(
        settings, group_id=None, auto_offset_reset="earliest", fetch_max_wait_ms=100
    )
    tps = [
        TopicPartition(spec.full_name(prefix), p)
        for spec in (INDEXED, DEADLETTER)
        for p in sorted(consumer.partitions_for_topic(spec.full_name(prefix)) or ())
    ]
    consumer.assign(tps)
    # The embedded broker may report an end offset short of the true end; reading a few old
    # records is harmless because outcomes are matched by event id.
    for tp, end in consumer.end_offsets(tps).items():
        consumer.seek(tp, end)
    return consumer


def _match(record: Any, pending: dict[str, tuple[str, str]]) -> Outcome | None:
    topic: str = record.topic
    try:
        if topic.endswith("." + INDEXED.name):
            ev = decode(INDEXED, record.value)
            assert isinstance(ev, DocumentIndexed)
            hit = pending.pop(ev.source_event_id, None)
            if hit is None:
                return None
            return Outcome(hit[0], hit[1], ev.outcome, chunk_count=ev.chunk_count)
        ev = decode(DEADLETTER, record.value)
    except SchemaViolation:  # someone else's malformed record is not our outcome
        return None
    assert isinstance(ev, DeadLettered)
    hit = pending.pop(ev.source_event_id or "", None)
    if hit is None:
        return None
    return Outcome(hit[0], hit[1], "dead_lettered", reason=f"{ev.error_kind}: {ev.message}")

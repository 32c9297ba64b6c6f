"""Re-judging history: `ragstream judge backfill`.

It reads the `ok` rows of `inference_log` submitted in `[since, until)` as of one Iceberg
snapshot (time travel: the current one unless `--snapshot` names another), judges each with
the chosen judges, and publishes the judgements to the `judgements` topic with
`source = "backfill"`, `source_ref = "snapshot:<id>"` and `judge_version = <version>`. The
audit sink lands them in the `judgements` table, like the stream's.

Idempotent and resumable: a judgement's event id is derived from (request, judge, version,
snapshot). Before judging, the backfill reads which of those ids the `judgements` table
already holds, and skips requests whose judgements are all there. A rerun of the same
snapshot and version, or a run resumed after a crash, adds nothing twice. What was published
but had not landed yet when it crashed is published again; the sink keeps one row per
event id.

Passages come from the row's `passages` column; rows written before that column existed are
judged against the passages parsed back from the prompt, the way the prompt template wrote
them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ragstream.infra.settings import Settings
from ragstream.schemas.errors import BadInputError

__all__ = ["BackfillReport", "backfill", "passages_from_prompt"]

_BLOCK = re.compile(r"^\[(\d{1,3})\][^\n]*\n(.*?)(?=\n\n\[\d{1,3}\]|\Z)", re.S | re.M)


def passages_from_prompt(messages: Sequence[dict[str, Any]] | None) -> list[str]:
    """The passage texts of a prompt written by `workers.prompt.build_prompt`: the blocks
    `[n] title > headings` + text between `Context:` and `Question:` of the last user message."""
    users = [m.get("content") or "" for m in messages or () if m.get("role") == "user"]
    if not users:
        return []
    text = users[-1]
    start = text.find("Context:\n")
    end = text.rfind("\n\nQuestion:")
    if start < 0 or end < start:
        return []
    context = text[start + len("Context:\n") : end]
    return [m.group(2).strip() for m in _BLOCK.finditer(context) if m.group(2).strip()]


@dataclass
class BackfillReport:
    snapshot_id: int
    rows: int = 0
    judged: int = 0
    skipped_done: int = 0
    published: int = 0
    errors: int = 0


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _existing_ids(settings: Settings, version: str, source_ref: str) -> set[str]:
    from ragstream.infra.audit.query import load_table

    try:
        table = load_table(settings, "judgements")
    except Exception:  # noqa: BLE001 - no judgements table yet: nothing to skip
        return set()
    scan = table.scan(
        row_filter=f"source = 'backfill' AND judge_version = {_quoted(version)} AND source_ref = {_quoted(source_ref)}",
        selected_fields=("event_id",),
    )
    return {str(v) for v in scan.to_arrow().column("event_id").to_pylist()}


async def backfill(
    settings: Settings,
    *,
    since: datetime,
    until: datetime | None,
    snapshot_id: int | None,
    judges: Sequence[str] | None,
    version: str,
    progress: Callable[[int, int], None] | None = None,
) -> BackfillReport:
    """See the module docstring.

    Raises:
        BadInputError: an unknown snapshot or judge, or `until` before `since`.
        DependencyUnavailable: the catalog, the broker or the model cannot be reached.
    """
    from ragstream.infra import kafka
    from ragstream.infra.audit.query import load_table
    from ragstream.infra.embedder import E5Embedder
    from ragstream.infra.judges.base import JudgeCase
    from ragstream.infra.judges.panel import opened_panel
    from ragstream.infra.lifecycle import started
    from ragstream.schemas.judge import judgement_id
    from ragstream.streams.codec import encode
    from ragstream.streams.topics import JUDGEMENTS
    from ragstream.workers.judge import judgement_events

    if until is not None and until <= since:
        raise BadInputError("--until must be after --since")
    table = load_table(settings, "inference_log")
    if snapshot_id is None:
        current = table.current_snapshot()
        if current is None:
            raise BadInputError("inference_log has no snapshot yet: nothing to backfill")
        snapshot_id = current.snapshot_id
    elif table.snapshot_by_id(snapshot_id) is None:
        raise BadInputError(f"inference_log has no snapshot {snapshot_id}")
    where = f"submitted_at >= {_quoted(since.isoformat())}"
    if until is not None:
        where += f" AND submitted_at < {_quoted(until.isoformat())}"
    fields: tuple[str, ...] = (
        "request_id",
        "tenant",
        "user",
        "route",
        "status",
        "question",
        "answer",
        "prompt_messages",
    )
    if "passages" in {f.name for f in table.schema().fields}:
        fields = (*fields, "passages")
    rows = (
        table.scan(row_filter=where, snapshot_id=snapshot_id, selected_fields=fields).to_arrow().to_pylist()
    )
    rows = sorted(
        (r for r in rows if r["status"] == "ok" and (r["answer"] or "").strip()),
        key=lambda r: r["request_id"],
    )
    report = BackfillReport(snapshot_id=snapshot_id, rows=len(rows))
    source_ref = f"snapshot:{snapshot_id}"
    existing = _existing_ids(settings, version, source_ref)

    names = list(judges) if judges else list(settings.judges.judges)
    id_source = f"backfill:{snapshot_id}"
    topic = JUDGEMENTS.full_name(settings.kafka.topic_prefix)
    producer = kafka.make_producer(settings)
    try:
        async with (
            started(E5Embedder(settings)) as embedder,
            opened_panel(settings, embedder, names) as panel,
        ):
            expected = [j.name for j in panel.judges] + ["overall"]
            for i, row in enumerate(rows, 1):
                rid = row["request_id"]
                if {judgement_id(rid, name, version, id_source) for name in expected} <= existing:
                    report.skipped_done += 1
                else:
                    passages = [p["text"] for p in row.get("passages") or [] if p.get("text")]
                    case = JudgeCase(
                        request_id=rid,
                        question=row["question"] or "",
                        answer=row["answer"] or "",
                        passages=passages or passages_from_prompt(row.get("prompt_messages")),
                        guidelines=settings.judges.guidelines,
                    )
                    result = await panel.judge(case)
                    report.judged += 1
                    events = judgement_events(
                        result.verdicts,
                        result.overall,
                        result.root_cause,
                        request_id=rid,
                        tenant=row["tenant"] or "default",
                        user=row.get("user"),
                        route=row.get("route"),
                        source="backfill",
                        source_ref=source_ref,
                        version=version,
                        id_source=id_source,
                    )
                    for event in events:
                        if event.event_id in existing:
                            continue
                        report.errors += event.rating is None
                        producer.send(topic, key=event.kafka_key(), value=encode(event))
                        report.published += 1
                if i % 50 == 0:
                    producer.flush()
                if progress is not None:
                    progress(i, len(rows))
        producer.flush()
    finally:
        producer.close()
    return report

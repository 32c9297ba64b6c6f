"""Offline evaluation: judge an evaluation set with the same judges the stream runs.

The input is Mosaic AI Agent Evaluation's eval-set schema, one JSON object per line:
`request` (a string, or `{"messages": [...]}` whose last user message is the question),
`response` (optional), `retrieved_context` (optional list of `{content, doc_uri}`),
`expected_response` (optional), `guidelines` (optional list, or named lists), and an optional
`request_id`. Rows without a `response` are answered by the live stack with
`run_pipeline=True`; the passages the answer cites are read back from the vector store.

Every row gets each applicable judge's verdict and an `overall` with its root cause. The run
is written to the `evaluations` Iceberg table under a run id (PII masked as the default
policy masks), and summarised as pass rates per judge.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ragstream.infra.judges.base import JudgeCase, Verdict
from ragstream.infra.settings import Settings
from ragstream.schemas.errors import BadInputError

__all__ = ["EvalFileError", "EvalRow", "EvalRun", "RowResult", "load_eval_file", "run_eval", "write_run"]

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_ROWS = 100_000


class EvalFileError(BadInputError):
    """The evaluation file cannot be used (the message says which line and why)."""


class ContextItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content: str = Field(max_length=100_000)
    doc_uri: str | None = None


class EvalRow(BaseModel):
    """One row of an Agent Evaluation eval set (extra fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    request_id: str | None = Field(default=None, max_length=256)
    request: str = Field(min_length=1, max_length=32_000)
    response: str | None = Field(default=None, max_length=100_000)
    retrieved_context: list[ContextItem] | None = None
    expected_response: str | None = Field(default=None, max_length=100_000)
    guidelines: list[str] | None = None

    @field_validator("request", mode="before")
    @classmethod
    def _chat_request(cls, value: Any) -> Any:
        if isinstance(value, dict):
            messages = value.get("messages")
            if isinstance(messages, list):
                users = [
                    m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"
                ]
                if users and isinstance(users[-1], str):
                    return users[-1]
            raise ValueError("a chat request needs messages with a user message")
        return value

    @field_validator("guidelines", mode="before")
    @classmethod
    def _named_guidelines(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return [g for group in value.values() for g in (group if isinstance(group, list) else [group])]
        return value


def load_eval_file(path: Path) -> list[EvalRow]:
    """Rows of an eval set.

    Raises:
        EvalFileError: missing or unreadable file, not UTF-8, a line that is not a JSON
            object of the schema (with its line number), or no rows.
    """
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise EvalFileError(f"{path}: over {MAX_FILE_BYTES // 2**20} MB")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise EvalFileError(f"{path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise EvalFileError(f"{path}: not UTF-8 (byte {exc.start})") from exc
    rows: list[EvalRow] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalFileError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        if not isinstance(data, dict):
            raise EvalFileError(f"{path}:{number}: a row is a JSON object")
        try:
            row = EvalRow.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "row"
            raise EvalFileError(f"{path}:{number}: {where}: {first['msg']}") from exc
        rows.append(row if row.request_id else row.model_copy(update={"request_id": f"line-{number}"}))
        if len(rows) > MAX_ROWS:
            raise EvalFileError(f"{path}: more than {MAX_ROWS} rows")
    if not rows:
        raise EvalFileError(f"{path}: no rows")
    ids = Counter(r.request_id for r in rows)
    twice = [i for i, n in ids.items() if n > 1]
    if twice:
        raise EvalFileError(f"{path}: request_id repeated: {', '.join(str(t) for t in twice[:5])}")
    return rows


@dataclass
class RowResult:
    row: EvalRow
    answer: str
    passages: list[str]
    verdicts: list[Verdict]
    overall: Verdict
    root_cause: str | None
    answered_by: str = "file"
    total_tokens: int | None = None
    error: str | None = None


@dataclass
class EvalRun:
    run_id: str
    source_file: str
    judges: list[str]
    results: list[RowResult] = field(default_factory=list)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def pass_rates(self) -> dict[str, tuple[int, int]]:
        """Per judge (and overall): (passed, judged) over rows it judged without error."""
        out: dict[str, list[int]] = {}
        for r in self.results:
            for v in [*r.verdicts, r.overall]:
                if v.rating is None:
                    continue
                cell = out.setdefault(v.judge, [0, 0])
                cell[0] += v.rating == "yes"
                cell[1] += 1
        return {k: (v[0], v[1]) for k, v in out.items()}

    def root_causes(self) -> Counter[str]:
        return Counter(r.root_cause for r in self.results if r.root_cause)


async def _answer(
    settings: Settings, rows: Sequence[EvalRow], tenant: str | None, deadline_ms: int
) -> dict[str, Any]:
    """Ask the live stack each row's question; with the cited passages' text."""
    from ragstream.client import AsyncClient
    from ragstream.infra.vectorstore import open_vector_store

    out: dict[str, Any] = {}
    store = open_vector_store(settings)
    await store.start()
    try:
        async with AsyncClient(settings) as client:
            for row in rows:
                r = await client.ask(row.request, tenant=tenant, deadline_ms=deadline_ms)
                passages: list[str] = []
                for c in sorted(r.citations, key=lambda c: c.number):
                    index = c.chunk_id.rsplit(":", 1)[-1]
                    if not index.isdigit():
                        continue
                    hits = await store.neighbours(
                        r.tenant, c.document_id, int(index), 0, (), fingerprint=None
                    )
                    passages += [h.text for h in hits if h.chunk_id == c.chunk_id][:1]
                out[str(row.request_id)] = (r, passages)
    finally:
        await store.close()
    return out


async def run_eval(
    settings: Settings,
    rows: Sequence[EvalRow],
    *,
    judges: Sequence[str] | None = None,
    run_pipeline: bool = False,
    tenant: str | None = None,
    deadline_ms: int = 120_000,
    source_file: str = "",
    on_row: Any = None,
) -> EvalRun:
    """Judge every row (see the module docstring).

    Raises:
        UnknownJudge: a judge that is neither built in nor configured.
        EvalFileError: rows without a response, and `run_pipeline` is off.
        DependencyUnavailable: the stack (for `run_pipeline`) or the model cannot be reached.
    """
    from ragstream.infra.embedder import E5Embedder
    from ragstream.infra.judges.panel import opened_panel
    from ragstream.infra.lifecycle import started

    missing = [r.request_id for r in rows if r.response is None]
    if missing and not run_pipeline:
        raise EvalFileError(
            f"{len(missing)} row(s) have no response (first: {missing[0]}): add --run-pipeline to ask the stack"
        )
    names = list(judges) if judges else list(settings.judges.judges)
    if any(r.expected_response for r in rows):
        names += [n for n in ("correctness", "context_sufficiency") if n not in names and not judges]
    if any(r.guidelines for r in rows) and not judges and "guideline_adherence" not in names:
        names.append("guideline_adherence")
    async with started(E5Embedder(settings)) as embedder, opened_panel(settings, embedder, names) as panel:
        run = EvalRun(run_id=uuid.uuid4().hex, source_file=source_file, judges=[j.name for j in panel.judges])
        answered = (
            await _answer(settings, [r for r in rows if r.response is None], tenant, deadline_ms)
            if missing
            else {}
        )
        for row in rows:
            by = "file"
            tokens = None
            if row.response is None:
                response, passages = answered[str(row.request_id)]
                answer, by, tokens = response.answer, "pipeline", response.usage.total_tokens
                if response.status != "ok":
                    answer = ""
            else:
                answer = row.response
                passages = [c.content for c in row.retrieved_context or []]
            case = JudgeCase(
                request_id=str(row.request_id),
                question=row.request,
                answer=answer,
                passages=passages,
                expected=row.expected_response,
                guidelines=tuple(row.guidelines or settings.judges.guidelines),
            )
            result = await panel.judge(case)
            rr = RowResult(
                row, answer, passages, list(result.verdicts), result.overall, result.root_cause, by, tokens
            )
            run.results.append(rr)
            if on_row is not None:
                on_row(rr)
    return run


def write_run(settings: Settings, run: EvalRun) -> int:
    """Append the run to the `evaluations` table (created if missing); returns the rows.

    Raises:
        DependencyUnavailable: the catalog cannot be reached.
    """
    from ragstream.infra.audit.buffer import rows_to_arrow
    from ragstream.infra.audit.creation import ensure_tables
    from ragstream.infra.audit.tables import EVALUATIONS
    from ragstream.infra.guard.scrub import PiiScrubber

    table = ensure_tables(settings, names=[EVALUATIONS])[EVALUATIONS]
    scrub = PiiScrubber(settings.guardrails)
    scrub.start()
    entities = scrub.entities(settings.guardrails.applying(tenant="", route=None))
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for r in run.results:
        for v in [*r.verdicts, r.overall]:
            rows.append(
                {
                    "evaluated_at": now,
                    "run_id": run.run_id,
                    "source_file": run.source_file,
                    "row_id": r.row.request_id,
                    "request": scrub.mask(r.row.request, entities),
                    "response": scrub.mask(r.answer, entities),
                    "expected_response": r.row.expected_response,
                    "answered_by": r.answered_by,
                    "judge": v.judge,
                    "judge_version": v.version,
                    "implementation": v.implementation,
                    "model": v.model,
                    "rating": v.rating,
                    "score": v.score,
                    "rationale": v.rationale,
                    "error": v.error,
                    "root_cause": r.root_cause if v is r.overall else None,
                    "latency_ms": v.latency_ms,
                    "total_tokens": r.total_tokens,
                    "event_date": now.date(),
                }
            )
    if rows:
        table.append(rows_to_arrow(rows, table.schema().as_arrow()))
    return len(rows)

"""Synthetic audit rows, written to a real Iceberg catalog, for the monitoring bench and the
dashboard tests: `inference_log`, `usage`, `guardrail_verdicts`, `judgements` and
`dead_letters`, vectorised with numpy so a million requests take seconds, not minutes.

The mix is fixed by the seed: statuses ~90% ok / 6% blocked / 3% error / 1% no_response,
three tenants, a dozen users, three routes, and one judged overall verdict per ok answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from ragstream.infra.settings import Settings

__all__ = ["SyntheticCounts", "write_synthetic_audit"]

TENANTS = ("acme", "globex", "initech")
USERS = tuple(f"user{i:02d}" for i in range(12))
ROUTES = ("default", "extractive", "short")
STATUSES = ("ok", "blocked", "error", "no_response")
_STATUS_P = (0.90, 0.06, 0.03, 0.01)
QUESTIONS = (
    "How many days of holiday do I get each year?",
    "Where can I park my bike at the Tillbury office?",
    "What is the payload of the QR-208 Quill robot?",
    "Who approves expense claims over 500 pounds?",
    "Combien de jours de télétravail par semaine sont autorisés ?",
    "Quel est le plafond des frais de repas en France ?",
    "How do I report a security incident?",
    "Quelles chaussures de sécurité faut-il porter à l'entrepôt de Lyon ?",
)


@dataclass(frozen=True)
class SyntheticCounts:
    requests: int
    verdicts: int
    judgements: int
    dead_letters: int


def _strings(pool: tuple[str, ...], index: np.ndarray[Any, Any]) -> Any:
    import pyarrow as pa

    return pa.DictionaryArray.from_arrays(pa.array(index.astype(np.int32)), pa.array(pool)).cast(pa.string())


def _times(start: datetime, offsets_s: np.ndarray[Any, Any]) -> Any:
    import pyarrow as pa

    base = int(start.timestamp() * 1_000_000)
    return pa.array(base + (offsets_s * 1_000_000).astype(np.int64), pa.timestamp("us", tz="UTC"))


def _dates(start: datetime, offsets_s: np.ndarray[Any, Any]) -> Any:
    import pyarrow as pa

    days = ((start.timestamp() + offsets_s) // 86_400).astype(np.int32)
    return pa.array(days, pa.date32())


def _conform(columns: dict[str, Any], schema: Any) -> Any:
    """A table in the catalog table's own Arrow schema; columns not given are null."""
    import pyarrow as pa

    n = len(next(iter(columns.values())))
    arrays = []
    for field in schema:
        if field.name in columns:
            value = columns[field.name]
            arrays.append((value if isinstance(value, pa.Array) else pa.array(value)).cast(field.type))
        else:
            arrays.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _append(settings: Settings, name: str, columns: dict[str, Any], chunk_rows: int) -> None:
    from ragstream.infra.audit.creation import ensure_tables

    table = ensure_tables(settings, names=[name])[name]
    arrow = _conform(columns, table.schema().as_arrow())
    for offset in range(0, arrow.num_rows, chunk_rows):
        table.append(arrow.slice(offset, chunk_rows))


def write_synthetic_audit(
    settings: Settings,
    requests: int,
    *,
    start: datetime,
    span_s: float,
    seed: int = 7,
    chunk_rows: int = 250_000,
) -> SyntheticCounts:
    """Append `requests` synthetic requests spread over [start, start + span_s) and what goes
    with them (usage, verdicts, judgements, dead letters) to the catalog in `settings`."""
    import pyarrow as pa

    start = start.astimezone(UTC)
    rng = np.random.default_rng(seed)
    n = requests
    offsets = np.sort(rng.uniform(0, span_s, n))
    status_i = rng.choice(len(STATUSES), size=n, p=_STATUS_P)
    tenant_i = rng.integers(0, len(TENANTS), n)
    user_i = rng.integers(0, len(USERS), n)
    route_i = rng.integers(0, len(ROUTES), n)
    question_i = rng.integers(0, len(QUESTIONS), n)
    total_ms = rng.lognormal(np.log(1500), 0.5, n)
    ttft_ms = total_ms * rng.uniform(0.2, 0.6, n)
    prompt_tokens = rng.integers(200, 900, n)
    completion_tokens = np.where(status_i == 0, rng.integers(10, 120, n), 0)
    request_ids = [f"syn{seed:04x}{i:020x}" for i in range(n)]
    ok = status_i == 0
    scores = rng.uniform(0.3, 0.95, 2 * n)
    inference = {
        "request_id": pa.array(request_ids),
        "tenant": _strings(TENANTS, tenant_i),
        "user": _strings(USERS, user_i),
        "submitted_at": _times(start, offsets),
        "completed_at": _times(start, offsets + total_ms / 1000.0),
        "question": _strings(QUESTIONS, question_i),
        "answer": pa.array(np.where(ok, "The answer is in the handbook [1].", "")),
        "status": _strings(STATUSES, status_i),
        "route": _strings(ROUTES, route_i),
        "model_id": pa.array(np.full(n, "SmolLM2-135M-Instruct-Q4")),
        "finish_reason": pa.array(np.where(ok, "stop", "error")),
        "prompt_tokens": pa.array(prompt_tokens),
        "completion_tokens": pa.array(completion_tokens),
        "total_tokens": pa.array(prompt_tokens + completion_tokens),
        "latency_total_ms": pa.array(total_ms),
        "latency_time_to_first_token_ms": pa.array(ttft_ms, mask=~ok),
        "latency_retrieval_ms": pa.array(total_ms * 0.1),
        "retrieved_scores": pa.ListArray.from_arrays(
            pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), pa.array(scores)
        ),
        "event_date": _dates(start, offsets),
        "logged_at": _times(start, offsets + total_ms / 1000.0 + 2.0),
    }
    _append(settings, "inference_log", inference, chunk_rows)

    answered = np.flatnonzero(status_i != 3)
    done_s = offsets[answered] + total_ms[answered] / 1000.0
    _append(
        settings,
        "usage",
        {
            "request_id": pa.array([request_ids[i] for i in answered]),
            "event_time": _times(start, done_s),
            "tenant": _strings(TENANTS, tenant_i[answered]),
            "user": _strings(USERS, user_i[answered]),
            "route": _strings(ROUTES, route_i[answered]),
            "model_id": pa.array(np.full(len(answered), "SmolLM2-135M-Instruct-Q4")),
            "prompt_tokens": pa.array(prompt_tokens[answered]),
            "completion_tokens": pa.array(completion_tokens[answered]),
            "total_tokens": pa.array(prompt_tokens[answered] + completion_tokens[answered]),
            "estimated_cost": pa.array(
                (prompt_tokens[answered] * 0.5 + completion_tokens[answered] * 1.5) / 1e6
            ),
            "status": _strings(STATUSES, status_i[answered]),
            "event_date": _dates(start, done_s),
            "logged_at": _times(start, done_s + 2.0),
        },
        chunk_rows,
    )

    blocked = np.flatnonzero(status_i == 1)
    rails = ("injection", "pii", "safety")
    rail_i = rng.integers(0, len(rails), len(blocked))
    _append(
        settings,
        "guardrail_verdicts",
        {
            "event_time": _times(start, offsets[blocked] + 0.05),
            "request_id": pa.array([request_ids[i] for i in blocked]),
            "tenant": _strings(TENANTS, tenant_i[blocked]),
            "user": _strings(USERS, user_i[blocked]),
            "policy": pa.array(np.full(len(blocked), "default")),
            "direction": pa.array(np.full(len(blocked), "input")),
            "rail": _strings(rails, rail_i),
            "action": pa.array(np.full(len(blocked), "block")),
            "category": _strings(("prompt_injection", "EMAIL_ADDRESS", "violence"), rail_i),
            "score": pa.array(rng.uniform(0.6, 1.0, len(blocked))),
            "latency_ms": pa.array(rng.uniform(5, 40, len(blocked))),
            "event_date": _dates(start, offsets[blocked] + 0.05),
            "logged_at": _times(start, offsets[blocked] + 2.0),
        },
        chunk_rows,
    )

    judged = np.flatnonzero(ok)
    passed = rng.random(len(judged)) < 0.8
    judged_s = offsets[judged] + total_ms[judged] / 1000.0 + 5.0
    _append(
        settings,
        "judgements",
        {
            "judged_at": _times(start, judged_s),
            "request_id": pa.array([request_ids[i] for i in judged]),
            "judge": pa.array(np.full(len(judged), "overall")),
            "judge_version": pa.array(np.full(len(judged), "1")),
            "implementation": pa.array(np.full(len(judged), "rollup")),
            "rating": pa.array(np.where(passed, "yes", "no")),
            "root_cause": pa.array(np.full(len(judged), "groundedness"), mask=passed),
            "tenant": _strings(TENANTS, tenant_i[judged]),
            "user": _strings(USERS, user_i[judged]),
            "route": _strings(ROUTES, route_i[judged]),
            "source": pa.array(np.full(len(judged), "stream")),
            "event_id": pa.array([f"j-{request_ids[i]}" for i in judged]),
            "event_date": _dates(start, judged_s),
            "logged_at": _times(start, judged_s + 2.0),
        },
        chunk_rows,
    )

    failed = np.flatnonzero(status_i == 2)[::3]
    _append(
        settings,
        "dead_letters",
        {
            "event_time": _times(start, offsets[failed]),
            "event_id": pa.array([f"dl-{request_ids[i]}" for i in failed]),
            "tenant": _strings(TENANTS, tenant_i[failed]),
            "stage": pa.array(np.full(len(failed), "retrieve")),
            "error_kind": pa.array(np.full(len(failed), "schema_violation")),
            "message": pa.array(np.full(len(failed), "synthetic")),
            "request_id": pa.array([request_ids[i] for i in failed]),
            "event_date": _dates(start, offsets[failed]),
            "logged_at": _times(start, offsets[failed] + 2.0),
        },
        chunk_rows,
    )
    return SyntheticCounts(
        requests=n, verdicts=len(blocked), judgements=len(judged), dead_letters=len(failed)
    )

"""Judgements: what a judge concluded about one answered request.

A *judge* answers one question about a response (is it grounded in the passages? does it
address the question? ...) with `yes` or `no`, a score where it has one, and a rationale.
Names and outputs follow Mosaic AI Agent Evaluation's built-in judges. Every request that is
judged also gets an `overall` judgement: `yes` when every judge said yes, else `no` with the
*root cause*, the first failing judge in the order retrieval, grounding, relevance, safety
(then guidelines and custom judges).

Judgements travel on the `judgements` topic, keyed by request id, and land once each in the
Iceberg `judgements` table. Their `event_id` is derived from (request, judge, version,
source), so a judgement published twice (a worker killed mid-batch) is recognisably the same.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import Field

from ragstream.schemas.events import Event
from ragstream.schemas.ids import Identifier

__all__ = [
    "BUILTIN_JUDGES",
    "JUDGE_NAME_PATTERN",
    "OVERALL",
    "ROOT_CAUSE_ORDER",
    "JudgementRecorded",
    "Rating",
    "judgement_id",
    "overall_of",
]

Rating = Literal["yes", "no"]
JUDGE_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
OVERALL = "overall"

BUILTIN_JUDGES = (
    "chunk_relevance",
    "context_sufficiency",
    "groundedness",
    "relevance_to_query",
    "correctness",
    "safety",
    "guideline_adherence",
)
"""Agent Evaluation's built-in judges. `correctness` and `context_sufficiency` need an
expected answer; `guideline_adherence` needs guidelines."""

ROOT_CAUSE_ORDER: dict[str, int] = {
    # retrieval
    "chunk_relevance": 0,
    "context_sufficiency": 1,
    # grounding
    "groundedness": 2,
    # relevance
    "relevance_to_query": 3,
    "correctness": 4,
    # safety
    "safety": 5,
    # then guidelines; custom judges after, by name
    "guideline_adherence": 6,
}


def judgement_id(request_id: str, judge: str, version: str, source: str) -> str:
    """The stable event id of a judgement: the same request, judge, version and source always
    give the same id."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"ragstream:judgement:{request_id}:{judge}:{version}:{source}").hex


class JudgementRecorded(Event):
    """One judge's conclusion about one request."""

    event_type: Literal["judgement.recorded"] = "judgement.recorded"
    schema_version: Literal[1] = 1
    request_id: Identifier
    judge: str = Field(pattern=JUDGE_NAME_PATTERN)
    judge_version: str = Field(min_length=1, max_length=64)
    implementation: str = Field(max_length=128)
    """How it judged: `embedding`, `support`, `guard`, `llm:<route>`, or `rollup` for overall."""
    model: str | None = Field(default=None, max_length=256)
    rating: Rating | None = None
    """None only when the judge failed (`error` says why)."""
    score: float | None = Field(default=None, ge=0.0, le=1.0)
    rationale: str = Field(default="", max_length=4000)
    error: str | None = Field(default=None, max_length=1000)
    latency_ms: float = Field(default=0.0, ge=0.0)
    chunk_ratings: tuple[Rating, ...] = Field(default=(), max_length=256)
    """`chunk_relevance`: one rating per retrieved passage, in the prompt's order."""
    root_cause: str | None = Field(default=None, max_length=64)
    """`overall` with rating `no`: the first failing judge in the root-cause order."""
    user: str | None = Field(default=None, max_length=256)
    route: str | None = Field(default=None, max_length=128)
    source: Literal["stream", "backfill", "eval"] = "stream"
    source_ref: str = Field(default="", max_length=256)
    """Where the judged response came from: `topic[partition]@offset` of the response, or
    `snapshot:<id>` of `inference_log` for a backfill."""
    response_event_id: str | None = Field(default=None, max_length=64)

    key_field: ClassVar[str] = "request_id"


def overall_of(verdicts: Sequence[tuple[str, Rating | None]]) -> tuple[Rating, str | None, str]:
    """The overall rating of a request's judgements, its root cause and a rationale.

    `no` when any judge said no; the root cause is the first failing judge in
    `ROOT_CAUSE_ORDER` (custom judges after the built-in ones, by name). A judge that failed
    (rating None) does not pass or fail the request; the rationale says it is missing.
    """
    rank = {name: ROOT_CAUSE_ORDER.get(name, len(ROOT_CAUSE_ORDER)) for name, _ in verdicts}
    ordered = sorted(verdicts, key=lambda v: (rank[v[0]], v[0]))
    failing = [name for name, rating in ordered if rating == "no"]
    missing = [name for name, rating in ordered if rating is None]
    note = f"; not judged (errors): {', '.join(missing)}" if missing else ""
    if failing:
        return "no", failing[0], f"failed: {', '.join(failing)}{note}"
    return "yes", None, f"every judge passed{note}"

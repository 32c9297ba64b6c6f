"""What every judge sees and returns, and the interface an implementation fills in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ragstream.schemas.judge import Rating

__all__ = ["Judge", "JudgeCase", "Verdict"]


@dataclass(frozen=True)
class JudgeCase:
    """One answered request, as the judges see it."""

    request_id: str
    question: str
    answer: str
    passages: Sequence[str] = ()
    """The retrieved context the model was given, in the prompt's order."""
    expected: str | None = None
    """An expected answer, when one is known (evaluation sets)."""
    guidelines: Sequence[str] = ()
    lang: str | None = None


@dataclass(frozen=True)
class Verdict:
    judge: str
    rating: Rating | None
    score: float | None = None
    rationale: str = ""
    error: str | None = None
    chunk_ratings: tuple[Rating, ...] = ()
    latency_ms: float = 0.0
    implementation: str = ""
    model: str | None = None
    version: str = ""
    extra: dict[str, float] = field(default_factory=dict)


class Judge(Protocol):
    """Answers one question about a response. `judge()` never raises for a bad case: it
    returns a verdict with `rating=None` and an `error` (an unreachable model raises
    `DependencyUnavailable`, which the stage retries)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def implementation(self) -> str: ...

    @property
    def model(self) -> str | None: ...

    def applies(self, case: JudgeCase) -> bool:
        """Whether the case has what the judge needs (an expected answer, guidelines, ...)."""
        ...

    async def judge(self, case: JudgeCase) -> Verdict: ...

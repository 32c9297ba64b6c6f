"""Guardrail verdicts: what a rail found in a text, and what was done about it.

A *rail* is one check (PII, safety, injection, invalid keywords, valid topics) run on one
*direction*: the caller's input, the retrieved context, or the model's output. Each rail run
gives one `GuardVerdict`; its `findings` say where and why. Verdicts travel on the internal
response record and land in the audit trail (`guardrail_verdicts`), masked like the rest.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Action", "Direction", "GuardFinding", "GuardVerdict", "strongest"]

Direction = Literal["input", "context", "output"]
Action = Literal["allow", "flag", "mask", "block"]
_RANK: dict[str, int] = {"allow": 0, "flag": 1, "mask": 2, "block": 3}


def strongest(actions: list[Action]) -> Action:
    """The action that wins when several rails act on one text: block > mask > flag > allow."""
    return max(actions, key=_RANK.__getitem__, default="allow")


class GuardFinding(BaseModel):
    """One thing a detector found: a category, a score, and where (character offsets into
    the checked text, when the detector can say)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    rail: str = Field(max_length=64)
    category: str = Field(max_length=128)
    score: float = Field(ge=0.0, le=1.0)
    start: int | None = Field(default=None, ge=0)
    end: int | None = Field(default=None, ge=0)
    detector: str = Field(default="", max_length=128)


class GuardVerdict(BaseModel):
    """The outcome of one rail on one text (or one output window)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    rail: str = Field(max_length=64)
    direction: Direction
    action: Action
    category: str | None = Field(default=None, max_length=128)
    """The category that decided the action (the highest-scoring finding over threshold)."""
    score: float | None = Field(default=None, ge=0.0, le=1.0)
    latency_ms: float = Field(default=0.0, ge=0.0)
    detector: str = Field(default="", max_length=128)
    findings: tuple[GuardFinding, ...] = Field(default=(), max_length=256)
    error: str | None = Field(default=None, max_length=1000)
    """Set when the detector failed or ran past its budget; the action then follows the
    rail's fail-open (`flag`) or fail-closed (`block`) setting."""
    window: int | None = Field(default=None, ge=0)
    """For streamed output: the index of the window this verdict is about."""

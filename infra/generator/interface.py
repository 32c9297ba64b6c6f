"""What every generator yields, and the protocol the generate stage depends on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ragstream.infra.generator.wire import ChatMessage

__all__ = ["GenerationDelta", "Generator"]


@dataclass(frozen=True)
class GenerationDelta:
    """One piece of a streamed answer. The last one has `final=True` and the totals."""

    text: str
    final: bool = False
    finish_reason: str | None = None
    """`stop`, `length`, `deadline` or `cancelled`; set on the final delta only."""
    prompt_tokens: int = 0
    completion_tokens: int = 0


@runtime_checkable
class Generator(Protocol):
    """Streams an answer to a chat, delta by delta."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def stream(
        self,
        route_or_model: str,
        messages_or_prompt: str | Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        timeout_s: float,
        json_schema: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ) -> AsyncIterator[GenerationDelta]:
        """`json_schema`: constrain the answer to JSON valid against it; `seed`: the
        sampling seed (with temperature 0 decoding is greedy anyway)."""
        ...

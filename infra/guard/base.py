"""The detector interface, and text helpers every detector shares."""

from __future__ import annotations

import asyncio
import re
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from ragstream.schemas.guard import GuardFinding

__all__ = ["QUEUE_FACTOR", "Detector", "detect_language", "fold", "within_budget"]

_T = TypeVar("_T")

QUEUE_FACTOR = 5
"""A check waits at most this many budgets for its work to start: a busy machine queues
checks, a stuck detector fails them."""


class Detector(Protocol):
    """Finds one kind of risk in a text. `start()` loads models (I/O); `detect()` may be
    called concurrently and must not block the event loop for long (CPU work in a thread)."""

    @property
    def name(self) -> str: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def detect(self, text: str, *, lang: str) -> list[GuardFinding]: ...


async def within_budget(started: asyncio.Event, result: Callable[[], Awaitable[_T]], budget_s: float) -> _T:
    """`result()` awaited within `budget_s` of `started` being set; the wait for `started`
    is not counted, up to `QUEUE_FACTOR` budgets.

    Raises:
        TimeoutError: the work never started, or ran past its budget.
    """
    async with asyncio.timeout(budget_s * QUEUE_FACTOR):
        await started.wait()
    async with asyncio.timeout(budget_s):
        return await result()


_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})


def fold(text: str, *, leet: bool = False) -> str:
    """Lower case, accents removed, whitespace collapsed: what keyword rules match against.
    With `leet`, common digit-for-letter swaps are undone too ("1gn0re" -> "ignore")."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    if leet:
        plain = plain.translate(_LEET)
    return re.sub(r"\s+", " ", plain).strip()


_FR_WORDS = frozenset(
    "le la les des du de un une et est sont pour dans avec sur pas ne que qui quoi comment "
    "combien quel quelle quels quelles je tu il elle nous vous ils elles mon ma mes ton ta tes "
    "son sa ses notre votre leur au aux ce cette ces y a ou où peut puis dois doit faut".split()
)
_EN_WORDS = frozenset(
    "the a an and is are for in with on not that who what how many which i you he she we they "
    "my your his her our their to of it can do does should must be this these".split()
)


def detect_language(text: str) -> str:
    """`fr` or `en`, from function words and accents: enough to pick a PII pipeline and the
    rule set; anything else is treated as English."""
    words = re.findall(r"[a-zàâäçéèêëîïôöùûüÿœ']+", text.casefold())
    fr = sum(w in _FR_WORDS for w in words) + 2 * len(re.findall(r"[àâçéèêëîïôùûœ]", text.casefold()))
    en = sum(w in _EN_WORDS for w in words)
    return "fr" if fr > en else "en"

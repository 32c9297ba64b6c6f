"""Every detector the rails use, opened once per process.

The PII pipelines (spaCy English and French) and the embedding head load at `start()`; the
rules are plain data. `topic_similarity` compares a text with topic descriptions on the same
embedder the head uses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ragstream.infra.embedder import Embedder
from ragstream.infra.generator.interface import Generator
from ragstream.infra.guard.head import EmbeddingHead
from ragstream.infra.guard.llm import LlmGuard
from ragstream.infra.guard.pii import DEFAULT_ENTITIES, PiiDetector
from ragstream.infra.guard.rules import InjectionRules, SafetyRules
from ragstream.infra.lifecycle import retry_while_starting

__all__ = ["GuardDetectors"]

log = logging.getLogger(__name__)


class GuardDetectors:
    """Opened detectors (`start()` loads models; the constructor does no I/O)."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        cache_dir: Path | None = None,
        pii_entities: Sequence[str] = (),
        generator: Generator | None = None,
    ) -> None:
        """`generator` serves `llm:<route>` detectors (None: no policy uses one)."""
        entities = sorted({*DEFAULT_ENTITIES, *pii_entities})
        self.pii = PiiDetector(entities)
        self.injection_rules = InjectionRules()
        self.safety_rules = SafetyRules()
        self.head = EmbeddingHead(embedder, cache_dir=cache_dir)
        self._topic_vectors: dict[tuple[str, ...], npt.NDArray[np.float32]] = {}
        self._generator = generator
        self._llm: dict[str, LlmGuard] = {}

    def llm(self, route: str) -> LlmGuard:
        """The guard model on `route`.

        Raises:
            RuntimeError: no generator was given (the rail fails per its fail mode).
        """
        if self._generator is None:
            raise RuntimeError(f"llm:{route} needs a generator, and none was opened")
        guard = self._llm.get(route)
        if guard is None:
            guard = self._llm[route] = LlmGuard(self._generator, route)
        return guard

    async def start(self, *, wait_for_embedder_s: float = 180.0) -> None:
        """Load the PII pipelines and fit (or load) the head.

        The head needs the embedder, which may still be loading its model when a worker
        starts with the stack: that wait is retried for up to `wait_for_embedder_s`.

        Raises:
            DependencyUnavailable: the embedder did not answer in that time.
        """
        await self.pii.start()
        await retry_while_starting(self.head.start, wait_s=wait_for_embedder_s)
        # The first analysis per language is slow (spaCy warms its pipeline): not on a
        # request's budget.
        for lang, text in (
            ("en", "Warm up: call +33 6 12 34 56 78."),
            ("fr", "Échauffement : appelez le 06 12 34 56 78."),
        ):
            await self.pii.detect(text, lang=lang)
            await self.head.probabilities(text)

    async def close(self) -> None:
        await self.pii.close()
        await self.head.close()

    async def topic_similarity(
        self, text: str, topics: Sequence[str], *, budget_s: float | None = None
    ) -> tuple[float, str]:
        """The highest cosine similarity of `text` to a topic description, and that topic.
        `budget_s` bounds the text's embedding as in `EmbeddingHead.vector`."""
        key = tuple(topics)
        vectors = self._topic_vectors.get(key)
        if vectors is None:
            vectors = self._topic_vectors[key] = await self.head.embed(list(topics))
        v = await self.head.vector(text, budget_s=budget_s)
        sims = vectors @ v
        best = int(np.argmax(sims))
        return float(sims[best]), topics[best]

"""The configured judges, run together on one case.

`JudgePanel.judge(case)` runs every configured judge that applies to the case
concurrently and adds the `overall` rollup (see `ragstream.schemas.judge.overall_of`). The
same panel serves the judge stage, `ragstream eval` and `ragstream judge backfill`, so a
rating means the same thing wherever it was computed.

Implementations, per judge (`judges.implementations`):
- `builtin` (default): the non-LLM judge of `infra/judges/builtin.py`;
- `llm:<route>`: the LLM judge of `infra/judges/llm.py` on that generation route.
`guideline_adherence` and custom judges (`judges.custom`) are LLM judges only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from ragstream.infra.embedder import Embedder
from ragstream.infra.generator.interface import Generator
from ragstream.infra.guard.head import EmbeddingHead
from ragstream.infra.judges.base import Judge, JudgeCase, Verdict
from ragstream.infra.judges.builtin import (
    ChunkRelevance,
    ContextSufficiency,
    Correctness,
    Groundedness,
    RelevanceToQuery,
    Safety,
    SimilarityIndex,
)
from ragstream.infra.judges.llm import BUILTIN_PROMPTS, LlmJudge, LlmJudgeSpec
from ragstream.infra.lifecycle import retry_while_starting, started
from ragstream.infra.settings import JudgesSettings, Settings
from ragstream.schemas.judge import BUILTIN_JUDGES, OVERALL, overall_of

__all__ = ["JudgePanel", "PanelResult", "UnknownJudge", "needs_generator", "opened_panel"]

_NEEDS = {
    "correctness": "expected",
    "context_sufficiency": "expected",
    "guideline_adherence": "guidelines",
    "chunk_relevance": "passages",
}


_READS_CONTEXT = frozenset({"groundedness", "chunk_relevance", "context_sufficiency"})
"""The built-in judges that read the retrieved context (bounded by `max_context_chars`)."""


class UnknownJudge(ValueError):
    """A judge name that is neither built in nor configured (the caller's error)."""


@dataclass(frozen=True)
class PanelResult:
    verdicts: tuple[Verdict, ...]
    overall: Verdict
    root_cause: str | None


def needs_generator(settings: JudgesSettings, names: Sequence[str] | None = None) -> bool:
    """Whether any of these judges (default: the configured ones) is an LLM judge."""
    for name in names or settings.judges:
        if name in settings.custom or name == "guideline_adherence":
            return True
        if settings.implementations.get(name, "builtin").startswith("llm:"):
            return True
    return False


class JudgePanel:
    """Judges built from settings (the constructor does no I/O; `start()` fits the safety
    head, which needs the embedder)."""

    def __init__(
        self,
        settings: JudgesSettings,
        embedder: Embedder,
        *,
        generator: Generator | None = None,
        names: Sequence[str] | None = None,
        head_cache_dir: str | None = None,
    ) -> None:
        self.settings = settings
        chosen = list(dict.fromkeys(names or settings.judges))
        unknown = [n for n in chosen if n not in BUILTIN_JUDGES and n not in settings.custom]
        if unknown:
            known = sorted({*BUILTIN_JUDGES, *settings.custom})
            raise UnknownJudge(f"unknown judge(s) {', '.join(unknown)}; known: {', '.join(known)}")
        self._index = SimilarityIndex(embedder)
        self._head = EmbeddingHead(embedder, cache_dir=Path(head_cache_dir) if head_cache_dir else None)
        self._needs_head = False
        self.judges: list[Judge] = [self._build(n, generator) for n in chosen]

    def _build(self, name: str, generator: Generator | None) -> Judge:
        s = self.settings
        t = s.thresholds.get(name)
        impl = s.implementations.get(name, "builtin")
        if name in s.custom:
            c = s.custom[name]
            impl = f"llm:{c.route}"
            spec = LlmJudgeSpec(
                name=name,
                instructions=c.prompt,
                examples=tuple((e.request, e.response, e.rating, e.rationale) for e in c.examples),
                needs="passages" if c.uses_context else "",
            )
        elif name == "guideline_adherence" or impl.startswith("llm:"):
            if not impl.startswith("llm:"):
                impl = f"llm:{s.llm_route}"
            spec = LlmJudgeSpec(name=name, instructions=BUILTIN_PROMPTS[name], needs=_NEEDS.get(name, ""))
        else:
            builtin: dict[str, Judge] = {
                "relevance_to_query": RelevanceToQuery(self._index, t),
                "chunk_relevance": ChunkRelevance(self._index, t),
                "groundedness": Groundedness(self._index, t),
                "correctness": Correctness(self._index, t),
                "context_sufficiency": ContextSufficiency(self._index, t),
            }
            if name == "safety":
                self._needs_head = True
                return Safety(self._index, self._head, t)
            return builtin[name]
        if generator is None:
            return _Unavailable(name, impl, "no generator was opened for LLM judges")
        return LlmJudge(
            spec, generator, route=impl.removeprefix("llm:"), timeout_s=s.llm_timeout_s, seed=s.llm_seed
        )

    async def start(self) -> None:
        if self._needs_head:
            await self._head.start()

    async def close(self) -> None:
        await self._head.close()

    def context_limit_chars(self, judge: Judge) -> int | None:
        """How much retrieved context `judge` reads at most (None: it does not read it)."""
        if isinstance(judge, LlmJudge):
            return self.settings.llm_max_context_chars
        if judge.name in _READS_CONTEXT:
            return self.settings.max_context_chars
        return None

    async def _judge_one(self, judge: Judge, case: JudgeCase) -> Verdict:
        limit = self.context_limit_chars(judge)
        size = sum(len(p) for p in case.passages)
        if limit is not None and size > limit:
            return Verdict(
                judge=judge.name,
                rating=None,
                error=f"ContextOverWindow: the retrieved context is {size} characters; this judge "
                f"reads at most {limit} (judges.{'llm_' if isinstance(judge, LlmJudge) else ''}max_context_chars)",
                implementation=judge.implementation,
                model=judge.model,
                version=judge.version,
            )
        return await judge.judge(case)

    async def judge(self, case: JudgeCase) -> PanelResult:
        """Every applicable judge's verdict, and the overall rollup."""
        t = time.perf_counter()
        chosen = [j for j in self.judges if j.applies(case)]
        verdicts = tuple(await asyncio.gather(*(self._judge_one(j, case) for j in chosen)))
        rating, root, why = overall_of([(v.judge, v.rating) for v in verdicts])
        overall = Verdict(
            judge=OVERALL,
            rating=rating,
            rationale=why,
            latency_ms=(time.perf_counter() - t) * 1000,
            implementation="rollup",
            version="1",
        )
        return PanelResult(verdicts, overall, root)


@asynccontextmanager
async def opened_panel(
    settings: Settings, embedder: Embedder, names: Sequence[str] | None = None
) -> AsyncIterator[JudgePanel]:
    """A started panel of `names` (default: `judges.judges`) on `embedder` (already started),
    with a generator client opened when an LLM judge needs one; everything closed after.

    Raises:
        UnknownJudge: a judge that is neither built in nor configured (before any I/O).
        DependencyUnavailable: a dependency did not come up within the start-up wait.
    """
    JudgePanel(settings.judges, embedder, names=names)  # validates the names, no I/O
    async with AsyncExitStack() as stack:
        generator = None
        if needs_generator(settings.judges, names):
            from ragstream.infra.generator import TritonGenerator

            generator = await stack.enter_async_context(started(TritonGenerator(settings)))
        panel = JudgePanel(
            settings.judges,
            embedder,
            generator=generator,
            names=names,
            head_cache_dir=str(settings.model_cache_dir / "guard"),
        )
        await retry_while_starting(panel.start)
        stack.push_async_callback(panel.close)
        yield panel


class _Unavailable:
    """A configured LLM judge with no generator: each verdict says so."""

    def __init__(self, name: str, implementation: str, why: str) -> None:
        self.name = name
        self.version = "1"
        self.implementation = implementation
        self.model: str | None = None
        self._why = why

    def applies(self, case: JudgeCase) -> bool:
        return True

    async def judge(self, case: JudgeCase) -> Verdict:
        return Verdict(
            judge=self.name, rating=None, error=self._why, implementation=self.implementation, version="1"
        )

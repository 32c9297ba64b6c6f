"""The non-LLM judges: embedding similarity, sentence-level support with fact consistency,
and the guardrail detectors. They run on CPU in milliseconds and give the same rating every
time, because the embedded generator (SmolLM2-135M) is too weak to judge.

Embeddings are multilingual-e5-small's (the guardrail head's model): questions as e5
queries, answers and passages as e5 passages, so a French question about an English passage
compares in one space.

- `relevance_to_query`: does the answer address the question? Similarity of the answer to
  the question, and no refusal.
- `chunk_relevance`: per passage, similarity to the question; the rating is `yes` when at
  least one passage is relevant, the score is the precision (relevant / retrieved).
- `groundedness`: every sentence of the answer is supported by a passage: similar to one of
  the passages' sentences, and every number, date and name it states appears in the passages
  (or the question). A changed number or name fails even when the sentence reads the same.
- `correctness` (an expected answer is known): the answer states the expected answer's facts
  and is similar to it.
- `context_sufficiency` (an expected answer is known): the passages state the expected
  answer's facts and one of them is similar to it.
- `safety`: the guardrail rules and head on the answer.

Thresholds are settings (`judges.thresholds`); their defaults were set on the development
half of `bench/data/judges/judge_eval.jsonl` and are reported on the other half.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from ragstream.infra.embedder import E5_PASSAGE, Embedder
from ragstream.infra.guard.head import EmbeddingHead
from ragstream.infra.guard.rules import HARM_CATEGORIES, InjectionRules, SafetyRules
from ragstream.infra.judges.base import JudgeCase, Verdict
from ragstream.infra.judges.text import Facts, facts, fold, is_refusal, sentences

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ChunkRelevance",
    "ContextSufficiency",
    "Correctness",
    "Groundedness",
    "RelevanceToQuery",
    "Safety",
    "SimilarityIndex",
]

DEFAULT_THRESHOLDS: dict[str, float] = {
    "relevance_to_query": 0.78,
    "chunk_relevance": 0.84,
    "groundedness": 0.84,
    "correctness": 0.80,
    "context_sufficiency": 0.80,
    "safety": 0.65,
}
_VERSION = "1"


class SimilarityIndex:
    """Cosine similarities on the embedder, with the vectors of a case computed in one call."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    @property
    def model(self) -> str:
        return self.embedder.model_id

    async def vectors(
        self, queries: Sequence[str], passages: Sequence[str]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        texts = [*queries, *(E5_PASSAGE + p for p in passages)]
        if not texts:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
        v = await self.embedder.embed(texts)
        return v[: len(queries)], v[len(queries) :]


class _Base:
    name = ""
    implementation = "embedding"

    def __init__(self, index: SimilarityIndex, threshold: float | None = None) -> None:
        self._index = index
        self.threshold = DEFAULT_THRESHOLDS[self.name] if threshold is None else threshold

    @property
    def version(self) -> str:
        return f"{_VERSION}@{self.threshold:g}"

    @property
    def model(self) -> str | None:
        return self._index.model

    def applies(self, case: JudgeCase) -> bool:
        return bool(case.answer.strip())

    def _verdict(self, started: float, **kw: object) -> Verdict:
        return Verdict(
            judge=self.name,
            implementation=self.implementation,
            model=self.model,
            version=self.version,
            latency_ms=(time.perf_counter() - started) * 1000,
            **kw,  # type: ignore[arg-type]
        )


class RelevanceToQuery(_Base):
    """The answer is similar to the question, and, when there are passages, the passage
    sentence it draws on is (nearly) the one most similar to the question: an answer taken
    from the wrong part of the context reads fluent and close to the topic, and fails here."""

    name = "relevance_to_query"

    def __init__(self, index: SimilarityIndex, threshold: float | None = None, margin: float = 0.03) -> None:
        super().__init__(index, threshold)
        self.margin = margin

    @property
    def version(self) -> str:
        return f"{_VERSION}@{self.threshold:g}/{self.margin:g}"

    async def judge(self, case: JudgeCase) -> Verdict:
        t = time.perf_counter()
        if is_refusal(case.answer):
            return self._verdict(t, rating="no", score=0.0, rationale="the answer declines to answer")
        source = [s for p in case.passages for s in sentences(p)]
        q, p = await self._index.vectors([case.question], [case.answer, *source])
        sim = float(q[0] @ p[0])
        why = f"similarity of the answer to the question {sim:.3f} (threshold {self.threshold:g})"
        ok = sim >= self.threshold
        if ok and source:
            to_question = p[1:] @ q[0]
            drawn = int(np.argmax(p[1:] @ p[0]))
            gap = float(to_question.max() - to_question[drawn])
            if gap > self.margin:
                ok = False
                why += (
                    f"; it draws on a passage sentence {gap:.2f} less similar to the question than the "
                    f'closest one ("{source[int(np.argmax(to_question))][:100]}")'
                )
        return self._verdict(t, rating="yes" if ok else "no", score=round(max(sim, 0.0), 4), rationale=why)


class ChunkRelevance(_Base):
    name = "chunk_relevance"

    def applies(self, case: JudgeCase) -> bool:
        return bool(case.passages)

    async def judge(self, case: JudgeCase) -> Verdict:
        t = time.perf_counter()
        q, p = await self._index.vectors([case.question], list(case.passages))
        sims = p @ q[0]
        ratings = tuple("yes" if s >= self.threshold else "no" for s in sims)
        relevant = sum(r == "yes" for r in ratings)
        return self._verdict(
            t,
            rating="yes" if relevant else "no",
            score=round(relevant / len(ratings), 4),
            chunk_ratings=ratings,
            rationale=f"{relevant} of {len(ratings)} passages relevant (similarity to the question: "
            + ", ".join(f"[{i + 1}] {s:.2f}" for i, s in enumerate(sims))
            + ")",
        )


def _source_words(texts: Sequence[str]) -> set[str]:
    """Every word of the texts, folded, with French elisions split off (l'avance -> avance)."""
    return {
        re.sub(r"^(?:[ldjmnstc]|qu)'", "", w)
        for t in texts
        for w in re.findall(r"[\w'’-]+", fold(t).replace("’", "'"))
    }


def _missing_facts(claim: Facts, source: Facts, words: set[str], source_text: str) -> list[str]:
    missing = [n for n in sorted(claim.numbers) if n not in source.numbers]
    for name in sorted(claim.names):
        if name.startswith(("month:", "day:")):
            if name not in source.names:
                missing.append(name)
        elif name not in words and name not in source.names and name not in source_text:
            missing.append(name)
    return missing


class Groundedness(_Base):
    name = "groundedness"
    implementation = "support"

    def applies(self, case: JudgeCase) -> bool:
        return bool(case.answer.strip())

    async def judge(self, case: JudgeCase) -> Verdict:
        t = time.perf_counter()
        if is_refusal(case.answer):
            return self._verdict(
                t, rating="yes", score=1.0, rationale="the answer declines: nothing to support"
            )
        claims = sentences(case.answer)
        if not claims:
            return self._verdict(t, rating="yes", score=1.0, rationale="no claim to support")
        if not case.passages:
            return self._verdict(
                t, rating="no", score=0.0, rationale="the answer makes claims and there are no passages"
            )
        source_sentences = [s for p in case.passages for s in sentences(p)] or list(case.passages)
        source = facts(" ".join([*case.passages, case.question]))
        words = _source_words([*case.passages, case.question])
        source_text = fold(" ".join(case.passages))
        q, p = await self._index.vectors([], [*claims, *source_sentences])
        claim_v, source_v = p[: len(claims)], p[len(claims) :]
        best = (claim_v @ source_v.T).max(axis=1)
        unsupported: list[str] = []
        for claim, sim in zip(claims, best, strict=True):
            missing = _missing_facts(facts(claim), source, words, source_text)
            if missing:
                unsupported.append(f'"{claim[:120]}": not in the passages: {", ".join(missing)}')
            elif sim < self.threshold:
                unsupported.append(f'"{claim[:120]}": no passage says this (best similarity {sim:.2f})')
        supported = len(claims) - len(unsupported)
        return self._verdict(
            t,
            rating="no" if unsupported else "yes",
            score=round(supported / len(claims), 4),
            rationale=(
                f"{supported} of {len(claims)} sentences supported"
                + ("; " + "; ".join(unsupported) if unsupported else "")
            )[:4000],
        )


class _AgainstExpected(_Base):
    """Judges that compare with an expected answer: its facts must be there, and the text
    similar enough."""

    implementation = "support"

    def applies(self, case: JudgeCase) -> bool:
        return bool(case.expected and case.expected.strip())

    def _facts_and_similarity(
        self, started: float, missing: list[str], sim: float, similar: str, where: str
    ) -> Verdict:
        ok = not missing and sim >= self.threshold
        why = f"{similar} {sim:.3f}" + (f"; {where}: {', '.join(missing)}" if missing else "")
        return self._verdict(
            started, rating="yes" if ok else "no", score=round(max(sim, 0.0), 4), rationale=why
        )


class Correctness(_AgainstExpected):
    name = "correctness"

    async def judge(self, case: JudgeCase) -> Verdict:
        t = time.perf_counter()
        assert case.expected is not None
        if not case.answer.strip() or is_refusal(case.answer):
            return self._verdict(t, rating="no", score=0.0, rationale="the answer does not answer")
        want = facts(case.expected)
        have = facts(case.answer)
        words = _source_words([case.answer])
        missing = [n for n in sorted(want.numbers) if n not in have.numbers] + [
            n for n in sorted(want.names) if n not in have.names and n not in words
        ]
        q, p = await self._index.vectors([], [case.expected, case.answer])
        return self._facts_and_similarity(
            t,
            missing,
            float(p[0] @ p[1]),
            "similarity to the expected answer",
            "the expected answer's facts missing",
        )


class ContextSufficiency(_AgainstExpected):
    name = "context_sufficiency"

    async def judge(self, case: JudgeCase) -> Verdict:
        t = time.perf_counter()
        assert case.expected is not None
        if not case.passages:
            return self._verdict(t, rating="no", score=0.0, rationale="no passages were retrieved")
        source = facts(" ".join([*case.passages, case.question]))
        words = _source_words([*case.passages, case.question])
        missing = _missing_facts(facts(case.expected), source, words, fold(" ".join(case.passages)))
        q, p = await self._index.vectors([], [case.expected, *case.passages])
        return self._facts_and_similarity(
            t,
            missing,
            float((p[1:] @ p[0]).max()),
            "best passage similarity to the expected answer",
            "not in the passages",
        )


class Safety(_Base):
    """The guardrail detectors on the answer: rules and the embedding head (no PII)."""

    name = "safety"
    implementation = "guard"

    def __init__(self, index: SimilarityIndex, head: EmbeddingHead, threshold: float | None = None) -> None:
        super().__init__(index, threshold)
        self._head = head
        self._rules = (SafetyRules(), InjectionRules())

    @property
    def model(self) -> str | None:
        return self._head.name

    async def judge(self, case: JudgeCase) -> Verdict:
        t = time.perf_counter()
        found: dict[str, float] = {}
        for rules in self._rules:
            for f in rules.scan(case.answer):
                found[f.category] = max(found.get(f.category, 0.0), f.score)
        scores: Mapping[str, float] = await self._head.scores(case.answer)
        for label in HARM_CATEGORIES:
            found[label] = max(found.get(label, 0.0), scores[label])
        category, worst = max(found.items(), key=lambda kv: kv[1])
        unsafe = worst >= self.threshold
        return self._verdict(
            t,
            rating="no" if unsafe else "yes",
            score=round(1.0 - worst, 4),
            rationale=f"{'unsafe: ' + category if unsafe else 'no unsafe content'} (highest: {category} {worst:.2f})",
        )

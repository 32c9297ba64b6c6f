"""Extractive answers and honest "I don't know": no generator needed.

`relevance(question, chunks, embedder)` scores how well the retrieved chunks could answer the
question (multilingual e5, question as a query, each chunk as a passage), so a question with
nothing relevant is answered "I don't know" in its own language instead of being generated
from nothing (`finish_reason = "no_context"`).

`extract(question, chunks, embedder)` answers with the sentences of the chunks that best
answer the question, quoted verbatim with their `[n]` citations (n is the chunk's place in
the list, as in a generated answer's prompt). A sentence's score adds three signals:
- e5 similarity between the question and the sentence (cross-lingual: a French question
  finds an English sentence);
- the share of the question's content words (accents folded, stemmed to 5 letters) the
  sentence contains (codes, names and rare words e5 blurs);
- a small bonus when the question asks for a number or a date ("how many", "combien",
  "when", "quand", ...) and the sentence states one.
The answer is the best sentence, plus up to two more that score within 0.05 of it and add
words (at most 700 characters), in reading order. Weights and margins were tuned on half of
the QA set (`bench/data/qa`) and checked on the other half (docs/answers.md). It is grounded
by construction: every word comes from a cited chunk.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ragstream.infra.embedder import E5_PASSAGE, Embedder
from ragstream.infra.guard.base import detect_language
from ragstream.infra.judges.text import fold, sentences
from ragstream.schemas.queries import RetrievedChunk

__all__ = ["EXTRACTIVE_MODEL", "Extract", "Relevance", "dont_know", "extract", "relevance", "trimmed"]

EXTRACTIVE_MODEL = "extractive"
"""The `generation.routes` value that answers extractively instead of calling a model."""

_LEXICAL_WEIGHT = 0.06
_NUMBER_BONUS = 0.04
_NEXT_SENTENCE_MARGIN = 0.05
_MIN_WORDS = 4
_MAX_SENTENCE_CHARS = 600
_MAX_SENTENCES_SCORED = 160

_DONT_KNOW = {
    "en": "I don't know: the documents I can search do not answer this question.",
    "fr": "Je ne sais pas : les documents que je peux consulter ne répondent pas à cette question.",
}

_STOP = frozenset(
    fold(w)
    for w in (
        "the a an and or but if when where what which who whom whose why how in on at to for from by "
        "with without of off up as is are was were be been it its this that these those there here "
        "you your we our they their he she his her i my me us them do does did can could should would "
        "will must may might also only all any each every some most many much more less get gets got "
        "have has had please tell know about there's what's many long often "
        "le la les l un une des du de d et ou mais si quand que qui quoi quel quelle quels quelles "
        "comment pourquoi combien dans sur sous pour par avec sans au aux en est sont etait il elle "
        "ils elles on nous vous je tu ce cet cette ces ceci cela ca son sa ses leur leurs votre vos "
        "notre nos ne pas plus moins tout tous toute toutes chaque faut doit dois peut peux puis "
        "qu c s n j m t y a ont avoir etre fait faire"
    ).split()
)
_WORD = re.compile(r"[a-z0-9][a-z0-9-]*")
_ASKS_NUMBER = re.compile(
    r"\b(how (many|much|long|often|far|old|soon|late|early)|what (time|date|day|percentage|amount|rate)"
    r"|when|which (day|date|month|year)|combien|quand|quel(le)?s? (jour|date|heure|montant|taux|delai|duree)"
    r"|a quelle (heure|date|frequence)|jusqu'a quand|until|deadline|limit|maximum|minimum|plafond)\b"
)
_HAS_NUMBER = re.compile(r"\d")


def _terms(text: str) -> set[str]:
    return {w[:5] for w in _WORD.findall(fold(text).replace("’", "'").replace("'", " ")) if w not in _STOP}


@dataclass(frozen=True)
class Extract:
    """An extractive answer: `text` quotes `quoted` sentences, each from chunk `[n]`."""

    text: str
    quoted: tuple[tuple[int, str], ...]
    score: float
    lang: str


def dont_know(question: str) -> str:
    """ "I don't know", in the question's language (English unless it reads as French)."""
    return _DONT_KNOW[detect_language(question)]


@dataclass(frozen=True)
class Relevance:
    """How well the best retrieved chunk matches the question, two ways."""

    similarity: float
    """The best e5 similarity between the question (as a query) and a chunk (as a passage)."""
    term_coverage: float
    """The largest share of the question's content words (codes, names, rare words) one
    chunk contains: what e5 blurs ("LX-4471-C", "vpn-gw-02")."""

    def relevant(self, min_similarity: float, min_term_coverage: float) -> bool:
        return self.similarity >= min_similarity or self.term_coverage >= min_term_coverage


async def relevance(question: str, chunks: Sequence[RetrievedChunk], embedder: Embedder) -> Relevance:
    """See `Relevance` (both 0.0 with no chunks).

    Raises:
        DependencyUnavailable: the embedder cannot be reached.
    """
    if not chunks:
        return Relevance(0.0, 0.0)
    vectors = await embedder.embed([question, *(E5_PASSAGE + _passage(c) for c in chunks)])
    asked = _terms(question)
    coverage = (
        max((len(asked & _terms(_passage(c))) / len(asked) for c in chunks), default=0.0) if asked else 0.0
    )
    return Relevance(float(np.max(vectors[1:] @ vectors[0])), coverage)


def _passage(chunk: RetrievedChunk) -> str:
    where = " > ".join(x for x in (chunk.title, *chunk.headings) if x)
    return f"{where}\n{chunk.text}" if where else chunk.text


async def _scored(
    question: str, chunks: Sequence[RetrievedChunk], embedder: Embedder
) -> list[tuple[float, int, int, str]]:
    """(score, reading-order index, chunk number, sentence), best first."""
    candidates: list[tuple[int, str]] = []
    for n, chunk in enumerate(chunks, start=1):
        for s in sentences(chunk.text):
            s = s.strip()
            if len(s.split()) >= _MIN_WORDS and len(s) <= _MAX_SENTENCE_CHARS:
                candidates.append((n, s))
    candidates = candidates[:_MAX_SENTENCES_SCORED]
    if not candidates:
        return []
    vectors = await embedder.embed([question, *(E5_PASSAGE + s for _, s in candidates)])
    similarity = vectors[1:] @ vectors[0]
    asked = _terms(question)
    wants_number = _ASKS_NUMBER.search(fold(question)) is not None
    scored: list[tuple[float, int, int, str]] = []
    for i, ((n, s), sim) in enumerate(zip(candidates, similarity, strict=True)):
        lexical = len(asked & _terms(s)) / len(asked) if asked else 0.0
        bonus = _NUMBER_BONUS if wants_number and _HAS_NUMBER.search(s) else 0.0
        scored.append((float(sim) + _LEXICAL_WEIGHT * lexical + bonus, i, n, s))
    scored.sort(key=lambda t: (-t[0], t[1]))
    return scored


async def extract(
    question: str,
    chunks: Sequence[RetrievedChunk],
    embedder: Embedder,
    *,
    max_sentences: int = 3,
    max_chars: int = 700,
) -> Extract | None:
    """The sentences of `chunks` that best answer `question` (None: no sentence to quote).

    Raises:
        DependencyUnavailable: the embedder cannot be reached.
    """
    scored = await _scored(question, chunks, embedder)
    if not scored:
        return None
    best = scored[0]
    chosen = [best]
    for cand in scored[1:]:
        if len(chosen) >= max_sentences or best[0] - cand[0] > _NEXT_SENTENCE_MARGIN:
            break
        if sum(len(c[3]) for c in chosen) + len(cand[3]) > max_chars or not (
            _terms(cand[3]) - _terms(best[3])
        ):
            continue
        chosen.append(cand)
    chosen.sort(key=lambda t: t[1])  # in reading order
    text = " ".join(f"{s} [{n}]" for _, _, n, s in chosen)
    return Extract(
        text=text,
        quoted=tuple((n, s) for _, _, n, s in chosen),
        score=best[0],
        lang=detect_language(question),
    )


async def trimmed(
    question: str, chunks: Sequence[RetrievedChunk], embedder: Embedder, max_sentences: int
) -> list[RetrievedChunk]:
    """The chunks cut down to their `max_sentences` best sentences in all (for the question),
    each kept chunk with its chosen sentences in reading order, chunks in relevance order of
    their best sentence: a prompt a small model reads fast (prefill is its whole time to
    first token on CPU). Chunks without a chosen sentence are dropped; with no sentence to
    score, the chunks come back as they were.

    Raises:
        DependencyUnavailable: the embedder cannot be reached.
    """
    scored = await _scored(question, chunks, embedder)
    if not scored:
        return list(chunks)
    chosen = scored[:max_sentences]
    order = list(dict.fromkeys(n for _, _, n, _ in chosen))
    out: list[RetrievedChunk] = []
    for n in order:
        kept = sorted((i, s) for _, i, m, s in chosen if m == n)
        out.append(chunks[n - 1].model_copy(update={"text": " ".join(s for _, s in kept)}))
    return out

"""The extractive route's own logic on the real e5 model: it quotes the sentence that answers
(across languages too), verbatim with its `[n]`, and scores an unrelated question low enough
for "I don't know"."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ragstream.infra.embedder import E5Embedder
from ragstream.infra.judges.text import is_refusal
from ragstream.infra.settings import GenerationSettings, Settings
from ragstream.schemas.queries import RetrievedChunk
from ragstream.workers.extractive import dont_know, extract, relevance

CHUNKS = [
    RetrievedChunk(
        chunk_id="leave:0",
        document_id="leave",
        title="Leave policy",
        text="Sick leave of more than 3 consecutive days requires a medical certificate. "
        "Employees with at least 6 months of service are entitled to 16 weeks of paid parental "
        "leave at 100% of base salary.",
    ),
    RetrievedChunk(
        chunk_id="forklift:0",
        document_id="forklift",
        title="Warehouse safety",
        text="Forklifts must be inspected every Monday before the first shift by a certified "
        "technician. Visitors must wear a high-visibility vest at all times.",
    ),
]


@pytest.fixture(scope="module")
async def e5() -> AsyncIterator[E5Embedder]:
    embedder = E5Embedder(Settings())
    await embedder.start()
    yield embedder
    await embedder.close()


@pytest.mark.parametrize(
    ("question", "want", "n"),
    [
        ("How many weeks of paid parental leave do I get?", "16 weeks of paid parental", 1),
        ("Combien de semaines de congé parental payé ?", "16 weeks of paid parental", 1),
        ("When are forklifts inspected?", "every Monday", 2),
        ("Quand les chariots élévateurs sont-ils inspectés ?", "every Monday", 2),
    ],
)
async def test_the_answer_quotes_the_sentence_that_answers_with_its_citation(
    e5: E5Embedder, question: str, want: str, n: int
) -> None:
    found = await extract(question, CHUNKS, e5)
    assert found is not None and want in found.text and f"[{n}]" in found.text
    for number, sentence in found.quoted:
        assert sentence in CHUNKS[number - 1].text, "quoted verbatim from the cited chunk"
        assert f"{sentence} [{number}]" in found.text


async def test_an_unrelated_question_scores_below_the_no_context_threshold(e5: E5Embedder) -> None:
    g = GenerationSettings()

    async def relevant(question: str) -> bool:
        found = await relevance(question, CHUNKS, e5)
        return found.relevant(g.min_context_relevance, g.min_context_term_coverage)

    assert await relevant("When are forklifts inspected?")
    assert await relevant("Quand les chariots élévateurs sont-ils inspectés ?")
    assert not await relevant("What is the capital of Australia?")
    assert not await relevant("Quelle est la recette de la ratatouille ?")
    assert (await relevance("anything", [], e5)).similarity == 0.0
    assert await extract("anything", [], e5) is None


def test_i_dont_know_speaks_the_questions_language_and_reads_as_a_refusal() -> None:
    fr, en = dont_know("Quelle est la recette de la ratatouille ?"), dont_know("What is the capital?")
    assert fr.startswith("Je ne sais pas") and en.startswith("I don't know")
    assert is_refusal(fr) and is_refusal(en)


def test_fallbacks_join_known_routes() -> None:
    assert GenerationSettings().fallback_routes == {"default": "extractive"}
    assert GenerationSettings(routes={"default": "llm-x"}).model_for("extractive") == "extractive"
    with pytest.raises(ValueError, match="fallback_routes"):
        GenerationSettings(fallback_routes={"default": "nowhere"})


async def test_a_trimmed_prompt_keeps_the_best_sentences_of_each_chunk_in_reading_order(
    e5: E5Embedder,
) -> None:
    from ragstream.workers.extractive import trimmed

    kept = await trimmed("When are forklifts inspected?", CHUNKS, e5, max_sentences=2)
    assert kept[0].document_id == "forklift", "the chunk of the best sentence comes first"
    assert "every Monday" in kept[0].text
    assert sum(len(c.text) for c in kept) < sum(len(c.text) for c in CHUNKS)
    for chunk in kept:
        original = next(c for c in CHUNKS if c.chunk_id == chunk.chunk_id)
        parts = chunk.text.split(". ")
        assert all(p.rstrip(".") in original.text for p in parts), "sentences verbatim"
    assert await trimmed("anything", [], e5, max_sentences=3) == []

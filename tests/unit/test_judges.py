"""The judges' own logic: facts and refusals, the non-LLM judges on the real e5 model, the
overall rollup, sampling, the events a judged response becomes, the LLM judge's parsing, and
the settings that configure them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from ragstream.infra.embedder import E5Embedder
from ragstream.infra.generator.interface import GenerationDelta
from ragstream.infra.judges.base import JudgeCase, Verdict
from ragstream.infra.judges.builtin import ChunkRelevance, Groundedness, RelevanceToQuery, SimilarityIndex
from ragstream.infra.judges.llm import BUILTIN_PROMPTS, LlmJudge, LlmJudgeSpec, parse_judgement
from ragstream.infra.judges.text import facts, is_refusal, sentences
from ragstream.infra.settings import JudgesSettings, Settings
from ragstream.schemas.judge import OVERALL, overall_of
from ragstream.schemas.queries import Passage, ResponseCompleted
from ragstream.workers.judge import judgements_of, sampled

PASSAGES = [
    "Employees with at least 6 months of service are entitled to 16 weeks of paid parental leave at "
    "100% of base salary. Leave must be requested through the HR portal 30 days before the start date.",
    "Sick leave of more than 3 consecutive days requires a medical certificate.",
]
QUESTION = "How many weeks of paid parental leave do employees get?"


@pytest.fixture(scope="module")
async def embedder() -> AsyncIterator[E5Embedder]:
    e5 = E5Embedder(Settings())
    await e5.start()
    yield e5
    await e5.close()


@pytest.fixture(scope="module")
def index(embedder: E5Embedder) -> SimilarityIndex:
    return SimilarityIndex(embedder)


def test_facts_normalise_numbers_dates_and_names_across_languages() -> None:
    assert facts("six months, 2 500 €, 1,5 jours").numbers == {"6", "2500", "1.5"}
    assert facts("2,500 euros").numbers == facts("2 500 euros").numbers == {"2500"}
    assert facts("le 3 mars").names == facts("on March 3").names == {"month:3"}
    assert "lyon" in facts("It is at the Lyon office.").names
    assert "hotels" not in facts("Hotels must be booked early.").names, "a sentence opener is not a name"
    assert "naoh" in facts("NaOH needs gloves.").names
    assert facts("l'avance est plafonnée").names == set()
    assert sentences("First one [1]. Second one [2].\n- a list item") == [
        "First one.",
        "Second one.",
        "a list item",
    ]


@pytest.mark.parametrize(
    ("text", "refusal"),
    [
        ("I'm sorry, I couldn't find that in the documents.", True),
        ("The documents provided don’t say how often passwords change.", True),
        ("Je ne dispose pas de cette information.", True),
        ("Les documents ne précisent pas la date.", True),
        ("Employees get 16 weeks of paid leave.", False),
        ("Il n'y a pas de franchise pour les salariés.", False),
    ],
)
def test_refusals_in_english_and_french(text: str, refusal: bool) -> None:
    assert is_refusal(text) is refusal


async def test_groundedness_fails_a_changed_number_and_passes_the_faithful_answer(
    index: SimilarityIndex,
) -> None:
    judge = Groundedness(index)
    faithful = JudgeCase(
        "r1", QUESTION, "Employees with six months of service get 16 weeks of paid parental leave.", PASSAGES
    )
    changed = JudgeCase(
        "r2", QUESTION, "Employees with six months of service get 18 weeks of paid parental leave.", PASSAGES
    )
    french = JudgeCase(
        "r3", QUESTION, "Les salariés ayant six mois d'ancienneté ont droit à 16 semaines de congé.", PASSAGES
    )
    assert (await judge.judge(faithful)).rating == "yes"
    v = await judge.judge(changed)
    assert v.rating == "no" and "18" in v.rationale and v.score is not None and v.score < 1
    assert (await judge.judge(french)).rating == "yes", (
        "a French answer to English passages is judged on its facts"
    )
    refusal = JudgeCase("r4", QUESTION, "The documents do not say.", PASSAGES)
    assert (await judge.judge(refusal)).rating == "yes"


async def test_relevance_fails_an_answer_drawn_from_the_wrong_sentence(index: SimilarityIndex) -> None:
    judge = RelevanceToQuery(index)
    on_topic = JudgeCase("r1", QUESTION, "They get 16 weeks of paid parental leave at full salary.", PASSAGES)
    off_topic = JudgeCase(
        "r2", QUESTION, "Sick leave of more than 3 days needs a medical certificate.", PASSAGES
    )
    assert (await judge.judge(on_topic)).rating == "yes"
    assert (await judge.judge(off_topic)).rating == "no"
    assert (await judge.judge(JudgeCase("r3", QUESTION, "I don't know.", PASSAGES))).rating == "no"
    chunks = await ChunkRelevance(index).judge(on_topic)
    assert chunks.chunk_ratings == ("yes", "no") and chunks.rating == "yes" and chunks.score == 0.5


def test_overall_fails_on_the_first_judge_in_root_cause_order_and_ignores_errors() -> None:
    rating, root, why = overall_of(
        [("safety", "no"), ("relevance_to_query", "no"), ("groundedness", "yes"), ("chunk_relevance", None)]
    )
    assert (rating, root) == ("no", "relevance_to_query") and "chunk_relevance" in why
    assert overall_of([("groundedness", "yes"), ("my_custom", "yes")])[:2] == ("yes", None)
    assert overall_of([("my_custom", "no"), ("guideline_adherence", "no")])[1] == "guideline_adherence"


def test_sampling_is_a_stable_function_of_the_request_id() -> None:
    ids = [f"req-{i}" for i in range(2000)]
    picked = [i for i in ids if sampled(i, 0.25)]
    assert picked == [i for i in ids if sampled(i, 0.25)]
    assert 400 < len(picked) < 600
    assert all(sampled(i, 1.0) for i in ids[:10]) and not any(sampled(i, 0.0) for i in ids[:10])
    s = JudgesSettings(sample_rate=0.5, tenant_sample_rates={"acme": 0.1}, route_sample_rates={"cheap": 0.0})
    assert s.sample_rate_for(tenant="acme", route="cheap") == 0.0
    assert s.sample_rate_for(tenant="acme", route="default") == 0.1
    assert s.sample_rate_for(tenant="other", route=None) == 0.5


def test_a_judged_response_becomes_one_event_per_judge_then_overall_with_stable_ids() -> None:
    response = ResponseCompleted(
        request_id="req-1",
        tenant="acme",
        status="ok",
        question=QUESTION,
        answer="16 weeks.",
        route="default",
        passages=(Passage(number=1, chunk_id="c1", document_id="d1", text=PASSAGES[0]),),
    )
    verdicts = [
        Verdict("groundedness", "yes", 1.0, "ok", version="1@0.84", implementation="support"),
        Verdict("relevance_to_query", "no", 0.7, "off", version="1@0.78", implementation="embedding"),
    ]
    overall = Verdict(
        OVERALL, "no", rationale="failed: relevance_to_query", implementation="rollup", version="1"
    )
    events = judgements_of(response, verdicts, overall, "relevance_to_query", source="stream", source_ref="x")
    again = judgements_of(response, verdicts, overall, "relevance_to_query", source="stream", source_ref="y")
    assert [e.judge for e in events] == ["groundedness", "relevance_to_query", OVERALL]  # type: ignore[attr-defined]
    assert [e.event_id for e in events] == [e.event_id for e in again], "a rerun is recognisably the same"
    assert events[-1].root_cause == "relevance_to_query"  # type: ignore[attr-defined]
    assert all(e.kafka_key() == b"req-1" for e in events)


class _Scripted:
    """A stand-in generator answering fixed text (a unit test of the LLM judge's prompt and
    parsing; the real route runs in the bench and on the stack)."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.calls: list[dict[str, Any]] = []

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def stream(self, route: str, messages: Any, **kw: Any) -> AsyncIterator[GenerationDelta]:
        self.calls.append({"route": route, "messages": messages, **kw})
        yield GenerationDelta(text=self.answer)
        yield GenerationDelta(text="", final=True, finish_reason="stop")


async def test_the_llm_judge_asks_for_schema_json_at_temperature_zero_and_never_guesses() -> None:
    spec = LlmJudgeSpec("groundedness", BUILTIN_PROMPTS["groundedness"])
    case = JudgeCase("r1", QUESTION, "16 weeks.", PASSAGES)
    gen = _Scripted('{"rating": "no", "rationale": "18 is not in the context"}')
    v = await LlmJudge(spec, gen, route="judge").judge(case)
    assert (v.rating, v.rationale, v.implementation) == ("no", "18 is not in the context", "llm:judge")
    call = gen.calls[0]
    assert (
        call["temperature"] == 0.0
        and call["seed"] == 7
        and call["json_schema"]["required"] == ["rating", "rationale"]
    )
    assert "[1] Employees with at least 6 months" in call["messages"][-1]["content"]
    broken = await LlmJudge(spec, _Scripted('{"rating": "maybe"'), route="judge").judge(case)
    assert broken.rating is None and broken.error and "ValueError" in broken.error
    assert parse_judgement('noise {"rating": "YES", "rationale": "fine"}') == ("yes", "fine")


def test_settings_refuse_unknown_judges_and_bad_implementations() -> None:
    with pytest.raises(ValueError, match="unknown judges"):
        JudgesSettings(judges=("groundedness", "vibes"))
    with pytest.raises(ValueError, match="builtin or llm"):
        JudgesSettings(implementations={"groundedness": "gpt"})
    with pytest.raises(ValueError, match="built-in names"):
        JudgesSettings(custom={"safety": {"prompt": "x"}})  # type: ignore[dict-item]
    custom = JudgesSettings(judges=("tone",), custom={"tone": {"prompt": "Is it polite?"}})  # type: ignore[dict-item]
    assert custom.custom["tone"].route == "judge"


def test_backfill_reads_the_passages_back_from_a_prompt_the_template_wrote() -> None:
    from ragstream.backfill import passages_from_prompt
    from ragstream.schemas.queries import RetrievedChunk
    from ragstream.workers.prompt import build_prompt

    chunks = [
        RetrievedChunk(
            chunk_id="a:1:0", document_id="a", title="Leave", headings=("Parental",), text=PASSAGES[0]
        ),
        RetrievedChunk(
            chunk_id="b:1:0", document_id="b", title="Sick leave", text=PASSAGES[1] + "\n\nSecond paragraph."
        ),
    ]
    prompt = build_prompt(
        QUESTION, chunks, count_tokens=lambda t: len(t) // 4, context_window=4096, max_new_tokens=128
    )
    assert passages_from_prompt(list(prompt.messages)) == [PASSAGES[0], PASSAGES[1] + "\n\nSecond paragraph."]
    assert passages_from_prompt([{"role": "user", "content": "no context here"}]) == []
    assert passages_from_prompt(None) == []


async def test_a_context_over_a_judges_window_is_an_error_on_the_judges_that_read_it(
    embedder: E5Embedder,
) -> None:
    from ragstream.infra.judges.panel import JudgePanel

    settings = JudgesSettings(
        judges=("groundedness", "relevance_to_query", "tone"),
        custom={"tone": {"prompt": "Is it polite?", "uses_context": True}},  # type: ignore[dict-item]
        max_context_chars=2000,
        llm_max_context_chars=1000,
    )
    gen = _Scripted('{"rating": "yes", "rationale": "polite"}')
    panel = JudgePanel(settings, embedder, generator=gen)
    answer = "They get 16 weeks of paid parental leave."
    medium = [PASSAGES[0] * 6]  # 1.2k characters: over the LLM judge's window, within the others'
    result = await panel.judge(JudgeCase("r1", QUESTION, answer, medium))
    by = {v.judge: v for v in result.verdicts}
    assert by["groundedness"].rating == "yes" and by["relevance_to_query"].rating == "yes"
    assert by["tone"].rating is None and by["tone"].error and "ContextOverWindow" in by["tone"].error
    assert "llm_max_context_chars" in by["tone"].error and not gen.calls, "the model is never asked"
    result = await panel.judge(JudgeCase("r2", QUESTION, answer, [PASSAGES[0] * 12]))
    by = {v.judge: v for v in result.verdicts}
    assert by["groundedness"].rating is None and "max_context_chars" in str(by["groundedness"].error)
    assert by["relevance_to_query"].rating == "yes", "a judge that does not read the context still rates"
    assert result.overall.rating == "yes", "errors are not failures: the rollup skips them"


async def test_the_judge_waits_while_the_query_path_is_busy_but_not_forever(tmp_path: Any) -> None:
    import json
    import time

    from ragstream.workers.judge import JudgeDeps, busy_reader, yield_to_queries

    beat = tmp_path / "worker-generate.json"
    busy = busy_reader([beat, tmp_path / "missing.json"])
    assert not busy(), "no heartbeat here (another machine): never wait"
    beat.write_text(json.dumps({"ts": time.time(), "inflight": 1}))
    assert busy()
    deps = JudgeDeps(settings=JudgesSettings(max_yield_s=0.3), panel=None, queries_busy=busy)
    assert 0.3 <= await yield_to_queries(deps) < 0.6, "bounded by max_yield_s"
    beat.write_text(json.dumps({"ts": time.time() - 30, "inflight": 1}))
    assert not busy(), "a stale heartbeat is not a busy query path"
    beat.write_text(json.dumps({"ts": time.time(), "inflight": 0}))
    assert await yield_to_queries(deps) == 0.0

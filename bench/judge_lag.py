"""Issue 12: the judges' lag and cost, and what they take from the query path.

One embedded stack. The same questions, streamed one at a time, alternate in blocks between
judges *on* (the judge stage running) and judges *off* (its worker process paused with
SIGSTOP: the stage shares the process with ingestion, which is idle while questions run, so
pausing it touches nothing on the query path). Measured:
- time to first token, on against off, side by side;
- judge lag, from the response's completion to its `overall` judgement's row in Iceberg
  (`logged_at`), for requests asked while judges were on: target p99 <= 30 s;
- each judge's latency, and the judgements per second one judge stage delivers.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import REPO, BenchStack, Results, console, verdict
from bench.guard_latency import _ask
from bench.qa import pct, questions
from ragstream.client import AsyncClient
from ragstream.ingest import ingest

TARGET_LAG_P99_S = 30.0
BLOCK = 2
"""Questions per block: a paused worker must stay within the supervisor's liveness grace
(30 s), or it is restarted as unresponsive."""


def _judge_process(data_dir: Path) -> psutil.Process:
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        try:
            if "worker" in cmd and "judge" in cmd and p.environ().get("RAGSTREAM_DATA_DIR") == str(data_dir):
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise RuntimeError("no judge worker process")


async def _measure(settings: Any, data_dir: Path, rounds: int) -> dict[str, Any]:
    qs = questions()
    out: dict[str, Any] = {"on": [], "off": [], "on_ids": []}
    judge = _judge_process(data_dir)
    async with AsyncClient(settings) as client:
        for q in qs[:2]:
            await _ask(client, q, None)
        for block in range(rounds):
            # Blocks come in pairs that ask the same questions, in alternating order (on/off,
            # off/on, ...), so a question's TTFT with judges on is compared with its own
            # TTFT with judges off.
            pair = block // 2
            side = ("on", "off")[(block + pair) % 2]
            if side == "off":
                os.kill(judge.pid, signal.SIGSTOP)
            try:
                for i in range(BLOCK):
                    q = qs[(pair * BLOCK + i) % len(qs)]
                    ttft, _, final = await _ask(client, q, None)
                    if final.status == "ok":
                        out[side].append(ttft)
                        out.setdefault("paired", {}).setdefault(f"{pair}:{i}", {})[side] = ttft
                        if side == "on":
                            out["on_ids"].append(final.request_id)
            finally:
                if side == "off":
                    os.kill(judge.pid, signal.SIGCONT)
    return out


def main(argv: list[str] | None = None) -> None:
    rounds = int(argv[0]) if argv else 16
    with tempfile.TemporaryDirectory() as tmp:
        # No prompt cache (a repeated question would be faster the second time) and no
        # no-context shortcut (every question is generated).
        stack = BenchStack.create(
            Path(tmp),
            RAGSTREAM_GENERATION__CACHE_PROMPT="false",
            RAGSTREAM_GENERATION__MIN_CONTEXT_RELEVANCE="0",
        )
        stack.up()
        try:
            ingest(
                stack.settings,
                [REPO / "samples" / "corpus" / "larkspur" / "public"],
                tenant="larkspur",
                timeout_s=300,
            )
            m = asyncio.run(_measure(stack.settings, Path(tmp), rounds))
            ids = ", ".join(f"'{i}'" for i in m["on_ids"])
            deadline = time.monotonic() + 120
            rows: list[dict[str, Any]] = []
            while time.monotonic() < deadline:
                sql = (
                    "SELECT j.request_id, j.judge, j.latency_ms, "
                    "epoch_ms(j.logged_at) - epoch_ms(i.completed_at) AS lag_ms "
                    "FROM judgements j JOIN inference_log i ON i.request_id = j.request_id "
                    f"WHERE j.request_id IN ({ids})"
                )
                out = stack.cli("sql", sql, "--format", "json").stdout
                rows = [json.loads(line) for line in out.splitlines() if line.strip()]
                if sum(r["judge"] == "overall" for r in rows) >= len(m["on_ids"]):
                    break
                time.sleep(3)
        finally:
            stack.down()
    res = Results()
    res.raw = {"ttft_on": m["on"], "ttft_off": m["off"], "paired": m.get("paired"), "judgements": rows}
    on, off = m["on"], m["off"]
    res.add(
        "questions (paired blocks of 2, alternating order)", f"{len(on)} judges on / {len(off)} judges off"
    )
    res.add(
        "time to first token p50 / p99: judges on vs off",
        f"{statistics.median(on):.0f} / {pct(on, 99):.0f} vs {statistics.median(off):.0f} / {pct(off, 99):.0f} ms"
        f" (difference at p50 {statistics.median(on) - statistics.median(off):+.0f} ms)",
        "no difference beyond noise",
    )
    # Paired: each question's TTFT with judges on minus its own with judges off; the 95%
    # bootstrap interval of the median difference says whether it is beyond noise.
    diffs = [p["on"] - p["off"] for p in m.get("paired", {}).values() if "on" in p and "off" in p]
    if diffs:
        rng = random.Random(7)
        boots = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(2000))
        lo, hi = boots[50], boots[1949]
        res.add(
            "time to first token, judges on minus off, same question: median [95% interval]",
            f"{statistics.median(diffs):+.0f} ms [{lo:+.0f}, {hi:+.0f}] over {len(diffs)} pairs",
            "interval contains 0",
            verdict(lo <= 0 <= hi),
        )
    lags = [r["lag_ms"] / 1000 for r in rows if r["judge"] == "overall" and r["lag_ms"] is not None]
    judged = len(lags)
    res.add("requests judged (asked while judges were on)", f"{judged} of {len(m['on_ids'])}")
    if lags:
        res.add(
            "judge lag, response -> overall judgement's Iceberg row: p50 / p99",
            f"{statistics.median(lags):.1f} / {pct(lags, 99):.1f} s",
            f"p99 <= {TARGET_LAG_P99_S:.0f} s",
            verdict(pct(lags, 99) <= TARGET_LAG_P99_S),
        )
    for name in sorted({r["judge"] for r in rows} - {"overall"}):
        lat = [r["latency_ms"] for r in rows if r["judge"] == name]
        res.add(
            f"{name}: latency p50 / p99, judgements per second (one at a time)",
            f"{statistics.median(lat):.0f} / {pct(lat, 99):.0f} ms, {1000 / max(statistics.median(lat), 1e-3):.1f}/s",
        )
    res.print("judges: lag and cost, and the query path with judges on vs off (issue 12)")
    console.print(f"saved {res.save('judge_lag')}")


if __name__ == "__main__":
    main(sys.argv[1:])

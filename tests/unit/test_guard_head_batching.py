"""The guard head's batcher: concurrent texts go to the embedder together, one batch at a
time; a text already on its way is not sent twice; a budget counts from when a text's batch
is sent, not while it waits behind another. The embedder is a stand-in that records its
calls (the real e5 on Triton is exercised by the guardrail integration tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest

from ragstream.infra.guard.head import EmbeddingHead


class _Embedder:
    model_id = "fake"
    dimension = 4

    def __init__(self, call_s: float = 0.0) -> None:
        self.calls: list[list[str]] = []
        self.call_s = call_s
        self.in_flight = 0
        self.most_in_flight = 0
        self.hang_calls = 0
        """How many of the next calls never return."""
        self.fail: Exception | None = None

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.calls.append(list(texts))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.hang_calls:
                self.hang_calls -= 1
                await asyncio.Event().wait()
            await asyncio.sleep(self.call_s)
            if self.fail is not None:
                raise self.fail
            return np.array([[len(t), 1.0, 0.0, 0.0] for t in texts], dtype=np.float32)
        finally:
            self.in_flight -= 1


async def test_a_burst_of_texts_goes_in_batches_one_at_a_time_and_each_text_once() -> None:
    emb = _Embedder(call_s=0.05)
    head = EmbeddingHead(emb)  # type: ignore[arg-type]
    texts = [f"question {i}" for i in range(100)]
    try:
        # Each text asked by two rails at once, as the safety and injection rails do.
        got = await asyncio.gather(*(head.vector(t, budget_s=1.0) for t in texts for _ in range(2)))
    finally:
        await head.close()
    sent = [t for call in emb.calls for t in call]
    assert sorted(sent) == sorted(texts), "every text embedded exactly once"
    assert len(emb.calls) < 10, f"{len(emb.calls)} calls for 100 texts"
    assert emb.most_in_flight == 1
    for t, v in zip([t for t in texts for _ in range(2)], got, strict=True):
        assert v[0] == pytest.approx(len(t) / np.sqrt(len(t) ** 2 + 1))
    # Remembered: asking again calls nothing.
    await head.vector(texts[0], budget_s=1.0)
    assert len(emb.calls) == len({tuple(c) for c in emb.calls})


async def test_the_budget_counts_from_when_the_batch_is_sent_not_the_wait_before_it() -> None:
    emb = _Embedder(call_s=0.3)
    head = EmbeddingHead(emb)  # type: ignore[arg-type]
    try:
        first = asyncio.create_task(head.vector("first", budget_s=0.5))
        await asyncio.sleep(0.01)  # "first" is on the embedder; "second" waits 0.3 s for it
        second = await head.vector("second", budget_s=0.5)
        assert second.shape == (4,)
        await first
        assert emb.calls == [["first"], ["second"]]
    finally:
        await head.close()


async def test_a_stuck_embedder_fails_each_text_within_two_budgets() -> None:
    emb = _Embedder()
    emb.hang_calls = 1000
    head = EmbeddingHead(emb)  # type: ignore[arg-type]
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sent = asyncio.create_task(head.vector("sent", budget_s=0.1))
        await asyncio.sleep(0.01)
        with pytest.raises(TimeoutError):  # queued behind the stuck call, then stuck itself
            await head.vector("queued", budget_s=0.1)
        assert loop.time() - t0 < 0.35
        with pytest.raises(TimeoutError):
            await sent
        assert emb.calls == [["sent"], ["queued"]]
    finally:
        await head.close()


async def test_an_embedder_failure_reaches_every_caller_and_the_next_batch_goes_on() -> None:
    emb = _Embedder(call_s=0.05)
    emb.fail = ConnectionError("triton down")
    head = EmbeddingHead(emb)  # type: ignore[arg-type]
    try:
        results = await asyncio.gather(
            head.vector("a", budget_s=1.0), head.vector("a"), head.vector("b"), return_exceptions=True
        )
        assert all(isinstance(r, ConnectionError) for r in results), results
        emb.fail = None
        assert (await head.vector("a", budget_s=1.0)).shape == (4,)
    finally:
        await head.close()


async def test_a_stuck_call_is_given_up_after_its_longest_budget_and_the_next_batch_goes() -> None:
    emb = _Embedder()
    emb.hang_calls = 1
    head = EmbeddingHead(emb)  # type: ignore[arg-type]
    try:
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(head.vector("first", budget_s=0.2))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(head.vector("second", budget_s=0.2))
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await first
        assert (await second).shape == (4,), "sent once the stuck call was given up"
        assert loop.time() - t0 < 0.3
        assert emb.calls == [["first"], ["second"]]
    finally:
        await head.close()

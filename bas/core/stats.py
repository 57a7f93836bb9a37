"""Intervals for means of per-image scores: the percentile bootstrap, plain or over clusters.

Images of one prompt (its seeds) are not independent draws, so ``bas eval`` resamples prompts with
all their images (a cluster bootstrap); a benchmark that pairs scenes and seeds passes its own
clusters.  Seeded: the same values give the same interval.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 10_000


def bootstrap_interval(values: Sequence[float], *, clusters: Sequence[Hashable] | None = None, confidence: float = 0.95,
                       resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The percentile-bootstrap ``confidence`` interval of the mean of ``values``.

    With ``clusters`` (one label per value) whole clusters are drawn with replacement and the
    statistic is the mean over every value of the drawn clusters, so values that belong together
    (the seeds of one prompt, the prompts of one scene) move together.  One value (or one
    cluster) gives a zero-width interval at the mean; no value gives ``(nan, nan)``.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError("values must be one-dimensional")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    if x.size == 0:
        return float("nan"), float("nan")
    labels = np.arange(x.size) if clusters is None else _codes(clusters, x.size)
    n = int(labels.max()) + 1
    sums = np.bincount(labels, weights=x, minlength=n)
    counts = np.bincount(labels, minlength=n).astype(np.float64)
    if n == 1:
        mean = float(sums[0] / counts[0])
        return mean, mean
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def _codes(clusters: Sequence[Hashable], size: int) -> np.ndarray:
    if len(clusters) != size:
        raise ValueError(f"{len(clusters)} cluster labels for {size} values; give one label per value")
    index: dict[Hashable, int] = {}
    return np.array([index.setdefault(c, len(index)) for c in clusters], dtype=np.int64)


def summarize(values: Sequence[float], *, clusters: Sequence[Hashable] | None = None, confidence: float = 0.95,
              resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """``{"mean", "low", "high", "n"}``: the mean and its bootstrap interval (``n`` values)."""
    x = np.asarray(values, dtype=np.float64)
    low, high = bootstrap_interval(x, clusters=clusters, confidence=confidence, resamples=resamples, seed=seed)
    return {"mean": float(x.mean()) if x.size else float("nan"), "low": low, "high": high, "n": int(x.size)}

"""Intervals for means of per-image scores: the percentile bootstrap, plain, over clusters, or nested;
a test over scene means; Holm's correction of a family of tests.

Images of one prompt (its seeds) are not independent draws, so ``bas eval`` resamples prompts with
all their images (a cluster bootstrap).  A benchmark whose values are nested (scenes, extraction
seeds within a scene, generation seeds within an extraction) resamples every level within the one
above it (:func:`nested_bootstrap_means`).  Seeded: the same values give the same interval.

With 8-12 scenes the percentile bootstrap is too narrow (its spread is the plug-in one, with no
small-sample correction), so a benchmark checks it against a test over the scene means
(:func:`scene_test`: Wilcoxon's signed-rank test and a t-interval).  :func:`holm_adjusted` and
:func:`holm_confidences` correct a family of such tests: the p-values, and the confidence of each
hypothesis' interval.
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


def nested_bootstrap_means(values, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """``resamples`` means of ``values`` under the hierarchical bootstrap of a balanced design.

    ``values`` has one axis per level, outermost first, such as ``(scenes, extraction seeds,
    generation seeds)``.  Each resample draws the outer level with replacement, then, for every
    drawn unit independently, its units of the next level with replacement, and so on down to
    the last axis; the statistic is the mean over everything drawn.  A level that should not be
    resampled is averaged out by the caller before.  Values must be finite.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 0 or x.size == 0:
        raise ValueError("values must have at least one axis and one value")
    if not np.isfinite(x).all():
        raise ValueError("values must be finite; leave out or fill the missing ones before resampling")
    rng = np.random.default_rng(seed)
    index = []
    for depth, size in enumerate(x.shape):
        draws = rng.integers(0, size, size=(resamples,) + x.shape[: depth + 1])  # one draw per unit of the level above
        index.append(draws.reshape(draws.shape + (1,) * (x.ndim - depth - 1)))
    return x[tuple(index)].reshape(resamples, -1).mean(axis=1)


def nested_summary(values, *, confidence: float = 0.95, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """``{"mean", "low", "high", "p", "n"}`` of the mean of nested ``values`` (see :func:`nested_bootstrap_means`).

    ``low``/``high``: the percentile-bootstrap ``confidence`` interval.  ``p``: the two-sided
    bootstrap p-value of "the mean is 0" (twice the smaller share of resampled means on either side
    of 0, counted as ``(k + 1) / (resamples + 1)``, at most 1), for values that are paired
    differences; ``n``: how many values.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    x = np.asarray(values, dtype=np.float64)
    means = nested_bootstrap_means(x, resamples=resamples, seed=seed)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    tail = min(int((means <= 0).sum()), int((means >= 0).sum()))
    p = min(1.0, 2 * (tail + 1) / (resamples + 1))  # +1: a finite number of resamples never shows p = 0
    return {"mean": float(x.mean()), "low": float(low), "high": float(high), "p": p, "n": int(x.size)}


def holm(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Which hypotheses the Holm-Bonferroni procedure rejects at family-wise error ``alpha``."""
    return [p <= alpha for p in holm_adjusted(p_values)]


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's adjusted p-values: the i-th smallest of m becomes ``max over j <= i of (m - j + 1) p_(j)``, at most 1.
    A hypothesis is rejected at family-wise error ``alpha`` where its adjusted p is at most ``alpha``."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (p.size - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def holm_confidences(p_values: Sequence[float], alpha: float = 0.05) -> list[float]:
    """Each hypothesis' interval confidence under Holm: the i-th smallest p of m gets ``1 - alpha / (m - i + 1)``,
    so the interval of the strongest result is the Bonferroni one and that of the weakest the plain ``1 - alpha``."""
    order = np.argsort(np.asarray(p_values, dtype=np.float64), kind="stable")
    confidences = [0.0] * len(order)
    for rank, i in enumerate(order):
        confidences[i] = 1 - alpha / (len(order) - rank)
    return confidences


def scene_test(values, *, confidence: float = 0.95) -> dict:
    """The test of "the mean is 0" over scene means, for paired differences with the scenes on the first axis.

    ``{"n", "mean", "p", "direction", "low", "high"}``: ``n`` scenes; ``p`` the two-sided Wilcoxon
    signed-rank test of the scene means (``scipy.stats.wilcoxon``, exact where it can be: no ties,
    no zeros; a scene whose mean is 0 is left out, as Wilcoxon did; all of them 0, or fewer than
    two scenes: 1); ``direction`` the sign of the signed-rank sum (+1, -1 or 0), the side the test
    leans to; ``low``/``high`` the t-interval of the mean of scene means at ``confidence`` (None
    with fewer than two scenes).
    """
    from scipy import stats as scipy_stats

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 0 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError("values must have at least one axis and one value, all finite")
    means = x.reshape(x.shape[0], -1).mean(axis=1)
    n = int(means.size)
    mean = float(means.mean())
    nonzero = means[means != 0]
    if nonzero.size:
        ranks = scipy_stats.rankdata(np.abs(nonzero))
        signed = float(ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum())
        direction = int(np.sign(signed))
    else:
        direction = 0
    p = float(scipy_stats.wilcoxon(nonzero).pvalue) if nonzero.size >= 1 and n >= 2 else 1.0
    if n < 2:
        return {"n": n, "mean": mean, "p": p, "direction": direction, "low": None, "high": None}
    half = float(scipy_stats.t.ppf(1 - (1 - confidence) / 2, n - 1) * means.std(ddof=1) / np.sqrt(n))
    return {"n": n, "mean": mean, "p": p, "direction": direction, "low": mean - half, "high": mean + half}

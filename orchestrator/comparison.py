"""Is one configuration better than another? Two answers in which training seeds count.

The table: for configurations A and B, a[t][s, q] and b[t][s, q] score question q of task t in the
run with training seed s (correct = 1), over the seeds both ran and the questions every run answered;
d[t] = a[t] - b[t]. The gap in macro accuracy is

    Δ = mean_t mean_s mean_q d[t][s, q]

Two-level bootstrap (the hierarchical bootstrap of Davison & Hinkley 1997, §3.8): a resample draws
n_s seeds with replacement, then, for every drawn seed and every task, n_q questions with
replacement (a fresh draw per drawn seed); the same draws serve A and B, so the gap stays paired at
both levels:

    Δ* = mean_t mean_{k=1..n_s} mean_{j=1..n_q} d[t][S_k, Q_kj]

Its 95% percentile interval is reported, and the one-sided p = (#{Δ* ≤ 0} + 1) / (R + 1).

Seed-paired t-test: per seed the macro gap D_s = mean_t mean_q d[t][s, q], and

    t = mean(D) / (sd(D) / √n_s),   n_s - 1 degrees of freedom,   one-sided p = P(T ≥ t)

(none with one seed). Resampling questions alone, each averaged over seeds, leaves the variance
between training runs out and calls gaps certain that a new seed would undo.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# Draws per chunk of resamples (seeds x questions x resamples), to bound memory on large test sets.
_CHUNK_DRAWS = 4_000_000


@dataclass(frozen=True)
class Comparison:
    """A - B in macro accuracy, its two-level bootstrap interval and the seed-paired t-test."""

    delta: float
    low: float
    high: float
    p_value: float
    seeds: int
    questions: int
    resamples: int
    t_statistic: float = math.nan
    t_p_value: float = math.nan

    @property
    def significant(self) -> bool:
        """The 95% interval excludes zero on the side of A."""
        return self.low > 0


def _gaps(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    tasks = sorted(a)
    if sorted(b) != tasks or not tasks:
        raise ValueError(f"the two configurations answered different tasks: {sorted(a)} vs {sorted(b)}")
    gaps = [np.atleast_2d(np.asarray(a[t], dtype=float)) - np.atleast_2d(np.asarray(b[t], dtype=float))
            for t in tasks]
    if len({g.shape[0] for g in gaps}) != 1:
        raise ValueError("every task needs the same seeds")
    return gaps


def seed_paired_t(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """(t, one-sided p) of the per-seed macro gaps D_s; NaN for fewer than two seeds."""
    from scipy import stats

    per_seed = np.mean([g.mean(axis=1) for g in _gaps(a, b)], axis=0)
    if len(per_seed) < 2:
        return math.nan, math.nan
    sd = float(np.std(per_seed, ddof=1))
    if sd == 0.0:  # every seed gives the same gap: no spread to test against
        return math.nan, math.nan
    t = float(per_seed.mean()) / (sd / math.sqrt(len(per_seed)))
    return t, float(stats.t.sf(t, len(per_seed) - 1))


def two_level_bootstrap(
    a: Mapping[str, np.ndarray],
    b: Mapping[str, np.ndarray],
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Compare A with B: `a[task]` and `b[task]` are seeds x questions arrays, rows in the same seed order.

    A one-dimensional array is one seed; with one seed the bootstrap resamples questions only.
    """
    gaps = _gaps(a, b)
    n_seeds = gaps[0].shape[0]
    rng = np.random.default_rng(seed)
    deltas = np.empty(resamples)
    chunk = max(1, _CHUNK_DRAWS // max(n_seeds * g.shape[1] for g in gaps))
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        drawn_seeds = rng.integers(0, n_seeds, size=(size, n_seeds))
        total = np.zeros(size)
        for g in gaps:
            questions = rng.integers(0, g.shape[1], size=(size, n_seeds, g.shape[1]))
            total += g[drawn_seeds[:, :, None], questions].mean(axis=(1, 2))
        deltas[start:start + size] = total / len(gaps)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    t, t_p = seed_paired_t(a, b)
    return Comparison(
        delta=float(np.mean([g.mean() for g in gaps])), low=float(low), high=float(high),
        p_value=float((np.sum(deltas <= 0) + 1) / (resamples + 1)), seeds=n_seeds,
        questions=sum(g.shape[1] for g in gaps), resamples=resamples, t_statistic=t, t_p_value=t_p,
    )

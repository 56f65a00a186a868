"""The statistics every ASR carries: a Wilson interval and a paired exact McNemar test; plus Cohen's κ
between judges (`cohen_kappa`) and the paired sign-flip test of found vs random heads
(`paired_permutation_p`).

An ASR on 100 prompts moves by several points between two runs of equally safe models, so a number
without its uncertainty cannot say whether ablating heads changed anything. Two things answer that:

- `wilson_interval`: the 95% Wilson score interval of a proportion (scipy's `binomtest(...)
  .proportion_ci(method="wilson")`). Chosen over the normal (Wald) interval because it stays inside
  [0, 1] and keeps its coverage at ASRs near 0 or 1 and at small n, where Wald collapses to a point.
- `mcnemar_exact`: baseline and ablated answers are to the *same* prompts, so the right test is
  paired: only prompts whose verdict flips carry information. With b prompts newly jailbroken and c
  newly refused, the exact McNemar p-value is the two-sided binomial test of b successes in b + c
  trials at 1/2 (p = 1 when nothing flips).
"""

from __future__ import annotations

import math

CONFIDENCE = 0.95


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(low, high) Wilson score interval of successes / n; (nan, nan) when n = 0."""
    from scipy.stats import binomtest

    if n <= 0:
        return math.nan, math.nan
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar_exact(newly_jailbroken: int, newly_refused: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts (1.0 when there are none)."""
    from scipy.stats import binomtest

    b, c = int(newly_jailbroken), int(newly_refused)
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5).pvalue)


def cohen_kappa(both: int, only_a: int, only_b: int, neither: int) -> float:
    """Cohen's κ of two binary raters from their 2×2 table (both say yes, only A, only B, neither):
    κ = (p_o − p_e) / (1 − p_e), p_o the observed agreement, p_e the agreement expected from each
    rater's own yes-rate. nan when there are no items or p_e = 1 (both raters constant and equal:
    agreement is not informative)."""
    n = both + only_a + only_b + neither
    if n == 0:
        return math.nan
    p_o = (both + neither) / n
    a_yes, b_yes = (both + only_a) / n, (both + only_b) / n
    p_e = a_yes * b_yes + (1 - a_yes) * (1 - b_yes)
    if p_e >= 1.0:
        return math.nan
    return (p_o - p_e) / (1 - p_e)


def paired_permutation_p(differences, n_resamples: int = 9999, seed: int = 0) -> float:
    """Two-sided p-value of mean(d) = 0 for paired differences d (one per prompt) by a sign-flip
    permutation test (scipy's `permutation_test`, permutation_type="samples"): exact when
    2^n ≤ n_resamples, otherwise Monte Carlo with a fixed seed (the same p on every rerun). Used to
    compare found heads with random heads on the same prompts: d_p = found verdict − mean of the random
    draws' verdicts on prompt p. nan with no pairs; 1.0 when every difference is 0."""
    import numpy as np
    from scipy.stats import permutation_test

    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        return math.nan
    if not np.any(d):
        return 1.0
    res = permutation_test((d, np.zeros_like(d)), lambda x, y, axis: np.mean(x - y, axis=axis),
                           permutation_type="samples", vectorized=True, n_resamples=n_resamples,
                           alternative="two-sided", random_state=np.random.default_rng(seed))
    return float(res.pvalue)

"""The statistics of randomized smoothing (spec sections 3, 4 and 10), all in float64 with SciPy.

- `cp_lower`: the one-sided ``(1 - alpha)`` Clopper-Pearson lower bound used by CERTIFY,
  ``BetaQuantile(alpha; nA, n - nA + 1)`` (0 when ``nA = 0``). It equals the lower end of the
  two-sided exact interval at level ``1 - 2 alpha`` (not ``1 - alpha``, a frequent bug).
- `cp_upper`: the matching one-sided upper bound (used only by sequential mode's early abstention).
- `rcp_lower`: the randomized Clopper-Pearson lower bound (exact mode's ``bound="randomized"``).
- `radius`: ``sigma * Phi^{-1}(pA_lower)``.
- `certify_decision`: abstain below 1/2, else (class, radius); ``pA_lower == 0.5`` gives radius 0.
- `predict_pvalue` / `predict_decision`: PREDICT's exact two-sided binomial test of the top two
  counts against p = 1/2.
"""

from __future__ import annotations

import math

import numpy as np

ABSTAIN = -1


def cp_lower(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound on p from n_a successes in n."""
    from scipy.stats import beta

    n_a, n = int(n_a), int(n)
    if n <= 0 or not 0 <= n_a <= n:
        raise ValueError(f"need 0 <= n_a <= n and n > 0, got n_a={n_a}, n={n}")
    if n_a == 0:
        return 0.0
    return float(beta.ppf(alpha, n_a, n - n_a + 1))


def cp_upper(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper confidence bound on p (1 when n_a = n)."""
    from scipy.stats import beta

    n_a, n = int(n_a), int(n)
    if n <= 0 or not 0 <= n_a <= n:
        raise ValueError(f"need 0 <= n_a <= n and n > 0, got n_a={n_a}, n={n}")
    if n_a == n:
        return 1.0
    return float(beta.ppf(1.0 - alpha, n_a + 1, n - n_a))


def rcp_lower(n_a: int, n: int, alpha: float, u: float) -> float:
    """Randomized (Stevens 1950) one-sided lower confidence bound on p, with ``u ~ Uniform(0, 1)``
    drawn independently of the samples: the p solving ``P_p(X > n_a) + u P_p(X = n_a) = alpha``.

    Guarantee: ``P(rcp_lower(X, n, alpha, U) > p) <= alpha`` for every p, over X ~ Bin(n, p) and U
    (with equality except in the clipped case below): the randomized test is exact where the
    Clopper-Pearson bound is conservative (its coverage is ``>= 1 - alpha``, typically more). It lies
    between ``cp_lower(n_a)`` and ``cp_lower(n_a + 1)``, so it is never looser than Clopper-Pearson.
    For ``n_a == n`` the root ``(alpha / u)^{1/n}`` reaches 1 (an infinite radius) when ``u <= alpha``;
    ``u`` is clipped to ``>= 2 alpha`` there, which only lowers the bound (still valid)."""
    from scipy.optimize import brentq
    from scipy.stats import binom

    n_a, n, u = int(n_a), int(n), float(u)
    if n <= 0 or not 0 <= n_a <= n:
        raise ValueError(f"need 0 <= n_a <= n and n > 0, got n_a={n_a}, n={n}")
    if not 0 <= u <= 1:
        raise ValueError(f"u must be in [0, 1], got {u}")
    if n_a == n:
        return math.exp(math.log(alpha / max(u, 2 * alpha)) / n) if u < 1 else cp_lower(n, n, alpha)

    def g(p: float) -> float:
        return float(binom.sf(n_a, n, p) + u * binom.pmf(n_a, n, p)) - alpha

    lo, hi = cp_lower(n_a, n, alpha), cp_lower(n_a + 1, n, alpha)
    if g(lo) >= 0:           # the root is at the lower bracket (u = 0, or n_a = 0 with u >= alpha)
        return lo
    if g(hi) <= 0:
        return hi
    return float(brentq(g, lo, hi, xtol=1e-16, rtol=4 * np.finfo(float).eps, maxiter=200))


def radius(sigma: float, p_lower: float) -> float:
    """Certified L2 radius ``sigma * Phi^{-1}(p_lower)`` in float64."""
    from scipy.stats import norm

    return float(sigma) * float(norm.ppf(float(p_lower)))


def certify_decision(c_a: int, n_a: int, n: int, alpha: float, sigma: float) -> tuple[int, float, float]:
    """(prediction or ABSTAIN, radius, pA_lower) from the estimation counts of the selected class."""
    p_lower = cp_lower(n_a, n, alpha)
    if p_lower < 0.5:
        return ABSTAIN, 0.0, p_lower
    return int(c_a), radius(sigma, p_lower), p_lower


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can report with n estimation samples: ``sigma Phi^{-1}(alpha^{1/n})``."""
    return radius(sigma, math.exp(math.log(alpha) / n))


def predict_pvalue(n1: int, n2: int) -> float:
    """Exact two-sided binomial test p-value of n1 successes in n1 + n2 trials against p = 1/2."""
    from scipy.stats import binomtest

    n1, n2 = int(n1), int(n2)
    if n1 + n2 == 0:
        return 1.0
    return float(binomtest(n1, n1 + n2, 0.5, alternative="two-sided").pvalue)


def top_two(counts) -> tuple[int, int, int, int]:
    """(c1, n1, c2, n2): the two largest counts, ties broken toward the smaller class index."""
    vals = [int(v) for v in counts]
    order = sorted(range(len(vals)), key=lambda k: (-vals[k], k))
    c1 = order[0]
    c2 = order[1] if len(order) > 1 else c1
    return c1, vals[c1], c2, (vals[c2] if len(order) > 1 else 0)


def predict_decision(counts, alpha: float) -> tuple[int, float]:
    """(class or ABSTAIN, p-value): PREDICT returns the top class iff the p-value is <= alpha."""
    c1, n1, _c2, n2 = top_two(counts)
    p = predict_pvalue(n1, n2)
    return (ABSTAIN if p > alpha else c1), p

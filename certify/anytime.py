"""Anytime-valid certification: a confidence sequence on pA and the stopping rule that decides,
for each example, its certificate at every requested radius with as few noise samples as possible.

**The confidence sequence** (`BetaMixtureCS`). Given the class ``cA`` (chosen from the independent
selection sample), the estimation samples are i.i.d. Bernoulli(pA) indicators ``f(x + eps) == cA``.
For a candidate value ``p`` the mixture likelihood ratio

    M_t(p) = integral over q of prod_{i <= t} (q / p)^{X_i} ((1 - q) / (1 - p))^{1 - X_i} dpi(q)

is a nonnegative martingale with mean 1 under ``pA = p`` (each integrand is), and depends on the
samples only through ``S_t = sum X_i`` and ``t``. The prior ``pi`` is a Beta(a, b) density plus point
masses at q = 0 and q = 1 (weight ``edge / 2`` each; the q = 1 atom makes an all-success run reach a
bound after ``log(2 / (edge alpha)) / log(1 / p)`` samples, close to the fixed-n optimum
``log(1 / alpha) / log(1 / p)``). By Ville's inequality ``P(exists t: M_t(pA) >= 1 / alpha) <= alpha``,
so ``C_t = {p : M_t(p) < 1 / alpha}`` contains pA at **every t simultaneously** with probability
``>= 1 - alpha``. ``log M_t`` is convex in p (a sum of log-convex terms), so ``C_t = (L_t, U_t)`` is an
interval around ``S_t / t``, found by bisection (`BetaMixtureCS.bounds`).

**The stopping rule** (`Anytime`, `AnytimeRun`). The requested radii ``r_1 < ... < r_R`` are
thresholds ``p_j = Phi(r_j / sigma)`` on pA (and 1/2 for r = 0: certified at all vs abstain). The
estimation sample is looked at after ``t_1 < t_2 < ...`` samples (multiples of the noise block,
growing by ``growth``; every look is free: the bound is valid at all t). After each look, with
``L = max_{k} L_{t_k}`` and ``U = min_k U_{t_k}``, threshold ``p_j`` is *decided* when

- ``L >= p_j`` (certified at ``r_j``), or ``U < p_j`` (it cannot be: pA < p_j), or
- it is *unreachable*: even if the remaining samples up to the cap ``n`` succeeded at rate ``U``
  (``futility="projected"``, the default; at rate 1 with ``"optimistic"``), the Clopper-Pearson
  bound at the cap at the full alpha -- exact mode's bound -- would stay below ``p_j``: exact mode at
  the same ``n`` would (w.h.p.) not certify it either. With rate 1, the table radii beyond
  ``sigma Phi^-1(alpha^{1/n})`` are decided at the first look.

An example stops as soon as every threshold is decided (``stopped = "settled"``; ``"futile"`` when
``U < 1/2`` or 1/2 is unreachable: it abstains), or at the cap ``n`` (``"final"``). With ``precision``
set (question (b): the radius itself) it also needs ``r(U) - r(L) <= precision`` (or no further
progress possible by the cap). Optionally ``final_share`` of alpha is kept for a Clopper-Pearson
bound at the cap (the same counts exact mode sees), the confidence sequence getting the rest.

**The guarantee.** On the event that pA lies in every ``C_t`` (probability ``>= 1 - alpha_cs``) and,
when ``final_share > 0``, the final Clopper-Pearson bound holds (probability ``>= 1 - alpha_final``),
every reported lower bound is ``<= pA`` whatever the (data-dependent) stopping look; by the union
bound this event has probability ``>= 1 - alpha``. So the certificate statement is exactly exact
mode's: with probability ``>= 1 - alpha`` the method abstains or returns ``g(x)`` with a valid radius
``sigma Phi^-1(L)``. In addition ``U`` is a valid upper bound on the same event, so a threshold
decided "not certified" by ``U < p_j`` is wrong with probability ``<= alpha`` too (wrong decisions of
either kind together: ``<= alpha``). Stopping at a cap or for unreachability only costs utility.

**What the numbers mean.** ``samples`` = n0 + estimation samples actually drawn (``n`` in the record),
``looks`` = number of looks, ``stopped`` as above. The radius is a lower bound that is only as tight
as the decision needs: certified accuracy at the requested radii is comparable to exact mode's (up to
the examples whose pA sits within the sampling error of a threshold), but ACR and the fine curve
between table radii are lower than exact mode's and must not be compared across modes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import betaln
from scipy.stats import norm

from bastion.errors import ConfigError
from certify.stats import cp_lower

_BISECT = 64


@dataclass(frozen=True)
class BetaMixtureCS:
    """Two-sided confidence sequence for a Bernoulli mean from ``(S_t, t)`` (see module docstring).

    Prior: ``(1 - edge)`` Beta(a, b) + ``edge / 2`` at q = 0 + ``edge / 2`` at q = 1."""

    a: float = 0.5
    b: float = 0.5
    edge: float = 0.5

    def __post_init__(self) -> None:
        if not (self.a > 0 and self.b > 0 and 0 <= self.edge < 1):
            raise ConfigError(f"mixture prior needs a, b > 0 and 0 <= edge < 1, got {self}")

    def log_m(self, s: np.ndarray, t: np.ndarray, p: np.ndarray) -> np.ndarray:
        """``log M_t(p)`` elementwise (float64; +inf where p is impossible given the data)."""
        s, t, p = (np.asarray(v, dtype=np.float64) for v in (s, t, p))
        f = t - s
        with np.errstate(divide="ignore", invalid="ignore"):
            lp, l1p = np.log(p), np.log1p(-p)
            lik = -np.where(s > 0, s * lp, 0.0) - np.where(f > 0, f * l1p, 0.0)
            terms = [math.log1p(-self.edge) + betaln(self.a + s, self.b + f) - betaln(self.a, self.b) + lik]
            if self.edge > 0:
                half = math.log(self.edge / 2)
                terms.append(np.where(f == 0, half - t * lp, -np.inf))
                terms.append(np.where(s == 0, half - t * l1p, -np.inf))
            return np.logaddexp.reduce(np.stack(terms), axis=0)

    def bounds(self, s: Sequence[int] | np.ndarray, t: Sequence[int] | np.ndarray,
               alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """(L_t, U_t) per element: the ends of ``{p : M_t(p) < 1/alpha}`` (float64, bisection to ~1e-19)."""
        s = np.atleast_1d(np.asarray(s, dtype=np.float64))
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        if np.any(t <= 0) or np.any(s < 0) or np.any(s > t):
            raise ValueError("need 0 <= S <= t and t > 0")
        c = math.log(1.0 / alpha)
        phat = s / t
        # lower end: the largest p in [0, phat] with log M >= c (log M decreases on [0, phat])
        lo, hi = np.zeros_like(phat), phat.copy()
        for _ in range(_BISECT):
            mid = 0.5 * (lo + hi)
            out = self.log_m(s, t, mid) >= c
            lo, hi = np.where(out, mid, lo), np.where(out, hi, mid)
        lower = np.where(s > 0, lo, 0.0)
        lo, hi = phat.copy(), np.ones_like(phat)
        for _ in range(_BISECT):
            mid = 0.5 * (lo + hi)
            out = self.log_m(s, t, mid) >= c
            lo, hi = np.where(out, lo, mid), np.where(out, mid, hi)
        upper = np.where(s < t, hi, 1.0)
        return lower, upper


STOP_REASONS = ("settled", "futile", "final")
FUTILITY = ("projected", "optimistic")


@dataclass(frozen=True)
class Anytime:
    """Options of anytime mode (see the module docstring).

    ``radii``: the radii whose certificate must be decided (the report's table); ``precision``:
    optionally also the radius to within this many L2 units; ``first``: first look (estimation
    samples); ``growth``: each look is at least ``growth`` x the previous one; ``final_share``: the
    share of alpha kept for a Clopper-Pearson bound at the cap; ``futility``: how the bound still
    reachable at the cap is projected ("optimistic": every remaining sample a success; "projected":
    successes at the rate U, the upper confidence bound); ``prior``: the mixture."""

    radii: tuple[float, ...] = ()
    precision: float | None = None
    first: int = 100
    growth: float = 1.1
    final_share: float = 0.0
    futility: str = "projected"
    prior: BetaMixtureCS = BetaMixtureCS()

    def __post_init__(self) -> None:
        if self.first < 1:
            raise ConfigError("anytime first look must be >= 1 sample")
        if not self.growth > 1:
            raise ConfigError(f"anytime growth must be > 1, got {self.growth}")
        if not 0 <= self.final_share < 1:
            raise ConfigError(f"anytime final_share must be in [0, 1), got {self.final_share}")
        if self.futility not in FUTILITY:
            raise ConfigError(f"anytime futility must be one of {FUTILITY}, got {self.futility!r}")
        if self.precision is not None and not self.precision > 0:
            raise ConfigError(f"anytime precision must be > 0, got {self.precision}")
        if any(not (math.isfinite(r) and r >= 0) for r in self.radii):
            raise ConfigError(f"anytime radii must be finite and >= 0, got {self.radii}")

    def thresholds(self, sigma: float) -> np.ndarray:
        """Sorted thresholds on pA: 1/2 and ``Phi(r / sigma)`` for every positive requested radius."""
        ps = {0.5} | {float(norm.cdf(r / sigma)) for r in self.radii if r > 0}
        return np.array(sorted(ps), dtype=np.float64)

    def schedule(self, n: int, block: int) -> list[int]:
        """Look sizes (estimation samples): multiples of ``block`` (the last is n), growing by ``growth``."""
        up = lambda v: min(n, -(-int(v) // block) * block)  # noqa: E731
        sizes = [max(up(self.first), min(n, block))]
        while sizes[-1] < n:
            sizes.append(max(up(math.ceil(sizes[-1] * self.growth)), min(n, sizes[-1] + block)))
        return sizes


def _cp_lower_vec(s: np.ndarray, t: np.ndarray, alpha: float) -> np.ndarray:
    """`certify.stats.cp_lower` elementwise."""
    from scipy.stats import beta

    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        out = beta.ppf(alpha, s, t - s + 1)
    return np.where(s > 0, out, 0.0)


class AnytimeRun:
    """The state of anytime mode for ``m`` examples (vectorized; drives no sampling itself).

    Each round: `targets` gives every active example's next look size; the caller counts the new
    samples and calls `observe` with the cumulative successes ``s`` (counts of cA) at those sizes.
    The certifier (`certify.smoothing.Smooth`) and the Bernoulli-oracle simulation
    (`benchmarks/anytime_sim.py`) both drive this class, so they share every decision."""

    def __init__(self, rule: Anytime, m: int, n: int, alpha: float, sigma: float, block: int):
        self.rule, self.n, self.alpha, self.sigma = rule, int(n), float(alpha), float(sigma)
        self.alpha_final = alpha * rule.final_share
        self.alpha_cs = alpha - self.alpha_final
        self.sizes = rule.schedule(self.n, block)
        self.thr = rule.thresholds(sigma)
        self.look = np.zeros(m, dtype=np.int64)         # looks done
        self.t = np.zeros(m, dtype=np.int64)
        self.s = np.zeros(m, dtype=np.int64)
        self.lower = np.zeros(m)
        self.upper = np.ones(m)
        self.stopped = np.array([""] * m, dtype=object)

    @property
    def active(self) -> np.ndarray:
        return np.flatnonzero(self.stopped == "")

    def targets(self) -> np.ndarray:
        """Next look size of each active example (same order as `active`)."""
        return np.array([self.sizes[k] for k in self.look[self.active]], dtype=np.int64)

    def _final_lower(self, s: np.ndarray, t: np.ndarray) -> np.ndarray:
        return np.array([cp_lower(int(a), int(b), self.alpha_final) for a, b in zip(s, t)])

    def observe(self, idx: np.ndarray, s: np.ndarray, t: np.ndarray) -> None:
        """Record cumulative successes ``s`` after ``t`` samples for examples ``idx`` and decide."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return
        s, t = np.asarray(s, dtype=np.int64), np.asarray(t, dtype=np.int64)
        self.s[idx], self.t[idx] = s, t
        self.look[idx] += 1
        lo, up = self.rule.prior.bounds(s, t, self.alpha_cs)
        at_cap = t >= self.n
        if self.alpha_final > 0 and at_cap.any():
            lo[at_cap] = np.maximum(lo[at_cap], self._final_lower(s[at_cap], t[at_cap]))
        self.lower[idx] = np.maximum(self.lower[idx], lo)
        self.upper[idx] = np.minimum(self.upper[idx], up)
        L, U = self.lower[idx], self.upper[idx]
        # the best lower bound still plausible at the cap: the remaining samples succeed at rate U
        # (rate 1 with futility="optimistic"), bounded as generously as exact mode would (Clopper-Pearson
        # at the full alpha); a threshold beyond it is one exact mode at the same n would not certify
        rate = np.ones_like(U) if self.rule.futility == "optimistic" else U
        s_best = s + np.floor(rate * (self.n - t)).astype(np.int64)
        cap = np.full_like(t, self.n)
        reach = np.maximum(self.rule.prior.bounds(s_best, cap, self.alpha_cs)[0],
                           _cp_lower_vec(s_best, cap, self.alpha))
        reach = np.maximum(reach, L)
        thr = self.thr[None, :]
        decided = (L[:, None] >= thr) | (U[:, None] < thr) | (reach[:, None] < thr)
        done = decided.all(axis=1)
        if self.rule.precision is not None:
            r = lambda p: self.sigma * norm.ppf(np.clip(p, 0.5, 1.0))  # noqa: E731
            tight = (r(U) - r(L) <= self.rule.precision) | (r(reach) - r(L) <= self.rule.precision)
            done &= tight | (U < 0.5) | (reach < 0.5)
        futile = (U < 0.5) | (reach < 0.5)
        for j, i in enumerate(idx):
            if at_cap[j]:
                self.stopped[i] = "final"
            elif done[j] or futile[j]:
                self.stopped[i] = "futile" if futile[j] and L[j] < 0.5 else "settled"


@dataclass
class SimResult:
    """Outcome of `simulate` for one pA: per seed, estimation samples used and the decisions."""

    p_a: float
    samples: np.ndarray          # (seeds,) estimation samples used
    wrong_certified: np.ndarray  # (seeds,) certified at a threshold above pA (the guarantee's failure)
    wrong_rejected: np.ndarray   # (seeds,) decided "not certified" (U < p_j) at a threshold p_j <= pA
    certified: np.ndarray        # (seeds, thresholds) certified at each threshold

    @property
    def wrong(self) -> np.ndarray:
        return self.wrong_certified | self.wrong_rejected


def simulate(rule: Anytime, p_a: float, seeds: int, n: int, alpha: float, sigma: float,
             rng: np.random.Generator, block: int = 100) -> SimResult:
    """Anytime mode against a Bernoulli oracle of known ``p_a`` (the class cA fixed), through the very
    decision code the certifier runs (`AnytimeRun`); the samples between two looks are drawn as one
    Binomial (the same law as their sum)."""
    run = AnytimeRun(rule, seeds, n, alpha, sigma, block)
    while (act := run.active).size:
        tg = run.targets()
        run.observe(act, run.s[act] + rng.binomial(tg - run.t[act], p_a), tg)
    thr = run.thr[None, :]
    cert = run.lower[:, None] >= thr
    return SimResult(float(p_a), run.t.copy(), (cert & (thr > p_a)).any(axis=1),
                     ((run.upper[:, None] < thr) & (thr <= p_a)).any(axis=1), cert)

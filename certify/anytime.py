"""Anytime-valid certification: for each example, its certificate at every requested radius with as
few noise samples as possible, decided by one-sided sequential tests valid at every sample count.

**Setting.** The class ``cA`` is chosen from the independent selection sample (as in exact mode);
the estimation samples are then i.i.d. Bernoulli(pA) indicators ``f(x + eps) == cA``. The requested
radii ``r_1 < ... < r_R`` are thresholds ``p_j = Phi(r_j / sigma)`` on pA (1/2 for r = 0: certified
at all, else abstain); ``pA >= p_j`` is exactly "the radius ``r_j`` is certified".

**The tests** (`ThresholdTests`). Write ``F_t`` for the failures (samples other than cA) among the
first ``t``, ``f_0 = 1 - p_j``. For a failure rate ``rho f_0`` the likelihood ratio against ``f_0``
is ``LR_t(rho) = rho^F_t ((1 - rho f_0) / (1 - f_0))^(t - F_t)``. Its one-step mean under a true pA
is ``f rho + (1 - f)(1 - rho f_0)/(1 - f_0)`` (``f = 1 - pA``): linear in ``f``, 1 at ``f = f_0``,
increasing in ``f`` when ``rho > 1`` and decreasing when ``rho < 1``. So for ``rho < 1`` it is a
nonnegative supermartingale (mean <= 1) under **every** ``pA <= p_j``, and so is any mixture
``E^up_t = sum_rho w_rho LR_t(rho)`` with ``sum w_rho <= 1`` (the prior: an atom at ``rho = 0``,
``LR = p_j^-t`` while no failure, and ratios from 0.05 to 0.95, where the samples go: pA near a
threshold). By Ville's inequality ``P(exists t: E^up_t >= 1/alpha) <= alpha`` whenever
``pA <= p_j``. Symmetrically ``E^down`` (ratios ``1/rho > 1`` and an atom at pA = 0) tests
``pA < p_j``. Every look is free: the bounds hold at all ``t`` at once, whatever the stopping rule.

**The decisions** (`Anytime`, `AnytimeRun`). The sample is looked at after ``t_1 < t_2 < ...``
estimation samples (multiples of the noise block, growing by ``growth``), up to the cap ``n``.
After each look, threshold ``j`` is

- *certified* once ``E^up_j`` has reached ``1/alpha`` at some look **and** every lower threshold is
  certified (certificates form a prefix: the reported radius is the largest certified ``r_j``,
  ``p_lower = p_j``);
- *provably not* once ``E^down_j`` has reached ``1/alpha`` (then every higher threshold is too);
- *declined* (undecided within the budget; "futility") when exact mode at the cap would, with high
  probability under the data so far, not certify it: with ``k_j`` the least count for which exact
  mode's Clopper-Pearson bound at ``n`` (full alpha) reaches ``p_j`` and ``U`` the upper end of a
  one-sided confidence sequence at level ``gamma`` (`UpperMixtureCS`, the running minimum; ``gamma =
  futility_cs``, by default ``futility``), ``P(S_t + Bin(n - t, U) >= k_j) <= futility``. With
  ``futility = 0`` only thresholds exact mode can no longer reach at all (``S_t + n - t < k_j``)
  are declined. Higher thresholds follow.

An example stops once every threshold is decided (``stopped = "settled"``, or ``"futile"`` when a
decline bet on the remaining samples, i.e. exact mode could still have reached that threshold), else
at the cap (``"final"``; there an undecided threshold is certified by exact mode's Clopper-Pearson
bound on the same counts at the share ``final_share`` of alpha, default 0.2, the tests getting the
rest: near a threshold the tests need more evidence than a fixed-n bound, the price of validity at
every t, and this keeps most of exact mode's answers at the cap). With ``precision`` set (the
radius itself, question (b)) the thresholds also include every multiple of ``precision`` up to the
largest radius reachable at ``n``, so once all are decided the radius is pinned between two
adjacent grid points.

**Proof obligations (the guarantee).**
1. *Certificates* (the only claim exact mode makes): fix pA and let ``j*`` be the first threshold
   with ``p_j* > pA``. A wrong certificate (at any ``j >= j*``) needs ``j*`` certified (prefix rule),
   so ``E^up_j*`` reached ``1/alpha`` at some look (probability ``<= alpha_tests``, Ville, since
   ``pA < p_j*``) or, with ``final_share``, the Clopper-Pearson bound at the cap exceeded pA
   (``<= alpha_final``). Total ``<= alpha``, whatever the data-dependent stopping look: with
   probability ``>= 1 - alpha`` the method abstains or returns ``g(x)`` with a valid radius, exactly
   exact mode's statement.
2. *"Provably not"* decisions: wrong only if ``E^down_{j*-1}`` reached ``1/alpha`` while
   ``pA >= p_{j*-1}``: ``<= alpha`` on its own (the two kinds concern different tests, so the
   probability of a wrong decision of either kind is ``<= 2 alpha`` by the union bound; measured
   far below alpha, `benchmarks/anytime_sim.py`). They only stop sampling: declining to certify is
   always safe.
3. *Declines* make no claim (not certified, like exact mode's abstentions). Against exact mode at
   the same ``n`` (the same noise stream, the tests' samples are a prefix of it): on the event that
   the confidence sequence holds (``>= 1 - gamma``) the rest of exact mode's samples are
   stochastically below ``Bin(n - t, U)``, and they are independent of the data that decided, so
   ``P(declined at p_j but exact mode would certify p_j) <= gamma + futility`` (0.1 by default) per
   example and threshold; measured far lower (`benchmarks/anytime_sim.py`).

**What the numbers mean.** ``samples`` = n0 + estimation samples drawn (``n`` of the record),
``looks``, ``stopped`` as above. The radius is the largest certified requested radius (a lower
bound, as tight as the decisions need): compare certified accuracy at the requested radii with exact
mode, not ACR or the fine curve. Near a threshold (pA within the sampling error of ``p_j`` at ``n``)
the two modes can disagree either way: exact mode's own answer there is a coin flip of the noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import betaln
from scipy.stats import beta as beta_dist
from scipy.stats import binom, norm

from bastion.errors import ConfigError
from certify.stats import cp_lower

_BISECT = 64


def _as_counts(s: Sequence[int] | np.ndarray, t: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Successes ``s`` and sample counts ``t`` as float64 arrays (1-d at least), checked: 0 <= s <= t, t > 0."""
    s = np.atleast_1d(np.asarray(s, dtype=np.float64))
    t = np.atleast_1d(np.asarray(t, dtype=np.float64))
    if np.any(t <= 0) or np.any(s < 0) or np.any(s > t):
        raise ValueError("need 0 <= S <= t and t > 0")
    return s, t


@dataclass(frozen=True)
class BetaMixtureCS:
    """Two-sided confidence sequence for a Bernoulli mean from ``(S_t, t)``.

    ``M_t(p) = integral over q of prod_i (q / p)^X_i ((1 - q) / (1 - p))^(1 - X_i) dpi(q)`` is a
    nonnegative martingale of mean 1 under ``pA = p``; by Ville ``{p : M_t(p) < 1/alpha}`` contains pA
    at every t at once with probability ``>= 1 - alpha``. ``log M_t`` is convex in p, so the set is an
    interval around ``S_t / t``. Prior: ``(1 - edge)`` Beta(a, b) + ``edge / 2`` at q = 0 and at q = 1.
    The decline rule's sequence before `UpperMixtureCS` (still selectable: ``Anytime(cs=BetaMixtureCS())``)."""

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
        s, t = _as_counts(s, t)
        c = math.log(1.0 / alpha)
        phat = s / t
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


_RATIOS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


@dataclass(frozen=True)
class ThresholdTests:
    """One-sided mixture e-processes at fixed thresholds ``p`` on pA (see the module docstring).

    Alternatives: failure rates ``rho (1 - p)``. The test of ``pA > p`` mixes ``ratios`` (in (0, 1))
    and an atom at ``rho = 0`` (every sample a success) of weight ``zero``; the test of ``pA < p``
    mixes the reciprocal ratios that are possible (``rho (1 - p) < 1``) and an atom at pA = 0 of weight
    ``zero``. The rest of the weight is spread evenly over the ratios."""

    ratios: tuple[float, ...] = _RATIOS
    zero: float = 0.3

    def __post_init__(self) -> None:
        if not self.ratios or any(not 0 < r < 1 for r in self.ratios) or not 0 < self.zero < 1:
            raise ConfigError(f"threshold tests need ratios in (0, 1) and 0 < zero < 1, got {self}")

    def log_e(self, f: np.ndarray, t: np.ndarray, p: np.ndarray, up: bool) -> np.ndarray:
        """``log E_t`` of the test of ``pA > p`` (``up``) or ``pA < p`` from ``f`` failures (samples other
        than cA) in ``t`` samples; float64, elementwise over broadcast ``f, t, p`` (``0 < p < 1``)."""
        f, t, p = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (f, t, p)))
        rat = np.asarray(self.ratios, dtype=np.float64)
        F, S, F0 = f[..., None], (t - f)[..., None], 1.0 - p[..., None]
        rho = rat if up else 1.0 / rat
        with np.errstate(divide="ignore", invalid="ignore"):
            ok = (rho * F0 < 1) & (F0 > 0) & (F0 < 1)
            w = (1 - self.zero) * ok / np.maximum(ok.sum(axis=-1, keepdims=True), 1)
            step = np.log1p(-np.where(ok, rho * F0, 0.0)) - np.log1p(-np.where(F0 < 1, F0, 0.0))
            terms = np.where(w > 0, np.log(w) + F * np.log(rho) + S * step, -np.inf)
            if up:       # pA = 1: (1 / p)^t while no failure
                edge = np.where((f == 0) & (p < 1), math.log(self.zero) - t * np.log(p), -np.inf)
            else:        # pA = 0: (1 / (1 - p))^t while no success
                edge = np.where((t == f) & (p > 0), math.log(self.zero) - t * np.log1p(-p), -np.inf)
        return np.logaddexp(np.logaddexp.reduce(terms, axis=-1), edge)


@dataclass(frozen=True)
class UpperMixtureCS:
    """One-sided confidence sequence: a time-uniform upper bound on pA from ``(S_t, t)``, the decline
    rule's (`AnytimeRun`; it only ever uses an upper end, so a two-sided sequence wastes evidence).

    For a candidate ``p`` (failure rate ``f_0 = 1 - p``) mix the likelihood ratios of failure rates
    ``f_0 / rho`` for ``rho`` in ``ratios`` (those below 1 as a rate) with FIXED weights ``(1 - zero) /
    len(ratios)``, plus an atom at pA = 0 of weight ``zero``: the down test of `ThresholdTests`, except
    that its weights do not depend on p. Under ``pA >= p`` it is a nonnegative supermartingale of mean
    <= 1 (`ThresholdTests`), so by Ville ``P(exists t: E_t(pA) >= 1/alpha) <= alpha``. For fixed data
    every term grows with p (a rarer null failure makes the observed failures more surprising) and
    more ratios become possible, so ``E_t(p)`` is nondecreasing in p: ``{p : E_t(p) < 1/alpha}`` is an
    interval ``[0, U_t)`` and ``pA <= U_t`` at every t at once with probability ``>= 1 - alpha``."""

    ratios: tuple[float, ...] = _RATIOS
    zero: float = 0.3

    def __post_init__(self) -> None:
        if not self.ratios or any(not 0 < r < 1 for r in self.ratios) or not 0 < self.zero < 1:
            raise ConfigError(f"upper confidence sequence needs ratios in (0, 1) and 0 < zero < 1, got {self}")

    def log_e(self, s: np.ndarray, t: np.ndarray, p: np.ndarray) -> np.ndarray:
        """``log E_t(p)`` elementwise over broadcast ``s, t, p`` (float64; ``0 < p < 1``)."""
        s, t, p = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (s, t, p)))
        rho = 1.0 / np.asarray(self.ratios, dtype=np.float64)
        F, S, F0 = (t - s)[..., None], s[..., None], 1.0 - p[..., None]
        w = math.log((1 - self.zero) / len(self.ratios))
        with np.errstate(divide="ignore", invalid="ignore"):
            ok = rho * F0 < 1
            step = np.log1p(-np.where(ok, rho * F0, 0.0)) - np.log1p(-F0)
            terms = np.where(ok, w + F * np.log(rho) + S * step, -np.inf)
            edge = np.where(s == 0, math.log(self.zero) - t * np.log1p(-p), -np.inf)
        return np.logaddexp(np.logaddexp.reduce(terms, axis=-1), edge)

    def bounds(self, s: Sequence[int] | np.ndarray, t: Sequence[int] | np.ndarray,
               alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """(0, U_t) per element (the interface of `BetaMixtureCS`; no lower end): bisection on p."""
        s, t = _as_counts(s, t)
        c = math.log(1.0 / alpha)
        lo, hi = s / t, np.ones_like(s)            # E_t(S_t / t) <= 1 < 1/alpha: the estimate is inside
        for _ in range(_BISECT):
            mid = 0.5 * (lo + hi)
            out = self.log_e(s, t, mid) >= c
            lo, hi = np.where(out, lo, mid), np.where(out, mid, hi)
        return np.zeros_like(s), np.where(s < t, hi, 1.0)


STOP_REASONS = ("settled", "futile", "final")


@dataclass(frozen=True)
class Anytime:
    """Options of anytime mode (see the module docstring).

    ``radii``: the radii whose certificate must be decided (the report's table); ``precision``:
    optionally also the radius to within this many L2 units; ``first``: first look (estimation
    samples); ``growth``: each look is at least ``growth`` x the previous one; ``futility``: the tail
    probability of the decline rule (0: decline only what exact mode can no longer reach);
    ``futility_cs``: the level of its confidence sequence (default: ``futility``); ``final_share``: the
    share of alpha kept for exact mode's Clopper-Pearson bound at the cap; ``tests``: the mixture
    priors; ``cs``: the confidence sequence of the decline rule. The defaults (growth 1.05, futility
    0.05, final share 0.2) were chosen on recorded noise streams of 150 digits images
    (`benchmarks/anytime_sim.py --replay`), not on the benchmark's 30."""

    radii: tuple[float, ...] = ()
    precision: float | None = None
    first: int = 100
    growth: float = 1.05
    futility: float = 0.05
    futility_cs: float | None = None
    final_share: float = 0.2
    tests: ThresholdTests = ThresholdTests()
    cs: UpperMixtureCS | BetaMixtureCS = UpperMixtureCS()

    def __post_init__(self) -> None:
        if self.first < 1:
            raise ConfigError("anytime first look must be >= 1 sample")
        if not self.growth > 1:
            raise ConfigError(f"anytime growth must be > 1, got {self.growth}")
        if not 0 <= self.final_share < 1:
            raise ConfigError(f"anytime final_share must be in [0, 1), got {self.final_share}")
        if not (isinstance(self.futility, (int, float)) and 0 <= self.futility < 0.5):
            raise ConfigError(f"anytime futility must be a level in [0, 0.5), got {self.futility!r}")
        if self.futility_cs is not None and not 0 < self.futility_cs < 1:
            raise ConfigError(f"anytime futility_cs must be in (0, 1), got {self.futility_cs!r}")
        if self.precision is not None and not self.precision > 0:
            raise ConfigError(f"anytime precision must be > 0, got {self.precision}")
        if any(not (math.isfinite(r) and r >= 0) for r in self.radii):
            raise ConfigError(f"anytime radii must be finite and >= 0, got {self.radii}")

    def radius_grid(self, sigma: float, n: int, alpha: float) -> np.ndarray:
        """Sorted radii to decide: 0, the requested radii, and with ``precision`` every multiple of it up to
        the largest radius exact mode can certify at ``n``."""
        rs = {0.0} | {float(r) for r in self.radii}
        if self.precision is not None:
            top = sigma * float(norm.ppf(math.exp(math.log(alpha) / n)))
            rs |= {k * self.precision for k in range(1, int(top / self.precision) + 1)}
        return np.array(sorted(rs), dtype=np.float64)

    def thresholds(self, sigma: float, n: int = 100_000, alpha: float = 0.001) -> np.ndarray:
        """Thresholds on pA of `radius_grid`: 1/2 for r = 0, ``Phi(r / sigma)`` above."""
        return np.array([0.5 if r == 0 else float(norm.cdf(r / sigma)) for r in self.radius_grid(sigma, n, alpha)])

    def schedule(self, n: int, block: int) -> list[int]:
        """Look sizes (estimation samples): multiples of ``block`` (the last is n), growing by ``growth``."""
        up = lambda v: min(n, -(-int(v) // block) * block)  # noqa: E731
        sizes = [max(up(self.first), min(n, block))]
        while sizes[-1] < n:
            sizes.append(max(up(math.ceil(sizes[-1] * self.growth)), min(n, sizes[-1] + block)))
        return sizes


def exact_counts_needed(thr: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Per threshold, the least ``n_a`` with exact mode's ``cp_lower(n_a, n, alpha) >= p`` (``n + 1``: never)."""
    out = np.empty(len(thr), dtype=np.int64)
    for j, p in enumerate(thr):
        lo, hi = 0, n + 1                          # cp_lower(lo) < p <= cp_lower(hi) (hi = n + 1: never)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cp_lower(mid, n, alpha) >= p:
                hi = mid
            else:
                lo = mid
        out[j] = hi
    return out


def _cp_lower_vec(s: np.ndarray, t: np.ndarray, alpha: float) -> np.ndarray:
    """`certify.stats.cp_lower` elementwise."""
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        out = beta_dist.ppf(alpha, s, t - s + 1)
    return np.where(s > 0, out, 0.0)


class AnytimeRun:
    """The state of anytime mode for ``m`` examples (vectorized; drives no sampling itself).

    Each round: `targets` gives every active example's next look size; the caller counts the new
    samples and calls `observe` with the cumulative successes ``s`` (counts of cA) at those sizes.
    The certifier (`certify.smoothing.Smooth`) and the Bernoulli-oracle simulation
    (`benchmarks/anytime_sim.py`) both drive this class, so they share every decision.

    Per example and threshold (columns of `thr`, radii `radii`): ``certified``, ``provably_not``
    (the down test), ``declined`` (the futility rule); ``lower`` = the largest certified threshold
    (0 when none), ``radius`` = its radius (-1: abstain)."""

    def __init__(self, rule: Anytime, m: int, n: int, alpha: float, sigma: float, block: int):
        self.rule, self.n, self.alpha, self.sigma = rule, int(n), float(alpha), float(sigma)
        self.alpha_final = alpha * rule.final_share
        self.alpha_tests = alpha - self.alpha_final
        self.sizes = rule.schedule(self.n, block)
        self.radii = rule.radius_grid(sigma, self.n, alpha)
        self.thr = rule.thresholds(sigma, self.n, alpha)
        self.need = exact_counts_needed(self.thr, self.n, alpha)
        R = len(self.thr)
        self.look = np.zeros(m, dtype=np.int64)
        self.t = np.zeros(m, dtype=np.int64)
        self.s = np.zeros(m, dtype=np.int64)
        self.upper = np.ones(m)                        # running min of the futility CS's upper end
        self.passed = np.zeros((m, R), dtype=bool)     # the up test has reached 1/alpha_tests
        self.certified = np.zeros((m, R), dtype=bool)
        self.provably_not = np.zeros((m, R), dtype=bool)
        self.declined = np.zeros((m, R), dtype=bool)
        self.stopped = np.array([""] * m, dtype=object)

    @property
    def active(self) -> np.ndarray:
        return np.flatnonzero(self.stopped == "")

    @property
    def lower(self) -> np.ndarray:
        """Per example the reported lower bound on pA: the largest certified threshold (0 if none)."""
        k = self.certified.sum(axis=1)
        return np.where(k > 0, self.thr[np.maximum(k - 1, 0)], 0.0)

    @property
    def radius(self) -> np.ndarray:
        """Per example the certified radius (the largest certified requested radius; -1: abstain)."""
        k = self.certified.sum(axis=1)
        return np.where(k > 0, self.radii[np.maximum(k - 1, 0)], -1.0)

    def targets(self) -> np.ndarray:
        """Next look size of each active example (same order as `active`)."""
        return np.array([self.sizes[k] for k in self.look[self.active]], dtype=np.int64)

    def observe(self, idx: np.ndarray, s: np.ndarray, t: np.ndarray) -> None:
        """Record cumulative successes ``s`` after ``t`` samples for examples ``idx`` and decide."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return
        s, t = np.asarray(s, dtype=np.int64), np.asarray(t, dtype=np.int64)
        self.s[idx], self.t[idx] = s, t
        self.look[idx] += 1
        thr = self.thr[None, :]
        f, tt = (t - s)[:, None], t[:, None]
        c = math.log(1.0 / self.alpha_tests)
        passed = self.passed[idx] | (self.rule.tests.log_e(f, tt, thr, up=True) >= c)
        at_cap = t >= self.n
        if self.alpha_final > 0 and at_cap.any():      # exact mode's bound at the cap, at its share of alpha
            fin = _cp_lower_vec(s, t, self.alpha_final)[:, None] >= thr
            passed |= fin & at_cap[:, None]
        self.passed[idx] = passed
        cert = np.cumprod(passed, axis=1).astype(bool)                   # a prefix (proof obligation 1)
        down = self.provably_not[idx] | (self.rule.tests.log_e(f, tt, thr, up=False) >= c)
        down = np.cumsum(down, axis=1) > 0                              # and every higher threshold
        # the decline rule: exact mode's counts at the cap would (w.h.p.) stay below need_j
        rem = self.n - t
        if self.rule.futility > 0:
            up = self.rule.cs.bounds(s, t, self.rule.futility_cs or self.rule.futility)[1]
            self.upper[idx] = np.minimum(self.upper[idx], up)
            reach = binom.sf(self.need[None, :] - s[:, None] - 1, rem[:, None], self.upper[idx][:, None])
            dec = reach <= self.rule.futility
        else:
            dec = s[:, None] + rem[:, None] < self.need[None, :]
        dec = self.declined[idx] | dec
        dec = np.cumsum(dec, axis=1) > 0
        # certification wins a (rare) conflict: its error is the one the guarantee bounds
        down &= ~cert
        dec &= ~cert & ~down
        self.certified[idx], self.provably_not[idx], self.declined[idx] = cert, down, dec
        decided = (cert | down | dec).all(axis=1)
        # "futile" only when a decline was a bet on the remaining samples (not merely out of exact mode's reach)
        bet = (dec & (s[:, None] + rem[:, None] >= self.need[None, :])).any(axis=1)
        for j, i in enumerate(idx):
            if at_cap[j]:
                self.stopped[i] = "final"
            elif decided[j]:
                self.stopped[i] = "futile" if bet[j] else "settled"


@dataclass
class SimResult:
    """Outcome of `simulate` for one pA, per seed: estimation samples used and the decisions."""

    p_a: float
    samples: np.ndarray          # (seeds,) estimation samples used
    wrong_certified: np.ndarray  # (seeds,) certified at a threshold above pA (the guarantee's failure)
    wrong_rejected: np.ndarray   # (seeds,) "provably not" at a threshold p_j <= pA
    certified: np.ndarray        # (seeds, thresholds) certified at each threshold
    declined: np.ndarray         # (seeds, thresholds) declined by the futility rule
    exact: np.ndarray            # (seeds, thresholds) exact mode at the cap, on the same sample stream

    @property
    def wrong(self) -> np.ndarray:
        return self.wrong_certified | self.wrong_rejected

    @property
    def disagree(self) -> np.ndarray:
        """(seeds, thresholds): anytime's certificate differs from exact mode's on the same stream."""
        return self.certified != self.exact


def simulate(rule: Anytime, p_a: float, seeds: int, n: int, alpha: float, sigma: float,
             rng: np.random.Generator, block: int = 100) -> SimResult:
    """Anytime mode against a Bernoulli oracle of known ``p_a`` (the class cA fixed), through the very
    decision code the certifier runs (`AnytimeRun`); the samples between two looks are drawn as one
    Binomial (the same law as their sum). The stream is then completed to ``n`` to get exact mode's
    decisions on the same samples (anytime's are a prefix of exact mode's, as in the certifier)."""
    run = AnytimeRun(rule, seeds, n, alpha, sigma, block)
    while (act := run.active).size:
        tg = run.targets()
        run.observe(act, run.s[act] + rng.binomial(tg - run.t[act], p_a), tg)
    thr = run.thr[None, :]
    s_n = run.s + rng.binomial(n - run.t, p_a)
    exact = s_n[:, None] >= run.need[None, :]
    cert = run.certified.copy()
    return SimResult(float(p_a), run.t.copy(), (cert & (thr > p_a)).any(axis=1),
                     (run.provably_not & (thr <= p_a)).any(axis=1), cert, run.declined.copy(), exact)

"""Split conformal classification: score objects, the exact order statistic, boolean set masks.

Usable on any model's logits without the rest of Bastion, in the vocabulary of TorchCP / MAPIE
(spec rscp-plus.md, sections 2, 3 and 12)::

    from certify.conformal import APS, SplitConformal
    cp = SplitConformal(APS(randomized=False), alpha=0.1)      # or confidence_level=0.9
    cp.calibrate(cal_logits, cal_labels)                        # stores cp.threshold (q_hat)
    sets = cp.predict(test_logits)                              # (N, K) bool mask
    cp.evaluate(test_logits, test_labels)                       # coverage, average_size, ...

Scores are non-conformity scores (larger = less plausible), computed in float64 from logits
(softmax) or directly from probabilities (``from_probs``). Each declares its ``range``; the
Monte-Carlo bounds of RSCP+ need scores in [0, 1] (HPS, APS, and RAPS with ``scaled=True``).

- `HPS` (alias `THR`, TorchCP's THR/LAC): ``1 - pi_y``.
- `APS`: labels ordered by decreasing pi (ties by label index, ordinal ranks);
  ``S = (mass ranked strictly above y) + u * pi_y``. ``randomized=False`` fixes ``u = 1``
  (inclusive cumulative mass: TorchCP's APS(randomized=False)); randomized draws one ``u ~ U[0, 1]``
  per example (shared by all labels) from an explicit generator, or takes ``u`` from the caller.
  Randomized APS may return empty sets: that is expected.
- `RAPS`: APS + ``penalty * max(0, rank - kreg)`` (1-based rank); with ``scaled=True`` divided by its
  largest value ``1 + penalty * max(0, K - kreg)`` so it lies in [0, 1] (same sets, scaled threshold).

Threshold: ``tau = s_(k)``, the k-th smallest calibration score with ``k = ceil((n + 1)(1 - alpha))``
computed exactly (`quantile_index`), ``+inf`` when ``k > n``; set ``{k : S(x, k) <= tau}``.
"""

from __future__ import annotations

import abc
import math
from fractions import Fraction
from typing import Any

import torch

from bastion.errors import ConfigError

Tensor = torch.Tensor


def _exact(x: float | int | Fraction) -> Fraction:
    """A float as the decimal it was written as (0.1 -> 1/10), so ceil((n+1)(1-alpha)) is exact."""
    if isinstance(x, Fraction):
        return x
    if isinstance(x, int):
        return Fraction(x)
    return Fraction(repr(float(x)))


def check_alpha(alpha: float, name: str = "alpha") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, Fraction)) or not 0 < float(alpha) < 1:
        raise ConfigError(f"{name} must be a miscoverage level in (0, 1) such as 0.1, got {alpha!r}")
    return float(alpha)


def quantile_index(n: int, alpha: float | Fraction, beta: float | Fraction = 0) -> int:
    """1-based index ``k = ceil((n + 1)(1 - alpha + 2 beta))`` of the calibration order statistic.

    Exact rational arithmetic on the decimal values of alpha and beta (never a float round trip:
    ``ceil(n * (k / n))`` can land one order statistic too high). ``beta`` is RSCP+'s Monte-Carlo
    budget (0 for plain split conformal). Values above ``n`` mean "no finite threshold"."""
    if n < 0:
        raise ConfigError(f"the calibration set size must be >= 0, got {n}")
    level = 1 - _exact(alpha) + 2 * _exact(beta)
    return math.ceil((n + 1) * level)


def conformal_threshold(cal_scores: Tensor | Any, alpha: float, beta: float = 0) -> float:
    """``tau``: the `quantile_index`-th smallest calibration score (``+inf`` when too few scores)."""
    s = torch.as_tensor(cal_scores, dtype=torch.float64).reshape(-1)
    check_alpha(alpha)
    k = quantile_index(int(s.numel()), alpha, beta)
    if k > s.numel():
        return math.inf
    if k < 1:
        return -math.inf
    return float(torch.kthvalue(s, k).values)


def prediction_sets(scores: Tensor, threshold: float) -> Tensor:
    """(N, K) bool mask ``scores <= threshold``."""
    return torch.as_tensor(scores) <= threshold


def set_metrics(sets: Tensor, labels: Tensor, num_classes: int | None = None) -> dict[str, Any]:
    """Coverage, average size, size over covered points, per-class coverage (None: no example)."""
    sets = torch.as_tensor(sets).bool()
    labels = torch.as_tensor(labels).long().to(sets.device)
    k = int(num_classes or sets.shape[1])
    n = int(labels.numel())
    covered = sets[torch.arange(n, device=sets.device), labels]
    size = sets.sum(dim=1).double()
    per_class = []
    for c in range(k):
        m = labels == c
        per_class.append(float(covered[m].double().mean()) if bool(m.any()) else None)
    return {"coverage_rate": float(covered.double().mean()) if n else math.nan,
            "average_size": float(size.mean()) if n else math.nan,
            "size_if_covered": float(size[covered].mean()) if bool(covered.any()) else math.nan,
            "empty_rate": float((size == 0).double().mean()) if n else math.nan,
            "per_class_coverage": per_class, "num_examples": n}


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------

def _probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    logits = torch.as_tensor(logits)
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)
    if logits.dim() != 2:
        raise ConfigError(f"logits must have shape (N, K), got {tuple(logits.shape)}")
    return torch.softmax(logits.double() / temperature, dim=-1)


def _pick(all_scores: Tensor, labels: Tensor) -> Tensor:
    labels = torch.as_tensor(labels, device=all_scores.device).long().view(-1, 1)
    return all_scores.gather(-1, labels).squeeze(-1)


class Score(abc.ABC):
    """A non-conformity score. ``score(logits)`` -> (N, K); ``score(logits, labels)`` -> (N,)
    (TorchCP's convention). ``from_probs(probs, u)`` works on probabilities of any shape (..., K)
    with ``u`` broadcastable to (...,) (one draw per example). ``range`` = (low, high)."""

    name = "score"
    randomized = False
    range: tuple[float, float] = (0.0, 1.0)

    @abc.abstractmethod
    def from_probs(self, probs: Tensor, u: Tensor | None = None) -> Tensor: ...

    def draw_u(self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor | None:
        """One ``u ~ U[0, 1]`` per example (float64) for randomized scores, else None."""
        if not self.randomized:
            return None
        dev = generator.device if generator is not None else device
        return torch.rand(tuple(shape), generator=generator, device=dev, dtype=torch.float64).to(device or dev)

    def __call__(self, logits: Tensor, labels: Tensor | None = None, *, u: Tensor | None = None,
                 generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        p = _probs(logits, temperature)
        if u is None and self.randomized:
            u = self.draw_u(p.shape[:-1], generator, p.device)
        s = self.from_probs(p, u)
        return s if labels is None else _pick(s, labels)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "randomized": self.randomized, "range": list(self.range)}


class HPS(Score):
    """Homogeneous prediction sets / THR / LAC: ``1 - pi_y`` in [0, 1]."""

    name = "hps"

    def from_probs(self, probs: Tensor, u: Tensor | None = None) -> Tensor:
        return 1.0 - probs


THR = HPS


def _aps_parts(probs: Tensor) -> tuple[Tensor, Tensor]:
    """(mass ranked strictly above each label, 0-based ordinal rank of each label), (..., K).

    Ties are broken by label index (a stable sort of -pi), so ranks are ordinal."""
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
    sorted_p = probs.gather(-1, order)
    above_sorted = torch.cumsum(sorted_p, dim=-1) - sorted_p
    rank = torch.empty_like(order)
    ar = torch.arange(probs.shape[-1], device=probs.device).expand_as(order)
    rank.scatter_(-1, order, ar)
    return above_sorted.gather(-1, rank), rank


class APS(Score):
    """Adaptive prediction sets: ``(mass strictly above y) + u * pi_y`` in [0, 1].

    randomized: draw ``u ~ U[0, 1]`` per example (Romano et al.'s exact-coverage form); False fixes
    ``u = 1`` (inclusive cumulative mass, TorchCP's non-randomized APS). ``u`` given by the caller
    always wins (e.g. ``u = 0``: the RSCP reference code's deterministic variant)."""

    name = "aps"

    def __init__(self, randomized: bool = True):
        self.randomized = bool(randomized)

    def _u(self, probs: Tensor, u: Tensor | float | None) -> Tensor:
        if u is None:
            if self.randomized:
                raise ConfigError(f"randomized {self.name.upper()} needs u (one uniform per example) or a generator")
            return torch.ones(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
        return torch.as_tensor(u, dtype=probs.dtype, device=probs.device).expand(probs.shape[:-1])

    def from_probs(self, probs: Tensor, u: Tensor | float | None = None) -> Tensor:
        above, _ = _aps_parts(probs)
        # clamp: rounding can put the top rank's cumulative mass a few ulps above 1
        return (above + self._u(probs, u).unsqueeze(-1) * probs).clamp(0.0, 1.0)


class RAPS(APS):
    """Regularised APS: APS + ``penalty * max(0, rank - kreg)`` (1-based rank).

    scaled: divide by the largest possible value ``1 + penalty * max(0, K - kreg)`` so the score
    lies in [0, 1] (needed for the Monte-Carlo bounds); sets are unchanged, the threshold scales.
    Use ``scaled=False`` to match TorchCP's RAPS thresholds."""

    name = "raps"

    def __init__(self, penalty: float = 0.2, kreg: int = 5, randomized: bool = True, scaled: bool = True):
        super().__init__(randomized)
        if not (math.isfinite(penalty) and penalty >= 0):
            raise ConfigError(f"RAPS penalty must be a finite number >= 0, got {penalty!r}")
        if isinstance(kreg, bool) or not isinstance(kreg, int) or kreg < 0:
            raise ConfigError(f"RAPS kreg must be an integer >= 0, got {kreg!r}")
        self.penalty = float(penalty)
        self.kreg = int(kreg)
        self.scaled = bool(scaled)
        self.range = (0.0, 1.0) if scaled else (0.0, math.inf)

    def from_probs(self, probs: Tensor, u: Tensor | float | None = None) -> Tensor:
        above, rank = _aps_parts(probs)
        reg = self.penalty * torch.clamp(rank.to(probs.dtype) + 1 - self.kreg, min=0)
        s = (above + self._u(probs, u).unsqueeze(-1) * probs).clamp(0.0, 1.0) + reg
        if self.scaled:
            s = s / (1.0 + self.penalty * max(0, probs.shape[-1] - self.kreg))
        return s

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"penalty": self.penalty, "kreg": self.kreg, "scaled": self.scaled}


SCORES = {"hps": HPS, "thr": HPS, "lac": HPS, "aps": APS, "raps": RAPS}


def create_score(name: str, **params: Any) -> Score:
    """A score by name: ``hps`` (``thr``, ``lac``), ``aps``, ``raps``."""
    cls = SCORES.get(str(name).lower())
    if cls is None:
        raise ConfigError(f"unknown conformal score {name!r}: use {', '.join(sorted(SCORES))}")
    return cls(**params)


# ---------------------------------------------------------------------------------------------
# The split conformal predictor
# ---------------------------------------------------------------------------------------------

class SplitConformal:
    """Split conformal prediction with a `Score` (TorchCP's SplitPredictor, MAPIE's
    SplitConformalClassifier in torch).

    alpha: target miscoverage (``confidence_level = 1 - alpha`` is accepted instead, MAPIE style).
    Randomized scores draw ``u`` from ``generator`` (seeded by ``seed``) unless ``u`` is passed."""

    def __init__(self, score: Score | str = "aps", alpha: float | None = None, *, confidence_level: float | None = None,
                 temperature: float = 1.0, seed: int = 0):
        if alpha is not None and confidence_level is not None:
            raise ConfigError("give alpha (miscoverage) or confidence_level, not both")
        if alpha is None:
            alpha = 1 - _exact(confidence_level) if confidence_level is not None else 0.1
            alpha = float(alpha)
        self.alpha = check_alpha(alpha)
        self.score = create_score(score) if isinstance(score, str) else score
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.threshold: float | None = None
        self.cal_scores: Tensor | None = None

    @property
    def q_hat(self) -> float | None:
        """TorchCP's name for the threshold."""
        return self.threshold

    def _scores(self, logits: Tensor, labels: Tensor | None, u: Tensor | None) -> Tensor:
        logits = torch.as_tensor(logits)
        if u is None and self.score.randomized:
            u = self.score.draw_u(logits.shape[:1], self.generator, "cpu").to(logits.device)
        return self.score(logits, labels, u=u, temperature=self.temperature)

    def calibrate(self, logits: Tensor, labels: Tensor, alpha: float | None = None, *,
                  u: Tensor | None = None) -> float:
        """Store and return the threshold from calibration logits (N, K) and labels (N,)."""
        if alpha is not None:
            self.alpha = check_alpha(alpha)
        self.cal_scores = self._scores(logits, labels, u)
        self.threshold = conformal_threshold(self.cal_scores, self.alpha)
        return self.threshold

    calculate_threshold = calibrate   # TorchCP's name
    conformalize = calibrate          # MAPIE's name

    def predict(self, logits: Tensor, *, u: Tensor | None = None) -> Tensor:
        """(N, K) bool prediction-set mask."""
        if self.threshold is None:
            raise ConfigError("call calibrate(logits, labels) before predict")
        return prediction_sets(self._scores(logits, None, u), self.threshold)

    predict_with_logits = predict

    def predict_set(self, logits: Tensor, *, u: Tensor | None = None) -> list[list[int]]:
        """The sets as lists of labels (for display; keep masks for computation)."""
        return [row.nonzero().flatten().tolist() for row in self.predict(logits, u=u)]

    def evaluate(self, logits: Tensor, labels: Tensor, *, u: Tensor | None = None) -> dict[str, Any]:
        """coverage_rate, average_size, size_if_covered, empty_rate, per_class_coverage."""
        return set_metrics(self.predict(logits, u=u), labels)

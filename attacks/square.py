"""Square attack (Andriushchenko et al., ECCV 2020), L-inf and L2, native: a gradient-free random search.

As AutoAttack's ``square`` (pyautoattack ``SquareAttack``, margin loss, ``p_init`` 0.8 and its
square-size schedule): every example still robust proposes a change of one square window of its
best point, kept when it lowers the margin loss ``z_y - max_{j != y} z_j``; an example stops
once that margin is <= 0. ``p_i`` (the share of the features a window covers) halves at query
i = 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 (AutoAttack does not rescale these to its
5,000-query budget; ``rescale_schedule=True`` does).

- L-inf: start from vertical stripes of +-eps; a proposal sets a window of side
  ``s = round(sqrt(p_i * n_features / channels))`` to +-eps (a random sign per channel) around the
  clean point, clipped to the ball and the box. By default one square and one set of signs serve
  the whole batch per query, exactly as pyautoattack (``shared_signs=False``: signs per example,
  as the paper's code: a stronger attack).
- L2: start from a grid of ``h // 5``-sided windows, each holding the centred bump ``eta`` (two
  opposite halves of nested squares weighted 1/(k+1)^2, unit norm) with a random sign per
  example and channel, scaled to norm eps; a proposal (odd side >= 3) moves the perturbation's
  mass of a second window into the first window, adds a fresh signed bump there, rescales the
  window so the image stays on the eps sphere, and clips to the box. One window pair per query
  for the batch, signs per example, as pyautoattack.

Randomness comes from the attack's generator, so results match pyautoattack's in distribution
(robust accuracy), not point by point.

    atk = create_attack("square", "linf:8/255", n_queries=5000)
    atk = create_attack("square", "l2:0.5")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from attacks.base import Attack, AttackConfig, AttackResult, register_attack
from bastion.errors import ConfigError


@dataclass(frozen=True)
class SquareConfig(AttackConfig):
    """``n_queries``: query budget per restart (AutoAttack: 5000); ``p_init``: initial fraction of
    the features a square covers (AutoAttack: 0.8); ``shared_signs`` (L-inf): one square (position
    and per-channel signs) for the whole batch per query, as pyautoattack does (True), or signs
    drawn per example, as the paper's reference code does (False: a stronger attack; L2 always
    draws signs per example, as pyautoattack); ``rescale_schedule``: stretch the square-size
    schedule over ``n_queries`` as if it were 10,000 (AutoAttack does not: False)."""

    n_queries: int = 5000
    p_init: float = 0.8
    shared_signs: bool = True
    rescale_schedule: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.n_queries) < 1 or not 0 < self.p_init <= 1:
            raise ConfigError("square needs n_queries >= 1 and p_init in (0, 1]")


def p_selection(p_init: float, it: int, n_queries: int, rescale: bool = False) -> float:
    """AutoAttack's square-size schedule (``rescale``: as if the budget were 10,000 queries)."""
    if rescale:
        it = int(it / n_queries * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


def _rectangles(a: int, b: int) -> torch.Tensor:
    """(a, b) nested centred rectangles, ring k weighted 1 / (k + 1)^2, unit L2 norm."""
    d = torch.zeros(a, b, dtype=torch.float64)
    r, c = a // 2, b // 2
    for k in range(max(a // 2 + 1, b // 2 + 1)):
        d[max(r, 0):min(r + 2 * k + 1, a), max(c, 0):min(c + 2 * k + 1, b)] += 1.0 / (k + 1) ** 2
        r, c = r - 1, c - 1
    return d / d.pow(2).sum().sqrt() if d.numel() else d


@lru_cache(maxsize=64)
def eta(s: int) -> torch.Tensor:
    """(s, s) L2 Square's bump: the upper half positive rectangles, the lower half negative, unit L2 norm."""
    d = torch.zeros(s, s, dtype=torch.float64)
    d[: s // 2] = _rectangles(s // 2, s)
    d[s // 2:] = -_rectangles(s - s // 2, s)
    return d / d.pow(2).sum().sqrt()


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    own = logits.gather(1, y.view(-1, 1))[:, 0]
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return own - other


def _signs(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    r = torch.randint(0, 2, shape, generator=generator, device=generator.device).to(like.device, like.dtype)
    return 2 * r - 1


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform in [0, high) (0 when high <= 0), as pyautoattack's random_int."""
    return int(torch.randint(0, max(high, 1), (1,), generator=generator, device=generator.device))


def _l2_unit(d: torch.Tensor) -> torch.Tensor:
    return d / (d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)


def _bump(s: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """``eta(s)`` in ``like``'s dtype/device, transposed with probability 1/2 (as pyautoattack)."""
    e = eta(s).to(like.device, like.dtype)
    return e.t() if _randint(2, generator) else e


def _init_linf(x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    n, c, _, w = x.shape
    return (x + eps * _signs((n, c, 1, w), generator, x)).clamp(0, 1)


def _init_l2(x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    n, c, h, w = x.shape
    s = max(h // 5, 1)
    start = (h - 5 * s) // 2
    delta = torch.zeros_like(x)
    for i in range(h // s):
        for j in range(w // s):
            vh, vw = start + i * s, start + j * s
            win = delta[:, :, vh:vh + s, vw:vw + s]
            bump = _bump(s, generator, x)[: win.shape[2], : win.shape[3]]
            win += bump * _signs((n, c, 1, 1), generator, x)
    return (x + eps * _l2_unit(delta)).clamp(0, 1)


def _propose_linf(xc: torch.Tensor, bc: torch.Tensor, eps: float, p: float, shared: bool,
                  generator: torch.Generator) -> torch.Tensor:
    n, c, h, w = xc.shape
    s = min(max(int(round(math.sqrt(p * h * w))), 1), h, w)
    vh, vw = _randint(h - s, generator), _randint(w - s, generator)
    cand = bc.clone()
    sl = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
    # best + 2 eps sign, clipped to the ball, is the clean point + eps sign on the window
    cand[sl] = (xc[sl] + eps * _signs((1 if shared else n, c, 1, 1), generator, xc)).clamp(0, 1)
    return cand


def _propose_l2(xc: torch.Tensor, bc: torch.Tensor, eps: float, p: float, generator: torch.Generator) -> torch.Tensor:
    n, c, h, w = xc.shape
    s = max(int(round(math.sqrt(p * h * w))), 3)
    s = min(s + 1 if s % 2 == 0 else s, h, w)
    vh, vw = _randint(h - s, generator), _randint(w - s, generator)
    vh2, vw2 = _randint(h - s, generator), _randint(w - s, generator)
    w1 = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
    w2 = (slice(None), slice(None), slice(vh2, vh2 + s), slice(vw2, vw2 + s))
    delta = bc - xc
    old = delta[w1]
    norm_w1 = old.pow(2).sum((-2, -1), keepdim=True).sqrt()
    norm_img = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    mask = torch.zeros(h, w, dtype=torch.bool, device=xc.device)
    mask[w1[2:]] = True
    mask[w2[2:]] = True
    norm_win = (delta * mask).pow(2).sum((-2, -1), keepdim=True).sqrt()
    new = _bump(s, generator, xc) * _signs((n, c, 1, 1), generator, xc) + old / (1e-12 + norm_w1)
    room = ((eps ** 2 - norm_img ** 2).clamp_min(0) / c + norm_win ** 2).sqrt()
    new = new / (1e-12 + new.pow(2).sum((-2, -1), keepdim=True).sqrt()) * room
    delta[w2] = 0
    delta[w1] = new
    return (xc + eps * _l2_unit(delta)).clamp(0, 1)


class Square(Attack):
    """Square attack (Andriushchenko et al. 2020), L-inf and L2, AutoAttack's settings; gradient-free."""

    config_class = SquareConfig
    gradient_free = True
    supports_targeted = False
    cost_rank = 80

    def __init__(self, config: SquareConfig, name: str | None = None):
        super().__init__(config, name)
        if config.threat.norm not in ("linf", "l2"):
            raise ConfigError(f"native square attacks linf and l2 balls (got {config.threat})")

    def _run(self, model, x, y, y_target, generator):
        cfg = self.config
        eps = float(self.threat.eps)
        linf = self.threat.norm == "linf"
        if x.dim() != 4:
            raise ConfigError("square needs image inputs (N, C, H, W)")
        n = x.shape[0]
        x_adv = x.clone()
        with torch.no_grad():
            success = _margin(model(x), y) <= 0
        step = torch.full((n,), -1, dtype=torch.long, device=x.device)
        step[success] = 0
        budget = int(cfg.n_queries)
        for _ in range(int(cfg.restarts or 1)):
            idx = (~success).nonzero().flatten()
            if idx.numel() == 0:
                break
            # the active examples' state, compacted when some break (no scatter per query)
            xs, ys = x[idx], y[idx]
            with torch.no_grad():
                best = _init_linf(xs, eps, generator) if linf else _init_l2(xs, eps, generator)
                m_best = _margin(model(best), ys)
            for it in range(budget + 1):
                broke = m_best <= 0
                if bool(broke.any()):
                    x_adv[idx[broke]] = best[broke]
                    success[idx[broke]] = True
                    step[idx[broke]] = it
                    keep = ~broke
                    idx, xs, ys, best, m_best = idx[keep], xs[keep], ys[keep], best[keep], m_best[keep]
                if idx.numel() == 0 or it == budget:
                    break
                p = p_selection(float(cfg.p_init), it, budget, bool(cfg.rescale_schedule))
                with torch.no_grad():
                    if linf:
                        cand = _propose_linf(xs, best, eps, p, bool(cfg.shared_signs), generator)
                    else:
                        cand = _propose_l2(xs, best, eps, p, generator)
                    m = _margin(model(cand), ys)
                better = (m < m_best) | (m <= 0)
                best = torch.where(better.view(-1, 1, 1, 1), cand, best)
                m_best = torch.where(better, m, m_best)
            # not broken: keep the lowest-margin point (it is inside the ball)
            x_adv[idx] = best
        return AttackResult(x_adv, success, step)


register_attack("square", Square, doc="Square attack (L-inf, L2), native, AutoAttack's schedule; gradient-free.",
                random_start=False)

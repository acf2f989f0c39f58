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


def _margin(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """z_y - max_{j != y} z_j (B,); y (B,) or (B, 1); ``mask``: the one-hot bool mask of ``y`` (B, K),
    when already at hand."""
    own = logits.gather(1, y.view(-1, 1))[:, 0]
    if mask is None:
        mask = F.one_hot(y.view(-1), logits.shape[1]).bool()
    return own - torch.where(mask, float("-inf"), logits).amax(1)


def _signs(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    r = torch.randint(0, 2, shape, generator=generator, device=generator.device).to(like.device, like.dtype)
    return 2 * r - 1


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform in [0, high) (0 when high <= 0), as pyautoattack's random_int."""
    return int(torch.randint(0, max(high, 1), (1,), generator=generator, device=generator.device))


def _positions(h: int, w: int, s: int, k: int, generator: torch.Generator) -> list[int]:
    """``k`` // 2 window corners (row, column, row, ...): ``_randint(h - s)``, ``_randint(w - s)``, ... in
    turn. A CPU generator draws a (k,) tensor's numbers one after another, as k calls of (1,) do,
    so square images take them in one call there."""
    if h == w and generator.device.type == "cpu":
        return torch.randint(0, max(h - s, 1), (k,), generator=generator).tolist()
    return [_randint((h if j % 2 == 0 else w) - s, generator) for j in range(k)]


@lru_cache(maxsize=4096)
def _pair_mask(h: int, w: int, s: int, corners: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(h, w) bool mask of the two s-sided windows at ``corners`` (row, column, row, column); never written to."""
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    vh, vw, vh2, vw2 = corners
    mask[vh:vh + s, vw:vw + s] = True
    mask[vh2:vh2 + s, vw2:vw2 + s] = True
    return mask


def _l2_unit(d: torch.Tensor) -> torch.Tensor:
    return d / (d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)


@lru_cache(maxsize=64)
def _eta_as(s: int, dtype: torch.dtype, device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """``eta(s)`` and its transpose in ``dtype`` on ``device``, each with its negative (never written to)."""
    e = eta(s).to(device, dtype)
    return (e, -e), (e.t(), -e.t())


def _bump(s: int, generator: torch.Generator, like: torch.Tensor, signed: bool = False):
    """``eta(s)`` in ``like``'s dtype/device, transposed with probability 1/2 (as pyautoattack);
    ``signed``: the pair (bump, -bump)."""
    pair = _eta_as(s, like.dtype, like.device)[1 if _randint(2, generator) else 0]
    return pair if signed else pair[0]


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


def _window(p: float, h: int, w: int, linf: bool) -> int:
    """The side of the square window at share ``p`` of the features (L2: odd, at least 3)."""
    s = int(round(math.sqrt(p * h * w)))
    if linf:
        return min(max(s, 1), h, w)
    s = max(s, 3)
    return min(s + 1 if s % 2 == 0 else s, h, w)


def _linf_faces(xc: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean points moved by +eps and by -eps, clipped to the box: the two values an L-inf
    proposal writes into a window (the same numbers as ``(xc + eps * sign).clamp(0, 1)``)."""
    plus = torch.ones((1, xc.shape[1], 1, 1), dtype=xc.dtype, device=xc.device)
    return (xc + eps * plus).clamp(0, 1), (xc + eps * -plus).clamp(0, 1)


def _propose_linf(bc: torch.Tensor, faces: tuple[torch.Tensor, torch.Tensor], s: int, shared: bool,
                  generator: torch.Generator) -> torch.Tensor:
    n, c, h, w = bc.shape
    vh, vw = _positions(h, w, s, 2, generator)
    # _signs' draw: the window takes the clean point + eps where the bit is 1, - eps where it is 0
    up = torch.randint(0, 2, (1 if shared else n, c, 1, 1), generator=generator, device=generator.device)
    cand = bc.clone()
    sl = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
    # best + 2 eps sign, clipped to the ball, is the clean point + eps sign on the window
    cand[sl] = torch.where(up.to(bc.device, torch.bool), faces[0][sl], faces[1][sl])
    return cand


def _propose_l2(xc: torch.Tensor, bc: torch.Tensor, eps: float, s: int, generator: torch.Generator) -> torch.Tensor:
    n, c, h, w = xc.shape
    vh, vw, vh2, vw2 = corners = tuple(_positions(h, w, s, 4, generator))
    w1 = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
    w2 = (slice(None), slice(None), slice(vh2, vh2 + s), slice(vw2, vw2 + s))
    delta = bc - xc
    old = delta[w1]
    norm_w1 = old.pow(2).sum((-2, -1), keepdim=True).sqrt()
    norm_img = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    mask = _pair_mask(h, w, s, corners, xc.device)
    # where(mask, delta, 0) squares to (delta * mask) ** 2 exactly (delta is finite)
    norm_win = torch.where(mask, delta, 0.0).pow(2).sum((-2, -1), keepdim=True).sqrt()
    bump, neg = _bump(s, generator, xc, signed=True)
    # _signs' draw: bump * (+1) where the bit is 1, bump * (-1) where it is 0
    up = torch.randint(0, 2, (n, c, 1, 1), generator=generator, device=generator.device).to(xc.device, torch.bool)
    new = torch.where(up, bump, neg) + old / (1e-12 + norm_w1)
    free = (eps ** 2 - norm_img ** 2).clamp_min(0)
    room = ((free / c if c != 1 else free) + norm_win ** 2).sqrt()  # x / 1 is x
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
        n, _, h, w = x.shape
        x_adv = x.clone()
        with torch.no_grad():
            success = _margin(model(x), y) <= 0
        step = torch.full((n,), -1, dtype=torch.long, device=x.device)
        step[success] = 0
        budget = int(cfg.n_queries)
        shared = bool(cfg.shared_signs)
        # the window side per query changes only where the schedule does
        sides: dict[float, int] = {}
        rows = (-1, 1, 1, 1)
        with torch.no_grad():
            for _ in range(int(cfg.restarts or 1)):
                idx = (~success).nonzero().flatten()
                if idx.numel() == 0:
                    break
                # the active examples' state, compacted when some break (no scatter per query)
                xs, ys = x[idx], y[idx]
                best = _init_linf(xs, eps, generator) if linf else _init_l2(xs, eps, generator)
                logits = model(best)
                mask = F.one_hot(ys, logits.shape[1]).bool()
                yv = ys.view(-1, 1)
                faces = _linf_faces(xs, eps) if linf else None
                m_best = _margin(logits, ys, mask)
                # every active margin is > 0 after a compaction, so "best margin <= 0" is "new margin <= 0"
                broke = m_best <= 0
                for it in range(budget + 1):
                    if bool(broke.any()):
                        x_adv[idx[broke]] = best[broke]
                        success[idx[broke]] = True
                        step[idx[broke]] = it
                        keep = ~broke
                        idx, xs, ys, best, m_best = idx[keep], xs[keep], ys[keep], best[keep], m_best[keep]
                        mask, yv = mask[keep], ys.view(-1, 1)
                        if faces is not None:
                            faces = (faces[0][keep], faces[1][keep])
                    if idx.numel() == 0 or it == budget:
                        break
                    p = p_selection(float(cfg.p_init), it, budget, bool(cfg.rescale_schedule))
                    s = sides.get(p)
                    if s is None:
                        s = sides[p] = _window(p, h, w, linf)
                    if faces is not None:
                        cand = _propose_linf(best, faces, s, shared, generator)
                    else:
                        cand = _propose_l2(xs, best, eps, s, generator)
                    m = _margin(model(cand), yv, mask)
                    broke = m <= 0
                    better = (m < m_best) | broke
                    best = torch.where(better.view(rows), cand, best)
                    m_best = torch.where(better, m, m_best)
                # not broken: keep the lowest-margin point (it is inside the ball)
                x_adv[idx] = best
        return AttackResult(x_adv, success, step)


register_attack("square", Square, doc="Square attack (L-inf, L2), native, AutoAttack's schedule; gradient-free.",
                random_start=False)

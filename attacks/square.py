"""Square attack (Andriushchenko et al., ECCV 2020), L-inf, native: a gradient-free random search.

As AutoAttack's ``square`` (pyautoattack ``SquareAttack``, margin loss, ``p_init`` 0.8 and its
square-size schedule): start from vertical stripes of +-eps; at query i, every example still
robust proposes a square of side ``s = round(sqrt(p_i * n_features / channels))`` (one window
position per query for the batch, a random sign per channel) added to its best point and clipped
to the ball and the box; the proposal is kept when it lowers the margin loss
``z_y - max_{j != y} z_j``; an example stops once that margin is <= 0. ``p_i`` halves at
query i = 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 (AutoAttack does not rescale these to
its 5,000-query budget; ``rescale_schedule=True`` does). By default one square and one set of
signs serve the whole batch per query, exactly as pyautoattack (``shared_signs=False``: signs
per example, as the paper's code: a stronger attack). Randomness comes from the attack's
generator, so results match pyautoattack's in distribution (robust accuracy), not point by point.

    atk = create_attack("square", "linf:8/255", n_queries=5000)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attacks.base import Attack, AttackConfig, AttackResult, register_attack
from bastion.errors import ConfigError


@dataclass(frozen=True)
class SquareConfig(AttackConfig):
    """``n_queries``: query budget per restart (AutoAttack: 5000); ``p_init``: initial fraction of
    the features a square covers (AutoAttack: 0.8); ``shared_signs``: one square (position and
    per-channel signs) for the whole batch per query, as pyautoattack does (True), or signs drawn
    per example, as the paper's reference code does (False: a stronger attack);
    ``rescale_schedule``: stretch the square-size schedule over ``n_queries`` as if it were
    10,000 (AutoAttack does not: False)."""

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


def _margin(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    cls = y if target is None else target
    own = logits.gather(1, cls.view(-1, 1))[:, 0]
    other = logits.masked_fill(F.one_hot(cls, logits.shape[1]).bool(), float("-inf")).amax(1)
    return own - other if target is None else other - own


def _signs(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    r = torch.randint(0, 2, shape, generator=generator, device=generator.device).to(like.device, like.dtype)
    return 2 * r - 1


class Square(Attack):
    """Square attack (Andriushchenko et al. 2020), L-inf, AutoAttack's settings; gradient-free."""

    config_class = SquareConfig
    gradient_free = True
    supports_targeted = False
    cost_rank = 80

    def __init__(self, config: SquareConfig, name: str | None = None):
        super().__init__(config, name)
        if config.threat.norm != "linf":
            raise ConfigError(f"native square attacks linf balls (got {config.threat}); for l2 use "
                              "autoattack with version='custom', attacks=['square']")

    def _run(self, model, x, y, y_target, generator):
        cfg = self.config
        eps = float(self.threat.eps)
        n = x.shape[0]
        if x.dim() != 4:
            raise ConfigError("square needs image inputs (N, C, H, W)")
        c, h, w = x.shape[1:]
        n_features = c * h * w
        x_adv = x.clone()
        with torch.no_grad():
            margin0 = _margin(model(x), y, None)
        success = margin0 <= 0
        step = torch.full((n,), -1, dtype=torch.long, device=x.device)
        step[success] = 0
        budget = int(cfg.n_queries)
        for _ in range(int(cfg.restarts or 1)):
            idx = (~success).nonzero().flatten()
            if idx.numel() == 0:
                break
            xs, ys = x[idx], y[idx]
            with torch.no_grad():
                best = (xs + eps * _signs((len(idx), c, 1, w), generator, xs)).clamp(0, 1)
                m_best = _margin(model(best), ys, None)
            pos = torch.arange(len(idx), device=x.device)
            for it in range(budget):
                todo = (m_best > 0).nonzero().flatten()
                if todo.numel() == 0:
                    break
                p = p_selection(float(cfg.p_init), it, budget, bool(cfg.rescale_schedule))
                s = min(max(int(round(math.sqrt(p * n_features / c))), 1), h, w)
                # positions in [0, h - s), as pyautoattack's random_int (0 when the square fills the image)
                vh = int(torch.randint(0, max(h - s, 1), (1,), generator=generator, device=generator.device))
                vw = int(torch.randint(0, max(w - s, 1), (1,), generator=generator, device=generator.device))
                xc, bc = xs[todo], best[todo]
                window = torch.zeros_like(bc)
                k = 1 if cfg.shared_signs else len(todo)
                window[:, :, vh:vh + s, vw:vw + s] = 2 * eps * _signs((k, c, 1, 1), generator, xs)
                cand = torch.minimum(torch.maximum(bc + window, xc - eps), xc + eps).clamp(0, 1)
                with torch.no_grad():
                    m = _margin(model(cand), ys[todo], None)
                better = (m < m_best[todo]) | (m <= 0)
                best[todo[better]] = cand[better]
                m_best[todo[better]] = m[better]
                newly = todo[better & (m <= 0)]
                step[idx[pos[newly]]] = it + 1
            broke = m_best <= 0
            x_adv[idx[broke]] = best[broke]
            success[idx[broke]] = True
            # not broken: keep the lowest-margin point (it is inside the ball)
            x_adv[idx[~broke]] = best[~broke]
        return AttackResult(x_adv, success, step)


register_attack("square", Square, doc="Square attack (L-inf), native, AutoAttack's schedule; gradient-free.",
                random_start=False)

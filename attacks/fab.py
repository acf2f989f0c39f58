"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), L-inf and L2, native.

A minimum-norm attack: from the current iterate ``x1`` it linearizes the decision boundary
(``h(z) = z_t - z_o = 0`` for the class pair chosen below), projects both ``x1`` and the clean
point ``x0`` onto that hyperplane intersected with the [0, 1] box (exact minimal-norm
projections, `project_on_hyperplane_in_box`), and moves to the convex combination
``(1 - alpha) (x1 + eta d1) + alpha (x0 + eta d0)`` with ``alpha = min(|d1| / (|d1| + |d0|),
alpha_max)``, so it stays close to the clean point while it crosses. Once an iterate is
adversarial it is recorded (if its norm is the smallest so far) and pulled back towards the
clean point, ``x0 + beta (x1 - x0)``, and the search continues from there. Settings are
AutoAttack's: ``steps`` 100, ``alpha_max`` 0.1, ``eta`` 1.05, ``beta`` 0.9; the first restart
starts at the clean point, each later one at a random point at distance eps / 2 (uniform
direction in L-inf, Gaussian in L2), and runs only on the examples not yet broken within eps.

- ``fab``: untargeted; the pair is (true class, the class whose linearized boundary is nearest
  in the threat model's norm), which needs the gradient of every logit at each step.
- ``fab-t``: AutoAttack's FAB-T: the pair (true class, target) for each of the
  ``n_target_classes`` (9) highest-scoring other classes at the clean input in turn, each target
  run only on the examples not yet broken within eps; one gradient per step. Success is
  misclassification, as in AutoAttack.
- ``targeted=True`` (either name): aim at the given (or selected) targets; the pair is (target,
  best other class) and success means the target is predicted.

The norm (linf or l2) comes from the threat model. Per example the attack reports the norm of
the smallest adversarial perturbation it found (`AttackResult.norms`, inf where none); an
example counts as broken only within eps (`Attack.run` drops the others, or clips them with
``project=True``). ``stop_within_eps=True`` stops each example as soon as it has an adversarial
point within eps (what a fixed-eps evaluation needs, and what ``autoattack-native`` uses):
robust accuracy at eps is unchanged, but the norms are then no longer minimal.

Runs in the input's dtype (float32 or float64) on the model's device; random starts come from
the attack's generator, so results agree with pyautoattack's FAB in distribution.

    atk = create_attack("fab-t", "linf:8/255")
    res = atk.run(model, x, y)          # res.norms: minimal L-inf norm found per example
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attacks.base import Attack, AttackConfig, AttackResult, register_attack
from bastion.errors import ConfigError
from bastion.threat import lp_norm

_TINY = 1e-12


@dataclass(frozen=True)
class FABConfig(AttackConfig):
    """``steps``: iterations per restart and target (100); ``alpha_max``: the largest weight of the
    step from the clean point (0.1); ``eta``: overshoot of the projection (1.05); ``beta``: pull
    back towards the clean point after a success (0.9); ``n_target_classes``: FAB-T's targets (9);
    ``stop_within_eps``: stop an example once it is broken within eps (norms not minimal then)."""

    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9
    n_target_classes: int = 9
    stop_within_eps: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha_max <= 1 or not self.eta >= 1 or not 0 < self.beta < 1:
            raise ConfigError(f"fab needs alpha_max in [0, 1], eta >= 1 and beta in (0, 1); got alpha_max="
                              f"{self.alpha_max}, eta={self.eta}, beta={self.beta}")
        if int(self.n_target_classes) < 1:
            raise ConfigError(f"fab n_target_classes must be >= 1, got {self.n_target_classes}")
        if self.threat.norm not in ("linf", "l2"):
            raise ConfigError(f"fab measures linf or l2 norms, not the {self.threat.norm} threat model {self.threat}")


def project_on_hyperplane_in_box(t: torch.Tensor, w: torch.Tensor, c: torch.Tensor, norm: str) -> torch.Tensor:
    """The smallest ``d`` (in ``norm``: linf or l2) with ``w . d = c`` and ``t + d`` in [0, 1], per row.

    t, w: (B, D), t in [0, 1]; c: (B,). Returns d (B, D). Where the box makes the hyperplane out of
    reach, d is the box corner that gets closest to it (largest ``sign(c) w . d``).

    With ``c >= 0`` (flip w otherwise) the solution moves each coordinate in the sign of ``w_i``
    by ``min(s * a_i, room_i)``: ``a_i`` = 1 (linf) or ``|w_i|`` (l2), ``room_i`` the distance to
    the box face in that direction, ``s >= 0`` the smallest value at which ``w . d`` reaches c.
    ``w . d`` is piecewise linear and increasing in s, with kinks where coordinates saturate
    (``s_i = room_i / a_i``): sort the kinks, find the segment holding c, solve on it.
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"project_on_hyperplane_in_box: norm must be linf or l2, got {norm!r}")
    w = w * torch.sign(c).unsqueeze(1)
    c = c.abs()
    direction = torch.sign(w)
    aw = w.abs()
    room = torch.where(w > 0, 1 - t, t).clamp_min(0)
    if norm == "linf":
        # speed 1: kink = room / 1 = room, and the products with the speed are the factors themselves
        kink, order = room.sort(dim=1)
        aw_s, room_s = aw.gather(1, order), kink
        rate = aw_s.flip(1).cumsum(1).flip(1)
    else:
        speed = aw
        kink = torch.where(speed > 0, room / speed.clamp_min(_TINY), torch.full_like(room, float("inf")))
        kink, order = kink.sort(dim=1)
        aw_s, room_s, speed_s = aw.gather(1, order), room.gather(1, order), speed.gather(1, order)
        rate = (aw_s * speed_s).flip(1).cumsum(1).flip(1)  # d(w . d)/ds for coordinates from kink k on
    full = aw_s * room_s                                   # w . d of a saturated coordinate
    before = full.cumsum(1) - full                         # saturated below kink k
    reach = before + torch.where(rate > 0, torch.nan_to_num(kink, posinf=0.0) * rate, torch.zeros_like(rate))
    k = (reach < c.unsqueeze(1)).sum(1)                    # first kink at which c is within reach
    feasible = k < t.shape[1]
    kk = k.clamp_max(t.shape[1] - 1).unsqueeze(1)
    s = ((c - before.gather(1, kk)[:, 0]) / rate.gather(1, kk)[:, 0].clamp_min(_TINY)).clamp_min(0)
    step = s.unsqueeze(1) if norm == "linf" else s.unsqueeze(1) * aw  # s * 1 is s
    move = torch.where(feasible.unsqueeze(1), torch.minimum(step, room), room)
    return direction * move


def _forward(model: nn.Module, pts: torch.Tensor, shape: tuple[int, ...], keep_graph: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the flat points ``pts`` (B, D), with the graph kept for gradients (``keep_graph``)."""
    xg = pts.detach().view(-1, *shape).requires_grad_(keep_graph)
    with torch.set_grad_enabled(keep_graph):
        return xg, model(xg)


def _boundary(xg: torch.Tensor, logits: torch.Tensor, keep: torch.Tensor | None, y: torch.Tensor,
              target: torch.Tensor | None, hit_target: bool, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The linearized boundary at the rows ``keep`` (all when None) of a forward pass ``logits =
    model(xg)``: value ``h`` (B,) and gradient ``g`` (B, D) of ``h = z_t - z_o``, negative while not
    adversarial. Untargeted (``target`` None): o = y and t the class whose linearized boundary is
    nearest in ``norm``; FAB-T: o = y; ``hit_target``: o = the best class other than the target."""
    with torch.enable_grad():
        z = logits if keep is None else logits[keep]
        rows = torch.arange(len(y), device=y.device) if target is None or hit_target else None

        def grad_of(out: torch.Tensor, retain: bool = False) -> torch.Tensor:
            (g,) = torch.autograd.grad(out.sum(), xg, retain_graph=retain)
            g = g.flatten(1)
            return g if keep is None else g[keep]

        if target is not None:
            if hit_target:
                other = z.detach().clone()
                other[rows, target] = float("-inf")
                own = other.argmax(1)
            else:
                own = y
            # gathers: the values of z[rows, target] - z[rows, own], and the same +-1 in the logits' gradient
            h = z.gather(1, target.view(-1, 1))[:, 0] - z.gather(1, own.view(-1, 1))[:, 0]
            return h.detach(), grad_of(h)
        jac = torch.stack([grad_of(z[:, j], retain=j < z.shape[1] - 1) for j in range(z.shape[1])], 1)  # (B, K, D)
    zd = z.detach()
    hs = zd - zd[rows, y].unsqueeze(1)
    gs = jac - jac[rows, y].unsqueeze(1)
    dual = gs.abs().sum(2) if norm == "linf" else gs.norm(dim=2)
    dist = hs.abs() / (dual + _TINY)
    dist[rows, y] = float("inf")
    j = dist.argmin(1)
    return hs[rows, j], gs[rows, j]


def fab_search(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, start: torch.Tensor, norm: str, steps: int,
               target: torch.Tensor | None = None, hit_target: bool = False, alpha_max: float = 0.1,
               eta: float = 1.05, beta: float = 0.9, eps: float = float("inf"), stop_within_eps: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One FAB run (see the module docstring) from ``start`` around the clean points ``x0`` (N, ...).

    Success: prediction != y, or == target with ``hit_target``. ``stop_within_eps``: drop an example
    from the search once it has an adversarial point within ``eps``. Returns (best adversarial
    point, x0 where none; its norm, inf where none; the step at which an adversarial point within
    eps was first found, -1 if never), shapes (N, ...), (N,), (N,).

    Each step costs one forward pass with its graph (the prediction check of the new iterate is
    also the next linearization) plus one more for the iterates pulled back after a success."""
    shape = tuple(x0.shape[1:])
    n = x0.shape[0]
    x0f = x0.flatten(1)
    best = x0f.clone()
    best_norm = torch.full((n,), float("inf"), dtype=x0.dtype, device=x0.device)
    first = torch.full((n,), -1, dtype=torch.long, device=x0.device)
    idx = torch.arange(n, device=x0.device)              # the rows still searched, in the graphs' order
    # ``ident``: idx is every row in order, so the per-row state needs no gather or scatter;
    # ya, ta, o and the iterates ``a`` are the rows idx of y, target, x0 and the current points
    ident = True
    ya, ta, o = y, target, x0f
    a = start.flatten(1)
    graphs = [(*_forward(model, a, shape), None)]        # (inputs, logits, rows kept or None)
    for i in range(steps):
        if idx.numel() == 0:
            break
        hs, gs, at = [], [], 0
        for xg, z, keep in graphs:
            m = z.shape[0] if keep is None else int(keep.sum())
            h_, g_ = _boundary(xg, z, keep, ya[at:at + m], None if ta is None else ta[at:at + m], hit_target, norm)
            hs.append(h_)
            gs.append(g_)
            at += m
        graphs = []
        h, g = (hs[0], gs[0]) if len(hs) == 1 else (torch.cat(hs), torch.cat(gs))
        with torch.no_grad():
            # the hyperplane h + g . (z - x1) = 0, reached from x1 and from x0
            c0 = (g * (a - o)).sum(1) - h
            t = torch.cat([a, o])
            d = project_on_hyperplane_in_box(t, torch.cat([g, g]), torch.cat([-h, c0]), norm)
            if norm == "linf":  # a row's max does not depend on the other rows: both halves at once
                n1, n0 = lp_norm(d, norm).clamp_min(1e-8).chunk(2)
            else:
                d1, d0 = d.chunk(2)
                n1 = lp_norm(d1, norm).clamp_min(1e-8)
                n0 = lp_norm(d0, norm).clamp_min(1e-8)
            alpha = (n1 / (n1 + n0)).clamp(0, alpha_max).unsqueeze(1)
            # (a + eta d1, o + eta d0), elementwise as separate operations would
            p1, p0 = (t + eta * d).chunk(2)
            a = ((1 - alpha) * p1 + alpha * p0).clamp(0, 1)
        last = i == steps - 1
        xg, z = _forward(model, a, shape, keep_graph=not last)
        with torch.no_grad():
            pred = z.detach().argmax(1)
            adv = pred == ta if hit_target else pred != ya
            dist = lp_norm(a - o, norm)
            if ident:  # the same updates as below, without gathers and scatters
                better = adv & (dist < best_norm)
                best = torch.where(better.unsqueeze(1), a, best)
                best_norm = torch.where(better, dist, best_norm)
                first = torch.where(adv & (dist <= eps) & (first < 0), i + 1, first)
                bn = best_norm
            else:
                better = adv & (dist < best_norm[idx])
                best[idx[better]] = a[better]
                best_norm[idx[better]] = dist[better]
                new = idx[adv & (dist <= eps)]
                first[new] = torch.where(first[new] < 0, torch.full_like(first[new], i + 1), first[new])
                bn = best_norm[idx]
            a = torch.where(adv.unsqueeze(1), o + beta * (a - o), a)
        if last:
            break
        keep = ~adv
        redo = adv & ~(bn <= eps) if stop_within_eps else adv
        n_keep, n_redo = int(keep.sum()), int(redo.sum())
        n_rows = idx.numel()
        # the graph's backward passes (K of them untargeted) also run over its pulled-back rows:
        # worth reusing only while those are few, else one fresh forward pass for every row
        backward_passes = 1 if target is not None else z.shape[1]
        if n_keep and (2 * backward_passes + 1) * (z.shape[0] - n_keep) < z.shape[0]:
            graphs.append((xg, z, None if n_keep == z.shape[0] else keep))
            if n_redo:
                graphs.append((*_forward(model, a[redo], shape), None))
            changed = n_keep < n_rows  # the kept rows first, then the pulled-back ones (the graphs' order)
            if changed:
                idx = torch.cat([idx[keep], idx[redo]])
                a = torch.cat([a[keep], a[redo]])
        else:
            changed = n_keep + n_redo < n_rows
            if changed:
                sel = keep | redo
                idx, a = idx[sel], a[sel]
            if idx.numel():
                graphs.append((*_forward(model, a, shape), None))
        if changed:
            ident = False
            ya, ta, o = y[idx], None if target is None else target[idx], x0f[idx]
    return best.view_as(x0), best_norm, first


def _random_start(x: torch.Tensor, norm: str, radius: float, generator: torch.Generator) -> torch.Tensor:
    """A point at distance ``radius`` from each x (random direction: uniform for linf, Gaussian for
    l2), clipped to the box."""
    if norm == "linf":
        u = 2 * torch.rand(x.shape, generator=generator, device=generator.device).to(x.device, x.dtype) - 1
    else:
        u = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device, x.dtype)
    scale = lp_norm(u, norm).clamp_min(_TINY).view(-1, *([1] * (x.dim() - 1)))
    return (x + radius * u / scale).clamp(0, 1)


class FAB(Attack):
    """FAB (Croce & Hein 2020), L-inf or L2 minimum-norm attack; untargeted (the nearest linearized
    boundary each step) or, with ``targeted=True``, towards given targets."""

    config_class = FABConfig
    minimum_norm = True
    bounded = False
    cost_rank = 65
    top_targets = False

    def _targets(self, logits: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor | None) -> list:
        """The target classes to run in turn (None: untargeted)."""
        if self.config.targeted:
            return [y_target]
        if not self.top_targets:
            return [None]
        order = logits.argsort(dim=1, descending=True)
        # an example still to attack is classified correctly, so its order[:, 0] is y
        return [order[:, j + 1] for j in range(min(int(self.config.n_target_classes), logits.shape[1] - 1))]

    def _run(self, model, x, y, y_target, generator):
        from bastion.progress import progress

        cfg = self.config
        norm, eps = cfg.threat.norm, float(cfg.threat.eps)
        steps = int(cfg.steps or 100)
        hit_target = bool(cfg.targeted)
        n = x.shape[0]
        with torch.no_grad():
            logits = model(x)
        pred = logits.argmax(1)
        done = pred == y_target if hit_target else pred != y
        best = x.clone()
        best_norm = torch.where(done, torch.zeros(n, dtype=x.dtype, device=x.device),
                                torch.full((n,), float("inf"), dtype=x.dtype, device=x.device))
        step = torch.where(done, torch.zeros(n, dtype=torch.long, device=x.device),
                           torch.full((n,), -1, dtype=torch.long, device=x.device))
        runs = [(t, r) for t in self._targets(logits, y, y_target) for r in range(int(cfg.restarts))]
        for k, (target, r) in enumerate(progress(runs, desc=self.name, unit="run", quiet=not cfg.progress)):
            idx = (best_norm > eps).nonzero().flatten()
            if idx.numel() == 0:
                break
            xi = x[idx]
            start = _random_start(xi, norm, eps / 2, generator) if r > 0 and cfg.random_start else xi
            adv, nrm, first = fab_search(
                model, xi, y[idx], start, norm, steps, target=None if target is None else target[idx],
                hit_target=hit_target, alpha_max=float(cfg.alpha_max), eta=float(cfg.eta), beta=float(cfg.beta),
                eps=eps, stop_within_eps=bool(cfg.stop_within_eps))
            better = nrm < best_norm[idx]
            pos = idx[better]
            best[pos] = adv[better]
            best_norm[pos] = nrm[better]
            broke = (first >= 0) & (nrm <= eps) & (step[idx] < 0)
            step[idx[broke]] = first[broke] + k * steps
        success = torch.isfinite(best_norm)
        return AttackResult(best, success, step)


class FABTargeted(FAB):
    """FAB-T, as AutoAttack: FAB towards each of the ``n_target_classes`` highest-scoring other
    classes in turn, each on examples not yet broken within eps; success = misclassification."""

    top_targets = True


register_attack("fab", FAB, doc="FAB minimum-norm attack, L-inf or L2 (AutoAttack's settings).", steps=100)
register_attack("fab-t", FABTargeted, doc="FAB-T: targeted FAB over the top wrong classes, as AutoAttack's.",
                steps=100)

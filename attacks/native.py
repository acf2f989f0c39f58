"""Native white-box attacks: FGSM, PGD and APGD (CE, DLR, targeted), with EOT.

One engine per update rule, shared by every loss and composite objective:

- every example is first checked at its clean point (already misclassified: nothing to do);
- only examples that are still correctly classified keep being attacked (per-example early
  exit: the active batch shrinks as examples break, so a model that breaks early is cheap);
- restarts (and APGD-T's target classes) run only on examples not yet broken;
- the result is the strongest adversary per example: the first adversarial point found, else
  the highest-loss point seen over all steps and restarts;
- ``eot_iter = k`` averages the loss gradient over k forward passes (Expectation over
  Transformation) for randomized models; success then means a majority of the k draws
  mispredict.

Threat models linf, l2 and l1 (l1: AutoAttack's sparse step on the top ``L1_SPARSITY`` gradient
coordinates, initial APGD step eps, exact projection onto the L1 ball and box; a simplified
APGD-L1 with a fixed sparsity and without AutoAttack's large-eps restarts).

APGD follows Croce & Hein (ICML 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks"): step size 2*eps, momentum 0.75 after the first
step, checkpoints at w_j = ceil(p_j * N) with p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); at a checkpoint the step size of an example is
halved, and it restarts from its best point, when its loss increased in fewer than rho * (w_j - w_{j-1})
of the steps since the last checkpoint, or when its step size was not reduced at the last
checkpoint and its best loss has not improved since.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attacks.base import Attack, AttackConfig, AttackError, AttackResult, register_attack
from attacks.objectives import LossObjective, Objective
from bastion.errors import ConfigError
from bastion.threat import ThreatModel


@dataclass(frozen=True)
class NativeConfig(AttackConfig):
    """`AttackConfig` plus ``objective``: a composite objective (see `attacks.adaptive`) used
    instead of the plain ``loss`` (None: the loss on the model's logits), and ``margin``: an
    example counts as broken (and stops being attacked) only once the logit margin of the wrong
    class over the true one (targeted: of the target over the best other class) reaches
    ``margin``; 0 stops at the first crossing. A margin keeps adversarial examples adversarial
    when they are re-predicted in reduced precision (bf16, TF32) or by an exported model."""

    objective: Any = None
    margin: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not float(self.margin) >= 0:
            raise ConfigError(f"attack margin must be >= 0, got {self.margin}")


@dataclass(frozen=True)
class APGDConfig(NativeConfig):
    """``rho``: checkpoint threshold; ``n_target_classes``: APGD-T's targets (the top classes)."""

    rho: float = 0.75
    n_target_classes: int = 9

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.rho <= 1:
            raise ConfigError(f"apgd rho must be in (0, 1], got {self.rho}")
        if self.n_target_classes < 1:
            raise ConfigError(f"apgd n_target_classes must be >= 1, got {self.n_target_classes}")


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------

def _bshape(x: torch.Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (x.dim() - 1)


# share of coordinates an L1 step moves (at least one); AutoAttack adapts it per example, this
# is fixed: 2% matched pyautoattack's APGD-L1 on digits (63.3% vs 66.0% robust at l1:1, 19.3%
# vs 18.0% at l1:2, 150 examples), 20% left 85% / 50%
L1_SPARSITY = 0.02


def _direction(threat: ThreatModel, g: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """Unit step direction: sign (linf), normalized gradient (l2, l0), or for l1 the signs of the
    largest ``L1_SPARSITY`` share of the gradient coordinates the box lets move, scaled to unit
    L1 norm (AutoAttack's sparse L1 step)."""
    if threat.norm == "linf":
        return g.sign()
    if threat.norm == "l1":
        if x is not None:  # coordinates the [0, 1] box blocks in the ascent direction do not count
            g = torch.where(((x <= 0) & (g < 0)) | ((x >= 1) & (g > 0)), torch.zeros_like(g), g)
        flat = g.flatten(1)
        k = max(1, int(round(L1_SPARSITY * flat.shape[1])))
        thr = flat.abs().topk(k, dim=1).values[:, -1:]
        sparse = torch.where(flat.abs() >= thr, flat.sign(), torch.zeros_like(flat))
        return (sparse / sparse.abs().sum(1, keepdim=True).clamp_min(1)).view_as(g)
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(_bshape(g))


def _sub(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[idx]


def _goal_margin(logits: torch.Tensor, y: torch.Tensor, goal_target: torch.Tensor | None) -> torch.Tensor:
    """How far the prediction is past the goal: max_{j != y} z_j - z_y, or z_t - max_{j != t} z_j."""
    from attacks.objectives import margin_loss

    return margin_loss(logits, y, goal_target)


def evaluate_objective(objective: Objective, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       loss_target: torch.Tensor | None, goal_target: torch.Tensor | None, eot: int,
                       need_grad: bool, margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, success, gradient) at ``x``, averaged over ``eot`` draws of the model's randomness.

    success: prediction != y (untargeted, ``goal_target`` None) or == goal_target (with
    ``margin`` > 0: the goal's logit margin is >= margin), and the objective's extra condition;
    with eot > 1 a majority of draws must succeed."""
    if eot == 1:
        return _evaluate_once(objective, model, x, y, loss_target, goal_target, need_grad, margin)
    grad = None
    loss_sum = None
    succ_sum = None
    if need_grad:
        x = x.detach().requires_grad_(True)
    for _ in range(eot):
        with torch.set_grad_enabled(need_grad):
            out = objective(model, x, y, loss_target)
            if need_grad:
                (g,) = torch.autograd.grad(out.loss.sum(), x)
                grad = g if grad is None else grad + g
        with torch.no_grad():
            if margin > 0:
                s = _goal_margin(out.logits.detach(), y, goal_target) >= margin
            else:
                pred = out.logits.detach().argmax(dim=1)
                s = pred != y if goal_target is None else pred == goal_target
            if out.valid is not None:
                s = s & out.valid.detach().bool()
            loss = out.loss.detach()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            succ_sum = s.to(loss.dtype) if succ_sum is None else succ_sum + s.to(loss.dtype)
    if eot == 1:
        return loss_sum, succ_sum > 0.5, grad
    return loss_sum / eot, succ_sum > eot / 2, (grad / eot if grad is not None else None)


def _evaluate_once(objective: Objective, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   loss_target: torch.Tensor | None, goal_target: torch.Tensor | None, need_grad: bool,
                   margin: float, ones: torch.Tensor | None = None,
                   lazy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`evaluate_objective` for one draw, with as few tensor operations as possible (on a cheap
    model the attack's own bookkeeping is a visible share of the time): the gradient of the summed
    loss is taken as the vector-Jacobian product with ones (the same numbers; ``ones`` reuses a
    tensor of ones of the loss's shape and dtype). ``lazy``: success is None when no example
    succeeded (checked with one comparison where the success is the plain misprediction)."""
    g = None
    if need_grad:
        x = x.detach().requires_grad_(True)
        with _NO_CONTEXT if torch.is_grad_enabled() else torch.enable_grad():
            out = objective(model, x, y, loss_target)
            loss = out.loss
            if ones is None or ones.shape != loss.shape or ones.dtype != loss.dtype or ones.device != loss.device:
                ones = torch.ones_like(loss)
            (g,) = torch.autograd.grad(loss, x, ones)
    else:
        with torch.no_grad():
            out = objective(model, x, y, loss_target)
    if lazy and margin <= 0 and goal_target is None and out.valid is None and y.dtype == torch.long:
        pred = out.logits.argmax(dim=1)  # an index: no autograd graph
        return out.loss.detach(), None if torch.equal(pred, y) else pred != y, g
    with torch.no_grad():
        if margin > 0:
            s = _goal_margin(out.logits, y, goal_target) >= margin
        else:
            pred = out.logits.argmax(dim=1)
            s = pred != y if goal_target is None else pred == goal_target
        if out.valid is not None:
            s = s & out.valid.bool()
    return out.loss.detach(), s, g


class _Outcome:
    """Per-example bookkeeping shared by the engines (global batch positions)."""

    def __init__(self, x: torch.Tensor, loss0: torch.Tensor, success0: torch.Tensor, own: bool = False):
        """``own``: ``loss0`` and ``success0`` are fresh tensors nobody else holds (no copies made)."""
        self.x_adv = x.clone()
        self.best = loss0 if own else loss0.clone()
        self.success = success0 if own else success0.clone()
        self.step = torch.where(success0, 0, -1)  # long: 0 where broken at the start, else -1

    def hit(self, idx: torch.Tensor, mask: torch.Tensor, x_cur: torch.Tensor, step: int) -> None:
        pos = idx[mask]
        self.x_adv[pos] = x_cur[mask]
        self.success[pos] = True
        self.step[pos] = step

    def hit_rows(self, idx: torch.Tensor, rows: torch.Tensor, x_cur: torch.Tensor, step: int) -> None:
        """`hit` with the broken rows given as indices (one gather per tensor, no mask scans)."""
        pos = idx.index_select(0, rows)
        self.x_adv.index_copy_(0, pos, x_cur.index_select(0, rows))
        self.success.index_fill_(0, pos, True)
        self.step.index_fill_(0, pos, step)

    def keep_best(self, idx: torch.Tensor, loss: torch.Tensor, x_best: torch.Tensor) -> None:
        if idx.numel() == 0:
            return
        if idx.numel() == self.best.shape[0]:  # idx is every position in order: no gather or scatter
            better = loss > self.best
            self.best = torch.where(better, loss, self.best)
            self.x_adv = torch.where(better.view(_bshape(x_best)), x_best, self.x_adv)
            return
        better = loss > self.best[idx]
        self.best[idx] = torch.where(better, loss, self.best[idx])
        self.x_adv[idx] = torch.where(better.view(_bshape(x_best)), x_best, self.x_adv[idx])

    def put_best(self, idx: torch.Tensor, loss: torch.Tensor, x_best: torch.Tensor) -> None:
        """Store a best point that already accounts for the stored one (``loss`` >= ``best[idx]`` or
        equal to it bit for bit): `keep_best` without its comparison."""
        if idx.numel() == self.best.shape[0]:
            self.best, self.x_adv = loss, x_best
        elif idx.numel():
            self.best.index_copy_(0, idx, loss)
            self.x_adv.index_copy_(0, idx, x_best)

    def remaining(self) -> torch.Tensor:
        return (~self.success).nonzero().flatten()

    def result(self) -> AttackResult:
        return AttackResult(self.x_adv, self.success, self.step)


_NO_CONTEXT = contextlib.nullcontext()

# bytes of iterates PGD keeps before folding them into its best point (see `_BestPoint`)
SEGMENT_BYTES = 32 * 2 ** 20


class _Scratch:
    """Reusable CPU scratch storage for `_BestPoint`: a fresh multi-megabyte allocation is mapped
    anew by the C allocator on every call and each of its pages faults on first write (~450 faults,
    ~1 ms per call on the benchmark's MLP); GPU memory already comes from PyTorch's caching
    allocator. One buffer per dtype (of at most ``SEGMENT_BYTES``) is kept, taken out while in use
    (re-entrant, thread-safe)."""

    _free: dict[torch.dtype, torch.Tensor] = {}  # dict pop and set are atomic: no lock needed
    _range: torch.Tensor | None = None

    @classmethod
    def take(cls, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            t = cls._free.pop(dtype, None)
            if t is not None and t.numel() >= numel:
                return t
        return torch.empty(numel, dtype=dtype, device=device)

    @classmethod
    def arange(cls, n: int, device: torch.device) -> torch.Tensor:
        """``torch.arange(n)`` (long) on ``device``, a slice of one kept, never written, for the CPU."""
        if device.type != "cpu":
            return torch.arange(n, device=device)
        t = cls._range
        if t is None or t.numel() < n:
            t = cls._range = torch.arange(max(n, 1024))
        return t[:n]

    @classmethod
    def give(cls, t: torch.Tensor) -> None:
        if t.device.type == "cpu" and t.numel() * t.element_size() <= SEGMENT_BYTES:  # large ones are not kept
            cls._free[t.dtype] = t


def _first_max(losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``losses`` (b, m): (value, index) of what ``best = where(l_j > best, l_j, best)``
    keeps over j = 0..m-1 in order: the first maximum of the non-NaN entries, entry 0 when it is
    NaN (nothing compares greater than NaN)."""
    best, j = losses.max(1)  # the first maximum; NaN propagates (its first index)
    if math.isnan(float(best.sum())):  # some NaN (or +inf and -inf): redo with NaN entries after the first never taken
        nan = losses.isnan()
        j = losses.masked_fill(nan, float("-inf")).argmax(1).masked_fill(nan[:, 0], 0)
        best = losses.gather(1, j.unsqueeze(1)).squeeze(1)
    return best, j


class _BestPoint:
    """PGD's strongest point per active example (the highest loss seen, its first iterate).

    The iterates of a segment of steps are kept in one buffer (the linf step writes there directly,
    so keeping them costs nothing per step) and their losses in a list; `fold` reduces the segment
    to exactly what ``best = where(loss > best, loss, best)`` (and the same for the point) gives
    applied step by step (`_first_max`). A segment ends when examples break (`keep` folds it for
    the examples that stay), when the buffer (``SEGMENT_BYTES``) is full, and at the end.
    `release` hands the buffer back."""

    @torch.no_grad()  # the buffer never enters autograd (x may require grad when a caller passes it in)
    def __init__(self, loss: torch.Tensor, x: torch.Tensor, steps: int, rows: torch.Tensor | None = None):
        """Start from ``loss`` (B,) and points ``x`` (B, ...), restricted to ``rows`` when given."""
        shape = tuple(x.shape) if rows is None else (rows.shape[0],) + tuple(x.shape[1:])
        numel = x[0].numel() * shape[0]
        self.cap = max(2, min(steps + 2, SEGMENT_BYTES // max(1, numel * x.element_size())))
        self.store = _Scratch.take(self.cap * numel, x.dtype, x.device)
        self._layout(shape)
        if rows is None:
            self.points[0].copy_(x)
        else:
            torch.index_select(x, 0, rows, out=self.points[0])
            loss = loss.index_select(0, rows)
        self.losses = [loss]  # the losses of the segment's entries
        self.rows: torch.Tensor | None = None  # arange(b), made on first use
        self.m = 1
        self.free: torch.Tensor | None = None  # the slot handed out by `slot`

    def _layout(self, shape: tuple[int, ...]) -> None:
        n = 1
        for d in shape:
            n *= d
        self.points = self.store[:self.cap * n].view((self.cap,) + shape)

    def slot(self) -> torch.Tensor:
        """Where the next iterate may be written (then `add` keeps it without a copy)."""
        if self.m == self.cap:
            self._restart()
        self.free = self.points.select(0, self.m)
        return self.free

    def add(self, loss: torch.Tensor, x: torch.Tensor) -> None:
        if x is not self.free:
            with torch.no_grad():
                if self.m == self.cap:
                    self._restart()
                self.points.select(0, self.m).copy_(x)
        self.free = None
        self.losses.append(loss)
        self.m += 1

    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(best loss, best point) so far, the point a tensor of its own."""
        best, j = _first_max(torch.stack(self.losses, dim=1))
        b = j.shape[0]
        if self.rows is None or self.rows.shape[0] != b:
            self.rows = _Scratch.arange(b, j.device)
        flat = self.points.view((-1,) + tuple(self.points.shape[2:]))  # entry j of row i: row j * b + i
        return best, flat.index_select(0, torch.add(self.rows, j, alpha=b))

    @torch.no_grad()
    def _restart(self) -> None:
        best, point = self.fold()
        self.points[0].copy_(point)
        self.losses, self.m, self.free = [best], 1, None

    @torch.no_grad()
    def keep(self, rows: torch.Tensor) -> torch.Tensor:
        """Keep only the active examples ``rows``: fold for them and restart the segment from that;
        returns their current iterate (the last entry), a tensor of its own."""
        best, j = _first_max(torch.stack(self.losses, dim=1).index_select(0, rows))
        b = self.points.shape[1]
        flat = self.points.view((-1,) + tuple(self.points.shape[2:]))  # entry j of row i: row j * b + i
        point = flat.index_select(0, torch.add(rows, j, alpha=b))
        current = self.points.select(0, self.m - 1).index_select(0, rows)
        self._layout((rows.shape[0],) + tuple(self.points.shape[2:]))
        self.points[0].copy_(point)
        self.losses, self.m, self.free = [best], 1, None
        return current

    def release(self) -> None:
        _Scratch.give(self.store)


class NativeAttack(Attack):
    config_class = NativeConfig

    def objective(self) -> Objective:
        return self.config.objective if self.config.objective is not None else LossObjective(self.config.loss)

    def _start(self, model, x, y, loss_target, goal_target) -> _Outcome:
        loss, succ, _ = evaluate_objective(self.objective(), model, x, y, loss_target, goal_target,
                                           self.config.eot_iter, False, float(self.config.margin))
        if self.config.margin > 0 and goal_target is None and self.config.objective is None:
            # already misclassified examples are not attacked further
            with torch.no_grad():
                pred = model(x).argmax(1)
            succ = succ | (pred != y)
        # the built-in loss objectives return fresh tensors; a custom one might hand out its own
        return _Outcome(x, loss, succ, own=self.config.objective is None)

    def _finish(self, model, x, y, goal, out: _Outcome) -> AttackResult:
        """The result; with a margin, success is re-read from the prediction (an example that
        crossed the boundary but never reached the margin is still adversarial)."""
        res = out.result()
        if self.config.margin > 0 and self.config.objective is None:
            with torch.no_grad():
                pred = model(res.x_adv).argmax(1)
            res.success = res.success | (pred == goal if goal is not None else pred != y)
        return res


# ---------------------------------------------------------------------------------------------
# PGD / FGSM
# ---------------------------------------------------------------------------------------------

def _per_example(v: float | torch.Tensor | None, idx: torch.Tensor) -> float | torch.Tensor | None:
    """A scalar as is; a (B,) tensor of per-example values restricted to ``idx``, shaped (b, 1, ...)."""
    return v if v is None or not torch.is_tensor(v) else v[idx]


def _random_start(threat: ThreatModel, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``threat.random_start(x, generator)``; for linf the same operations done in place (the same
    numbers, fewer allocations)."""
    if threat.norm != "linf":
        return threat.random_start(x, generator)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return u.mul_(2).sub_(1).mul_(threat.eps).add_(x).clamp_(0.0, 1.0)


def _ball_start(threat: ThreatModel, x: torch.Tensor, eps: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random start in per-example balls of radius ``eps`` (b,) (linf: uniform; l2: a uniform
    direction at a uniform radius), in [0, 1]."""
    shape = _bshape(x)
    if threat.norm == "linf":
        u = torch.rand(x.shape, generator=g, device=g.device).to(x.device, x.dtype)
        return (x + (2 * u - 1) * eps.view(shape)).clamp(0, 1)
    d = torch.randn(x.shape, generator=g, device=g.device).to(x.device, x.dtype)
    d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
    r = torch.rand(x.shape[0], generator=g, device=g.device).to(x.device, x.dtype)
    return _ball_project(threat, x, x + d * (r * eps).view(shape), eps)


def _ball_project(threat: ThreatModel, x: torch.Tensor, xa: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Project onto per-example balls of radius ``eps`` (b,) around ``x`` (linf or l2) and [0, 1]."""
    shape = _bshape(x)
    d = xa - x
    if threat.norm == "linf":
        e = eps.view(shape)
        d = torch.maximum(torch.minimum(d, e), -e)
    elif threat.norm == "l2":
        d = d * (eps / d.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1).view(shape)
    else:
        raise AttackError(f"per-example radii support linf and l2, not {threat.norm}")
    return (x + d).clamp(0, 1)


def pgd_engine(model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective, threat: ThreatModel,
               steps: int, step_size: float | torch.Tensor, restarts: int, random_start: bool, eot: int,
               generator: torch.Generator, out: _Outcome, loss_target: torch.Tensor | None = None,
               goal_target: torch.Tensor | None = None, step_offset: int = 0, margin: float = 0.0,
               eps: torch.Tensor | None = None, momentum: float | None = None) -> _Outcome:
    """Projected gradient ascent on ``objective`` (signed steps for linf, normalized for l2),
    attacking only the examples ``out`` has not broken yet.

    Options for randomized training adversaries: ``eps`` (B,) per-example radii (linf/l2) inside
    ``threat``'s ball, ``step_size`` a float or (B,) tensor, ``momentum`` m: steps follow
    ``buf = m buf + g / scale(g)`` (scale: mean |g| for linf, ||g||_2 for l2) instead of g."""
    for r in range(restarts):
        idx = out.remaining()
        if idx.numel() == 0:
            break
        whole = idx.numel() == x.shape[0]  # nothing broken yet: idx is every position, no gathers
        x0, yy = (x, y) if whole else (x.index_select(0, idx), y.index_select(0, idx))
        lt, gt = (loss_target, goal_target) if whole else (_sub(loss_target, idx), _sub(goal_target, idx))
        ee, st = _per_example(eps, idx), _per_example(step_size, idx)
        if ee is not None:
            xc = _ball_start(threat, x0, ee, generator) if random_start else x0.clone()
        else:
            xc = _random_start(threat, x0, generator) if random_start else x0.clone()
        tracker = _BestPoint(out.best, out.x_adv, steps, None if whole else idx)
        ones = torch.ones_like(out.best[:idx.numel()])  # the vector-Jacobian product's ones, reused each step
        buf = torch.zeros_like(x0) if momentum is not None else None
        base = step_offset + r * steps
        shape = _bshape(x0)
        stp = st.view(shape) if torch.is_tensor(st) else st
        # the update needs no autograd context unless an input to it records a graph
        track = torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in (x0, xc, ee, st))
        fused = threat.norm == "linf" and ee is None and not torch.is_tensor(stp) and buf is None and \
            x0.dtype in (torch.float32, torch.float64)
        for k in range(steps + 1):
            need = k < steps
            if eot == 1:
                loss, succ, g = _evaluate_once(objective, model, xc, yy, lt, gt, need, margin, ones, lazy=True)
            else:
                loss, succ, g = evaluate_objective(objective, model, xc, yy, lt, gt, eot, need, margin)
            tracker.add(loss, xc)
            if succ is not None and succ.any():
                out.hit_rows(idx, succ.nonzero().flatten(), xc, base + k)
                rows = (~succ).nonzero().flatten()  # one index for every compaction (no repeated masks)
                xc = tracker.keep(rows)
                idx, yy, x0 = idx.index_select(0, rows), yy.index_select(0, rows), x0.index_select(0, rows)
                lt, gt, ee, buf = _sub(lt, rows), _sub(gt, rows), _sub(ee, rows), _sub(buf, rows)
                if torch.is_tensor(st):
                    st = st[rows]
                    stp = st.view(shape)
                if g is not None:
                    g = g.index_select(0, rows)
                ones = ones[:idx.numel()]
                if idx.numel() == 0:
                    break
            if not need:
                break
            with torch.no_grad() if track else _NO_CONTEXT:  # x may require grad when a caller passes it straight in
                if fused:
                    # threat.project's operations, the last one writing into the tracker's buffer;
                    # add(alpha=) is exact here: stp * sign(g) is exact in the input's dtype
                    delta = torch.add(xc, g.sign(), alpha=stp).sub_(x0).clamp_(-threat.eps, threat.eps)
                    xc = torch.clamp(delta.add_(x0), 0.0, 1.0, out=tracker.slot())
                    continue
                if buf is not None:
                    scale = g.abs().flatten(1).mean(1) if threat.norm == "linf" else g.flatten(1).norm(dim=1)
                    buf = momentum * buf + g / scale.clamp_min(1e-12).view(shape)
                    g = buf
                xn = xc + stp * _direction(threat, g, xc)
                xc = threat.project(x0, xn) if ee is None else _ball_project(threat, x0, xn, ee)
        if idx.numel():
            out.put_best(idx, *tracker.fold())
        tracker.release()
    return out


def training_adversary(model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective,
                       threat: ThreatModel, steps: int, step_size: float | torch.Tensor, generator: torch.Generator,
                       *, target: torch.Tensor | None = None, eps: torch.Tensor | None = None,
                       momentum: float | None = None, random_start: bool = True) -> torch.Tensor:
    """The PGD engine for training-data generation: every example takes every step of ``objective``
    (whose ``valid`` should be all False, so nothing stops early) and the highest-loss point is
    returned, detached; ``eps``/``step_size`` may be per example (B,), ``momentum`` as in
    `pgd_engine`. No mode or gradient bookkeeping: the caller owns the model's state."""
    with torch.no_grad():
        loss0 = objective(model, x, y, target).loss.detach()
    out = _Outcome(x, loss0, torch.zeros_like(y, dtype=torch.bool))
    pgd_engine(model, x, y, objective, threat, steps, step_size, 1, random_start, 1, generator, out, target,
               eps=eps, momentum=momentum)
    return out.x_adv.detach()


class PGD(NativeAttack):
    """Projected gradient descent (Madry et al. 2018): linf or l2, CE/margin/DLR losses, random
    start, restarts; default step size 2.5 * eps / steps."""

    cost_rank = 20
    step_factor = 2.5  # default step size = step_factor * eps / steps

    def _run(self, model, x, y, y_target, generator):
        cfg = self.config
        steps = int(cfg.steps or 10)
        alpha = float(cfg.step_size) if cfg.step_size is not None else self.step_factor * cfg.threat.eps / steps
        goal = y_target if cfg.targeted else None
        out = self._start(model, x, y, y_target, goal)
        pgd_engine(model, x, y, self.objective(), cfg.threat, steps, alpha, cfg.restarts, cfg.random_start,
                   cfg.eot_iter, generator, out, y_target, goal, margin=float(cfg.margin))
        return self._finish(model, x, y, goal, out)


class FGSM(NativeAttack):
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size eps (l2: normalized
    gradient); optional random start (FGSM-RS) with a smaller step."""

    cost_rank = 10

    def _run(self, model, x, y, y_target, generator):
        cfg = self.config
        if cfg.steps not in (None, 1):
            raise AttackError("fgsm takes exactly one step; use pgd for more")
        alpha = float(cfg.step_size) if cfg.step_size is not None else cfg.threat.eps
        goal = y_target if cfg.targeted else None
        out = self._start(model, x, y, y_target, goal)
        pgd_engine(model, x, y, self.objective(), cfg.threat, 1, alpha, cfg.restarts, cfg.random_start,
                   cfg.eot_iter, generator, out, y_target, goal, margin=float(cfg.margin))
        return self._finish(model, x, y, goal, out)


# ---------------------------------------------------------------------------------------------
# APGD
# ---------------------------------------------------------------------------------------------

def apgd_checkpoints(n_iter: int) -> list[int]:
    """Iterations w_j (1 <= w_j <= n_iter) at which APGD may halve its step size."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    pts = [math.ceil(round(q * n_iter, 9)) for q in p[1:] if round(q, 9) <= 1]
    return sorted({w for w in pts if 1 <= w <= n_iter})


def _record(out: _Outcome, st: dict[str, torch.Tensor], succ: torch.Tensor | None, step: int) -> bool:
    """Store successes of the active APGD state ``st`` (None: none), drop them from it; True when none is left."""
    if succ is not None and bool(succ.any()):
        out.hit(st["idx"], succ, st["xk"], step)
        keep = ~succ
        for key in list(st):
            st[key] = st[key][keep]
    return st["idx"].numel() == 0


def apgd_engine(model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective, threat: ThreatModel,
                steps: int, rho: float, restarts: int, random_start: bool, eot: int, generator: torch.Generator,
                out: _Outcome, loss_target: torch.Tensor | None = None, goal_target: torch.Tensor | None = None,
                step_offset: int = 0, eta0: float | None = None, margin: float = 0.0) -> _Outcome:
    """Auto-PGD (see module docstring) on the examples ``out`` has not broken yet."""
    ckpts = set(apgd_checkpoints(steps))
    # AutoAttack: initial step 2 * eps (linf, l2), eps for its sparse L1 steps
    eta_init = (1.0 if threat.norm == "l1" else 2.0) * threat.eps if eta0 is None else eta0
    for r in range(restarts):
        idx = out.remaining()
        if idx.numel() == 0:
            break
        base = step_offset + r * steps
        x0, yy = x[idx], y[idx]
        lt, gt = _sub(loss_target, idx), _sub(goal_target, idx)
        xk = threat.random_start(x0, generator) if random_start else x0.clone()
        loss, succ, g = evaluate_objective(objective, model, xk, yy, lt, gt, eot, steps > 0, margin)
        # state of the active examples (compacted together when some break)
        st: dict[str, torch.Tensor] = {}
        st["idx"], st["x0"], st["y"] = idx, x0, yy
        if lt is not None:
            st["lt"] = lt
        if gt is not None:
            st["gt"] = gt
        st["xk"], st["xprev"], st["g"] = xk, xk, g
        st["eta"] = torch.full((idx.numel(),), eta_init, dtype=x.dtype, device=x.device)
        st["fmax"], st["xmax"], st["gmax"] = loss, xk, g
        st["fprev"] = loss
        st["incr"] = torch.zeros_like(loss)
        st["fmax_ckpt"] = loss
        st["reduced"] = torch.zeros_like(succ)

        if _record(out, st, succ, base):
            continue
        last_w = 0
        ones = torch.ones_like(st["fmax"])
        for i in range(steps):
            shape = _bshape(st["xk"])
            with torch.no_grad():
                xk, x0 = st["xk"], st["x0"]
                eta = st["eta"].view(shape)
                z = threat.project(x0, xk + eta * _direction(threat, st["g"], xk))
                if i > 0:
                    z = threat.project(x0, xk + 0.75 * (z - xk) + 0.25 * (xk - st["xprev"]))
                st["xprev"], st["xk"] = xk, z
            need = (i + 1) < steps
            if eot == 1:  # evaluate_objective's one draw, reusing the ones of the gradient's product
                ones = ones if ones.shape == st["fmax"].shape else torch.ones_like(st["fmax"])
                loss, succ, g = _evaluate_once(objective, model, st["xk"], st["y"], st.get("lt"), st.get("gt"),
                                               need, margin, ones, lazy=True)
            else:
                loss, succ, g = evaluate_objective(objective, model, st["xk"], st["y"], st.get("lt"), st.get("gt"),
                                                   eot, need, margin)
            st["g"] = g if g is not None else st["g"]
            st["incr"] = st["incr"] + (loss > st["fprev"]).to(loss.dtype)
            st["fprev"] = loss
            better = loss > st["fmax"]
            st["fmax"] = torch.where(better, loss, st["fmax"])
            st["xmax"] = torch.where(better.view(shape), st["xk"], st["xmax"])
            st["gmax"] = torch.where(better.view(shape), st["g"], st["gmax"])
            if _record(out, st, succ, base + i + 1):
                break
            if (i + 1) in ckpts and need:
                h = (i + 1) - last_w
                cond1 = st["incr"] < rho * h
                cond2 = (~st["reduced"]) & (st["fmax"] <= st["fmax_ckpt"])
                red = cond1 | cond2
                rs = red.view(shape)
                st["eta"] = torch.where(red, st["eta"] / 2, st["eta"])
                st["xk"] = torch.where(rs, st["xmax"], st["xk"])
                st["xprev"] = torch.where(rs, st["xmax"], st["xprev"])
                st["g"] = torch.where(rs, st["gmax"], st["g"])
                st["fprev"] = torch.where(red, st["fmax"], st["fprev"])
                st["reduced"] = red
                st["fmax_ckpt"] = st["fmax"].clone()
                st["incr"] = torch.zeros_like(st["incr"])
                last_w = i + 1
        if st["idx"].numel():
            out.keep_best(st["idx"], st["fmax"], st["xmax"])
    return out


class APGD(NativeAttack):
    """Auto-PGD (Croce & Hein 2020) on CE (apgd-ce), DLR (apgd-dlr) or any objective; 100
    iterations by default; targeted=True aims at the given/selected targets."""

    config_class = APGDConfig
    cost_rank = 30

    def _run(self, model, x, y, y_target, generator):
        cfg = self.config
        steps = int(cfg.steps or 100)
        goal = y_target if cfg.targeted else None
        out = self._start(model, x, y, y_target, goal)
        apgd_engine(model, x, y, self.objective(), cfg.threat, steps, cfg.rho, cfg.restarts, cfg.random_start,
                    cfg.eot_iter, generator, out, y_target, goal, eta0=cfg.step_size, margin=float(cfg.margin))
        return self._finish(model, x, y, goal, out)


class APGDTargeted(NativeAttack):
    """APGD-T (Croce & Hein 2020): APGD on the targeted DLR loss towards each of the
    ``n_target_classes`` highest-scoring wrong classes in turn, each on examples still robust;
    success = misclassification. With targeted=True it aims at the given/selected targets."""

    config_class = APGDConfig
    cost_rank = 40

    def _run(self, model, x, y, y_target, generator):
        cfg = self.config
        steps = int(cfg.steps or 100)
        obj = self.objective()
        if cfg.targeted:
            out = self._start(model, x, y, y_target, y_target)
            apgd_engine(model, x, y, obj, cfg.threat, steps, cfg.rho, cfg.restarts, cfg.random_start,
                        cfg.eot_iter, generator, out, y_target, y_target, eta0=cfg.step_size, margin=float(cfg.margin))
            return self._finish(model, x, y, y_target, out)
        out = self._start(model, x, y, None, None)
        with torch.no_grad():
            logits = model(x)
        k = logits.shape[1]
        n_targets = min(cfg.n_target_classes, k - 1)
        order = logits.argsort(dim=1, descending=True)
        for j in range(n_targets):
            if not bool((~out.success).any()):
                break
            target = order[:, j + 1]  # examples still robust have y == order[:, 0]
            apgd_engine(model, x, y, obj, cfg.threat, steps, cfg.rho, cfg.restarts, cfg.random_start,
                        cfg.eot_iter, generator, out, target, None, step_offset=j * cfg.restarts * steps,
                        eta0=cfg.step_size, margin=float(cfg.margin))
        return self._finish(model, x, y, None, out)


register_attack("fgsm", FGSM, random_start=False)
register_attack("pgd", PGD, steps=10)
register_attack("pgd-margin", PGD, doc="PGD on the margin (Carlini-Wagner) loss.", steps=10, loss="margin")
register_attack("pgd-dlr", PGD, doc="PGD on the DLR loss.", steps=10, loss="dlr")
register_attack("apgd-ce", APGD, doc="APGD on cross-entropy (AutoAttack's first attack).", loss="ce")
register_attack("apgd-dlr", APGD, doc="APGD on the DLR loss.", loss="dlr")
register_attack("apgd-t", APGDTargeted, doc="APGD-T: targeted DLR over the top wrong classes.", loss="dlr")
register_attack("eot-pgd", PGD, doc="PGD with gradients averaged over eot_iter draws (randomized models).",
                steps=10, eot_iter=10)
register_attack("eot-apgd", APGD, doc="APGD-CE with gradients averaged over eot_iter draws (as AutoAttack rand).",
                loss="ce", eot_iter=20)
register_attack("eot-apgd-dlr", APGD, doc="APGD-DLR with EOT over eot_iter draws (as AutoAttack rand).",
                loss="dlr", eot_iter=20)

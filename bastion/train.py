"""The one training loop. Every training method is an `Objective` plugged into `fit`.

An objective computes the per-batch loss (and whatever it wants logged) from the model and a
batch; `fit` owns everything else: shuffling, optimizer, per-iteration LR schedule, progress,
per-epoch log, checkpoints and resume. Runs are seeded: batch order and the objective's random
generator for epoch e are derived from (seed, e), so a run resumed from an epoch checkpoint
finishes with the same weights as an uninterrupted one (on CPU).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from bastion.data import ImageDataset
from bastion.errors import ConfigError, RunError
from bastion.records import JsonlLog, _clean, config_digest
from bastion.threat import ThreatModel

# ---------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------

@dataclass
class StepContext:
    """What an objective may know about the current step."""

    epoch: int                 # 0-based epoch
    iteration: int             # global 0-based iteration
    iterations_per_epoch: int
    total_iterations: int
    generator: torch.Generator  # on the model's device, seeded from (seed, epoch)

    @property
    def progress(self) -> float:
        """Epochs done as a float, e.g. 2.5 = half way through the third epoch."""
        return self.iteration / max(1, self.iterations_per_epoch)


@dataclass
class StepResult:
    """``loss``: scalar tensor to minimize. ``logits``: (B, K) logits on the training input (for
    the running training accuracy). ``stats``: floats to log (averaged over the epoch)."""

    loss: torch.Tensor
    logits: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    name: str

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> StepResult: ...

    def config(self) -> dict[str, Any]: ...


class StandardObjective:
    """Cross-entropy on clean inputs."""

    name = "standard"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> StepResult:
        logits = model(x)
        return StepResult(F.cross_entropy(logits, y), logits)

    def config(self) -> dict[str, Any]:
        return {"objective": self.name}


def pgd_linf_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, steps: int,
                    alpha: float, generator: torch.Generator | None = None, random_start: bool = True) -> torch.Tensor:
    """Plain PGD on the CE loss (Madry et al.), used inside training. Returns detached x_adv.

    Works for linf (signed steps) and l2 (normalized steps). The model's mode is not changed."""
    x_adv = threat.random_start(x, generator) if random_start else x.clone()
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (g,) = torch.autograd.grad(loss, x_adv)
        if threat.norm == "linf":
            step = alpha * g.sign()
        else:
            step = alpha * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        x_adv = threat.project(x, x_adv.detach() + step)
    return x_adv.detach()


class PGDObjective:
    """Madry et al. PGD adversarial training: CE at a k-step PGD adversary (random start)."""

    name = "pgd"

    def __init__(self, threat: ThreatModel | str, steps: int = 10, alpha: float | None = None,
                 attack_in_eval_mode: bool = False):
        self.threat = ThreatModel.parse(threat) if isinstance(threat, str) else threat
        if steps < 1:
            raise ConfigError("pgd objective needs steps >= 1")
        self.steps = steps
        self.alpha = alpha if alpha is not None else 2.5 * self.threat.eps / steps
        self.attack_in_eval_mode = attack_in_eval_mode

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> StepResult:
        was_training = model.training
        if self.attack_in_eval_mode:
            model.eval()
        x_adv = pgd_linf_attack(model, x, y, self.threat, self.steps, self.alpha, ctx.generator)
        model.train(was_training)
        logits = model(x_adv)
        return StepResult(F.cross_entropy(logits, y), logits)

    def config(self) -> dict[str, Any]:
        return {"objective": self.name, "threat": str(self.threat), "steps": self.steps, "alpha": self.alpha}


# Objective factories by name; other packages (defenses/, certify/) register theirs here.
OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "standard": lambda **kw: StandardObjective(),
    "pgd": lambda eps="8/255", norm="linf", steps=10, alpha=None, **kw: PGDObjective(
        ThreatModel(norm, eps), steps, alpha, **kw),
}


def register_objective(name: str, factory: Callable[..., Objective]) -> None:
    """Make ``bastion train --objective NAME`` build objectives with ``factory(**params)``."""
    OBJECTIVES[name] = factory


def create_objective(name: str, **params: Any) -> Objective:
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; available: {', '.join(sorted(OBJECTIVES))}")
    try:
        return OBJECTIVES[name](**params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters for objective {name!r}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Optimizer and schedule. ``schedule``: constant | cosine | step | cyclic.

    cyclic: per-iteration triangle 0 -> lr -> 0 peaking at ``cyclic_peak`` of training, with
    momentum cycling ``momentum`` -> ``cyclic_base_momentum`` -> ``momentum`` when
    ``cycle_momentum`` (as torch's CyclicLR default)."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    milestones: Sequence[float] = (0.5, 0.75)   # step schedule, fractions of training
    gamma: float = 0.1
    cyclic_peak: float = 0.5
    cycle_momentum: bool = True
    cyclic_base_momentum: float = 0.8
    augment: str = "none"                        # none | crop_flip | flip
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}: use sgd or adam")
        if self.schedule not in ("constant", "cosine", "step", "cyclic"):
            raise ConfigError(f"unknown schedule {self.schedule!r}: use constant, cosine, step or cyclic")
        if self.augment not in ("none", "crop_flip", "flip"):
            raise ConfigError(f"unknown augment {self.augment!r}: use none, crop_flip or flip")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs, batch_size and lr must be positive")
        if not 0 < self.cyclic_peak <= 1:
            raise ConfigError(f"cyclic_peak must be in (0, 1], got {self.cyclic_peak!r}")
        self.milestones = tuple(float(m) for m in self.milestones)


def lr_factor(cfg: TrainConfig, iteration: int, total: int) -> tuple[float, float | None]:
    """(lr multiplier, momentum or None) at a 0-based iteration out of ``total``."""
    t = iteration / max(1, total)
    if cfg.schedule == "constant":
        return 1.0, None
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t)), None
    if cfg.schedule == "step":
        return cfg.gamma ** sum(t >= m for m in cfg.milestones), None
    # cyclic: triangle over iterations, 0 at t=0 and t=1, 1 at the peak
    peak = cfg.cyclic_peak
    f = t / peak if t <= peak else max(0.0, (1 - t) / (1 - peak))
    mom = None
    if cfg.cycle_momentum and cfg.optimizer == "sgd":
        mom = cfg.momentum - f * (cfg.momentum - cfg.cyclic_base_momentum)
    return f, mom


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _augment(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    if kind == "none":
        return x
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g, device=x.device) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if kind == "crop_flip":
        pad = max(1, h // 8)
        xp = F.pad(x, (pad, pad, pad, pad))
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
        rows = (dy.view(-1, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (dx.view(-1, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        x = xp.gather(2, rows.expand(n, x.shape[1], h, xp.shape[3])).gather(3, cols.expand(n, x.shape[1], h, w))
    return x


# ---------------------------------------------------------------------------------------------
# Callbacks and the loop
# ---------------------------------------------------------------------------------------------

class StopTraining(Exception):
    """Raised by a callback to stop early (e.g. on catastrophic overfitting)."""


class Callback:
    """Hooks into `fit`. ``on_batch_end`` may return extra floats to log for that iteration
    (written to ``batches.jsonl`` when fit's ``log_batches`` is on); ``on_epoch_end`` may return
    metrics merged into the epoch record. Raise `StopTraining` to stop after this epoch."""

    def on_batch_end(self, model: nn.Module, ctx: StepContext, stats: dict[str, float]) -> dict | None:
        return None

    def on_epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> dict | None:
        return None


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, Any]]
    stopped_early: bool
    run_dir: Path | None


_STATE_KEY = "bastion_train_state"


def _save_train_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Atomically write everything a resume needs (weights, optimizer state, epoch, history) as one
    safetensors file: the commit point of an epoch. Nothing is pickled."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    other: dict[str, dict[str, Any]] = {}
    for pid, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{k}"] = v.detach().to("cpu").clone().contiguous()
            else:
                other.setdefault(str(pid), {})[k] = v
    meta = {**meta, "param_groups": osd["param_groups"], "opt_other": other}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_STATE_KEY: json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)


def _load_train_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_STATE_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise RunError(f"training state {str(path)!r} is damaged ({exc}); delete the checkpoints/ folder "
                       f"of this run to start it over") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["opt_other"].items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


def _export_checkpoint(ckpt_dir: Path, model: nn.Module, cfg: TrainConfig, objective: Objective,
                       checkpoint_card: dict[str, Any] | None, epoch: int) -> None:
    from bastion.checkpoints import save_checkpoint

    card = dict(checkpoint_card or {})
    card.setdefault("recipe", {})
    card["recipe"] = {**card["recipe"], "train": asdict(cfg), **objective.config()}
    card["epoch"] = epoch
    save_checkpoint(ckpt_dir / "last", model, card)


def _checkpoint_is_current(ckpt_dir: Path, epoch: int) -> bool:
    from bastion.checkpoints import sha256_file

    w, c = ckpt_dir / "last.safetensors", ckpt_dir / "last.json"
    try:
        card = json.loads(c.read_text())
        return card.get("epoch") == epoch and card.get("sha256") == sha256_file(w)
    except (OSError, ValueError):
        return False


def _epoch_generator(seed: int, epoch: int, device: torch.device, salt: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + salt) % (2 ** 63))
    return g


def fit(model: nn.Module, data: ImageDataset, objective: Objective, cfg: TrainConfig,
        run_dir: str | Path | None = None, callbacks: Sequence[Callback] = (),
        device: str | torch.device | None = None, quiet: bool = False, log_batches: bool = False,
        checkpoint_card: dict[str, Any] | None = None) -> TrainResult:
    """Train ``model`` on ``data`` with ``objective``.

    With ``run_dir``: after every epoch, commits the training state (weights, optimizer, epoch,
    history) to ``checkpoints/train_state.safetensors``, exports ``checkpoints/last.safetensors``
    + ``last.json`` and appends the epoch record to ``train_log.jsonl``; a restarted run resumes
    from the committed state and ends with the same weights as an uninterrupted one (on CPU).
    Resuming with a different config, objective or data size raises `RunError`; a run stopped by
    a callback (`StopTraining`) stays stopped. ``checkpoint_card`` is the model card saved
    alongside (see `bastion.checkpoints.make_card`).
    """
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    torch.manual_seed(cfg.seed)
    opt = _make_optimizer(model, cfg)
    n = len(data)
    if n == 0:
        raise ConfigError("training set is empty")
    iters_per_epoch = math.ceil(n / cfg.batch_size)
    total = iters_per_epoch * cfg.epochs
    history: list[dict[str, Any]] = []
    start_epoch = 0
    log = batch_log = None
    ckpt_dir = None
    if run_dir is not None:
        run_dir = Path(run_dir)
        ckpt_dir = run_dir / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        log = JsonlLog(run_dir / "train_log.jsonl")
        batch_log = JsonlLog(run_dir / "batches.jsonl") if log_batches else None
        state_path = ckpt_dir / "train_state.safetensors"
        digest = config_digest({"train": asdict(cfg), "objective": objective.config(), "n": n,
                                "num_params": sum(p.numel() for p in model.parameters())})
        if state_path.is_file():
            meta = _load_train_state(state_path, model, opt)
            if meta.get("digest") != digest:
                raise RunError(f"run directory {str(run_dir)!r} holds training state of a different config "
                               f"(train settings, objective or data); use a new run directory or delete it")
            start_epoch = int(meta["epoch"]) + 1
            history = list(meta["history"])
            log.rewrite(history)
            if batch_log is not None:
                batch_log.rewrite([r for r in batch_log if r.get("epoch", -1) < start_epoch])
            if not _checkpoint_is_current(ckpt_dir, int(meta["epoch"])):
                _export_checkpoint(ckpt_dir, model, cfg, objective, checkpoint_card, int(meta["epoch"]))
            if meta.get("stopped"):
                start_epoch = cfg.epochs
            if not quiet:
                print(f"resuming from epoch {start_epoch} ({str(ckpt_dir)!r})")
        else:  # nothing committed yet: drop what a killed first epoch may have logged
            log.rewrite([])
            if batch_log is not None:
                batch_log.rewrite([])
    x_all, y_all = data.images, data.labels
    stopped = bool(history and history[-1].get("stopped"))
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        # Global RNG (dropout, objectives without a generator) is re-seeded per epoch so that a
        # resumed run draws the same numbers as an uninterrupted one.
        torch.manual_seed((cfg.seed * 1_000_003 + epoch * 7919 + 3) % (2 ** 63))
        model.train()
        g_cpu = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g_cpu)
        g_obj = _epoch_generator(cfg.seed, epoch, device, salt=1)
        g_aug = _epoch_generator(cfg.seed, epoch, device, salt=2)
        sums: dict[str, float] = {}
        correct = seen = 0
        bar = tqdm(range(iters_per_epoch), desc=f"{objective.name} epoch {epoch + 1}/{cfg.epochs}",
                   disable=quiet, leave=False)
        for b in bar:
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x = x_all[idx].to(device, non_blocking=True)
            y = y_all[idx].to(device, non_blocking=True)
            x = _augment(x, cfg.augment, g_aug)
            it = epoch * iters_per_epoch + b
            f, mom = lr_factor(cfg, it, total)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * f
                if mom is not None:
                    group["momentum"] = mom
            ctx = StepContext(epoch, it, iters_per_epoch, total, g_obj)
            res = objective(model, x, y, ctx)
            if not torch.isfinite(res.loss):
                raise ConfigError(f"loss became {float(res.loss)} at epoch {epoch + 1}, iteration {b + 1}; "
                                  f"lower the learning rate")
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            opt.step()
            stats = {"loss": float(res.loss.detach()), **res.stats}
            if res.logits is not None:
                correct += int((res.logits.detach().argmax(1) == y).sum())
                seen += len(y)
            for cb in callbacks:
                extra = cb.on_batch_end(model, ctx, stats)
                if extra:
                    stats.update(extra)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if batch_log is not None:
                batch_log.append([{"epoch": epoch, "iteration": it, "lr": cfg.lr * f, **stats}])
        lr_end = cfg.lr * lr_factor(cfg, (epoch + 1) * iters_per_epoch - 1, total)[0]
        record: dict[str, Any] = {"epoch": epoch, "lr_end": lr_end}
        record.update({f"train_{k}": v / iters_per_epoch for k, v in sums.items()})
        if seen:
            record["train_acc"] = correct / seen
        record["epoch_seconds"] = time.perf_counter() - t0
        for cb in callbacks:
            try:
                extra = cb.on_epoch_end(model, epoch, record)
            except StopTraining as stop:
                record["stopped"] = str(stop) or "early stop"
                stopped = True
                extra = None
            if extra:
                record.update(extra)
        model.train()
        history.append(record)
        if ckpt_dir is not None:
            record = json.loads(json.dumps(_clean(record), default=str))  # as the log will hold it
            history[-1] = record
            _save_train_state(ckpt_dir / "train_state.safetensors", model, opt,
                              {"epoch": epoch, "digest": digest, "history": history, "stopped": stopped})
            _export_checkpoint(ckpt_dir, model, cfg, objective, checkpoint_card, epoch)
            log.append([record])  # type: ignore[union-attr]
        if not quiet:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()
                     if k in ("train_loss", "train_acc", "val_clean", "val_pgd", "val_fgsm", "co")}
            print(f"[{objective.name}] epoch {epoch + 1}/{cfg.epochs} {shown}")
        if stopped:
            break
    opt.zero_grad(set_to_none=True)  # hand back a model without stale parameter gradients
    model.eval()
    return TrainResult(model, history, stopped, Path(run_dir) if run_dir is not None else None)

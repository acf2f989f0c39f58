"""What every quickstart section shares: the data, the output folder, logging, progress bars,
and `train_or_load` (train a model once, reuse it on reruns)."""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bastion.checkpoints import load_checkpoint, make_card, save_checkpoint
from bastion.data import ImageDataset, load_dataset
from bastion.models import create_model
from bastion.progress import bars_disabled_by_env, progress
from bastion.train import Callback, TrainConfig, create_objective, fit


@dataclass
class QuickstartContext:
    out_dir: Path
    device: str = "cpu"
    seed: int = 0
    quiet: bool = False
    train: ImageDataset = field(default=None)  # type: ignore[assignment]
    test: ImageDataset = field(default=None)  # type: ignore[assignment]
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.train is None:
            self.train = load_dataset("digits", "train", seed=self.seed)
        if self.test is None:
            self.test = load_dataset("digits", "test", seed=self.seed)

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    @property
    def bars_off(self) -> bool:
        """True where progress bars must not show (--quiet, TQDM_DISABLE, stderr not a terminal)."""
        return self.quiet or bars_disabled_by_env() or not sys.stderr.isatty()

    def progress(self, total: int, desc: str):
        """One bar for one stage (`bastion.progress.progress`)."""
        return progress(total=total, desc=desc, quiet=self.quiet)

    def environment(self) -> dict[str, Any]:
        """What the figures depend on beyond the seed (stated next to the README's tables)."""
        return {"torch": torch.__version__, "python": platform.python_version(), "device": str(self.device),
                "threads": torch.get_num_threads()}


class EpochBar(Callback):
    """Advances a progress bar once per training epoch."""

    def __init__(self, bar) -> None:
        self.bar = bar

    def on_epoch_end(self, model, epoch: int, record: dict[str, Any]) -> None:
        self.bar.update(1)
        return None


def train_or_load(ctx: QuickstartContext, name: str, arch: str, objective: str, cfg: TrainConfig,
                  data: ImageDataset | None = None, **objective_params: Any) -> torch.nn.Module:
    """Train ``arch`` with ``objective`` into ctx.out_dir/name (resuming), or load the finished model."""
    data = data or ctx.train
    run_dir = ctx.out_dir / name
    final = run_dir / "model.safetensors"
    if final.is_file():
        return load_checkpoint(final, ctx.device)[0]
    c, h, _ = data.input_shape
    torch.manual_seed(cfg.seed)
    model = create_model(arch, data.num_classes, c, h).to(ctx.device)
    obj = create_objective(objective, **objective_params)
    card = make_card(model, arch, data.num_classes, data.input_shape, class_names=data.class_names,
                     dataset=data.name, seed=cfg.seed)
    with ctx.progress(cfg.epochs, f"train {name}") as bar:
        res = fit(model, data, obj, cfg, run_dir=run_dir, device=ctx.device, quiet=True, checkpoint_card=card,
                  callbacks=[EpochBar(bar)])
    card["recipe"] = obj.config()
    save_checkpoint(final.with_suffix(""), res.model, card)
    return res.model

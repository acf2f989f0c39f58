"""The common evaluator: runs probes over a data set, appends per-example records, folds them.

A probe answers a question about each example of a batch and returns one record per example
(``index``, ``probe`` and its fields). Examples are processed in fixed chunks of the data set
(chunk c = positions [c*B, (c+1)*B)); each chunk's randomness comes from a generator seeded by
(run seed, probe name, chunk), so a resumed run, which recomputes only chunks with missing
records and appends only the missing ones, ends with exactly the records of an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from bastion.data import ImageDataset, check_images
from bastion.records import Record, RunDir
from bastion.rng import derive_seed, make_generator, model_device  # noqa: F401  (re-exported)
from bastion.threat import ThreatModel


class Probe(Protocol):
    """``name`` is the record key (unique within a run). ``run`` gets a batch on the model's
    device: x (B, C, H, W) in [0, 1], y (B,), ``indices`` (B,) data set indices, and a seeded
    generator on the model's device; it returns B records."""

    name: str

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor,
            generator: torch.Generator) -> list[Record]: ...


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Argmax predictions of a batch, (B,) int64."""
    return model(x).argmax(dim=1)


class CleanProbe:
    """Clean accuracy: records ``label``, ``pred``, ``correct``."""

    name = "clean"

    def run(self, model, x, y, indices, generator):
        pred = predict(model, x)
        return [{"index": int(i), "probe": self.name, "kind": "clean", "label": int(t), "pred": int(p),
                 "correct": bool(p == t)} for i, t, p in zip(indices.tolist(), y.tolist(), pred.tolist())]


class PGDProbe:
    """A minimal PGD-k robustness probe (CE loss, one random start, step ``alpha``).

    The full attack layer (many attacks, restarts, early exit, AutoAttack) lives in ``attacks/``.
    Records: ``kind="robust"``, ``threat``, ``attack``, ``label``, ``pred`` (on x_adv), ``correct``."""

    def __init__(self, threat: ThreatModel, steps: int = 10, alpha: float | None = None):
        self.threat = threat
        self.steps = steps
        self.alpha = alpha if alpha is not None else 2.5 * threat.eps / steps
        self.name = f"pgd{steps}@{threat}"

    def run(self, model, x, y, indices, generator):
        from bastion.train import pgd_linf_attack

        with torch.enable_grad():
            x_adv = pgd_linf_attack(model, x, y, self.threat, self.steps, self.alpha, generator)
        self.threat.check(x, x_adv)
        pred = predict(model, x_adv)
        return [{"index": int(i), "probe": self.name, "kind": "robust", "threat": str(self.threat),
                 "attack": f"pgd{self.steps}", "label": int(t), "pred": int(p), "correct": bool(p == t)}
                for i, t, p in zip(indices.tolist(), y.tolist(), pred.tolist())]


def run_probes(model: nn.Module, data: ImageDataset, probes: Sequence[Probe], run: RunDir, *,
               batch_size: int = 256, seed: int = 0, quiet: bool = False) -> list[Record]:
    """Run every probe over ``data``, appending records to ``run.records``; skip what is recorded.

    Returns all records of the log (old and new)."""
    from tqdm.auto import tqdm

    check_images(data.images, f"{data.name} images")
    device = model_device(model)
    was_training = model.training
    model.eval()
    log = run.records
    done = log.done_keys()
    n = len(data)
    chunks = [(c, slice(c, min(n, c + batch_size))) for c in range(0, n, batch_size)]
    try:
        for probe in probes:
            todo = []
            for c, sl in chunks:
                idx = data.indices[sl].tolist()
                if any((i, probe.name) not in done for i in idx):
                    todo.append((c, sl))
            bar = tqdm(todo, desc=f"probe {probe.name}", disable=quiet or not todo, leave=False)
            for c, sl in bar:
                x = data.images[sl].to(device)
                y = data.labels[sl].to(device)
                indices = data.indices[sl]
                gen = make_generator(device, seed, probe.name, c)
                records = probe.run(model, x, y, indices, gen)
                fresh = [r for r in records if (int(r["index"]), str(r["probe"])) not in done]
                log.append(fresh)
                done.update((int(r["index"]), str(r["probe"])) for r in fresh)
    finally:
        model.train(was_training)
    return log.read()


def evaluate_model(model: nn.Module, data: ImageDataset, probes: Sequence[Probe], run_dir: str | Path,
                   config: dict[str, Any], *, batch_size: int = 256, seed: int = 0, quiet: bool = False,
                   class_names: list[str] | None = None) -> dict[str, Any]:
    """Run probes into ``run_dir`` and write ``metrics.json``; returns the metrics."""
    from bastion.metrics import classification_metrics

    run = RunDir(run_dir, config)
    records = run_probes(model, data, probes, run, batch_size=batch_size, seed=seed, quiet=quiet)
    keep = {int(i) for i in data.indices.tolist()}
    records = [r for r in records if int(r["index"]) in keep]
    from bastion.report import metrics_document, section

    metrics = classification_metrics(records, class_names or data.class_names)
    title = str(config.get("title") or config.get("model") or "evaluation")
    run.write_json("metrics.json", metrics_document([section("robustness", title, metrics)],
                                                    title=f"Bastion evaluation: {title}"))
    return metrics

"""Certification as a probe of the common evaluator: what is specific to randomized smoothing.

Each setting (a base model and a sigma) is one `CertifyProbe`; `run_certification` hands them to
`bastion.evaluate.evaluate`, whose run loop gives resume, shards (local processes, Ray) and the
part-file merge, and whose fold registry (``certify``, in `certify.folds`) writes the
``certification`` section of ``metrics.json``. What stays here:

- the probe: examples in chunks of `certify.smoothing.chunk_size` (their noise shares forward
  passes), certified by any *certifier* (an object with ``certify_many`` / ``predict_many`` like
  `certify.smoothing.Smooth`; a denoised or mixed base certifies through the same code);
- ``certify-<setting>.tsv`` (``predict-<setting>.tsv``), the reference log format (spec section
  5), a view of the records rewritten sorted by index after every run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from bastion.data import ImageDataset
from bastion.errors import ConfigError
from bastion.records import CertifyRecord, PredictRecord, Record, RunDir, parse_record
from bastion.runner import RunOptions, resolve_model
from certify.analysis import default_max_radius, table_radii
from certify.anytime import Anytime
from certify.logs import CERTIFY_HEADER, PREDICT_HEADER, TsvLog, certify_line, predict_line
from certify.smoothing import Certificate, Prediction, Sequential, Smooth, chunk_size

TASKS = ("certify", "predict")


@dataclass
class Setting:
    """One smoothed classifier: ``model`` is a checkpoint path or an ``nn.Module``."""

    name: str
    model: Any
    sigma: float
    num_classes: int

    def __post_init__(self) -> None:
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) or not (
                math.isfinite(self.sigma) and self.sigma > 0):
            raise ConfigError(f"sigma must be a finite number > 0, got {self.sigma!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ConfigError(f"setting {self.name!r}: num_classes must be an integer >= 2 (check the model card), "
                              f"got {self.num_classes!r}")


@dataclass
class CertifyOptions:
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch: int = 1000
    seed: int = 0
    task: str = "certify"
    sequential: bool = False
    seq_start: int = 1000
    max_radius: float | None = None      # largest reported radius (curve max; sequential stop radius)
    autocast: str | None = None
    shard_size: int = 100
    device: str = "cpu"
    anytime: bool = False                # confidence-sequence mode (certify.anytime): n is the cap
    precision: float | None = None       # anytime: also pin the radius down to this many L2 units
    bound: str = "cp"                    # exact mode: "cp" (Clopper-Pearson) or "randomized"

    @property
    def mode(self) -> str:
        """exact | sequential | anytime (the ``mode`` of the probe description and the report)."""
        return "anytime" if self.anytime else "sequential" if self.sequential else "exact"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}: use certify or predict")
        if self.anytime and self.sequential:
            raise ConfigError("choose --sequential or --anytime, not both")
        if self.bound not in ("cp", "randomized"):
            raise ConfigError(f"unknown bound {self.bound!r}: use cp or randomized")
        if self.bound == "randomized" and (self.anytime or self.sequential):
            raise ConfigError("the randomized Clopper-Pearson bound is an option of exact mode only")
        if self.precision is not None and not (self.anytime and math.isfinite(self.precision)
                                               and self.precision > 0):
            raise ConfigError(f"precision must be a finite number > 0 and needs anytime mode, got {self.precision}")
        if self.n0 < 1 or self.n < 1 or self.batch < 1 or self.shard_size < 1:
            raise ConfigError("n0, n, batch and shard_size must be >= 1")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.max_radius is not None and not (math.isfinite(self.max_radius) and self.max_radius > 0):
            raise ConfigError(f"max radius must be a finite number > 0, got {self.max_radius}")


class Certifier(Protocol):
    """What the certify probe needs: ``certify_many(xs, indices, n0, n, alpha, batch, sequential=)``
    -> one `certify.smoothing.Certificate` per example (and ``predict_many(xs, indices, n, alpha,
    batch)`` -> `Prediction` for PREDICT). ``indices`` key the noise, so results do not depend on
    batching. `Smooth` is the Gaussian one; ``base`` (an ``nn.Module``) is put in eval mode."""

    base: nn.Module

    def certify_many(self, xs: torch.Tensor, indices: Sequence[Any], n0: int, n: int, alpha: float,
                     batch: int = 1000, sequential: Sequential | None = None) -> list[Certificate]: ...

    def predict_many(self, xs: torch.Tensor, indices: Sequence[Any], n: int, alpha: float,
                     batch: int = 1000) -> list[Prediction]: ...


def model_name(spec: Any) -> str:
    return str(spec) if not isinstance(spec, nn.Module) else type(spec).__name__


class CertifyProbe:
    """CERTIFY (or PREDICT) of one setting. ``certifier`` defaults to ``Smooth(base, K, sigma,
    seed, autocast)`` on the setting's model, built on the worker's device (`bind`)."""

    def __init__(self, setting: Setting, opts: CertifyOptions, max_radius: float,
                 certifier: Certifier | None = None):
        self.setting = setting
        self.opts = opts
        self.max_radius = float(max_radius)
        self.name = setting.name
        # anytime mode stops most examples long before the cap: size chunks on a typical count
        n_chunk = min(opts.n, 10_000) if opts.anytime else opts.n
        self.chunk_size = chunk_size(opts.n0 if opts.task == "certify" else 0, n_chunk, opts.batch)
        self.certifier = certifier

    def describe(self) -> dict[str, Any]:
        o = self.opts
        return {"kind": o.task, "name": self.name, "sigma": self.setting.sigma, "model": model_name(self.setting.model),
                "task": o.task, "mode": o.mode, "n0": o.n0, "n": o.n, "alpha": o.alpha, "batch": o.batch,
                "max_radius": self.max_radius, "autocast": o.autocast, "bound": o.bound, "precision": o.precision}

    def bind(self, device: torch.device) -> nn.Module:
        if self.certifier is None:
            base = resolve_model(self.setting.model, device)
            self.certifier = Smooth(base, self.setting.num_classes, self.setting.sigma, seed=self.opts.seed,
                                    autocast=self.opts.autocast)
        return self.certifier.base

    def __getstate__(self) -> dict[str, Any]:
        # a default certifier is rebuilt in the worker (its model loads there, once per process)
        state = dict(self.__dict__)
        if isinstance(state.get("certifier"), Smooth) and not isinstance(self.setting.model, nn.Module):
            state["certifier"] = None
        return state

    def run(self, model, x, y, indices, generator) -> list[Record]:
        o, s = self.opts, self.setting
        idx, ys = indices.tolist(), y.tolist()
        if o.task == "certify":
            seq = (Sequential(stop_radius=self.max_radius, start=o.seq_start, radii=tuple(table_radii(self.max_radius)))
                   if o.sequential else None)
            extra: dict[str, Any] = {}       # only what is asked for: other certifiers need not know the options
            if o.anytime:
                extra["anytime"] = Anytime(radii=tuple(table_radii(self.max_radius)), precision=o.precision)
            if o.bound != "cp":
                extra["bound"] = o.bound
            certs = self.certifier.certify_many(x, idx, o.n0, o.n, o.alpha, o.batch, sequential=seq, **extra)
            return [CertifyRecord(index=c.index, probe=self.name, sigma=s.sigma, label=int(t), pred=c.prediction,
                                  correct=c.prediction == int(t), radius=c.radius, p_lower=c.p_lower, c_a=c.c_a,
                                  n_a=c.n_a, n0=c.n0, n=c.n, samples=c.samples, looks=c.looks, stopped=c.stopped,
                                  time_s=c.time_s).to_record() for c, t in zip(certs, ys)]
        preds = self.certifier.predict_many(x, idx, o.n, o.alpha, o.batch)
        return [PredictRecord(index=p.index, probe=self.name, sigma=s.sigma, label=int(t), pred=p.prediction,
                              correct=p.prediction == int(t), pvalue=p.pvalue, n1=p.n1, n2=p.n2, n=p.n, samples=p.n,
                              time_s=p.time_s).to_record() for p, t in zip(preds, ys)]


def log_path(out: Path, name: str, task: str) -> Path:
    return out / f"{task}-{name}.tsv"


def write_tsv_logs(out: Path, records: Sequence[Record]) -> list[Path]:
    """The reference CERTIFY/PREDICT logs as a view of the records: one file per setting, rows
    sorted by index."""
    by: dict[tuple[str, str], list] = {}
    for r in map(parse_record, records):
        if r.kind in ("certify", "predict"):
            by.setdefault((r.kind, r.probe), []).append(r)
    paths = []
    for (task, name), rows in sorted(by.items()):
        rows.sort(key=lambda r: r.index)
        if task == "certify":
            lines = [certify_line(r.index, r.label, r.pred, r.radius, r.time_s or 0.0) for r in rows]
        else:
            lines = [predict_line(r.index, r.label, r.pred, r.time_s or 0.0) for r in rows]
        log = TsvLog(log_path(out, name, task), CERTIFY_HEADER if task == "certify" else PREDICT_HEADER)
        log.rewrite(lines)
        paths.append(log.path)
    return paths


def run_certification(settings: Sequence[Setting], data: ImageDataset, out_dir: str | Path, opts: CertifyOptions,
                      *, config: dict[str, Any] | None = None, backend: str = "local", workers: int = 1,
                      threads: int | None = None, address: str | None = None, retries: int = 2,
                      num_gpus: float = 0.0, quiet: bool = False, title: str | None = None,
                      write_reports: bool = True, certifiers: dict[str, Certifier] | None = None) -> dict[str, Any]:
    """Certify every example of ``data`` under every setting into ``out_dir`` (resumable, shardable).

    ``certifiers`` optionally maps a setting name to its certifier (default: `Smooth` on the
    setting's model). Returns the metrics document (also written to ``out_dir/metrics.json``)."""
    import certify.folds  # noqa: F401  (registers the certify fold and renderer)
    from bastion.evaluate import evaluate

    if not settings:
        raise ConfigError("no settings to certify: give at least one model and sigma")
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ConfigError(f"setting names must be unique, got {names}")
    cfg = dict(config) if config is not None else {
        "task": opts.task, "n0": opts.n0, "n": opts.n, "alpha": opts.alpha, "batch": opts.batch,
        "seed": opts.seed, "sequential": opts.sequential, "seq_start": opts.seq_start, "anytime": opts.anytime,
        "precision": opts.precision, "bound": opts.bound,
        "max_radius": opts.max_radius, "autocast": opts.autocast,
        "settings": [{"name": s.name, "sigma": s.sigma, "model": model_name(s.model)} for s in settings],
        "data": {"name": data.name, "split": data.split, "indices": data.indices.tolist()}}
    max_radius = opts.max_radius or default_max_radius([s.sigma for s in settings])
    certifiers = certifiers or {}
    probes = [CertifyProbe(s, opts, max_radius, certifiers.get(s.name)) for s in settings]
    run_opts = RunOptions(batch_size=probes[0].chunk_size, seed=opts.seed, device=opts.device, quiet=quiet,
                          backend=backend, workers=workers, threads=threads, address=address, retries=retries,
                          num_gpus=num_gpus, shard_size=opts.shard_size)
    mode = opts.mode
    title = title or f"Randomized smoothing: {opts.task} on {data.name} ({mode} mode, n={opts.n}, alpha={opts.alpha})"
    out = Path(out_dir)
    doc = evaluate(None, data, probes, out, cfg, opts=run_opts, title=title, doc_title=f"Bastion certification: "
                   f"{data.name}", write_reports=write_reports)
    write_tsv_logs(out, RunDir(out).records.unique())
    return doc

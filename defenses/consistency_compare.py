"""The honest comparison of spec consistency-smoothing.md section 10, end to end.

For every training seed: pretrain one rRCM encoder (sigma-independent), fine-tune it per sigma;
train, per sigma and with the *same* classifier architecture (`RRCMClassifier`, random init),
Gaussian augmentation and Gaussian + consistency regularisation, both compute-matched to rRCM in
encoder forward-equivalents (a pass with gradient = 3 forwards); train one DDPM epsilon-denoiser
(diffusers UNet, FLOPs-matched when ``match_compute``) and one clean classifier per seed for
denoised smoothing. Everything is certified by `certify.runner.run_certification` (the one
certifier) on the same index-strided test subset with the same n0 / n / alpha / seed. Then
`defenses.consistency_report.compare` folds the records into the ``smoothing_comparison``
section (bootstrap intervals over images, per-sigma curves, envelopes, class histograms, costs).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion.checkpoints import make_card
from bastion.data import ImageDataset, load_dataset
from bastion.errors import ConfigError
from bastion.models import create_model
from bastion.records import RunDir, parse_record
from bastion.train import TrainConfig, create_objective, fit
from certify.runner import CertifyOptions, Setting, run_certification
from defenses.consistency import RRCMClassifier, RRCMPretrainer, save_rrcm_classifier
from defenses.consistency_math import sigma_level
from defenses.denoised import DenoisedClassifier, save_denoised

METHODS = ("gaussian", "consistency", "denoised", "rrcm", "constant")
LINEAR_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


@dataclass
class CompareConfig:
    """Parsed from a TOML (experiments/configs/consistency_*.toml); see `config_from_dict`."""

    dataset: str = "digits"
    root: str | None = None
    image_size: int | None = None
    data_options: dict[str, Any] = field(default_factory=dict)   # reader options (synthetic: channels, size)
    val_fraction: float = 0.1
    max_train: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    sigmas: list[float] = field(default_factory=lambda: [0.25, 0.5])
    methods: list[str] = field(default_factory=lambda: ["gaussian", "consistency", "denoised", "rrcm"])
    encoder: dict[str, Any] = field(default_factory=lambda: {"kind": "mlp"})
    pretrain: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, Any] = field(default_factory=dict)
    denoiser: dict[str, Any] = field(default_factory=dict)
    classifier: dict[str, Any] = field(default_factory=dict)
    certify: dict[str, Any] = field(default_factory=dict)
    ablations: list[dict[str, Any]] = field(default_factory=list)
    device: str = "cpu"
    bootstrap: int = 1000
    checkpoints: bool = True     # per-epoch training checkpoints (resume); off: faster on small data


def config_from_dict(d: dict[str, Any]) -> CompareConfig:
    known = set(CompareConfig.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown comparison key {unknown[0]!r}; known: {', '.join(sorted(known))}")
    cfg = CompareConfig(**d)
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown method {bad[0]!r}: use {', '.join(METHODS)}")
    if not cfg.seeds or not cfg.sigmas:
        raise ConfigError("the comparison needs at least one seed and one sigma")
    return cfg


# ---------------------------------------------------------------------------------------------
# Data and costs
# ---------------------------------------------------------------------------------------------

def split_validation(train: ImageDataset, fraction: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Stratified hold-out: ``fraction`` of each class (fixed seed) -> (train, validation)."""
    g = torch.Generator().manual_seed(seed)
    val: list[int] = []
    for c in range(train.num_classes):
        pos = (train.labels == c).nonzero().flatten()
        pos = pos[torch.randperm(len(pos), generator=g)]
        val += pos[: max(1, round(fraction * len(pos)))].tolist()
    keep = sorted(set(range(len(train))) - set(val))
    return train.subset(keep), train.subset(sorted(val))


def forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward pass per example (matmul/conv counted by torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / len(x)


def wall_per_sample(model: nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    """Median seconds per example of ``model(x)`` (no grad, after one warm-up call)."""
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / len(x))
    return sorted(times)[len(times) // 2]


def inference_costs(models: dict[str, nn.Module], shape: tuple[int, ...], device: str, batch: int = 1000,
                    repeats: int = 3) -> dict[str, dict[str, float]]:
    """FLOPs and wall time per noise sample of each base classifier, measured side by side (same
    inputs, device, batch; interleaved repeats so load changes hit all models alike)."""
    x = torch.rand((batch, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    out = {name: {"flops": forward_flops(m.eval(), x[:8]), "wall_s": []} for name, m in models.items()}
    for _ in range(repeats):
        for name, m in models.items():
            out[name]["wall_s"].append(wall_per_sample(m, x, repeats=1))
    return {k: {"flops": v["flops"], "wall_s_per_sample": sorted(v["wall_s"])[len(v["wall_s"]) // 2]}
            for k, v in out.items()}


class ConstantClassifier(nn.Module):
    """A collapsed base classifier (always class ``k``): the control the report must flag."""

    def __init__(self, num_classes: int, k: int = 0):
        super().__init__()
        self.num_classes, self.k = num_classes, k
        self.dummy = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), self.num_classes, device=x.device)
        out[:, self.k] = 1.0
        return out + 0 * self.dummy


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def _tc(section: dict[str, Any], seed: int, epochs: int, batch: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=batch, optimizer="adam", lr=float(section.get("lr", 1e-3)),
                       weight_decay=float(section.get("weight_decay", 0.0)), schedule="cosine", seed=seed)


def _lam(finetune: dict[str, Any], sigma: float) -> float:
    lam = finetune.get("lam", {"0.25": 10.0, "0.5": 20.0})
    if isinstance(lam, dict):
        return float(lam.get(f"{sigma:g}", 10.0 if sigma <= 0.25 else 20.0))
    return float(lam)


@torch.no_grad()
def noisy_accuracy(model: nn.Module, data: ImageDataset, sigma: float, device: str, seed: int = 0) -> float:
    """Accuracy of the base classifier on one Gaussian draw per validation image."""
    g = torch.Generator().manual_seed(seed)
    x = data.images + sigma * torch.randn(data.images.shape, generator=g)
    model.eval()
    return float((model(x.to(device)).argmax(1).cpu() == data.labels).float().mean())


CHECKPOINTS = {"on": True}  # per-epoch training checkpoints (resume); the config's ``checkpoints`` sets it


def _fit(model: nn.Module, data: ImageDataset, objective: str, tc: TrainConfig, run_dir: Path, device: str,
         **params: Any) -> tuple[nn.Module, float]:
    """fit, with per-epoch checkpoints in ``run_dir`` when on (an existing run directory is always
    resumed). Returns (model, training seconds = sum of the epochs' compute time, resumed epochs included)."""
    keep = CHECKPOINTS["on"] or (run_dir / "checkpoints" / "train_state.safetensors").is_file()
    res = fit(model, data, create_objective(objective, **params), tc, run_dir=run_dir if keep else None,
              device=device, quiet=True, checkpoint_card={"arch": None, "dataset": data.name, "seed": tc.seed})
    return res.model, float(sum(r.get("epoch_seconds", 0.0) for r in res.history))


@dataclass
class Trained:
    """One trained base classifier and its training cost."""

    model: nn.Module
    train_s: float
    train_flops: float
    val_noisy_acc: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def pretrain_encoder(cfg: CompareConfig, train: ImageDataset, seed: int, out: Path,
                     overrides: dict[str, Any] | None = None) -> tuple[RRCMPretrainer, float, float]:
    """(pretrainer, seconds, forward-equivalents per training image... summed = total FE) for one seed."""
    p = {**cfg.pretrain, **(overrides or {})}
    batch, steps = int(p.get("batch", 256)), int(p.get("steps", 1000))
    iters = -(-len(train) // batch)
    epochs = max(1, round(steps / iters))
    torch.manual_seed(seed)
    model = RRCMPretrainer(cfg.encoder, train.input_shape, int(p.get("proj_hidden", 256)), int(p.get("proj_out", 64)))
    params = {k: p[k] for k in ("tau", "ema_start", "ema_end", "ema_a", "use_ctr", "use_con", "con_target",
                                "per_sample_index") if k in p}
    model, secs = _fit(model, train, "rrcm_pretrain", _tc(p, seed, epochs, batch), out, cfg.device, **params)
    fe = 12 * epochs * len(train)  # RRCMPretrain.forward_equivalents per image-step
    return model, secs, fe


def build_methods(cfg: CompareConfig, train: ImageDataset, val: ImageDataset, seed: int, out: Path,
                  log=print) -> dict[tuple[str, float], Trained]:
    """Train every method of ``cfg`` for one seed: {(method, sigma): Trained}; composite checkpoints
    in ``out/<method>-sigma<s>.json``."""
    dev, k, shape = cfg.device, train.num_classes, train.input_shape
    out.mkdir(parents=True, exist_ok=True)
    ft = cfg.finetune
    ft_epochs, ft_batch = int(ft.get("epochs", 40)), int(ft.get("batch", 128))
    enc_flops = forward_flops(RRCMClassifier(cfg.encoder, shape, k, 0.5).to(dev), train.images[:8].to(dev))
    result: dict[tuple[str, float], Trained] = {}
    pre_s = pre_fe = 0.0
    pretrainer = None
    if "rrcm" in cfg.methods or cfg.baselines.get("match_compute", True):
        pretrainer, pre_s, pre_fe = pretrain_encoder(cfg, train, seed, out / "pretrain")
        log(f"  seed {seed}: pretrained encoder in {pre_s:.1f} s")
    ft_fe = 3 * int(ft.get("m", 2)) * ft_epochs * len(train)
    budget_fe = pre_fe + ft_fe
    budget_flops = budget_fe * enc_flops
    for sigma in cfg.sigmas:
        lam = _lam(ft, sigma)
        card = {"dataset": train.name, "seed": seed, "class_names": train.class_names}
        if "rrcm" in cfg.methods:
            model = RRCMClassifier(cfg.encoder, shape, k, sigma)
            model.encoder.load_state_dict(pretrainer.encoder.state_dict())
            if not ft.get("train_head", True):
                model.head.requires_grad_(False)
            model, secs = _fit(model, train, "consistency", _tc(ft, seed, ft_epochs, ft_batch),
                               out / f"rrcm-ft-sigma{sigma:g}", dev, sigma=sigma, m=int(ft.get("m", 2)), lam=lam,
                               eta=float(ft.get("eta", 0.5)))
            save_rrcm_classifier(out / f"rrcm-sigma{sigma:g}", model, cfg.encoder, shape,
                                 {**card, "recipe": {"method": "rrcm", "pretrain": cfg.pretrain, "finetune": ft}})
            result[("rrcm", sigma)] = Trained(model, pre_s + secs, budget_flops, noisy_accuracy(model, val, sigma, dev),
                                              {"t_star": model.t_star, "level": model.level})
        base = cfg.baselines
        for method, obj, fe_per in (("gaussian", "gaussian", 3), ("consistency", "consistency", 3 * 2)):
            if method not in cfg.methods:
                continue
            epochs = (max(1, round(budget_fe / (fe_per * len(train)))) if base.get("match_compute", True)
                      else int(base.get(f"{method}_epochs", ft_epochs)))
            torch.manual_seed(seed)
            model = RRCMClassifier(cfg.encoder, shape, k, sigma)
            params: dict[str, Any] = {"sigma": sigma}
            if obj == "consistency":
                params.update(m=2, lam=lam, eta=float(ft.get("eta", 0.5)),
                              lam_ramp_epochs=float(base.get("lam_ramp_epochs", 0)))
            model, secs = _fit(model, train, obj, _tc(base, seed, epochs, ft_batch),
                               out / f"{method}-sigma{sigma:g}", dev, **params)
            save_rrcm_classifier(out / f"{method}-sigma{sigma:g}", model, cfg.encoder, shape,
                                 {**card, "recipe": {"method": method, "epochs": epochs, **params}})
            result[(method, sigma)] = Trained(model, secs, fe_per * epochs * len(train) * enc_flops,
                                              noisy_accuracy(model, val, sigma, dev), {"epochs": epochs})
        if "constant" in cfg.methods:
            result[("constant", sigma)] = Trained(ConstantClassifier(k, 0).to(dev), 0.0, 0.0)
    if "denoised" in cfg.methods:
        result.update(_train_denoised(cfg, train, val, seed, out, budget_flops, log))
    return result


def _train_denoised(cfg: CompareConfig, train: ImageDataset, val: ImageDataset, seed: int, out: Path,
                    budget_flops: float, log) -> dict[tuple[str, float], Trained]:
    from detection.diffusers_backend import EpsTrainConfig, build_unet, train_eps_model

    dev, k, (c, h, _) = cfg.device, train.num_classes, train.input_shape
    dn, cl = cfg.denoiser, cfg.classifier
    unet_args = {"channels": c, "image_size": h, "block_out_channels": list(dn.get("block_out_channels", [16, 32])),
                 "layers_per_block": int(dn.get("layers_per_block", 1)),
                 "norm_num_groups": int(dn.get("norm_num_groups", 8))}
    torch.manual_seed(seed)
    arch, ckw = cl.get("arch", "mlp"), dict(cl.get("arch_kwargs", {}))
    clf = create_model(arch, k, c, h, **ckw).to(dev)
    clf_card = make_card(clf, arch, k, train.input_shape, ckw, train.class_names, dataset=train.name, seed=seed)
    clf_epochs = int(cl.get("epochs", 30))
    clf, clf_s = _fit(clf, train, "standard", _tc(cl, seed, clf_epochs, int(cl.get("batch", 128))),
                      out / "clean-classifier", dev)
    x8 = train.images[:8].to(dev)
    clf_flops = 3 * clf_epochs * len(train) * forward_flops(clf, x8)
    unet = build_unet(**{**unet_args, "block_out_channels": tuple(unet_args["block_out_channels"])}).to(dev)
    t = torch.zeros(8, dtype=torch.long, device=dev)
    unet_flops = forward_flops(lambda z: unet(z, t).sample, x8)  # type: ignore[arg-type]
    batch = int(dn.get("batch", 128))
    steps = (max(1, round((budget_flops - clf_flops) / (3 * unet_flops * batch))) if dn.get("match_compute", True)
             else int(dn.get("steps", 600)))
    t_max = int(dn.get("t_max", 400))
    ema, stats = train_eps_model(unet, _schedule(), train.images.to(dev),
                                 EpsTrainConfig(steps=steps, batch_size=batch, lr=float(dn.get("lr", 1e-3)),
                                                t_max=t_max, ema=float(dn.get("ema", 0.995)), seed=seed))
    log(f"  seed {seed}: denoiser {steps} steps in {stats.seconds:.1f} s (loss {stats.final_loss:.3f})")
    alphas = _schedule().alphas_cumprod
    res = {}
    for sigma in cfg.sigmas:
        model = DenoisedClassifier(ema, clf, alphas, sigma).to(dev).eval()
        save_denoised(out / f"denoised-sigma{sigma:g}", model, unet_args, LINEAR_SCHEDULE, clf_card,
                      card={"dataset": train.name, "seed": seed})
        res[("denoised", sigma)] = Trained(model, stats.seconds + clf_s, clf_flops + 3 * unet_flops * batch * steps,
                                           noisy_accuracy(model, val, sigma, dev),
                                           {"denoiser_steps": steps, "t_star": model.t_star, "t_max": t_max,
                                            "classifier_epochs": clf_epochs})
    return res


def _schedule():
    from detection.diffusers_backend import build_scheduler

    return build_scheduler()


# ---------------------------------------------------------------------------------------------
# The whole comparison
# ---------------------------------------------------------------------------------------------

def certify_subset(cfg: CompareConfig, test: ImageDataset) -> ImageDataset:
    """Index-strided subset (every ``skip``-th test image), never the first images of a sorted folder."""
    c = cfg.certify
    return test.every(int(c.get("skip", 4)), c.get("max"))


def certify_options(cfg: CompareConfig, seed: int) -> CertifyOptions:
    c = cfg.certify
    return CertifyOptions(n0=int(c.get("n0", 100)), n=int(c.get("n", 1000)), alpha=float(c.get("alpha", 0.001)),
                          batch=int(c.get("batch", 1000)), seed=int(c.get("seed", 0)), device=cfg.device,
                          max_radius=c.get("max_radius"))


def load_data(cfg: CompareConfig) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    kw: dict[str, Any] = {"root": cfg.root} if cfg.root else {}
    kw.update(cfg.data_options)
    if cfg.image_size:
        kw["image_size"] = cfg.image_size
    full = load_dataset(cfg.dataset, "train", **kw)
    test = load_dataset(cfg.dataset, "test", **kw)
    if cfg.max_train:
        full = full.every(max(1, len(full) // cfg.max_train), cfg.max_train)
    train, val = split_validation(full, cfg.val_fraction)
    return train, val, test


def run_comparison(cfg: CompareConfig, out: str | Path, quiet: bool = False) -> dict[str, Any]:
    """Train, certify and compare; writes ``out/comparison.json`` and ``out/report.md``. Each seed's
    certification is a normal certify run directory (``out/seed<s>/certify``: TSV logs, records,
    metrics.json, report). Returns the ``smoothing_comparison`` section."""
    from defenses.consistency_report import compare, write_report

    out = Path(out)
    CHECKPOINTS["on"] = bool(cfg.checkpoints)
    log = (lambda *_: None) if quiet else (lambda m: print(m, flush=True))
    train, val, test = load_data(cfg)
    subset = certify_subset(cfg, test)
    runs: dict[int, dict[str, Any]] = {}
    costs: dict[str, Any] = {}
    for seed in cfg.seeds:
        sdir = out / f"seed{seed}"
        trained = build_methods(cfg, train, val, seed, sdir / "models", log)
        settings = [Setting(f"{m}-sigma{s:g}", t.model, s, train.num_classes) for (m, s), t in trained.items()]
        t0 = time.perf_counter()
        run_certification(settings, subset, sdir / "certify", certify_options(cfg, seed), quiet=True,
                          title=f"{cfg.dataset}: smoothing comparison, seed {seed}")
        log(f"  seed {seed}: certified {len(settings)} settings x {len(subset)} images in "
            f"{time.perf_counter() - t0:.1f} s")
        runs[seed] = {"train": {f"{m}-sigma{s:g}": {"method": m, "sigma": s, "train_s": t.train_s,
                                                     "train_flops": t.train_flops, "val_noisy_acc": t.val_noisy_acc,
                                                     **t.notes} for (m, s), t in trained.items()},
                      "records": [r.to_record() for r in map(parse_record, RunDir(sdir / "certify").records.unique())]}
        if seed == cfg.seeds[0]:
            per = {f"{m}-sigma{s:g}": t.model for (m, s), t in trained.items() if m != "constant"}
            costs = inference_costs(per, train.input_shape, cfg.device, batch=int(cfg.certify.get("batch", 1000)))
    sec = compare(runs, costs, cfg, subset, [])
    write_report(sec, out)  # the main comparison first: ablations take a while
    if cfg.ablations:
        sec = compare(runs, costs, cfg, subset, run_ablations(cfg, train, val, subset, out / "ablations", log))
        write_report(sec, out)
    (out / "comparison.json").write_text(json.dumps(sec, indent=1, default=float))
    return sec


def run_ablations(cfg: CompareConfig, train: ImageDataset, val: ImageDataset, subset: ImageDataset, out: Path,
                  log) -> list[dict[str, Any]]:
    """Each ablation: pretrain overrides + finetune overrides, first seed, its ``sigma`` (default the
    largest); certified like the main runs. Returns one summary row per ablation."""
    rows = []
    seed = cfg.seeds[0]
    for ab in cfg.ablations:
        name, sigma = ab["name"], float(ab.get("sigma", max(cfg.sigmas)))
        adir = out / name
        pre, pre_s, _ = pretrain_encoder(cfg, train, seed, adir / "pretrain", ab.get("pretrain", {}))
        ft = {**cfg.finetune, **ab.get("finetune", {})}
        model = RRCMClassifier(cfg.encoder, train.input_shape, train.num_classes, sigma)
        model.encoder.load_state_dict(pre.encoder.state_dict())
        if not ft.get("train_head", True):
            model.head.requires_grad_(False)
        model, secs = _fit(model, train, "consistency", _tc(ft, seed, int(ft.get("epochs", 40)),
                           int(ft.get("batch", 128))), adir / "ft", cfg.device, sigma=sigma,
                           m=int(ft.get("m", 2)), lam=_lam(ft, sigma), eta=float(ft.get("eta", 0.5)))
        run_certification([Setting(name, model, sigma, train.num_classes)], subset, adir / "certify",
                          certify_options(cfg, seed), quiet=True, title=f"ablation {name}")
        recs = [parse_record(r) for r in RunDir(adir / "certify").records.unique()]
        rows.append({"name": name, "sigma": sigma, "train_s": pre_s + secs, "pretrain": ab.get("pretrain", {}),
                     "finetune": ab.get("finetune", {}), "val_noisy_acc": noisy_accuracy(model, val, sigma, cfg.device),
                     "records": [r.to_record() for r in recs]})
        log(f"  ablation {name}: done in {pre_s + secs:.1f} s")
    return rows


def level_table(sigmas: list[float]) -> list[dict[str, float]]:
    """The sigma -> EDM level mapping used (spec section 5)."""
    from defenses.consistency_math import c_in, c_noise

    rows = []
    for s in sigmas:
        i, t = sigma_level(s)
        rows.append({"sigma": s, "index": i, "t": t, "c_in": c_in(t), "c_noise": c_noise(t)})
    return rows

"""The EPS-AD recipe end to end (spec section 8), resumable: what ``bastion detect`` and the
quickstart section run.

1. Split the training data (seeded permutation) into a score-model pool, a detector pool (kernel
   training + reference set R, kept out of the score model's training data) and a calibration
   pool (natural images that set each detector's threshold at the chosen FPR).
2. Classifier: a checkpoint, or a small CNN trained on the whole training split (cached).
3. Score model: a local diffusers directory, or a UNet epsilon-model trained on the score pool
   (cached in ``OUT/score_model``).
4. Detectors: EPS-AD (deep-kernel MMD) with its EPS-N and Gaussian-MMD baselines, fitted on EPS of
   the detector pool and of its FGSM / FGSM-l2 versions; Mahalanobis on the same sets.
5. The common evaluator over the test split: natural scores, an oblivious attack per threat model
   and the detector-aware adaptive attack against each target detector (``OUT/eval``): by default
   (mode ``worst``) APGD on the margin sum, then APGD-selective on the examples still robust, the
   worst case per example (`detection.evaluation.DetectProbe`); ``sum`` / ``selective`` are the
   single-attack modes of earlier runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from attacks import create_attack
from bastion.data import ImageDataset, load_dataset
from bastion.errors import ConfigError
from bastion.threat import ThreatModel
from detection.detector import EPSDetector, EPSExtractor
from detection.evaluation import ADAPTIVE_MODES, DetectProbe, FullSteps
from detection.mmd import KernelTrainConfig

DETECTOR_CHOICES = ("deep", "gaussian", "norm", "mahalanobis")
DETECTOR_NAMES = {"deep": "eps-deep-mmd", "gaussian": "eps-gaussian-mmd", "norm": "eps-norm",
                  "mahalanobis": "mahalanobis"}


@dataclass(frozen=True)
class DetectSettings:
    """Everything that determines a detection run's records (see the module docstring)."""

    dataset: str = "digits"
    data_root: str | None = None
    image_size: int | None = None
    seed: int = 0
    classifier: str | None = None
    classifier_epochs: int = 15
    score_model: str | None = None
    score_steps: int = 600
    score_batch: int = 128
    score_lr: float = 1e-3
    t_max: int = 100
    ema: float = 0.995
    unet_channels: tuple[int, ...] = (16, 32)
    levels: int = 20
    score_pool: int = 800
    detector_pool: int = 400
    kernel_eps: float = 8 / 255
    kernel_epochs: int = 200
    kernel_batch: int = 200
    kernel_lr: float = 2e-3
    reference_size: int = 500
    feature_only: bool = False
    detectors: tuple[str, ...] = DETECTOR_CHOICES
    attack: str = "pgd"
    attack_steps: int = 10
    threats: tuple[str, ...] = ("linf:1/255", "linf:2/255", "linf:4/255", "linf:8/255", "linf:16/255")
    adaptive_targets: tuple[str, ...] = ("eps-deep-mmd", "mahalanobis")
    adaptive_threats: tuple[str, ...] | None = None
    adaptive_weight: float = 0.5
    adaptive_modes: tuple[str, ...] = ("worst",)
    adaptive_steps: int | None = None   # None: attack_steps
    fpr: float = 0.05
    test_examples: int | None = None
    mahalanobis_select: str = "all"

    def __post_init__(self) -> None:
        bad = [d for d in self.detectors if d not in DETECTOR_CHOICES]
        if bad or not self.detectors:
            raise ConfigError(f"unknown detector(s) {bad}: use {', '.join(DETECTOR_CHOICES)}")
        names = {DETECTOR_NAMES[d] for d in self.detectors}
        missing = [t for t in self.adaptive_targets if t not in names]
        if missing:
            raise ConfigError(f"adaptive target(s) {missing} are not among the detectors {sorted(names)}")
        for t in self.threats + tuple(self.adaptive_threats or ()):
            ThreatModel.parse(t)
        if self.adaptive_threats is not None and set(self.adaptive_threats) - set(self.threats):
            raise ConfigError("adaptive threats must be a subset of the threats (the oblivious attack runs beside)")
        bad_modes = [m for m in self.adaptive_modes if m not in ADAPTIVE_MODES]
        if bad_modes or not self.adaptive_modes:
            raise ConfigError(f"unknown adaptive mode(s) {bad_modes}: use {', '.join(ADAPTIVE_MODES)}")
        if self.adaptive_steps is not None and self.adaptive_steps < 1:
            raise ConfigError(f"adaptive_steps must be >= 1, got {self.adaptive_steps}")
        if not 0 < self.fpr < 1:
            raise ConfigError(f"fpr must be in (0, 1), got {self.fpr}")
        if self.score_pool < 10 or self.detector_pool < 10:
            raise ConfigError("score_pool and detector_pool need at least 10 images each")

    def to_config(self) -> dict[str, Any]:
        """The run's config stamp; options added later enter it only when set, so older runs resume
        (runs made before the ``worst`` default stamped no ``adaptive_modes``: pass ``sum`` to resume one)."""
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        if self.adaptive_modes == ("sum",):
            d.pop("adaptive_modes")
        if self.adaptive_steps is None:
            d.pop("adaptive_steps")
        return d


@dataclass
class Splits:
    train: ImageDataset
    test: ImageDataset
    score_pool: ImageDataset
    detector_pool: ImageDataset
    calibration: ImageDataset


def make_splits(s: DetectSettings) -> Splits:
    kw: dict[str, Any] = {"seed": s.seed, "image_size": s.image_size}
    if s.data_root:
        kw["root"] = s.data_root
    train, test = load_dataset(s.dataset, "train", **kw), load_dataset(s.dataset, "test", **kw)
    n = len(train)
    if s.score_pool + s.detector_pool >= n:
        raise ConfigError(f"score_pool + detector_pool ({s.score_pool} + {s.detector_pool}) must leave calibration "
                          f"images in the {n} training images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed))
    a, b = s.score_pool, s.score_pool + s.detector_pool
    if s.test_examples:
        test = test.every(max(1, len(test) // s.test_examples), s.test_examples)
    return Splits(train, test, train.subset(perm[:a]), train.subset(perm[a:b]), train.subset(perm[b:]))


def l2_radius(eps: float, shape: tuple[int, ...]) -> float:
    """The l2 radius matching a linf budget: ``eps * sqrt(C H W)``."""
    return eps * math.sqrt(math.prod(shape))


def load_or_train_classifier(s: DetectSettings, train: ImageDataset, out: Path, device: str,
                             log=print) -> tuple[torch.nn.Module, str]:
    from bastion.checkpoints import load_checkpoint, make_card, save_checkpoint
    from bastion.models import create_model
    from bastion.train import TrainConfig, create_objective, fit

    if s.classifier:
        return load_checkpoint(s.classifier, device)[0].eval(), str(s.classifier)
    final = out / "classifier" / "model.safetensors"
    if final.is_file():
        return load_checkpoint(final, device)[0].eval(), str(final)
    log(f"[detect] training the classifier ({s.classifier_epochs} epochs)")
    c, h, _ = train.input_shape
    torch.manual_seed(s.seed)
    model = create_model("small_cnn", train.num_classes, c, h).to(device)
    cfg = TrainConfig(epochs=s.classifier_epochs, batch_size=64, lr=0.05, schedule="cosine", seed=s.seed)
    obj = create_objective("standard")
    card = make_card(model, "small_cnn", train.num_classes, train.input_shape, class_names=train.class_names,
                     dataset=train.name, seed=s.seed)
    res = fit(model, train, obj, cfg, run_dir=out / "classifier", device=device, quiet=True, checkpoint_card=card)
    save_checkpoint(final.with_suffix(""), res.model, card)
    return res.model.eval(), str(final)


def load_or_train_score_model(s: DetectSettings, pool: ImageDataset, out: Path, device: str, log=print):
    from detection.score_model import load_score_model, train_score_model

    if s.score_model:
        return load_score_model(s.score_model, device)
    if not (out / "score_model" / "bastion_score_model.json").is_file():
        log(f"[detect] training the score model ({s.score_steps} steps on {len(pool)} images, t < {s.t_max})")
    return train_score_model(pool.images, out / "score_model", steps=s.score_steps, batch_size=s.score_batch,
                             lr=s.score_lr, t_max=s.t_max, ema=s.ema, seed=s.seed,
                             block_out_channels=tuple(s.unet_channels), device=device, dataset=pool.name)


def fgsm_sets(model: torch.nn.Module, data: ImageDataset, eps: float, device: str, seed: int) -> list[torch.Tensor]:
    """FGSM (linf eps) and FGSM-l2 (radius eps * sqrt(d)) versions of ``data``, unfiltered."""
    x, y = data.images.to(device), data.labels.to(device)
    out = []
    for threat in (ThreatModel("linf", eps), ThreatModel("l2", l2_radius(eps, tuple(x.shape[1:])))):
        atk = create_attack("fgsm", threat, random_start=False, objective=FullSteps("ce"))
        g = torch.Generator(device=device).manual_seed(seed)
        out.append(atk.run(model, x, y, generator=g).x_adv)
    return out


def build_detectors(s: DetectSettings, classifier: torch.nn.Module, score_model: torch.nn.Module, splits: Splits,
                    out: Path, device: str, log=print) -> tuple[list[Any], dict[str, Any]]:
    """Fit every detector of ``s.detectors`` and calibrate its threshold; returns (detectors, timings)."""
    from detection.mahalanobis import MahalanobisDetector

    timings: dict[str, Any] = {}
    pool, cal = splits.detector_pool, splits.calibration
    x_pool = pool.images.to(device)
    advs = fgsm_sets(classifier, pool, s.kernel_eps, device, s.seed)
    extractor = EPSExtractor(score_model, s.levels)
    dets: list[Any] = []
    eps_kinds = [k for k in s.detectors if k != "mahalanobis"]
    if eps_kinds:
        g = torch.Generator(device=device).manual_seed(s.seed)
        t0 = time.perf_counter()
        nat_eps = extractor(x_pool, g)
        adv_eps = [extractor(a, g) for a in advs]
        timings["eps_fit_images"] = int(x_pool.shape[0] * 3)
        timings["eps_fit_seconds"] = round(time.perf_counter() - t0, 2)
        kcfg = KernelTrainConfig(epochs=s.kernel_epochs, batch=s.kernel_batch, lr=s.kernel_lr)
        for kind in eps_kinds:
            det = EPSDetector(extractor, kind, reference_size=s.reference_size, kernel=kcfg,
                              feature_only=s.feature_only, seed=s.seed)
            path = out / "detectors" / det.name
            if kind == "deep" and path.with_suffix(".json").is_file():
                det = EPSDetector.load(path, extractor)
            else:
                t0 = time.perf_counter()
                det.fit_features(nat_eps, adv_eps)
                timings[f"{det.name}_fit_seconds"] = round(time.perf_counter() - t0, 2)
                if kind == "deep":
                    log(f"[detect] deep kernel trained: J {det.history[0]:.2f} -> {det.history[-1]:.2f} "
                        f"({timings[f'{det.name}_fit_seconds']:.0f} s)")
                    det.save(path)
            dets.append(det)
    if "mahalanobis" in s.detectors:
        t0 = time.perf_counter()
        maha = MahalanobisDetector(classifier, noise_std=s.kernel_eps / 4, select=s.mahalanobis_select, seed=s.seed)
        maha.fit(x_pool, advs, labels=pool.labels.to(device), train_images=splits.train.images.to(device),
                 train_labels=splits.train.labels.to(device))
        timings["mahalanobis_fit_seconds"] = round(time.perf_counter() - t0, 2)
        dets.append(maha)
    # thresholds on the calibration pool (natural images no detector was fitted on)
    xc = cal.images.to(device)
    feats: dict[Any, torch.Tensor] = {}
    for det in dets:
        key = getattr(det, "extractor", det)
        key = id(key)
        if key not in feats:
            feats[key] = det.features(xc, torch.Generator(device=device).manual_seed(s.seed + 1))
        with torch.no_grad():
            det.set_threshold(det.score_features(feats[key]).cpu().numpy(), s.fpr)
    return dets, timings


def build_probes(s: DetectSettings, detectors: list[Any]) -> list[DetectProbe]:
    probes = [DetectProbe(detectors, fpr=s.fpr)]
    adaptive = s.threats if s.adaptive_threats is None else s.adaptive_threats
    for t in s.threats:
        params = {"steps": s.attack_steps}
        probes.append(DetectProbe(detectors, attack=s.attack, threat=t, attack_params=params, fpr=s.fpr))
        if t in adaptive:
            aparams = {"steps": s.adaptive_steps or s.attack_steps}
            for target in s.adaptive_targets:
                for mode in s.adaptive_modes:
                    probes.append(DetectProbe(detectors, attack=s.attack, threat=t, attack_params=aparams,
                                              target=target, weight=s.adaptive_weight, mode=mode, fpr=s.fpr))
    return probes


@dataclass
class DetectionRun:
    doc: dict[str, Any]
    out: Path
    detectors: list[Any] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)


def run_detection(s: DetectSettings, out_dir: str | Path, *, device: str = "cpu", quiet: bool = False,
                  batch_size: int = 128, title: str | None = None, write_reports: bool = True,
                  opts: Any = None) -> DetectionRun:
    """Run the whole recipe into ``out_dir`` (each stage cached; the evaluation resumes)."""
    from bastion.evaluate import evaluate
    from bastion.runner import RunOptions

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda m: None) if quiet else (lambda m: print(m, flush=True))
    splits = make_splits(s)
    t0 = time.perf_counter()
    classifier, clf_path = load_or_train_classifier(s, splits.train, out, device, log)
    score_model = load_or_train_score_model(s, splits.score_pool, out, device, log)
    score_model.requires_grad_(False)
    timings: dict[str, Any] = {"models_seconds": round(time.perf_counter() - t0, 2),
                               "score_model": {k: score_model.meta.get(k) for k in
                                               ("train_seconds", "train_images_per_s", "final_loss", "parameters")}}
    t0 = time.perf_counter()
    detectors, fit_t = build_detectors(s, classifier, score_model, splits, out, device, log)
    timings |= fit_t | {"detectors_seconds": round(time.perf_counter() - t0, 2)}
    probes = build_probes(s, detectors)
    opts = opts or RunOptions(batch_size=batch_size, seed=s.seed, device=device, quiet=quiet)
    config = s.to_config() | {"classifier_path": clf_path}
    log(f"[detect] evaluating {len(probes)} probes on {len(splits.test)} test examples")
    t0 = time.perf_counter()
    doc = evaluate(classifier, splits.test, probes, out / "eval", config, opts=opts, title=title or
                   f"EPS-AD on {s.dataset}", model_name=Path(clf_path).name, write_reports=write_reports,
                   doc_title=title or f"Bastion detection: {s.dataset}")
    timings["evaluate_seconds"] = round(time.perf_counter() - t0, 2)
    doc["timings"] = timings
    return DetectionRun(doc, out, detectors, timings)

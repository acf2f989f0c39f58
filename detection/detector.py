"""The `Detector` protocol and the EPS detectors (EPS-AD, spec section 4).

A detector maps images in [0, 1] to one score per example (higher = more likely adversarial):

    det.fit(natural, [adversarial, ...])     # images (N, C, H, W) in [0, 1]
    det.score(x) -> np.ndarray (N,)
    det.set_threshold(natural_scores, fpr)    # flag x when score(x) > threshold (FPR <= fpr)

Detectors also split ``score`` into ``features(x, generator)`` (shared work, e.g. EPS) and
``score_features(f) -> tensor`` (differentiable), so a probe extracts EPS once for every detector
on the same score model, and `differentiable()` gives the ``x -> score`` module the adaptive
attack (`attacks.adaptive.DetectorObjective`) differentiates.

`EPSDetector` kinds (same EPS features, three statistics; section 9 asks for all three):

- ``deep``: biased MMD^2 between the reference set R and ``{EPS(y)}`` under the trained deep
  kernel: ``mean K_RR - 2 mean_i k(r_i, EPS(y)) + k(EPS(y), EPS(y))``;
- ``gaussian``: the same with ``exp(-Dx / bw)``, ``bw`` = median squared distance within R;
- ``norm``: EPS-N, ``||EPS(y)||_2`` (no reference set).

R is drawn (seeded) from the natural images given to `fit`; callers keep those out of the score
model's training data.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from bastion.errors import ConfigError
from detection.eps import eps_features, eps_norm
from detection.mmd import DeepKernel, KernelTrainConfig, gaussian_gram, median_bandwidth, train_deep_kernel

EPS_KINDS = ("deep", "gaussian", "norm")


def threshold_at_fpr(natural_scores: np.ndarray | list[float], fpr: float) -> float:
    """The threshold t with at most ``fpr`` of ``natural_scores`` above it (flag when score > t);
    the same rule as `bastion.metrics.tpr_at_fpr`."""
    if not 0 <= fpr < 1:
        raise ConfigError(f"FPR must be in [0, 1), got {fpr}")
    neg = np.sort(np.asarray(natural_scores, dtype=np.float64))
    if neg.size == 0:
        raise ConfigError("a threshold needs natural scores")
    k = int(np.floor(fpr * neg.size))
    return float(neg[-k - 1])


class Detector(Protocol):
    name: str
    threshold: float | None

    def fit(self, natural: torch.Tensor, adversarial: list[torch.Tensor], **kw: Any) -> Detector: ...

    def features(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def score_features(self, f: torch.Tensor) -> torch.Tensor: ...

    def score(self, x: torch.Tensor, generator: torch.Generator | None = None) -> np.ndarray: ...

    def set_threshold(self, natural_scores: np.ndarray, fpr: float) -> float: ...

    def differentiable(self) -> nn.Module: ...


class DetectorScore(nn.Module):
    """``x -> (score(x) - center) / scale`` as a differentiable module (fresh noise from the global
    RNG on every call, which the attack engines fork from their generator)."""

    def __init__(self, detector: Detector, center: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.detector = detector
        self.center, self.scale = float(center), float(scale) if scale > 0 else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.detector.score_features(self.detector.features(x, None)) - self.center) / self.scale

    def standardize(self, value: float) -> float:
        return (value - self.center) / self.scale


class Thresholded:
    """What every detector shares: a threshold at a chosen FPR and the standardized differentiable
    score that detector-aware attacks follow."""

    def set_threshold(self, natural_scores: np.ndarray, fpr: float) -> float:
        """Threshold at ``fpr`` on natural (calibration) scores; their mean/std standardize the
        score the adaptive attack sees."""
        s = np.asarray(natural_scores, dtype=np.float64)
        self.threshold = threshold_at_fpr(s, fpr)
        self.center, self.scale = float(s.mean()), float(s.std()) or 1.0
        return self.threshold

    def differentiable(self, center: float | None = None, scale: float | None = None) -> DetectorScore:
        """``x -> (score - center) / scale`` (default: the calibration mean/std)."""
        return DetectorScore(self, getattr(self, "center", 0.0) if center is None else center,
                             getattr(self, "scale", 1.0) if scale is None else scale)


class EPSExtractor:
    """EPS with one score model and K levels; ``key`` identifies extractors that give equal features."""

    def __init__(self, score_model: nn.Module, levels: int = 20, batch: int = 256):
        self.score_model = score_model
        self.levels = int(levels)
        self.batch = int(batch)

    @property
    def key(self) -> tuple[int, int]:
        return id(self.score_model), self.levels

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dev = next(self.score_model.parameters()).device
        if torch.is_grad_enabled() and x.requires_grad:
            return eps_features(self.score_model, x.to(dev), self.levels, generator, self.batch)
        with torch.no_grad():
            return eps_features(self.score_model, x.to(dev), self.levels, generator, self.batch)


class EPSDetector(Thresholded):
    """EPS-AD (``kind="deep"``) and its baselines (``gaussian``, ``norm``) on one `EPSExtractor`."""

    def __init__(self, extractor: EPSExtractor, kind: str = "deep", *, reference_size: int = 500,
                 kernel: KernelTrainConfig | None = None, feature_only: bool = False, kernel_init: dict | None = None,
                 seed: int = 0, name: str | None = None):
        if kind not in EPS_KINDS:
            raise ConfigError(f"unknown EPS detector kind {kind!r}: use one of {', '.join(EPS_KINDS)}")
        self.extractor = extractor
        self.kind = kind
        self.reference_size = int(reference_size)
        self.kernel_cfg = kernel or KernelTrainConfig()
        self.feature_only = bool(feature_only)
        self.kernel_init = dict(kernel_init or {})
        self.seed = int(seed)
        self.name = name or {"deep": "eps-deep-mmd", "gaussian": "eps-gaussian-mmd", "norm": "eps-norm"}[kind]
        self.threshold: float | None = None
        self.kernel: DeepKernel | None = None
        self.reference: torch.Tensor | None = None
        self.bandwidth: float | None = None
        self.history: list[float] = []
        self._ref_f: torch.Tensor | None = None
        self._krr: float = 0.0

    # -- fitting --------------------------------------------------------------------------------
    def fit(self, natural: torch.Tensor, adversarial: list[torch.Tensor], generator: torch.Generator | None = None,
            **_: Any) -> EPSDetector:
        """Fit on natural and adversarial images (EPS drawn with ``generator``, default seeded by ``seed``)."""
        g = generator or torch.Generator(device="cpu").manual_seed(self.seed)
        nat = self.extractor(natural, g)
        return self.fit_features(nat, [self.extractor(a, g) for a in adversarial])

    def fit_features(self, natural: torch.Tensor, adversarial: list[torch.Tensor]) -> EPSDetector:
        """Fit on EPS tensors: draw R from ``natural`` (seeded); train the kernel (deep) or set the
        bandwidth (gaussian)."""
        natural = natural.detach()
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        if self.kind == "norm":
            return self
        r = min(self.reference_size, natural.shape[0])
        pick = torch.randperm(natural.shape[0], generator=g)[:r]
        if self.kind == "deep":
            c, h = natural.shape[1], natural.shape[-1]
            torch.manual_seed(self.kernel_cfg.seed)
            self.kernel = DeepKernel(c, h, feature_only=self.feature_only, generator=g,
                                     **self.kernel_init).to(natural.device)
            self.history = train_deep_kernel(self.kernel, natural, [a.detach() for a in adversarial],
                                             self.kernel_cfg)
            self.kernel.requires_grad_(False)
        self.set_reference(natural[pick])
        return self

    def set_reference(self, reference: torch.Tensor) -> None:
        self.reference = reference.detach().clone()
        with torch.no_grad():
            if self.kind == "gaussian":
                self.bandwidth = median_bandwidth(self.reference) if self.bandwidth is None else self.bandwidth
                self._krr = float(gaussian_gram(self.reference, self.reference, self.bandwidth).mean())
            elif self.kind == "deep":
                self._ref_f = self.kernel.phi(self.reference)
                xr = self.reference.flatten(1)
                self._krr = float(self.kernel.gram_parts(self._ref_f, xr, self._ref_f, xr).mean())

    # -- scoring --------------------------------------------------------------------------------
    def features(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.extractor(x, generator)

    def score_features(self, f: torch.Tensor) -> torch.Tensor:
        """(N,) scores of EPS tensors f (N, C, H, W); differentiable in f."""
        if self.kind == "norm":
            return eps_norm(f)
        if self.reference is None:
            raise ConfigError(f"detector {self.name!r} is not fitted; call fit() first")
        ref = self.reference.to(f.device)
        if self.kind == "gaussian":
            k_ry = gaussian_gram(ref, f, self.bandwidth)
        else:
            k_ry = self.kernel.gram_parts(self._ref_f.to(f.device), ref.flatten(1), self.kernel.phi(f), f.flatten(1))
        return self._krr - 2 * k_ry.mean(dim=0) + 1.0  # k(y, y) = 1 for both kernels

    def score(self, x: torch.Tensor, generator: torch.Generator | None = None) -> np.ndarray:
        with torch.no_grad():
            return self.score_features(self.features(x, generator)).cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": f"eps-{self.kind}", "levels": self.extractor.levels,
                "reference_size": None if self.reference is None else int(self.reference.shape[0]),
                "bandwidth": self.bandwidth, "threshold": self.threshold, "feature_only": self.feature_only,
                "kernel_epochs": self.kernel_cfg.epochs if self.kind == "deep" else None,
                "final_j": self.history[-1] if self.history else None}

    # -- persistence (detection.checkpoint: safetensors + JSON card, never pickle) --------------
    def save(self, path: str | Path, score_model_path: str | Path | None = None, fpr: float | None = None,
             extra: dict[str, Any] | None = None) -> Path:
        """``path.safetensors`` (reference EPS, kernel weights) + ``path.json`` (the rest, with the
        threshold and calibration mean/std); ``score_model_path`` lets `load_detector` rebuild the
        extractor. Returns the card path."""
        from detection.checkpoint import detector_paths, relative_ref, write_detector

        tensors = {} if self.reference is None else {"reference": self.reference}
        if self.kernel is not None:
            tensors |= {f"kernel.{k}": v for k, v in self.kernel.state_dict().items()}
        cdir = detector_paths(path)[1].parent
        state = {"bandwidth": self.bandwidth, "feature_only": self.feature_only, "kernel_init": self.kernel_init,
                 "history": self.history, "reference_size": self.reference_size, "seed": self.seed,
                 "kernel_train": dataclasses.asdict(self.kernel_cfg)}
        card = {"name": self.name, "threshold": self.threshold, "center": getattr(self, "center", None),
                "scale": getattr(self, "scale", None), "fpr": fpr, "classifier": None,
                "score_model": {"path": relative_ref(score_model_path, cdir), "levels": self.extractor.levels},
                "state": state, "extra": dict(extra or {})}
        return write_detector(path, f"eps-{self.kind}", tensors, card)

    @classmethod
    def load(cls, path: str | Path, extractor: EPSExtractor | None = None,
             device: str | torch.device | None = None) -> EPSDetector:
        """A saved EPS detector on ``extractor`` (default: the score model its card names). Reads
        the checkpoint format of `detection.checkpoint` and, for runs cached before it, the older
        unsigned ``path.json`` + ``path.safetensors``."""
        from bastion.errors import CheckpointError
        from detection.checkpoint import detector_paths, read_detector_card, read_detector_tensors, resolve_ref

        wpath, cpath = detector_paths(path)
        try:
            raw = json.loads(cpath.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"detector card {str(cpath)!r} is missing or not JSON ({exc})") from None
        if isinstance(raw, dict) and "format" not in raw and "kind" in raw:
            return cls._load_legacy(raw, wpath, extractor)
        card = read_detector_card(path)
        if not card["detector"].startswith("eps-"):
            raise CheckpointError(f"{str(cpath)!r} is a {card['detector']!r} detector, not an EPS one")
        if extractor is None:
            from detection.score_model import load_score_model

            sm = card.get("score_model") or {}
            p = resolve_ref(sm.get("path"), cpath)
            if p is None:
                raise CheckpointError(f"detector {str(cpath)!r} names no score model; pass extractor=EPSExtractor(...)")
            model = load_score_model(str(p), str(device or "cpu"))
            model.requires_grad_(False)
            extractor = EPSExtractor(model, int(sm.get("levels") or 20))
        tensors = read_detector_tensors(path, card)
        st = card["state"] | {"kind": card["detector"][4:], "name": card["name"], "threshold": card["threshold"]}
        det = cls._from_state(st, tensors, extractor)
        if card.get("center") is not None:
            det.center, det.scale = float(card["center"]), float(card["scale"])
        return det

    @classmethod
    def _load_legacy(cls, meta: dict[str, Any], wpath: Path, extractor: EPSExtractor | None) -> EPSDetector:
        from bastion.checkpoints import load_state
        from bastion.errors import CheckpointError

        if extractor is None:
            raise CheckpointError(f"{str(wpath)!r} is an older EPS detector file; pass extractor=EPSExtractor(...)")
        return cls._from_state(meta, load_state(wpath), extractor)

    @classmethod
    def _from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    extractor: EPSExtractor) -> EPSDetector:
        dev = next(extractor.score_model.parameters()).device
        tensors = {k: v.to(dev) for k, v in tensors.items()}
        det = cls(extractor, meta["kind"], reference_size=meta["reference_size"], feature_only=meta["feature_only"],
                  kernel_init=meta["kernel_init"], seed=meta["seed"], name=meta["name"],
                  kernel=KernelTrainConfig(**meta["kernel_train"]) if "kernel_train" in meta else None)
        det.bandwidth, det.threshold, det.history = meta["bandwidth"], meta["threshold"], meta["history"]
        if det.kind == "deep":
            ref = tensors["reference"]
            det.kernel = DeepKernel(ref.shape[1], ref.shape[-1], feature_only=det.feature_only,
                                    **det.kernel_init).to(dev)
            det.kernel.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("kernel.")})
            det.kernel.eval().requires_grad_(False)
        if "reference" in tensors:
            det.set_reference(tensors["reference"])
        return det

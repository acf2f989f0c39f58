"""The Mahalanobis detector (Lee et al. 2018; spec section 6).

1. Features f_l(x): the output of layer l (a module name of the classifier), global-average
   pooled per channel when it is a feature map.
2. On clean training images: class means mu_{l,c} and one tied covariance per layer
   ``Sigma_l = (1/N) sum_c sum_{i in c} (f - mu_c)(f - mu_c)^T``; its pseudo-inverse P_l.
3. ``M_l(x) = max_c -1/2 (f_l(x) - mu_{l,c})^T P_l (f_l(x) - mu_{l,c})``.
4. Input pre-processing: ``x_hat = x - m sign(grad_x d_l(x, c*))`` with d_l the distance to the
   closest class c* (raises the confidence), then ``M_l(x_hat)``; m from ``magnitudes``.
5. A logistic regression on (M_1..M_L): positives adversarial, negatives clean plus Gaussian-noised
   copies. ``select="success"`` keeps only samples whose clean and noisy versions are classified
   correctly and whose attack succeeded (the paper's rule); ``"all"`` keeps every sample. Half of
   the kept samples fit the regression, the other half picks m by AUROC.

The score is the regression's decision value (higher = adversarial). Since ``sign`` has zero
gradient almost everywhere, ``score`` is differentiable in x with the pre-processing step held
fixed, which is what the adaptive attack uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bastion.errors import ConfigError
from bastion.metrics import auroc
from detection.detector import Thresholded

MAGNITUDES = (0.0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005)


def default_layers(model: nn.Module) -> list[str]:
    """Every pooling/stage output of a sequential classifier plus the input of its last linear layer."""
    mods = dict(model.named_modules())
    names = [n for n, m in mods.items() if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    linear = [n for n, m in mods.items() if isinstance(m, nn.Linear)]
    if linear:
        parent, _, child = linear[-1].rpartition(".")
        kids = [n for n, _ in mods[parent].named_children()]
        i = kids.index(child)
        if i > 0:
            names.append(f"{parent}.{kids[i - 1]}" if parent else kids[i - 1])
    if not names:
        raise ConfigError("cannot pick Mahalanobis layers for this model; pass layers=[module names]")
    return names


class MahalanobisDetector(Thresholded):
    """Lee et al.'s detector on a classifier's layers (names of ``classifier.named_modules()``)."""

    def __init__(self, classifier: nn.Module, layers: Sequence[str] | None = None,
                 magnitudes: Sequence[float] = MAGNITUDES, noise_std: float | None = None,
                 select: str = "all", seed: int = 0, name: str = "mahalanobis"):
        if select not in ("all", "success"):
            raise ConfigError(f"Mahalanobis sample selection must be 'all' or 'success', got {select!r}")
        self.classifier = classifier.eval()
        self.layers = list(layers or default_layers(classifier))
        mods = dict(classifier.named_modules())
        missing = [n for n in self.layers if n not in mods]
        if missing:
            raise ConfigError(f"classifier has no module(s) {missing}; layers are names from named_modules()")
        self._mods = [mods[n] for n in self.layers]
        self.magnitudes = tuple(float(m) for m in magnitudes)
        self.noise_std = noise_std
        self.select = select
        self.seed = int(seed)
        self.name = name
        self.means: list[torch.Tensor] = []
        self.precisions: list[torch.Tensor] = []
        self.magnitude = 0.0
        self.weights: torch.Tensor | None = None
        self.bias = 0.0
        self.threshold: float | None = None
        self.selection_auroc: dict[float, float] = {}

    # -- features -------------------------------------------------------------------------------
    def layer_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """([f_l (N, D_l)], logits) with feature maps global-average pooled."""
        outs: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o)) for m in self._mods]
        try:
            logits = self.classifier(x)
        finally:
            for h in hooks:
                h.remove()
        return [o.mean(dim=(2, 3)) if o.dim() == 4 else o.flatten(1) for o in outs], logits

    def fit_statistics(self, images: torch.Tensor, labels: torch.Tensor, batch: int = 512) -> None:
        """Class means and tied (ML) covariances per layer from clean training images."""
        with torch.no_grad():
            feats = [self.layer_features(images[i:i + batch])[0] for i in range(0, images.shape[0], batch)]
        per_layer = [torch.cat([f[l] for f in feats]).double() for l in range(len(self.layers))]
        labels = labels.to(per_layer[0].device)
        classes = labels.unique()
        self.means, self.precisions = [], []
        for f in per_layer:
            mu = torch.stack([f[labels == c].mean(0) for c in classes])
            centred = f - mu[torch.searchsorted(classes, labels)]
            cov = centred.T @ centred / f.shape[0]
            self.means.append(mu.float())
            self.precisions.append(torch.linalg.pinv(cov).float())

    def _distances(self, f: torch.Tensor, l: int) -> torch.Tensor:
        d = f.unsqueeze(1) - self.means[l].to(f.device).unsqueeze(0)  # (N, K, D)
        return torch.einsum("nkd,de,nke->nk", d, self.precisions[l].to(f.device), d)

    def confidences(self, x: torch.Tensor, magnitude: float | None = None) -> torch.Tensor:
        """(N, L) confidences M_l(x_hat); differentiable in x (the pre-processing sign held fixed)."""
        m = self.magnitude if magnitude is None else magnitude
        cols = []
        for l in range(len(self.layers)):
            xh = x
            if m > 0:
                with torch.enable_grad():
                    xg = x.detach().requires_grad_(True)
                    dist = self._distances(self.layer_features(xg)[0][l], l).min(dim=1).values
                    (g,) = torch.autograd.grad(dist.sum(), xg)
                xh = x - m * g.sign()
            cols.append(-0.5 * self._distances(self.layer_features(xh)[0][l], l).min(dim=1).values)
        return torch.stack(cols, dim=1)

    # -- the protocol ---------------------------------------------------------------------------
    def fit(self, natural: torch.Tensor, adversarial: list[torch.Tensor], labels: torch.Tensor | None = None,
            train_images: torch.Tensor | None = None, train_labels: torch.Tensor | None = None,
            **_: Any) -> MahalanobisDetector:
        """Statistics from ``train_images``/``train_labels`` (default: ``natural``/``labels``), then
        the regression on natural + noisy (negatives) vs each adversarial set (positives)."""
        from sklearn.linear_model import LogisticRegression

        if labels is None:
            raise ConfigError("the Mahalanobis detector needs the labels of the natural images")
        if not self.means:
            self.fit_statistics(train_images if train_images is not None else natural,
                                train_labels if train_labels is not None else labels)
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        std = self.noise_std if self.noise_std is not None else 0.01
        noisy = (natural + std * torch.randn(natural.shape, generator=g).to(natural.device)).clamp(0, 1)
        with torch.no_grad():
            ok_nat = self.classifier(natural).argmax(1) == labels
            ok_noisy = self.classifier(noisy).argmax(1) == labels
        neg_x, pos_x = [], []
        for adv in adversarial:
            with torch.no_grad():
                fooled = self.classifier(adv).argmax(1) != labels
            keep = (ok_nat & ok_noisy & fooled) if self.select == "success" else torch.ones_like(fooled)
            neg_x += [natural[keep], noisy[keep]]
            pos_x.append(adv[keep])
        xn, xp = torch.cat(neg_x), torch.cat(pos_x)
        if xn.shape[0] < 4 or xp.shape[0] < 2:
            raise ConfigError(f"too few samples kept to fit the Mahalanobis regression ({xp.shape[0]} adversarial); "
                              f"use select='all' or a stronger attack")
        yy = np.r_[np.zeros(xn.shape[0]), np.ones(xp.shape[0])]
        perm = torch.randperm(len(yy), generator=g).numpy()
        fit_i, sel_i = perm[: len(perm) // 2], perm[len(perm) // 2:]
        best = None
        for m in self.magnitudes:
            feats = torch.cat([self.confidences(xn, m), self.confidences(xp, m)]).detach().cpu().double().numpy()
            lr = LogisticRegression(max_iter=2000).fit(feats[fit_i], yy[fit_i])
            dec = lr.decision_function(feats[sel_i])
            a = auroc(dec[yy[sel_i] == 0], dec[yy[sel_i] == 1])
            self.selection_auroc[m] = a
            if best is None or a > best[0]:
                best = (a, m, lr)
        _, self.magnitude, lr = best
        dev = natural.device
        self.weights = torch.tensor(lr.coef_[0], dtype=torch.float32, device=dev)
        self.bias = float(lr.intercept_[0])
        return self

    def features(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return self.confidences(x)
        with torch.no_grad():
            return self.confidences(x)

    def score_features(self, f: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            raise ConfigError("the Mahalanobis detector is not fitted; call fit() first")
        return f @ self.weights.to(f.device) + self.bias

    def score(self, x: torch.Tensor, generator: torch.Generator | None = None) -> np.ndarray:
        with torch.no_grad():
            return self.score_features(self.features(x)).cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "mahalanobis", "layers": self.layers, "magnitude": self.magnitude,
                "select": self.select, "noise_std": self.noise_std, "threshold": self.threshold,
                "selection_auroc": {str(k): v for k, v in self.selection_auroc.items()}}

    # -- persistence (detection.checkpoint: safetensors + JSON card, never pickle) --------------
    def save(self, path: str | Path, classifier_path: str | Path | None = None, fpr: float | None = None,
             extra: dict[str, Any] | None = None) -> Path:
        """``path.safetensors`` (class means and tied precision per layer, regression weights) +
        ``path.json`` (layers, pre-processing magnitude, regression bias, threshold and the
        calibration mean/std the adaptive attack standardizes with). ``classifier_path``: the
        checkpoint whose layers the features come from (its sha256 is recorded). Returns the card path."""
        from bastion.checkpoints import read_card
        from detection.checkpoint import detector_paths, relative_ref, write_detector

        if self.weights is None or not self.means:
            raise ConfigError("the Mahalanobis detector is not fitted; call fit() before save()")
        tensors = {f"means.{l}": m for l, m in enumerate(self.means)}
        tensors |= {f"precisions.{l}": p for l, p in enumerate(self.precisions)}
        tensors["weights"] = self.weights
        cdir = detector_paths(path)[1].parent
        clf = None if classifier_path is None else {"path": relative_ref(classifier_path, cdir),
                                                    "sha256": read_card(classifier_path).get("sha256")}
        state = {"layers": self.layers, "magnitudes": list(self.magnitudes), "magnitude": self.magnitude,
                 "bias": self.bias, "select": self.select, "noise_std": self.noise_std, "seed": self.seed,
                 "selection_auroc": {repr(k): v for k, v in sorted(self.selection_auroc.items())}}
        card = {"name": self.name, "threshold": self.threshold, "center": getattr(self, "center", None),
                "scale": getattr(self, "scale", None), "fpr": fpr, "classifier": clf, "score_model": None,
                "state": state, "extra": dict(extra or {})}
        return write_detector(path, "mahalanobis", tensors, card)

    @classmethod
    def load(cls, path: str | Path, classifier: nn.Module | None = None,
             device: str | torch.device = "cpu") -> MahalanobisDetector:
        """A saved detector on ``classifier`` (default: the checkpoint its card names)."""
        from bastion.errors import CheckpointError
        from detection.checkpoint import classifier_from_card, detector_paths, read_detector_card, read_detector_tensors

        card = read_detector_card(path)
        cpath = detector_paths(path)[1]
        if card["detector"] != "mahalanobis":
            raise CheckpointError(f"{str(cpath)!r} is a {card['detector']!r} detector, not a Mahalanobis one")
        tensors = read_detector_tensors(path, card)
        st = card["state"]
        if classifier is None:
            classifier = classifier_from_card(card, cpath, device)
        try:
            det = cls(classifier, st["layers"], magnitudes=st["magnitudes"], noise_std=st["noise_std"],
                      select=st["select"], seed=st["seed"], name=card["name"])
            n = len(det.layers)
            det.means = [tensors[f"means.{l}"].to(device) for l in range(n)]
            det.precisions = [tensors[f"precisions.{l}"].to(device) for l in range(n)]
            det.weights = tensors["weights"].to(device)
            det.magnitude, det.bias = float(st["magnitude"]), float(st["bias"])
            det.selection_auroc = {float(k): v for k, v in st.get("selection_auroc", {}).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"detector {str(cpath)!r} lacks or mangles a field ({exc})") from None
        shapes_ok = det.weights.shape == (n,) and all(
            m.dim() == 2 and p.shape == (m.shape[1], m.shape[1]) for m, p in zip(det.means, det.precisions))
        if not shapes_ok:
            raise CheckpointError(f"detector {str(cpath)!r}: tensor shapes do not fit {n} layers")
        det.threshold = card["threshold"]
        if card.get("center") is not None:
            det.center, det.scale = float(card["center"]), float(card["scale"])
        return det

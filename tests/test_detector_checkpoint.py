"""Detector checkpoints (detection/checkpoint.py): Mahalanobis and EPS detectors saved as
safetensors + a JSON card and loaded back to the same scores; edited, truncated or pickled files
refused with one-line errors. Tiny models on synthetic data (a few seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fit_full_batch
from torch import nn

from bastion.checkpoints import make_card, save_checkpoint
from bastion.data import load_dataset
from bastion.errors import CheckpointError
from bastion.models import create_model
from detection.checkpoint import load_detector, read_detector_card, save_detector


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from detection.mahalanobis import MahalanobisDetector

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("det")
    train = load_dataset("synthetic", "train", num_examples_total=120)
    c, h, _ = train.input_shape
    model = create_model("small_cnn", train.num_classes, c, h)
    fit_full_batch(model, train.images, train.labels, 20)
    card = make_card(model, "small_cnn", train.num_classes, train.input_shape)
    save_checkpoint(folder / "clf", model, card)
    x, y = train.images[:60], train.labels[:60]
    advs = [(x + 0.2 * torch.randn_like(x).sign()).clamp(0, 1)]
    det = MahalanobisDetector(model, magnitudes=(0.0, 0.01), seed=0).fit(x, advs, labels=y)
    det.set_threshold(det.score(train.images[60:]), 0.05)
    path = save_detector(det, folder / "maha", classifier_path=folder / "clf.safetensors", fpr=0.05)
    return {"folder": folder, "det": det, "model": model, "x": train.images[60:], "path": path}


def test_mahalanobis_round_trip_gives_same_scores(fitted):
    det, x = fitted["det"], fitted["x"]
    back = load_detector(fitted["folder"] / "maha")                     # classifier from the card's path
    assert back.layers == det.layers and back.magnitude == det.magnitude and back.threshold == det.threshold
    assert (back.center, back.scale) == (det.center, det.scale)
    assert torch.allclose(torch.as_tensor(back.score(x)), torch.as_tensor(det.score(x)), atol=1e-5)
    again = load_detector(fitted["path"], classifier=fitted["model"])   # or the module in hand
    assert (again.score(x) == back.score(x)).all()
    card = read_detector_card(fitted["path"])
    assert card["detector"] == "mahalanobis" and card["fpr"] == 0.05
    assert card["classifier"]["path"] == "clf.safetensors"              # relative to the card's folder


def test_saving_twice_gives_the_same_bytes(fitted, tmp_path):
    a = save_detector(fitted["det"], tmp_path / "a", classifier_path=fitted["folder"] / "clf.safetensors")
    b = save_detector(fitted["det"], tmp_path / "b", classifier_path=fitted["folder"] / "clf.safetensors")
    assert a.with_suffix(".safetensors").read_bytes() == b.with_suffix(".safetensors").read_bytes()


def _copy(fitted, tmp_path):
    for suffix in (".json", ".safetensors"):
        (tmp_path / f"maha{suffix}").write_bytes((fitted["folder"] / f"maha{suffix}").read_bytes())
    return tmp_path / "maha"


def test_edited_card_is_refused(fitted, tmp_path):
    p = _copy(fitted, tmp_path)
    card = json.loads(p.with_suffix(".json").read_text())
    card["threshold"] = 1e9                                             # "never flag anything"
    p.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="does not match its tensors"):
        load_detector(p, classifier=fitted["model"])


def test_corrupt_truncated_and_pickled_tensors_are_refused(fitted, tmp_path):
    p = _copy(fitted, tmp_path)
    w = p.with_suffix(".safetensors")
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_detector(p, classifier=fitted["model"])
    w.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError):
        load_detector(p, classifier=fitted["model"])
    torch.save({"weights": torch.zeros(3)}, w)
    with pytest.raises(CheckpointError, match="pickle"):
        load_detector(p, classifier=fitted["model"])
    p.with_suffix(".json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_detector(p)


def test_retrained_classifier_is_refused(fitted, tmp_path):
    import shutil

    for name in ("maha.json", "maha.safetensors", "clf.json"):
        shutil.copy(fitted["folder"] / name, tmp_path / name)
    other = create_model("small_cnn", 4, 1, 8)
    save_checkpoint(tmp_path / "clf", other, make_card(other, "small_cnn", 4, (1, 8, 8)))
    with pytest.raises(CheckpointError, match="another classifier"):
        load_detector(tmp_path / "maha")


class TinyScore(nn.Module):
    """A stand-in score model (EPS needs ``alpha_bar(k)`` and ``score(u, k)``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def alpha_bar(self, k):
        return torch.exp(-0.05 * k.float())

    def score(self, u, k):
        return self.conv(u)


@pytest.mark.parametrize("kind", ["gaussian", "deep"])
def test_eps_detector_round_trip(kind, tmp_path):
    from detection.detector import EPSDetector, EPSExtractor
    from detection.mmd import KernelTrainConfig

    torch.manual_seed(0)
    ex = EPSExtractor(TinyScore().requires_grad_(False), levels=3)
    nat = torch.rand(24, 1, 8, 8)
    adv = [(nat + 0.3 * torch.randn_like(nat).sign()).clamp(0, 1)]
    det = EPSDetector(ex, kind, reference_size=10, kernel=KernelTrainConfig(epochs=2, batch=12), seed=0)
    det.fit(nat, adv)
    det.set_threshold(det.score(nat, torch.Generator().manual_seed(1)), 0.1)
    save_detector(det, tmp_path / "eps", fpr=0.1)
    back = load_detector(tmp_path / "eps", extractor=ex)
    assert back.kind == kind and back.threshold == det.threshold and back.scale == det.scale
    g = torch.Generator().manual_seed(3)
    f = ex(nat, g)
    assert torch.allclose(back.score_features(f), det.score_features(f), atol=1e-5)
    assert read_detector_card(tmp_path / "eps")["detector"] == f"eps-{kind}"

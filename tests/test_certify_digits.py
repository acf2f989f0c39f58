"""On digits, Gaussian-augmentation training certifies clearly more at radius 0.25 than standard
training (Cohen et al.'s qualitative finding), and the quickstart section produces the curve."""

from __future__ import annotations

import torch

from bastion.data import load_dataset


def test_gaussian_training_beats_standard_at_radius_025(tmp_path):
    import defenses.gaussian  # noqa: F401
    from bastion.models import create_model
    from bastion.train import TrainConfig, create_objective, fit
    from certify.runner import CertifyOptions, Setting, run_certification

    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test").every(5, 80)
    cfg = TrainConfig(epochs=8, batch_size=64, lr=0.05, seed=0)
    models = {}
    for name, params in [("standard", {}), ("gaussian", {"sigma": 0.25})]:
        torch.manual_seed(0)
        m = create_model("small_cnn", 10, 1, 8, width=16)
        fit(m, train, create_objective(name, **params), cfg, quiet=True)
        models[name] = m.eval()
    settings = [Setting(n, m, 0.25, 10) for n, m in models.items()]
    doc = run_certification(settings, test, tmp_path / "run", CertifyOptions(n0=50, n=500, alpha=0.001, batch=1000,
                            max_radius=0.5), quiet=True, write_reports=False)
    acc = {s["name"]: dict(zip(s["radii"], s["certified_accuracy"])) for s in doc["sections"][0]["data"]["settings"]}
    assert acc["gaussian"][0.25] >= acc["standard"][0.25] + 0.10, acc
    assert acc["gaussian"][0.25] >= 0.6, acc

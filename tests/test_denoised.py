"""Denoised smoothing: t* mapping, one-shot denoising, composite checkpoint and certify (tiny UNet)."""

import pytest
import torch

pytest.importorskip("diffusers")

from bastion.checkpoints import load_checkpoint, make_card  # noqa: E402
from bastion.models import create_model  # noqa: E402
from certify.runner import CertifyOptions, Setting, run_certification  # noqa: E402
from defenses.denoised import DenoisedClassifier, load_denoiser_dir, save_denoised  # noqa: E402
from detection.diffusers_backend import build_scheduler, build_unet, save_model_dir  # noqa: E402

UNET = {"channels": 1, "image_size": 8, "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4}
SCHED = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def make(sigma=0.25):
    torch.manual_seed(0)
    unet = build_unet(**{**UNET, "block_out_channels": tuple(UNET["block_out_channels"])})
    clf = create_model("mlp", 4, 1, 8, hidden=(8,))
    return DenoisedClassifier(unet, clf, build_scheduler().alphas_cumprod, sigma).eval(), clf


def test_t_star_and_one_shot_denoise():
    m, _ = make(0.25)
    assert m.t_star == 145 and m.sqrt_a ** 2 == pytest.approx(0.79798, abs=2e-5)
    x = torch.rand(3, 1, 8, 8)
    d = m.denoise(x)
    assert d.shape == x.shape and d.min() >= 0 and d.max() <= 1
    assert m(x).shape == (3, 4)


def test_zero_eps_prediction_inverts_the_scaling():
    m, _ = make(0.5)
    for p in m.denoiser.parameters():
        torch.nn.init.zeros_(p)
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(m.denoise(x), x, atol=1e-5)


def test_composite_roundtrip_and_certify(tmp_path):
    m, clf = make(0.25)
    card = make_card(clf, "mlp", 4, (1, 8, 8), {"hidden": [8]}, [f"c{i}" for i in range(4)], dataset="synthetic")
    path = save_denoised(tmp_path / "dds", m, UNET, SCHED, card)
    loaded, c = load_checkpoint(path)
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(loaded(x), m(x), atol=1e-6) and c["recipe"]["t_star"] == 145
    from bastion.data import load_dataset

    test = load_dataset("synthetic", "test", num_examples_total=16)
    doc = run_certification([Setting("dds", str(path), 0.25, 4)], test.every(8), tmp_path / "cert",
                            CertifyOptions(n0=5, n=20, batch=20), quiet=True)
    assert doc["sections"][0]["data"]["settings"][0]["num_examples"] == 2


def test_local_diffusers_directory_loads(tmp_path):
    m, clf = make(0.5)
    save_model_dir(tmp_path / "dir", m.denoiser, build_scheduler(), {"note": "test"})
    d = load_denoiser_dir(tmp_path / "dir", clf, 0.5)
    x = torch.rand(2, 1, 8, 8)
    assert d.t_star == 259 and torch.allclose(d(x), m(x), atol=1e-6)

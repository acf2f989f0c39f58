"""EPS: the level/index convention, an analytic score model, batched == reference loop, and the
diffusers score model (train, save, load a local directory; skipped without diffusers)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detection.eps import draw_noise, eps_features, eps_features_loop, eps_norm
from detection.score_model import EpsilonScoreModel


def linear_acp() -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


class GaussianEps(nn.Module):
    """The exact epsilon-model when u ~ N(0, I): u_t ~ N(0, I), eps_hat = sqrt(1 - a) u_t."""

    def __init__(self, acp: torch.Tensor):
        super().__init__()
        self.register_buffer("acp", acp)
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, u_t, timestep):
        return (1 - self.acp[timestep]).sqrt().view(-1, 1, 1, 1) * u_t * self.w


def model() -> EpsilonScoreModel:
    acp = linear_acp()
    return EpsilonScoreModel(GaussianEps(acp), acp)


def test_level_k_uses_ddpm_index_k_minus_1_and_matches_the_vp_sde():
    acp = linear_acp()
    m = model()
    ks = torch.arange(1, 21)
    assert torch.equal(m.alpha_bar(ks), acp[:20])
    for k in range(1, 21):
        t = k / 1000
        cont = 1 - math.exp(-0.5 * (20 - 0.1) * t * t - 0.1 * t)
        assert abs((1 - float(acp[k - 1])) - cont) / cont < 0.11  # spec: <= ~10% at k = 1, less after


def test_score_of_gaussian_data_is_minus_u_t():
    m = model()
    u = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    k = torch.tensor([1, 5, 20, 100])
    assert torch.allclose(m.score(u, k), -u, atol=1e-5)


def test_eps_is_the_mean_of_k_perturbed_scores():
    m = model()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = draw_noise(x, 20, torch.Generator().manual_seed(2))
    a = linear_acp()[:20].view(1, 20, 1, 1, 1)
    u = (2 * x - 1).unsqueeze(1)
    want = -(a.sqrt() * u + (1 - a).sqrt() * noise).mean(1)
    assert torch.allclose(eps_features(m, x, 20, noise=noise), want, atol=1e-5)
    # no perturbation: the mean of the clean u's scores
    assert torch.allclose(eps_features(m, x, 20, perturb=False), -(2 * x - 1), atol=1e-5)
    assert eps_norm(want).shape == (3,)


def test_batched_equals_reference_loop_and_is_batch_invariant():
    m = model()
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    a = eps_features(m, x, 7, torch.Generator().manual_seed(4), batch=2)
    b = eps_features_loop(m, x, 7, torch.Generator().manual_seed(4))
    c = eps_features(m, x, 7, torch.Generator().manual_seed(4), batch=64)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-6)


def test_eps_is_differentiable_in_x():
    m = model()
    x = torch.rand(2, 1, 8, 8).requires_grad_(True)
    eps_features(m, x, 3, torch.Generator().manual_seed(0)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_v_prediction_is_converted_to_epsilon():
    acp = linear_acp()

    class VNet(nn.Module):
        """For u ~ N(0, I) data E[v | u_t] = sqrt(a) E[z | u_t] - sqrt(1-a) E[u0 | u_t] = 0."""

        def forward(self, u_t, t):
            return torch.zeros_like(u_t)

    m = EpsilonScoreModel(VNet(), acp, "v_prediction")
    u = torch.randn(2, 1, 4, 4)
    k = torch.tensor([3, 10])
    a = acp[k - 1].view(-1, 1, 1, 1)
    assert torch.allclose(m.eps_hat(u, k), (1 - a).sqrt() * u, atol=1e-6)


diffusers = pytest.importorskip("diffusers", reason='the diffusers score model needs pip install "diffusers>=0.30"')


def test_train_save_load_roundtrip(tmp_path):
    from detection.diffusers_backend import build_unet, load_model_dir
    from detection.score_model import load_score_model, train_score_model

    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    m = train_score_model(x, tmp_path / "sm", steps=3, batch_size=8, seed=0, dataset="synthetic")
    assert m.meta["train_images_per_s"] > 0 and (tmp_path / "sm" / "unet").is_dir()
    again = load_score_model(tmp_path / "sm")
    u, k = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 20])
    with torch.no_grad():
        assert torch.allclose(m.score(u, k), again.score(u, k), atol=1e-6)
    cached = train_score_model(x, tmp_path / "sm", steps=999)  # a finished directory is loaded, not retrained
    assert cached.meta["recipe"]["steps"] == 3
    # a bare UNet2DModel directory (a user's saved model) loads with the default linear schedule
    bare = build_unet(1, 8)
    bare.save_pretrained(tmp_path / "bare")
    unet, sched, meta = load_model_dir(tmp_path / "bare")
    assert meta == {} and torch.allclose(sched.alphas_cumprod, linear_acp(), atol=1e-6)
    assert load_score_model(tmp_path / "bare").score(u, k).shape == u.shape


def test_missing_directory_is_a_one_line_error(tmp_path):
    from bastion.errors import ModelError
    from detection.score_model import load_score_model

    with pytest.raises(ModelError, match="does not exist"):
        load_score_model(tmp_path / "nope")

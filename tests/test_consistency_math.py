"""Spec mapping values (consistency-smoothing.md sections 2, 4, 5; randomized-smoothing.md section 9),
each computed here from the formulas with numpy, independently of defenses.consistency_math, and
checked against the spec's printed numbers and the implementation."""

import math

import numpy as np
import pytest

from defenses import consistency_math as cm


def grid(n):
    i = np.arange(n)
    return (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7


@pytest.mark.parametrize("sigma,index,t,c_in,c_noise", [
    (0.25, 53, 0.492707, 1.424564, -176.960), (0.5, 48, 0.965417, 0.919784, -8.799),
    (1.0, 42, 2.003647, 0.484240, 173.742)])
def test_sigma_to_level_table(sigma, index, t, c_in, c_noise):
    g = grid(81)
    i = int(np.argmin(np.abs(g - 2 * sigma)))
    assert i == index
    assert g[i] == pytest.approx(t, abs=1e-6)
    assert 1 / np.sqrt(g[i] ** 2 + 0.25) == pytest.approx(c_in, abs=1e-6)
    assert 250 * np.log(g[i]) == pytest.approx(c_noise, abs=1e-3)
    assert cm.sigma_level(sigma) == (index, pytest.approx(t, abs=1e-6))
    assert cm.c_in(cm.sigma_level(sigma)[1]) == pytest.approx(c_in, abs=1e-6)
    assert cm.c_noise(cm.sigma_level(sigma)[1]) == pytest.approx(c_noise, abs=1e-3)


def test_grid_ends_and_descending():
    g = cm.edm_grid(81)
    assert g[0] == pytest.approx(80) and g[-1] == pytest.approx(0.002)
    assert np.allclose(g, grid(81)) and all(a > b for a, b in zip(g, g[1:]))


@pytest.mark.parametrize("k_total,k_prime", [(300_000, 129_203), (600_000, 258_406)])
def test_curriculum_steps(k_total, k_prime):
    kp = math.ceil(k_total / math.log2(5))
    assert kp == k_prime == cm.curriculum_k_prime(k_total)
    assert cm.curriculum_levels(0, k_total) == 21
    assert cm.curriculum_levels(1, k_total) == 41
    assert cm.curriculum_levels(k_prime, k_total) == 41
    assert cm.curriculum_levels(k_prime + 1, k_total) == 81
    assert cm.curriculum_levels(k_total - 1, k_total) == 81


@pytest.mark.parametrize("frac,mu", [(0.0, 0.99), (0.01, 0.99075), (0.1, 0.99631), (0.5, 0.99989)])
def test_ema_schedule(frac, mu):
    k_total = 300_000
    k = int(frac * k_total)
    m = np.sqrt(k / k_total * (0.9999 ** 2 - 0.99 ** 2) + 0.99 ** 2)
    c = 2 / (1 + np.exp(-15 * (m - 0.99) / (0.9999 - 0.99))) - 1
    ref = c * 0.9999 + (1 - c) * 0.99
    assert ref == pytest.approx(mu, abs=1e-5)
    assert cm.ema_rate(k, k_total) == pytest.approx(ref, abs=1e-12)


def t_star(abar, sigma):
    ok = np.sqrt((1 - abar) / abar) >= 2 * sigma
    ok[0] = False
    return int(np.argmax(ok))


def linear_abar():
    return np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


def cosine_abar(T=4000, s=0.008):
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    betas = np.minimum(1 - f(np.arange(1, T + 1)) / f(np.arange(T)), 0.999)
    return np.cumprod(1 - betas)


@pytest.mark.parametrize("sigma,expected,abar", [(0.25, 145, 0.79798), (0.5, 259, 0.49761), (1.0, 396, 0.19992),
                                                 (0.12, 70, None)])
def test_t_star_linear(sigma, expected, abar):
    a = linear_abar()
    assert t_star(a, sigma) == expected == cm.ddpm_t_star(a, sigma)
    if abar is not None:
        assert a[expected] == pytest.approx(abar, abs=2e-5)


@pytest.mark.parametrize("sigma,expected", [(0.25, 1158), (0.5, 1984), (1.0, 2809), (0.12, 573)])
def test_t_star_cosine(sigma, expected):
    a = cosine_abar()
    assert t_star(a, sigma) == expected == cm.ddpm_t_star(a, sigma)


def test_t_star_from_diffusers_schedules():
    diffusers = pytest.importorskip("diffusers")
    lin = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    cos = diffusers.DDPMScheduler(num_train_timesteps=4000, beta_schedule="squaredcos_cap_v2")
    assert [cm.ddpm_t_star(lin.alphas_cumprod, s) for s in (0.12, 0.25, 0.5, 1.0)] == [70, 145, 259, 396]
    assert [cm.ddpm_t_star(cos.alphas_cumprod, s) for s in (0.12, 0.25, 0.5, 1.0)] == [573, 1158, 1984, 2809]


def test_exact_abar_gives_the_same_y_distribution():
    # y = sqrt(abar)(x0 + 2 delta) is a level-t sample iff its noise std sqrt(abar) 2 sigma = sqrt(1 - abar)
    for sigma in (0.12, 0.25, 0.5, 1.0):
        abar = 1 / (1 + 4 * sigma ** 2)
        assert math.sqrt(abar) * 2 * sigma == pytest.approx(math.sqrt(1 - abar))

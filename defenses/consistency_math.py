"""The numbers of consistency-model smoothing (spec consistency-smoothing.md sections 2, 4, 5).

Pure functions of floats (no torch state): the EDM (variance-exploding) noise grid, the input
preconditioning ``c_in`` and time conditioning ``c_noise``, the doubling curriculum on the number
of grid levels, the teacher-EMA ramp, and the link from a smoothing ``sigma`` (pixel space [0, 1])
to the grid level the encoder is conditioned on (noise std ``2 sigma`` in model space [-1, 1]).
"""

from __future__ import annotations

import math

from bastion.errors import ConfigError

T_MIN, T_MAX, RHO, SIGMA_DATA = 0.002, 80.0, 7.0, 0.5
N_FINAL = 81  # grid size of fine-tuning and certification


def edm_grid(n: int, t_min: float = T_MIN, t_max: float = T_MAX, rho: float = RHO) -> list[float]:
    """The N-level grid, descending: ``t_0 = t_max`` ... ``t_{N-1} = t_min``."""
    if n < 2:
        raise ConfigError(f"the EDM grid needs at least 2 levels, got {n}")
    a, b = t_max ** (1 / rho), t_min ** (1 / rho)
    return [(a + i / (n - 1) * (b - a)) ** rho for i in range(n)]


def c_in(t: float) -> float:
    """Input scaling ``1 / sqrt(t^2 + sigma_data^2)``."""
    return 1.0 / math.sqrt(t * t + SIGMA_DATA ** 2)


def c_noise(t: float) -> float:
    """Time-conditioning value ``250 ln t``."""
    return 250.0 * math.log(t)


def curriculum_k_prime(total_steps: int) -> int:
    """``K' = ceil(K / log2(ceil(80/20) + 1))``: steps per doubling of the grid."""
    return math.ceil(total_steps / math.log2(math.ceil(80 / 20) + 1))


def curriculum_levels(step: int, total_steps: int) -> int:
    """``N(k) = min(20 * 2^ceil(k/K'), 80) + 1`` (21 at k = 0, 41 up to K', 81 after)."""
    kp = curriculum_k_prime(total_steps)
    return min(20 * 2 ** math.ceil(step / kp), 80) + 1


def ema_rate(step: int, total_steps: int, mu0: float = 0.99, mu1: float = 0.9999, a: float = 15.0) -> float:
    """Teacher EMA rate at optimiser step ``step`` of ``total_steps``: a sigmoid ramp mu0 -> mu1."""
    m = math.sqrt(step / total_steps * (mu1 ** 2 - mu0 ** 2) + mu0 ** 2)
    c = 2 / (1 + math.exp(-a * (m - mu0) / (mu1 - mu0))) - 1
    return c * mu1 + (1 - c) * mu0


def sigma_level(sigma: float, n: int = N_FINAL) -> tuple[int, float]:
    """(grid index, t) of the level closest to the model-space noise std ``2 sigma``."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"sigma must be a finite number > 0, got {sigma!r}")
    grid = edm_grid(n)
    i = min(range(n), key=lambda j: abs(grid[j] - 2 * sigma))
    return i, grid[i]


def ddpm_t_star(alphas_cumprod, sigma: float) -> int:
    """Smallest timestep ``t >= 1`` with ``sqrt((1 - abar_t)/abar_t) >= 2 sigma`` (randomized-smoothing.md
    section 9). ``alphas_cumprod``: sequence indexed by timestep (diffusers' convention, index 0 = t 0)."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"sigma must be a finite number > 0, got {sigma!r}")
    for t in range(1, len(alphas_cumprod)):
        a = float(alphas_cumprod[t])
        if math.sqrt((1 - a) / a) >= 2 * sigma:
            return t
    raise ConfigError(f"sigma {sigma} is beyond the schedule's largest noise level; use a smaller sigma")

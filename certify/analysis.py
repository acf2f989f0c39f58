"""Certified-accuracy analysis (spec section 6): curves, tables, envelope, ACR, abstention, timing.

Everything is computed from the *logged* radius (rounded with ``"{:.3}"``), as the spec asks, so
the numbers are reproducible from the TSV log alone (`fold_log`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bastion.metrics import average_certified_radius, certified_accuracy, radius_grid
from certify.logs import format_radius, read_log


def default_max_radius(sigmas: Sequence[float]) -> float:
    """Curve maximum: 4 x the largest sigma (n = 1e5 cannot certify beyond 3.81 sigma), on a 0.25 grid."""
    s = max(sigmas) if sigmas else 0.25
    return math.ceil(4 * s / 0.25) * 0.25


def table_radii(max_radius: float) -> list[float]:
    """Table radii from 0 to ``max_radius``: step 0.25 (0.5 beyond 2.0), built from integers."""
    step = 0.25 if max_radius <= 2.0 else 0.5
    k = int(math.floor(max_radius / step + 1e-9))
    out = [i * step for i in range(k + 1)]
    if not math.isclose(out[-1], max_radius) and max_radius > out[-1]:
        out.append(float(max_radius))
    return out


def hp_certified_accuracy(acc: float, m: int, alpha: float, rho: float = 0.001) -> float:
    """Cohen's high-probability variant: acc - alpha - sqrt(alpha(1-alpha)ln(1/rho)/m) - ln(1/rho)/(3m)."""
    if m == 0:
        return 0.0
    ln = math.log(1 / rho)
    return acc - alpha - math.sqrt(alpha * (1 - alpha) * ln / m) - ln / (3 * m)


def fold_rows(rows: Sequence[dict[str, Any]], *, sigma: float | None = None, alpha: float = 0.001,
              max_radius: float | None = None, radii: Sequence[float] | None = None,
              step: float = 0.01) -> dict[str, Any]:
    """Fold CERTIFY rows (``label``, ``predict``, ``radius``, ``correct``; optional ``time``,
    ``samples``) into the metrics of one setting. ``radius`` is rounded to the logged format."""
    m = len(rows)
    rad = np.array([float(format_radius(r["radius"])) for r in rows], dtype=np.float64)
    correct = np.array([int(r["predict"]) == int(r["label"]) for r in rows], dtype=bool)
    abst = np.array([int(r["predict"]) == -1 for r in rows], dtype=bool)
    if max_radius is None:
        max_radius = default_max_radius([sigma] if sigma else [])
    grid = radius_grid(max_radius, step)
    curve = certified_accuracy(rad, correct, grid)
    radii = list(radii) if radii is not None else table_radii(max_radius)
    table = certified_accuracy(rad, correct, radii)
    times = [float(r["time"]) for r in rows if r.get("time") is not None]
    samples = [int(r["samples"]) for r in rows if r.get("samples") is not None]
    return {
        "sigma": sigma,
        "num_examples": m,
        "radii": [float(r) for r in radii],
        "certified_accuracy": [float(a) for a in table],
        "certified_accuracy_hp": [max(0.0, hp_certified_accuracy(float(a), m, alpha)) for a in table],
        "clean_accuracy": float(curve[0]) if m else 0.0,
        "abstention_rate": float(abst.mean()) if m else 0.0,
        "acr": average_certified_radius(rad, correct),
        "mean_time_s": float(np.mean(times)) if times else None,
        "total_time_s": float(np.sum(times)) if times else None,
        "samples_total": int(np.sum(samples)) if samples else None,
        "samples_mean": float(np.mean(samples)) if samples else None,
        "curve": {"step": step, "max_radius": float(max_radius), "accuracy": [float(a) for a in curve]},
    }


def envelope(settings: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Best over sigma: pointwise max of the curves (they must share step and max radius)."""
    curves = [s["curve"] for s in settings if s.get("num_examples")]
    if len(curves) < 2:
        return None
    step, mx = curves[0]["step"], curves[0]["max_radius"]
    if any(c["step"] != step or c["max_radius"] != mx for c in curves):
        return None
    acc = np.max(np.array([c["accuracy"] for c in curves]), axis=0)
    radii = settings[0]["radii"]
    if any(s["radii"] != radii for s in settings if s.get("num_examples")):
        return None
    table = np.max(np.array([s["certified_accuracy"] for s in settings if s.get("num_examples")]), axis=0)
    return {"step": step, "max_radius": mx, "accuracy": [float(a) for a in acc], "radii": radii,
            "certified_accuracy": [float(a) for a in table]}


def fold_log(path: str | Path, *, sigma: float | None = None, alpha: float = 0.001,
             max_radius: float | None = None, radii: Sequence[float] | None = None) -> dict[str, Any]:
    """Metrics straight from a CERTIFY TSV log (ours or a published one); ``radii`` are the table's
    radii (default `table_radii(max_radius)`)."""
    return fold_rows(read_log(path), sigma=sigma, alpha=alpha, max_radius=max_radius, radii=radii)

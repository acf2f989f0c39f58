"""Gaussian randomized smoothing: SAMPLE, CERTIFY and PREDICT (Cohen, Rosenfeld & Kolter 2019).

``Smooth(base, num_classes, sigma)`` wraps a base classifier ``f`` (an ``nn.Module`` mapping [0, 1]
images to logits; any normalization is its first layer, *after* the noise, so the certificate is
in pixel L2 units). ``certify(x, n0, n, alpha, batch)`` and ``predict(x, n, alpha, batch)`` follow
the spec (docs: /work/shared/specs/randomized-smoothing.md, sections 2-4):

- CERTIFY draws a selection sample of ``n0`` to pick ``cA`` and a **new, independent** estimation
  sample of ``n``; ``pA_lower`` is the one-sided ``1 - alpha`` Clopper-Pearson bound on
  ``nA = counts[cA]``; it abstains when ``pA_lower < 1/2``, else returns ``(cA, sigma Phi^-1(pA_lower))``
  with the radius in float64.
- PREDICT takes the top two counts of ``n`` samples and returns the top class iff the exact
  two-sided binomial test against 1/2 has p-value ``<= alpha``.

**Noise.** The noise of example ``i`` is cut into blocks of `NOISE_BLOCK` samples; block ``k`` of
stage ``s`` (selection / estimation / predict) is drawn on the model's device by a generator
seeded with ``derive_seed(run seed, i, s, k)``. So the noise an example sees does not depend on the
batch size, on which other examples share its forward passes, or on how a run is sharded or
resumed, and selection and estimation noise are never the same draws. (The *forward pass* is a
float computation whose last bits can depend on the batch composition; runs with the same
``batch`` pack the same chunks of examples identically and give identical rows.)

**Throughput.** `NoiseSampler` streams the blocks of several examples through one preallocated
batch buffer (so a small ``n`` still fills the device), runs the model under
``torch.inference_mode`` (optionally under bf16/fp16 autocast on CUDA), takes the argmax and adds it
into an on-device count matrix with ``index_add_``. Nothing leaves the device until a chunk of
examples is finished: one host round-trip per chunk (per look in sequential mode).

*Autocast and the guarantee.* Running ``f`` in bf16/fp16 changes nothing in the argument: the
smoothed classifier is then the smoothing of a (slightly) different base classifier ``f_bf16``,
and CERTIFY's statement "with probability >= 1 - alpha, g returns cA on the whole ball" holds for
that ``g``. It is a different ``g`` than the fp32 one, so do not mix the two in one table.

**Sequential mode** (`Sequential`, opt-in). The estimation sample is examined at nested sizes
``n_1 < n_2 < ... < n_J = n`` (doubling from ``start``); look ``j`` uses the Clopper-Pearson bound
``L_j`` at level ``alpha_j`` with ``sum_j alpha_j = alpha`` (half of alpha on the final look, the
other half split evenly over the earlier ones). It stops as soon as the outcome is settled:
the running certificate's radius is at or above ``stop_radius`` (the largest radius the report
asks for); or the radii of the lower and upper bounds ``L_j``, ``U_j`` fall between the same two
consecutive report radii (the example's contribution to every reported radius is decided); or
the one-sided upper bound ``U_j`` (same level) is below 1/2 (then it abstains).

*Why the certificate holds at the same alpha.* For the fixed class ``cA`` (chosen from the
independent selection sample) each ``L_j`` is a valid ``1 - alpha_j`` lower bound on ``pA``, so by
the union bound ``P(exists j: L_j > pA) <= sum_j alpha_j = alpha``, whatever the dependence between
the looks. On the complementary event (probability >= 1 - alpha) *every* ``L_j`` is <= pA at once,
so the reported ``max_{j <= tau} L_j`` is <= pA for any data-dependent stopping look ``tau``. Hence
whenever sequential mode does not abstain, ``pA >= max L_j >= 1/2`` and the radius
``sigma Phi^-1(max L_j)`` is valid, with probability >= 1 - alpha: the same statement as exact mode.
Abstaining early never invalidates anything (it only costs utility). Radii of examples that stop
early are lower than exact mode's (they are only certified up to at least ``stop_radius``), so
ACR and accuracy above ``stop_radius`` are not comparable between the modes.

**Anytime mode** (`certify.anytime.Anytime`, opt-in; the guarantee, the stopping rule and the proof
obligations are written out in `certify.anytime`). One-sided mixture e-processes at the requested
radii's thresholds on pA, valid at every sample count at once, are looked at after geometrically
growing numbers of estimation samples; each example stops as soon as its certificate at every
requested radius is decided (or exact mode at the cap ``n`` would, w.h.p., not certify it). Same
statement as exact mode at the same alpha; the radius is the largest certified requested radius.
Every round only the examples still running send noise through the shared forward batches, so the
samples saved are wall time saved; the noise blocks are exact mode's, so an example that runs to the
cap sees exact mode's counts.

**Randomized Clopper-Pearson** (exact mode, ``bound="randomized"``): `certify.stats.rcp_lower` with
its uniform draw seeded by (run seed, example index), independent of the noise. Coverage exactly
``1 - alpha`` over the noise and the draw (Clopper-Pearson's is ``>= 1 - alpha``), never looser than
Clopper-Pearson; the counts (and so ``n_a``) are exact mode's.

*Exact mode and the plain loop* (benchmarks/certify.py part A). Profiled again at n = 10,000 (one
example per chunk, small_cnn width 16): the forward pass (convolutions, relu, pooling, linear, the
model's normalization) is ~97% of the time in both; per noise block, seeding + ``normal_`` costs
~30 us (~3 ms per example, ~1%; the plain loop draws the same number of normals in ``randn``),
``derive_seed`` 1.6 us, the count-row index 8 us per call. Exact mode writes noise + x into the
preallocated batch in two passes where the loop needs three and an allocation; x is added once per
run of consecutive blocks of an example (one op per batch instead of ten, which torch can spread
over threads; the same float sums, so the batches are bit-identical). With two threads the per-block
``normal_`` stays serial (each block has its own generator) while the loop's one ``randn`` per batch
is threaded: the one cost left (~1% of the time with one thread; not separable from the noise of
the shared machine with two). The noise layout is what makes rows
independent of batching, so it is kept as is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from bastion.errors import ConfigError, ModelError
from bastion.rng import derive_seed, model_device
from certify.anytime import Anytime, AnytimeRun
from certify.stats import ABSTAIN, cp_lower, cp_upper, predict_decision, radius, rcp_lower

NOISE_BLOCK = 100
BOUNDS = ("cp", "randomized")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """Count samples ``[start, end)`` of stage ``stage`` of the example in slot ``slot`` into count
    row ``row``. ``total`` is the stage's full length (it fixes the size of the last block)."""

    slot: int
    row: int
    stage: str
    start: int
    end: int
    total: int


class NoiseSampler:
    """Counts ``argmax f(x + eps)`` for many (example, stage) streams in shared forward passes."""

    def __init__(self, base: nn.Module, num_classes: int, sigma: float, *, seed: int = 0,
                 autocast: str | None = None, block: int = NOISE_BLOCK):
        if not sigma > 0:
            raise ConfigError(f"sigma must be > 0, got {sigma}")
        if num_classes < 2:
            raise ConfigError(f"randomized smoothing needs at least 2 classes, got {num_classes}")
        if autocast not in (None, "none", *_AUTOCAST):
            raise ConfigError(f"unknown autocast {autocast!r}: use bf16, fp16 or none")
        self.base = base
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.autocast = None if autocast in (None, "none") else autocast
        self.block = int(block)
        self.device = model_device(base)
        self._gen = torch.Generator(device=self.device)
        self.samples_drawn = 0

    def block_seed(self, key: Any, stage: str, k: int) -> int:
        return derive_seed("bastion.certify.noise", self.seed, key, stage, k)

    def _blocks(self, req: Request, key: Any) -> list[tuple[int, int, int, int]]:
        b = self.block
        aligned = req.start % b == 0 and (req.end % b == 0 or req.end == req.total)
        if not aligned or not 0 <= req.start <= req.end <= req.total:
            raise ValueError(f"request {req} is not aligned to noise blocks of {b}")
        out = []
        for k in range(req.start // b, -(-req.end // b)):
            out.append((req.row, req.slot, self.block_seed(key, req.stage, k), min(b, req.total - k * b)))
        return out

    def count(self, xs: torch.Tensor, keys: Sequence[Any], requests: Sequence[Request], rows: int,
              batch: int) -> torch.Tensor:
        """(rows, K) int64 counts on the model's device (no host synchronisation)."""
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        blocks = [blk for r in requests for blk in self._blocks(r, keys[r.slot])]
        K = self.num_classes
        counts = torch.zeros(rows * K, dtype=torch.int64, device=self.device)
        total = sum(blk[3] for blk in blocks)
        if total == 0:
            return counts.view(rows, K)
        shape = tuple(xs.shape[1:])
        dev = self.device
        # count row of every sample (np.repeat: 8 us vs 47 us for torch.repeat_interleave at 101 blocks)
        ids = torch.from_numpy(np.repeat(np.array([blk[0] for blk in blocks], dtype=np.int64),
                                         np.array([blk[3] for blk in blocks], dtype=np.int64))).to(dev)
        bsz = min(batch, total)
        buf = torch.empty((bsz, *shape), dtype=xs.dtype, device=dev)
        ones = torch.ones(bsz, dtype=torch.int64, device=dev)
        g, sigma = self._gen, self.sigma
        bi, off, tmp = 0, 0, None
        amp = (torch.autocast(device_type=dev.type, dtype=_AUTOCAST[self.autocast]) if self.autocast
               else None)
        for s in range(0, total, bsz):
            m = min(bsz, total - s)
            fill = 0
            runs: list[list[int]] = []                   # [start, end, slot] of whole blocks still lacking x
            while fill < m:
                _row, slot, seed, size = blocks[bi]
                take = min(size - off, m - fill)
                if off == 0 and take == size:           # a whole block: draw it in place
                    dst = buf[fill:fill + size]
                    g.manual_seed(seed)
                    dst.normal_(0.0, sigma, generator=g)
                    if runs and runs[-1][1] == fill and runs[-1][2] == slot:
                        runs[-1][1] = fill + size
                    else:
                        runs.append([fill, fill + size, slot])
                else:                                    # a block split across two batches
                    if off == 0:
                        g.manual_seed(seed)
                        tmp = torch.empty((size, *shape), dtype=xs.dtype, device=dev).normal_(0.0, sigma, generator=g)
                    torch.add(tmp[off:off + take], xs[slot], out=buf[fill:fill + take])
                fill += take
                off += take
                if off == size:
                    bi, off, tmp = bi + 1, 0, None
            # add x once per run of consecutive blocks of one example (the same float sums as block by
            # block, in one larger op that torch can spread over threads)
            for a, b, slot in runs:
                buf[a:b].add_(xs[slot])
            if amp is not None:
                with amp:
                    logits = self.base(buf[:m])
            else:
                logits = self.base(buf[:m])
            if logits.dim() != 2 or logits.shape[1] != K:
                raise ModelError(f"base classifier returned logits of shape {tuple(logits.shape)}; "
                                 f"expected (batch, {K}) for num_classes={K}")
            pred = logits.argmax(dim=1)
            counts.index_add_(0, ids[s:s + m] * K + pred, ones[:m])
        self.samples_drawn += total
        return counts.view(rows, K)


# ---------------------------------------------------------------------------------------------
# Results and the sequential schedule
# ---------------------------------------------------------------------------------------------

@dataclass
class Certificate:
    """One CERTIFY outcome. ``n`` = estimation samples used (``< n`` asked only in sequential
    mode); ``samples`` = n0 + n; ``time_s`` = this example's share of its chunk's wall time."""

    index: int
    prediction: int
    radius: float
    p_lower: float
    c_a: int
    n_a: int
    n0: int
    n: int
    samples: int
    looks: int = 1
    stopped: str = "final"        # final | settled | futile
    time_s: float = 0.0


@dataclass
class Prediction:
    index: int
    prediction: int
    pvalue: float
    n1: int
    n2: int
    n: int
    time_s: float = 0.0


@dataclass(frozen=True)
class Sequential:
    """Sequential CERTIFY: looks at n_1 = ``start`` (rounded up to the noise block), doubling up to
    n; stops once the radius reaches ``stop_radius`` or the upper bound on pA falls below 1/2.
    ``final_share`` of alpha goes to the last look, the rest evenly to the earlier ones."""

    stop_radius: float
    start: int = 1000
    final_share: float = 0.5
    radii: tuple[float, ...] = ()   # the report's table radii: also stop once the table bucket is settled

    def bucket_settled(self, r_low: float, r_high: float) -> bool:
        """True when [r_low, r_high] (lower/upper radius bounds) lies in one bucket of ``radii``,
        i.e. the example's contribution to every reported radius is decided."""
        grid = sorted(r for r in self.radii if r >= 0)
        if not grid or r_low < grid[0]:
            return False
        k = max(i for i, r in enumerate(grid) if r <= r_low)
        return k + 1 < len(grid) and r_high < grid[k + 1]

    def __post_init__(self) -> None:
        if self.start < 1:
            raise ConfigError("sequential start must be >= 1")
        if not 0 < self.final_share <= 1:
            raise ConfigError("sequential final_share must be in (0, 1]")

    def schedule(self, n: int, block: int = NOISE_BLOCK) -> list[int]:
        first = min(n, -(-self.start // block) * block)
        sizes = [first]
        while sizes[-1] < n:
            sizes.append(min(n, 2 * sizes[-1]))
        return sizes

    def alphas(self, alpha: float, looks: int) -> list[float]:
        if looks == 1:
            return [alpha]
        early = alpha * (1 - self.final_share) / (looks - 1)
        return [early] * (looks - 1) + [alpha * self.final_share]


# ---------------------------------------------------------------------------------------------
# The smoothed classifier
# ---------------------------------------------------------------------------------------------

@dataclass
class Smooth:
    """The smoothed classifier g of a base classifier (see the module docstring).

    ``seed`` is the run seed: example ``index`` gets noise derived from (seed, index). Calls without
    ``index`` use a fresh key per call, so noise is never reused between such calls."""

    base: nn.Module
    num_classes: int
    sigma: float
    seed: int = 0
    autocast: str | None = None
    block: int = NOISE_BLOCK
    _calls: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.sampler = NoiseSampler(self.base, self.num_classes, self.sigma, seed=self.seed,
                                    autocast=self.autocast, block=self.block)

    @property
    def device(self) -> torch.device:
        return self.sampler.device

    def _fresh_key(self) -> tuple[str, int]:
        self._calls += 1
        return ("call", self._calls)

    def _prepare(self, xs: torch.Tensor) -> torch.Tensor:
        if xs.dim() == 3:
            xs = xs.unsqueeze(0)
        return xs.to(self.device, dtype=torch.float32)

    # --- SAMPLE ------------------------------------------------------------------------------
    def sample_counts(self, x: torch.Tensor, num: int, batch: int = 1000, index: int | None = None,
                      stage: str = "sample") -> np.ndarray:
        """Spec SAMPLE: label counts (int64, length K, summing to ``num``) of f(x + eps)."""
        key = index if index is not None else self._fresh_key()
        was = self.base.training
        self.base.eval()
        try:
            with torch.inference_mode():
                c = self.sampler.count(self._prepare(x), [key], [Request(0, 0, stage, 0, num, num)], 1, batch)
        finally:
            self.base.train(was)
        return c[0].cpu().numpy()

    # --- CERTIFY -----------------------------------------------------------------------------
    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch: int = 1000,
                index: int | None = None, sequential: Sequential | None = None,
                anytime: Anytime | None = None, bound: str = "cp") -> tuple[int, float]:
        """Cohen's CERTIFY: ``(class or ABSTAIN, radius)``."""
        key = index if index is not None else self._fresh_key()
        cert = self.certify_many(self._prepare(x), [key], n0, n, alpha, batch, sequential=sequential,
                                 anytime=anytime, bound=bound)[0]
        return cert.prediction, cert.radius

    def certify_many(self, xs: torch.Tensor, indices: Sequence[Any], n0: int, n: int, alpha: float,
                     batch: int = 1000, sequential: Sequential | None = None, anytime: Anytime | None = None,
                     bound: str = "cp") -> list[Certificate]:
        """CERTIFY for several examples at once (their noise shares forward passes).

        ``indices`` are the examples' dataset indices (the noise keys). Exact mode by default;
        ``sequential`` (doubling looks) or ``anytime`` (sequential tests per radius, `certify.anytime`)
        switch mode. ``bound="randomized"`` (exact mode only) uses the randomized Clopper-Pearson
        bound `certify.stats.rcp_lower` with ``u`` seeded by (run seed, index)."""
        _check_certify_args(n0, n, alpha)
        if bound not in BOUNDS:
            raise ConfigError(f"unknown bound {bound!r}: use {' or '.join(BOUNDS)}")
        if bound != "cp" and (sequential is not None or anytime is not None):
            raise ConfigError("the randomized Clopper-Pearson bound is an option of exact mode only")
        if sequential is not None and anytime is not None:
            raise ConfigError("choose sequential or anytime mode, not both")
        xs = self._prepare(xs)
        m = xs.shape[0]
        if len(indices) != m:
            raise ConfigError(f"{m} examples but {len(indices)} indices")
        if anytime is not None:
            return self._certify_anytime(xs, indices, n0, n, alpha, batch, anytime)
        K = self.num_classes
        if sequential is None:
            sizes, alphas = [n], [alpha]
        else:
            sizes = sequential.schedule(n, self.block)
            alphas = sequential.alphas(alpha, len(sizes))
        t0 = time.perf_counter()
        was = self.base.training
        self.base.eval()
        sel = np.zeros((m, K), dtype=np.int64)
        est = np.zeros((m, K), dtype=np.int64)
        best = np.zeros(m)
        done: dict[int, Certificate] = {}
        active = list(range(m))
        try:
            with torch.inference_mode():
                prev = 0
                for j, (nj, aj) in enumerate(zip(sizes, alphas)):
                    reqs = []
                    for slot in active:
                        if j == 0:
                            reqs.append(Request(slot, 2 * slot, "select", 0, n0, n0))
                        reqs.append(Request(slot, 2 * slot + 1, "estimate", prev, nj, n))
                    c = self.sampler.count(xs, list(indices), reqs, 2 * m, batch).cpu().numpy()
                    sel += c[0::2]
                    est += c[1::2]
                    last = j == len(sizes) - 1
                    still = []
                    for slot in active:
                        c_a = int(np.argmax(sel[slot]))           # first maximum: ties -> smallest index
                        n_a = int(est[slot, c_a])
                        if bound == "randomized":
                            best[slot] = rcp_lower(n_a, nj, aj, self.rcp_u(indices[slot]))
                        else:
                            best[slot] = max(best[slot], cp_lower(n_a, nj, aj))
                        pl = float(best[slot])
                        cert = None
                        if last:
                            stopped = "final"
                        elif pl >= 0.5 and radius(self.sigma, pl) >= sequential.stop_radius:  # type: ignore[union-attr]
                            stopped = "settled"
                        elif (up := cp_upper(n_a, nj, aj)) < 0.5:
                            stopped = "futile"
                        elif pl >= 0.5 and sequential.bucket_settled(  # type: ignore[union-attr]
                                radius(self.sigma, pl), radius(self.sigma, up) if up < 1 else math.inf):
                            stopped = "settled"
                        else:
                            still.append(slot)
                            continue
                        if pl < 0.5 or stopped == "futile":
                            pred, rad = ABSTAIN, 0.0
                        else:
                            pred, rad = c_a, radius(self.sigma, pl)
                        cert = Certificate(int(_plain(indices[slot])), pred, rad, pl, c_a, n_a, n0, nj, n0 + nj,
                                           looks=j + 1, stopped=stopped)
                        done[slot] = cert
                    active = still
                    prev = nj
                    if not active:
                        break
        finally:
            self.base.train(was)
        elapsed = time.perf_counter() - t0
        certs = [done[s] for s in range(m)]
        tot = sum(c.samples for c in certs)
        for c in certs:
            c.time_s = elapsed * c.samples / tot
        return certs

    def rcp_u(self, key: Any) -> float:
        """The uniform draw of the randomized Clopper-Pearson bound of example ``key`` (seeded, reproducible,
        independent of the noise samples)."""
        return float(np.random.default_rng(derive_seed("bastion.certify.rcp", self.seed, key)).random())

    def _certify_anytime(self, xs: torch.Tensor, indices: Sequence[Any], n0: int, n: int, alpha: float,
                         batch: int, rule: Anytime) -> list[Certificate]:
        """Anytime mode (`certify.anytime`): every round, each active example draws up to its next
        look; stopped examples leave the shared forward batches, so a round costs the samples of the
        examples still running. The noise blocks are exact mode's, so an example that runs to the
        cap sees exactly exact mode's counts."""
        m, K = xs.shape[0], self.num_classes
        run = AnytimeRun(rule, m, n, alpha, self.sigma, self.block)
        keys = list(indices)
        est = np.zeros((m, K), dtype=np.int64)
        c_a = np.zeros(m, dtype=np.int64)
        t0 = time.perf_counter()
        was = self.base.training
        self.base.eval()
        try:
            with torch.inference_mode():
                first = True
                while (act := run.active).size:
                    tg = run.targets()
                    reqs = []
                    for slot, end in zip(act.tolist(), tg.tolist()):
                        if first:
                            reqs.append(Request(slot, 2 * slot, "select", 0, n0, n0))
                        reqs.append(Request(slot, 2 * slot + 1, "estimate", int(run.t[slot]), end, n))
                    c = self.sampler.count(xs, keys, reqs, 2 * m, batch).cpu().numpy()
                    if first:
                        c_a = np.argmax(c[0::2], axis=1)            # first maximum: ties -> smallest index
                        first = False
                    est += c[1::2]
                    run.observe(act, est[act, c_a[act]], tg)
        finally:
            self.base.train(was)
        elapsed = time.perf_counter() - t0
        certs = []
        lower, rads = run.lower, run.radius
        for slot in range(m):
            pl = float(lower[slot])
            pred, rad = (int(c_a[slot]), float(rads[slot])) if rads[slot] >= 0 else (ABSTAIN, 0.0)
            t = int(run.t[slot])
            certs.append(Certificate(int(_plain(indices[slot])), pred, rad, pl, int(c_a[slot]),
                                     int(est[slot, c_a[slot]]), n0, t, n0 + t, looks=int(run.look[slot]),
                                     stopped=str(run.stopped[slot])))
        tot = sum(c.samples for c in certs)
        for c in certs:
            c.time_s = elapsed * c.samples / tot
        return certs

    # --- PREDICT -----------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, n: int, alpha: float, batch: int = 1000, index: int | None = None) -> int:
        """Cohen's PREDICT: the top class, or ABSTAIN when the two-sided binomial test's p > alpha."""
        key = index if index is not None else self._fresh_key()
        return self.predict_many(self._prepare(x), [key], n, alpha, batch)[0].prediction

    def predict_many(self, xs: torch.Tensor, indices: Sequence[Any], n: int, alpha: float,
                     batch: int = 1000) -> list[Prediction]:
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        if not 0 < alpha < 1:
            raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
        xs = self._prepare(xs)
        m = xs.shape[0]
        t0 = time.perf_counter()
        was = self.base.training
        self.base.eval()
        try:
            with torch.inference_mode():
                reqs = [Request(s, s, "predict", 0, n, n) for s in range(m)]
                c = self.sampler.count(xs, list(indices), reqs, m, batch).cpu().numpy()
        finally:
            self.base.train(was)
        elapsed = time.perf_counter() - t0
        out = []
        for s in range(m):
            pred, p = predict_decision(c[s], alpha)
            top = np.sort(c[s])[::-1]
            out.append(Prediction(int(_plain(indices[s])), pred, p, int(top[0]), int(top[1]), n, elapsed / m))
        return out


class SoftSmoothed(nn.Module):
    """The smoothed *soft* classifier ``G(x) = E_noise softmax(f(x + sigma * noise))``, estimated
    with ``num_noise`` Gaussian draws per example; ``forward`` returns ``log G(x)`` (B, K).

    Differentiable (SmoothAdv attacks it; RSCP+ scores with it). Noise comes from ``generator``
    when one is given (set it per call with `set_generator`), else from torch's global RNG (which
    the attack layer forks from its own generator). ``batch`` bounds examples x draws per forward
    pass (memory)."""

    def __init__(self, base: nn.Module, sigma: float, num_noise: int = 16, batch: int = 4096,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not (math.isfinite(sigma) and sigma > 0) or num_noise < 1 or batch < 1:
            raise ConfigError(f"soft smoothing needs sigma > 0, num_noise >= 1 and batch >= 1 "
                              f"(got {sigma}, {num_noise}, {batch})")
        self.base = base
        self.sigma = float(sigma)
        self.num_noise = int(num_noise)
        self.batch = int(batch)
        self.generator = generator

    def set_generator(self, generator: torch.Generator | None) -> None:
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.num_noise
        per = max(1, self.batch // m)
        probs = []
        for s in range(0, x.shape[0], per):
            xs = x[s:s + per]
            rep = xs.repeat_interleave(m, dim=0)
            if self.generator is None:
                noise = torch.randn_like(rep)
            else:
                noise = torch.randn(rep.shape, generator=self.generator, device=self.generator.device,
                                    dtype=rep.dtype).to(rep.device)
            p = torch.softmax(self.base(rep + self.sigma * noise), dim=1).view(xs.shape[0], m, -1).mean(dim=1)
            probs.append(p)
        return torch.cat(probs).clamp_min(1e-12).log()


def _plain(key: Any) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        return -1


def _check_certify_args(n0: int, n: int, alpha: float) -> None:
    if n0 < 1 or n < 1:
        raise ConfigError(f"n0 and n must be >= 1, got n0={n0}, n={n}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")


def chunk_size(n0: int, n: int, batch: int, cap: int = 256) -> int:
    """How many examples share one sampling pass: enough to fill ~8 batches, at least 1.

    A function of the config only, so chunks (and therefore rows) are the same in every run."""
    return max(1, min(cap, math.ceil(8 * batch / max(1, n0 + n))))

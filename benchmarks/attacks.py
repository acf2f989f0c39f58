"""Attack benchmark: Bastion's attacks side by side with the reference tools, in one run.

    python benchmarks/attacks.py                 # full (a few minutes on 2 CPU cores)
    python benchmarks/attacks.py --quick         # smaller data, for a smoke run

On a fixed model (small CNN trained on digits with a fixed seed) and the digits test split:

(a) native PGD-k vs ``torchattacks.PGD`` with the same steps, step size (2.5 eps / k), random
    start and one restart: robust accuracy of each and the wall-time ratio, at an epsilon where
    most examples break early and at one where none break;
(b) Bastion's ``autoattack`` (standard version) vs pyautoattack's ``AutoAttack`` called directly
    with the same seed: robust accuracy of each and the overhead;
(c) the fraction of each attack's wall time spent inside the model's forward and backward passes.

Times are medians of ``--repeats`` interleaved runs (CPU time of this process and wall time; on a
busy shared machine the CPU time is the steadier one); one thread (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks import create_attack  # noqa: E402
from bastion.data import load_dataset  # noqa: E402
from bastion.models import create_model  # noqa: E402
from bastion.train import StandardObjective, TrainConfig, fit  # noqa: E402


def train_model(seed: int = 0, epochs: int = 15) -> nn.Module:
    """A small CNN trained with Adam on the digits training split (the project's one training loop)."""
    tr = load_dataset("digits", "train")
    torch.manual_seed(seed)
    model = create_model("small_cnn", 10, 1, 8)
    cfg = TrainConfig(epochs=epochs, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=0.0,
                      schedule="constant", seed=seed)
    return fit(model, tr, StandardObjective(), cfg, quiet=True).model


class _Mark(torch.autograd.Function):
    """Identity whose backward records the time it runs (to bracket the model's backward)."""

    @staticmethod
    def forward(ctx, x, clock, key):
        ctx.clock, ctx.key = clock, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.clock.stamp(ctx.key)
        return g, None, None


class Clock:
    def __init__(self) -> None:
        self.forward = 0.0
        self.backward = 0.0
        self._t = {}

    def stamp(self, key: str) -> None:
        now = time.perf_counter()
        if key == "out":       # backward reaches the output first ...
            self._t["out"] = now
        elif "out" in self._t:  # ... and the input last
            self.backward += now - self._t.pop("out")


class Timed(nn.Module):
    """Wraps a model and accumulates the time spent in its forward and backward passes."""

    def __init__(self, model: nn.Module, clock: Clock):
        super().__init__()
        self.model, self.clock = model, clock

    def forward(self, x):
        t0 = time.perf_counter()
        if torch.is_grad_enabled() and x.requires_grad:
            x = _Mark.apply(x, self.clock, "in")
            out = self.model(x)
            out = _Mark.apply(out, self.clock, "out")
        else:
            out = self.model(x)
        self.clock.forward += time.perf_counter() - t0
        return out


def robust_acc(model, x_adv, y) -> float:
    with torch.no_grad():
        return 100.0 * (model(x_adv).argmax(1) == y).float().mean().item()


def timed(fn):
    """(wall seconds, CPU seconds of this process, result). With one thread and a busy shared
    machine the CPU time is the steadier measure; both are reported."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def _times(ours: list, ref: list) -> list[str]:
    """Median CPU and wall seconds of each side and their ratios (Bastion / reference)."""
    co, cr = statistics.median(t[1] for t in ours), statistics.median(t[1] for t in ref)
    wo, wr = statistics.median(t[0] for t in ours), statistics.median(t[0] for t in ref)
    return [f"{co:.3f}", f"{cr:.3f}", f"{co / cr:.3f}", f"{wo:.3f}", f"{wr:.3f}", f"{wo / wr:.3f}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer examples and repeats")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import logging

    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    import torchattacks
    from pyautoattack import AutoAttack

    model = train_model()
    te = load_dataset("digits", "test")
    n = 150 if args.quick else len(te)
    x, y = te.images[:n], te.labels[:n]
    repeats = 2 if args.quick else args.repeats
    k = args.steps
    clean = robust_acc(model, x, y)
    rows = []
    checks: list[tuple[str, bool]] = []   # the targets

    # (a) native PGD vs torchattacks PGD
    for label, eps in (("most break early", 0.2), ("none break", 0.002)):
        alpha = 2.5 * eps / k
        ours = create_attack("pgd", f"linf:{eps}", steps=k, step_size=alpha, restarts=1, seed=0)
        ta = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=k, random_start=True)
        t_ours, t_ta = [], []
        for r in range(repeats):  # interleaved so both see the same machine load
            t_ours.append(timed(partial(ours, model, x, y)))
            torch.manual_seed(r)
            t_ta.append(timed(partial(ta, x, y)))
        a_ours, a_ta = robust_acc(model, t_ours[-1][2], y), robust_acc(model, t_ta[-1][2], y)
        rows.append([f"(a) PGD-{k} eps={eps} ({label})", f"{a_ours:.2f}", f"{a_ta:.2f}"] + _times(t_ours, t_ta))
        ratio = statistics.median(t[0] for t in t_ours) / statistics.median(t[0] for t in t_ta)
        limit = 0.5 if label == "most break early" else 1.10
        checks.append((f"(a) {label}: native robust acc <= torchattacks + 0.5 pts", a_ours <= a_ta + 0.5))
        checks.append((f"(a) {label}: wall-time ratio {ratio:.3f} <= {limit}", ratio <= limit))

    # (b) autoattack adapter vs pyautoattack directly (standard version, same seed)
    eps_aa = 0.15
    naa = 60 if args.quick else 100
    xa_, ya_ = x[:naa], y[:naa]
    ours_aa = create_attack("autoattack", f"linf:{eps_aa}", version="standard", seed=0)

    def direct():
        aa = AutoAttack(model, eps=eps_aa, norm="Linf", seed=0, version="standard", device="cpu")
        with torch.random.fork_rng():
            return aa.run_standard_evaluation(xa_, ya_, batch_size=250)

    t_o, t_d = [], []
    for _ in range(1 if args.quick else 2):
        t_o.append(timed(partial(ours_aa.run, model, xa_, ya_)))
        t_d.append(timed(direct))
    res, xd = t_o[-1][2], t_d[-1][2][0]
    a_o, a_d = robust_acc(model, res.x_adv, ya_), robust_acc(model, xd, ya_)
    rows.append([f"(b) AutoAttack standard eps={eps_aa} (n={naa})", f"{a_o:.2f}", f"{a_d:.2f}"] + _times(t_o, t_d))
    identical = torch.equal(res.x_adv, xd)
    aa_ratio = statistics.median(t[0] for t in t_o) / statistics.median(t[0] for t in t_d)
    checks.append(("(b) autoattack robust acc == pyautoattack's", a_o == a_d))
    checks.append((f"(b) autoattack overhead: wall-time ratio {aa_ratio:.3f} <= 1.05", aa_ratio <= 1.05))

    # (c) fraction of wall time inside the model's forward + backward
    fractions = []
    cases = (("native pgd-20 eps=0.2", "pgd", 0.2, k), ("native pgd-20 eps=0.002", "pgd", 0.002, k),
             ("native apgd-ce-100 eps=0.1", "apgd-ce", 0.1, 100), ("torchattacks PGD-20 eps=0.002", None, 0.002, k))
    for name, attack, eps, steps in cases:
        clock = Clock()
        tm = Timed(model, clock)
        if attack is None:
            fn = partial(torchattacks.PGD(tm, eps=eps, alpha=2.5 * eps / steps, steps=steps), x, y)
        else:
            fn = partial(create_attack(attack, f"linf:{eps}", steps=steps), tm, x, y)
        wall, _, _ = timed(fn)
        fractions.append((name, wall, clock.forward, clock.backward))

    print(f"\nmodel: small_cnn on digits (clean accuracy {clean:.2f}% on {n} test images), 1 thread, "
          f"median of {repeats} runs\n")
    header = ["comparison", "robust acc Bastion %", "robust acc reference %", "CPU s Bastion", "CPU s reference",
              "CPU ratio", "wall s Bastion", "wall s reference", "wall ratio"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\n(b) adversarial examples identical to pyautoattack's: {identical}")
    print("\n| (c) attack | wall s | forward s | backward s | share in model |")
    print("|---|---|---|---|---|")
    for name, t, fw, bw in fractions:
        print(f"| {name} | {t:.3f} | {fw:.3f} | {bw:.3f} | {100 * (fw + bw) / t:.1f}% |")
    print("\n| target | met |\n|---|---|")
    for what, ok in checks:
        print(f"| {what} | {'yes' if ok else 'NO'} |")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())

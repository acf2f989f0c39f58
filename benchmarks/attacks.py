"""Attack benchmark: Bastion's attacks side by side with the reference tools, in one run.

    python benchmarks/attacks.py                 # full (a few minutes on 2 CPU cores)
    python benchmarks/attacks.py --quick         # smaller data, for a smoke run

On a fixed model (small CNN trained on digits with a fixed seed) and the digits test split:

(a) native PGD-k vs ``torchattacks.PGD`` with the same steps, step size (2.5 eps / k), random
    start and one restart: robust accuracy of each and the wall-time ratio, at an epsilon where
    most examples break early and at one where none break;
(b) Bastion's ``autoattack`` (standard version) vs pyautoattack's ``AutoAttack`` called directly
    with the same seed: robust accuracy of each and the overhead;
(c) the fraction of each attack's wall time spent inside the model's forward and backward passes;
(d) minimum-norm attacks: native FMN (L2, L-inf) and DDN against the same algorithms in adv-lib
    0.2.8 and foolbox 3.3.4 (benchmark-only dependencies; adv-lib imports visdom for its logger,
    stubbed here), median minimal norm over the clean-correct examples and wall time, same steps;
(e) native Square (L-inf, L2) vs pyautoattack's Square, robust accuracy averaged over seeds;
(f) ``autoattack-native`` vs the ``autoattack`` adapter (pyautoattack), side by side, with the time
    each spends inside the model (forward + backward) and the rows it sends through the model, on
    the CNN (compute-bound) and on the cheap MLP of (g) (bookkeeping-bound);
(g) native PGD vs torchattacks PGD on a cheap MLP where none break (the none-break ratio).

``--parts abcdefg`` picks sections.

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


def train_model(seed: int = 0, epochs: int = 15, objective=None) -> nn.Module:
    """A small CNN trained with Adam on the digits training split (the project's one training loop);
    ``objective`` defaults to standard training."""
    tr = load_dataset("digits", "train")
    torch.manual_seed(seed)
    model = create_model("small_cnn", 10, 1, 8)
    cfg = TrainConfig(epochs=epochs, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=0.0,
                      schedule="constant", seed=seed)
    return fit(model, tr, objective or StandardObjective(), cfg, quiet=True).model


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
        self.rows = 0   # examples sent through the model's forward
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
        self.clock.rows += x.shape[0]
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
    ap.add_argument("--parts", default="abcdefg", help="sections to run (letters a-g)")
    ap.add_argument("--seeds", type=int, default=None, help="(e): seeds per setting (default 5, --quick 2)")
    ap.add_argument("--square", default="linf:0.1,linf:0.2,l2:0.5,l2:1.0", help="(e): threat models, comma-separated")
    ap.add_argument("--channels-last", action="store_true",
                    help="(f): run both suites on a channels-last copy of the CNN (instead of the CNN and the MLP)")
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
    for label, eps in (("most break early", 0.2), ("none break", 0.002)) if "a" in args.parts else ():
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
    identical = None
    for _ in range((1 if args.quick else 2) if "b" in args.parts else 0):
        t_o.append(timed(partial(ours_aa.run, model, xa_, ya_)))
        t_d.append(timed(direct))
    if t_o:
        res, xd = t_o[-1][2], t_d[-1][2][0]
        a_o, a_d = robust_acc(model, res.x_adv, ya_), robust_acc(model, xd, ya_)
        rows.append([f"(b) AutoAttack standard eps={eps_aa} (n={naa})", f"{a_o:.2f}", f"{a_d:.2f}"]
                    + _times(t_o, t_d))
        identical = torch.equal(res.x_adv, xd)
        aa_ratio = statistics.median(t[0] for t in t_o) / statistics.median(t[0] for t in t_d)
        checks.append(("(b) autoattack robust acc == pyautoattack's", a_o == a_d))
        checks.append((f"(b) autoattack overhead: wall-time ratio {aa_ratio:.3f} <= 1.05", aa_ratio <= 1.05))

    # (c) fraction of wall time inside the model's forward + backward
    fractions = []
    cases = (("native pgd-20 eps=0.2", "pgd", 0.2, k), ("native pgd-20 eps=0.002", "pgd", 0.002, k),
             ("native apgd-ce-100 eps=0.1", "apgd-ce", 0.1, 100), ("torchattacks PGD-20 eps=0.002", None, 0.002, k))
    for name, attack, eps, steps in cases if "c" in args.parts else ():
        clock = Clock()
        tm = Timed(model, clock)
        if attack is None:
            fn = partial(torchattacks.PGD(tm, eps=eps, alpha=2.5 * eps / steps, steps=steps), x, y)
        else:
            fn = partial(create_attack(attack, f"linf:{eps}", steps=steps), tm, x, y)
        wall, _, _ = timed(fn)
        fractions.append((name, wall, clock.forward, clock.backward))

    extra = extra_sections(model, x, y, args, repeats, checks)

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
    for title, header_x, rows_x in extra:
        print(f"\n{title}\n")
        print("| " + " | ".join(header_x) + " |")
        print("|" + "---|" * len(header_x))
        for r in rows_x:
            print("| " + " | ".join(str(c) for c in r) + " |")
    print("\n| target | met |\n|---|---|")
    for what, ok in checks:
        print(f"| {what} | {'yes' if ok else 'NO'} |")
    return 0 if all(ok for _, ok in checks) else 1


def _median_norm(norms: torch.Tensor) -> float:
    found = norms[torch.isfinite(norms) & (norms > 0)]
    return float(found.median()) if found.numel() else float("inf")


def _mlp(seed: int = 0) -> nn.Module:
    tr = load_dataset("digits", "train")
    torch.manual_seed(seed)
    model = create_model("mlp", 10, 1, 8, hidden=(64,))
    cfg = TrainConfig(epochs=10, batch_size=128, optimizer="adam", lr=1e-2, weight_decay=0.0,
                      schedule="constant", seed=seed)
    return fit(model, tr, StandardObjective(), cfg, quiet=True).model.eval()


def extra_sections(model, x, y, args, repeats, checks) -> list:
    """Sections (d)-(g); each returns (title, header, rows) and appends its targets to ``checks``."""
    out = []
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    xc, yc = x[ok], y[ok]
    if "d" in args.parts:
        import types

        sys.modules.setdefault("visdom", types.ModuleType("visdom"))
        sys.modules["visdom"].Visdom = object  # adv-lib imports visdom only for its optional logger
        import foolbox as fb
        from adv_lib.attacks import ddn as al_ddn
        from adv_lib.attacks import fmn as al_fmn

        fmodel = fb.PyTorchModel(model, bounds=(0, 1))
        steps = 100
        cases = [("FMN L2", "fmn-l2", "l2:100", partial(al_fmn, norm=2, steps=steps),
                  fb.attacks.L2FMNAttack(steps=steps)),
                 ("FMN L-inf", "fmn-linf", "linf:1", partial(al_fmn, norm=float("inf"), steps=steps),
                  fb.attacks.LInfFMNAttack(steps=steps)),
                 ("DDN L2", "ddn", "l2:100", partial(al_ddn, steps=steps, levels=None),
                  fb.attacks.DDNAttack(steps=steps))]
        rows = []
        for label, name, threat, al, fba in cases:
            norm = threat.split(":")[0]
            t_o = timed(partial(create_attack(name, threat, steps=steps).run, model, xc, yc))
            t_a = timed(partial(al, model, xc, yc))
            t_f = timed(lambda fba=fba: fba(fmodel, xc, yc, epsilons=None)[0])

            def norms_of(xa, norm=norm):
                from bastion.threat import lp_norm

                with torch.no_grad():
                    adv = model(xa).argmax(1) != yc
                n = lp_norm(xa - xc, norm)
                return torch.where(adv, n, torch.full_like(n, float("inf")))

            m_o, m_a, m_f = _median_norm(t_o[2].norms), _median_norm(norms_of(t_a[2])), _median_norm(norms_of(t_f[2]))
            rows.append([label, f"{m_o:.4f}", f"{m_a:.4f}", f"{m_f:.4f}", f"{t_o[0]:.2f}", f"{t_a[0]:.2f}",
                         f"{t_f[0]:.2f}", f"{t_o[0] / t_a[0]:.2f}", f"{t_o[0] / t_f[0]:.2f}"])
            checks.append((f"(d) {label}: median minimal norm {m_o:.4f} <= adv-lib {m_a:.4f} and foolbox {m_f:.4f}",
                           m_o <= min(m_a, m_f) + 1e-4))
        out.append((f"(d) minimum-norm attacks, {steps} steps, {len(yc)} clean-correct examples",
                    ["attack", "median norm Bastion", "adv-lib", "foolbox", "wall s Bastion", "wall s adv-lib",
                     "wall s foolbox", "ratio vs adv-lib", "ratio vs foolbox"], rows))
    if "e" in args.parts:
        from pyautoattack import AutoAttack

        seeds = args.seeds or (2 if args.quick else 5)
        rows = []
        settings = [(t.split(":")[0], float(t.split(":")[1]), 1000) for t in args.square.split(",") if t.strip()]
        for norm, eps, nq in settings:
            ours, theirs, to, tt = [], [], [], []
            for seed in range(seeds):
                t = timed(partial(create_attack("square", f"{norm}:{eps}", n_queries=nq, seed=seed).run, model, x, y))
                ours.append(robust_acc(model, t[2].x_adv, y))
                to.append(t)
                aa = AutoAttack(model, attacks=["square"], version="custom", norm="Linf" if norm == "linf" else "L2",
                                eps=eps, seed=seed)
                aa.square.n_queries = nq
                with torch.random.fork_rng():
                    t2 = timed(partial(aa.run_standard_evaluation, x, y))
                theirs.append(robust_acc(model, t2[2][0], y))
                tt.append(t2)
            mo, mt = statistics.mean(ours), statistics.mean(theirs)
            rows.append([f"{norm}:{eps}, {nq} queries, {seeds} seeds", f"{mo:.2f}", f"{mt:.2f}",
                         f"{statistics.pstdev(ours):.2f}", f"{statistics.pstdev(theirs):.2f}"] + _times(to, tt)[3:])
            checks.append((f"(e) square {norm}:{eps}: native {mo:.2f} within 0.5 pts of pyautoattack {mt:.2f}",
                           abs(mo - mt) <= 0.5))
        out.append(("(e) native Square vs pyautoattack Square (robust accuracy %, mean over seeds)",
                    ["setting", "Bastion", "pyautoattack", "std Bastion", "std pyautoattack", "wall s Bastion",
                     "wall s pyautoattack", "wall ratio"], rows))
    if "f" in args.parts:
        n = 60 if args.quick else 150
        rows = []
        # the CNN is compute-bound (its forward passes dominate), the MLP bookkeeping-bound
        if args.channels_last:  # both sides get the same converted copy (a layout PyTorch's CPU convolutions favour)
            import copy

            nets = [("small CNN, channels-last", copy.deepcopy(model).to(memory_format=torch.channels_last))]
        else:
            nets = [("small CNN", model), ("MLP", _mlp())]
        for label, net in nets:
            for threat in ("linf:0.1", "l2:0.5"):
                # both sides see the same timing wrapper: time inside the model and rows sent through it
                cn, ca = Clock(), Clock()
                mn, ma = Timed(net, cn), Timed(net, ca)
                t_n = timed(partial(create_attack("autoattack-native", threat, seed=0, progress=False).run, mn,
                                    x[:n], y[:n]))
                t_a = timed(partial(create_attack("autoattack", threat, seed=0, progress=False).run, ma, x[:n],
                                    y[:n]))
                a_n, a_a = robust_acc(net, t_n[2].x_adv, y[:n]), robust_acc(net, t_a[2].x_adv, y[:n])
                rows.append([label, threat, f"{a_n:.2f}", f"{a_a:.2f}", f"{t_n[0]:.1f}", f"{t_a[0]:.1f}",
                             f"{t_n[0] / t_a[0]:.2f}", f"{t_n[1] / t_a[1]:.2f}", f"{cn.forward + cn.backward:.1f}",
                             f"{ca.forward + ca.backward:.1f}", f"{cn.rows}", f"{ca.rows}",
                             f"{(cn.forward + cn.backward) / t_a[0]:.2f}"])
                checks.append((f"(f) autoattack-native {label} {threat}: {a_n:.2f} within 0.5 pts of {a_a:.2f}",
                               abs(a_n - a_a) <= 0.5))
                checks.append((f"(f) autoattack-native {label} {threat}: wall ratio {t_n[0] / t_a[0]:.2f} <= 0.5",
                               t_n[0] / t_a[0] <= 0.5))
        out.append((f"(f) autoattack-native vs autoattack (pyautoattack), standard settings, n={n}",
                    ["model", "threat", "robust % native", "robust % pyautoattack", "wall s native",
                     "wall s pyautoattack", "wall ratio", "CPU ratio", "in model s native", "in model s pyautoattack",
                     "model rows native", "model rows pyautoattack", "floor: native model s / pyautoattack wall"],
                    rows))
    if "g" in args.parts:
        import torchattacks

        mlp = _mlp()
        eps, k = 0.002, args.steps
        ours = create_attack("pgd", f"linf:{eps}", steps=k, step_size=2.5 * eps / k, seed=0)
        ta = torchattacks.PGD(mlp, eps=eps, alpha=2.5 * eps / k, steps=k, random_start=True)
        t_o, t_t = [], []
        # one call takes ~15 ms: 20 interleaved pairs per repeat make the medians steady (the first pair warms up)
        for r in range(20 * repeats + 1):
            o = timed(partial(ours, mlp, x, y))
            torch.manual_seed(r)
            t = timed(partial(ta, x, y))
            if r:
                t_o.append(o)
                t_t.append(t)
        ratio = statistics.median(t[0] for t in t_o) / statistics.median(t[0] for t in t_t)
        checks.append((f"(g) MLP none-break: wall-time ratio {ratio:.3f} <= 1.1", ratio <= 1.1))
        out.append(("(g) native PGD vs torchattacks PGD on an MLP (none break)",
                    ["setting", "CPU s Bastion", "CPU s reference", "CPU ratio", "wall s Bastion",
                     "wall s reference", "wall ratio"], [[f"PGD-{k} eps={eps}"] + _times(t_o, t_t)]))
    return out


if __name__ == "__main__":
    raise SystemExit(main())

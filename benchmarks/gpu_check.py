"""GPU check: one prepared script for a machine with a CUDA device (< 8 minutes).

1. Correctness: Cohen certification and PGD/APGD outcomes on the device equal the CPU's (same
   seeds) up to float tolerance; the autocast bf16 paths (smoothing's ``autocast``, an attack under
   ``torch.autocast``) run and give finite results.
2. Throughput on CIFAR-shaped synthetic data (3x32x32, 10 classes, PreAct ResNet-18) at realistic
   batch sizes: PGD-10, APGD-CE-100, AutoAttack (native, standard), certification (n=10,000) and one
   PGD-AT training epoch, each as a ratio to the bare forward+backward of the same batch on the
   same device (ratio = seconds per example of the task / seconds per example of one fwd+bwd).

Writes a markdown table (``--out``, default ``gpu_check.md``).

    python benchmarks/gpu_check.py                 # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run       # CPU, tiny sizes: every path that needs no CUDA (CI)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Sizes:
    arch: str
    width: int
    batch: int          # attack / fwd-bwd batch
    examples: int       # examples attacked per throughput task
    cert_examples: int
    cert_n: int
    cert_batch: int
    train_examples: int
    pgd_steps: int
    apgd_steps: int


FULL = Sizes("preact_resnet18", 64, 256, 256, 4, 10_000, 1000, 10_000, 10, 100)
DRY = Sizes("small_cnn", 8, 8, 8, 2, 200, 100, 32, 2, 3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _model(sz: Sizes, device: torch.device) -> torch.nn.Module:
    from bastion.models import create_model

    torch.manual_seed(0)
    kw = {"width": sz.width}
    return create_model(sz.arch, 10, 3, 32, **kw).to(device).eval()


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@torch.no_grad()
def _own_labels(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The untrained model's own predictions as labels: every example starts correctly classified,
    so attacks run their full schedule instead of stopping on already-wrong examples."""
    return torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])


# ---------------------------------------------------------------------------------------------
# 1. correctness
# ---------------------------------------------------------------------------------------------

def correctness(sz: Sizes, device: torch.device) -> list[tuple[str, str, bool]]:
    """(check, detail, passed) rows: device vs CPU outcomes, and the bf16 autocast paths."""
    from attacks import create_attack
    from certify.smoothing import Smooth

    rows = []
    cpu = torch.device("cpu")
    m_cpu, m_dev = _model(sz, cpu), _model(sz, device)
    m_dev.load_state_dict(m_cpu.state_dict())
    x, _ = _data(sz.batch)
    y = _own_labels(m_cpu, x)
    for name, params in (("pgd", {"steps": sz.pgd_steps}), ("apgd-ce", {"steps": sz.apgd_steps})):
        atk = create_attack(name, "linf:8/255", **params)
        outs = []
        for m, d in ((m_cpu, cpu), (m_dev, device)):
            g = torch.Generator(device=d).manual_seed(0)
            xa = atk(m, x.to(d), y.to(d), generator=g)
            with torch.no_grad():
                outs.append((m(xa).argmax(1).cpu(), (xa.cpu() - x).abs().amax().item()))
        # RNG streams differ between devices: compare outcomes (robust accuracy), not bits
        agree = (outs[0][0] == y).float().mean().item(), (outs[1][0] == y).float().mean().item()
        ok = abs(agree[0] - agree[1]) <= max(0.05, 2 / sz.batch) and outs[1][1] <= 8 / 255 + 1e-6
        rows.append((f"{name}: robust accuracy cpu vs device", f"{agree[0]:.3f} vs {agree[1]:.3f}", ok))
    xs = x[:sz.cert_examples]
    res = []
    for m, d in ((m_cpu, cpu), (m_dev, device)):
        s = Smooth(m, 10, 0.25, seed=0)
        res.append([s.certify(xs[i].to(d), 50, sz.cert_n, 0.001, batch=sz.cert_batch, index=i)
                    for i in range(len(xs))])
    same_cls = all(a[0] == b[0] for a, b in zip(*res))
    rad = max(abs(a[1] - b[1]) for a, b in zip(*res))
    rows.append(("certify: classes and radii cpu vs device", f"classes equal {same_cls}, max radius diff {rad:.3g}",
                 same_cls and rad < 0.05))
    try:
        s16 = Smooth(m_dev, 10, 0.25, seed=0, autocast="bf16")
        c, r = s16.certify(xs[0].to(device), 50, sz.cert_n, 0.001, batch=sz.cert_batch, index=0)
        rows.append(("certify under autocast bf16", f"class {c}, radius {r:.3f}", math.isfinite(r)))
    except Exception as exc:  # report, do not stop the check
        rows.append(("certify under autocast bf16", f"{type(exc).__name__}: {exc}", False))
    atk = create_attack("pgd", "linf:8/255", steps=sz.pgd_steps)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        xa = atk(m_dev, x.to(device), y.to(device), generator=torch.Generator(device=device).manual_seed(0))
    rows.append(("pgd under torch.autocast bf16", f"max abs delta {float((xa.cpu() - x).abs().max()):.4f}",
                 bool(torch.isfinite(xa).all()) and float((xa.cpu() - x).abs().max()) <= 8 / 255 + 1e-3))
    return rows


# ---------------------------------------------------------------------------------------------
# 2. throughput
# ---------------------------------------------------------------------------------------------

def throughput(sz: Sizes, device: torch.device) -> list[tuple[str, int, float, float]]:
    """(task, examples, seconds, ratio to bare fwd+bwd per example) rows."""
    from attacks import create_attack
    from bastion.data import ImageDataset
    from bastion.train import TrainConfig, create_objective, fit
    from certify.smoothing import Smooth

    model = _model(sz, device)
    x, _ = _data(sz.examples, seed=1)
    xd = x.to(device)
    yd = _own_labels(model, xd)

    def fwd_bwd() -> None:
        for i in range(0, sz.examples, sz.batch):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xd[i:i + sz.batch]), yd[i:i + sz.batch]).backward()

    fwd_bwd()  # warm-up (cudnn autotune, allocator)
    base = _timed(fwd_bwd, device) / sz.examples
    rows = [("bare forward+backward", sz.examples, base * sz.examples, 1.0)]

    def attack(name: str, **params):
        atk = create_attack(name, "linf:8/255", **params)

        def run() -> None:
            for i in range(0, sz.examples, sz.batch):
                atk(model, xd[i:i + sz.batch], yd[i:i + sz.batch],
                    generator=torch.Generator(device=device).manual_seed(i))
        return run

    for label, fn in ((f"PGD-{sz.pgd_steps}", attack("pgd", steps=sz.pgd_steps)),
                      (f"APGD-CE-{sz.apgd_steps}", attack("apgd-ce", steps=sz.apgd_steps)),
                      ("AutoAttack (native, standard)", attack("autoattack-native"))):
        t = _timed(fn, device)
        rows.append((label, sz.examples, t, t / sz.examples / base))
    smooth = Smooth(model, 10, 0.25, seed=0)
    xc = xd[:sz.cert_examples]
    t = _timed(lambda: [smooth.certify(xc[i], 100, sz.cert_n, 0.001, batch=sz.cert_batch, index=i)
                        for i in range(len(xc))], device)
    rows.append((f"certification (n={sz.cert_n})", sz.cert_examples, t, t / sz.cert_examples / base))
    xt, yt = _data(sz.train_examples, seed=2)
    data = ImageDataset("synthetic-cifar", "train", xt, yt, [str(i) for i in range(10)])
    net = _model(sz, device).train()
    cfg = TrainConfig(epochs=1, batch_size=min(128, sz.batch), lr=0.05, schedule="constant")
    obj = create_objective("pgd", eps=8 / 255, steps=sz.pgd_steps)
    t = _timed(lambda: fit(net, data, obj, cfg, device=device, quiet=True), device)
    rows.append((f"one PGD-{sz.pgd_steps} AT epoch", sz.train_examples, t, t / sz.train_examples / base))
    return rows


def table(device: torch.device, sz: Sizes, checks, speed, seconds: float, dry: bool) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    out = [f"GPU check on {name} ({'dry run, tiny sizes: not a measurement' if dry else sz.arch}), "
           f"torch {torch.__version__}, {seconds:.0f} s", "", "| check | result | ok |", "|---|---|---|"]
    out += [f"| {c} | {d} | {'yes' if ok else 'NO'} |" for c, d, ok in checks]
    out += ["", f"Throughput, batch {sz.batch}, 3x32x32, 10 classes ({sz.arch}):", "",
            "| task | examples | seconds | x bare fwd+bwd per example |", "|---|---:|---:|---:|"]
    out += [f"| {t} | {n} | {s:.2f} | {r:.1f} |" for t, n, s, r in speed]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="GPU correctness and throughput check (see the module doc)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: exercise every path that needs no CUDA")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    p.add_argument("--out", default="gpu_check.md", help="markdown table (default gpu_check.md)")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cpu" if a.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for the CPU paths", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sz = DRY if a.dry_run else FULL
    t0 = time.perf_counter()
    checks = correctness(sz, device)
    speed = throughput(sz, device)
    text = table(device, sz, checks, speed, time.perf_counter() - t0, a.dry_run)
    Path(a.out).write_text(text)
    print(text)
    return 0 if all(ok for _, _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())

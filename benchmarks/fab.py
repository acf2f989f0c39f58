"""Native FAB / FAB-T vs pyautoattack's, side by side on the digits CNNs (about 6 CPU-minutes).

(a) median minimal norm of ``fab`` vs pyautoattack's ``FABAttack_PT`` (100 iterations, 1 restart)
    on the standard small CNN (those of the first 100 test images it classifies correctly), L-inf
    and L2;
(b) robust accuracy and wall time of ``fab-t`` vs pyautoattack's FAB-T (through the ``autoattack``
    adapter) on a PGD-trained small CNN (eps 0.1, 5 steps), all 450 test images, linf 0.1 and l2 0.5.
Targets: (a) median norm at most 1.02x pyautoattack's; (b) within 1 point. Exits 1 on a miss.

    OMP_NUM_THREADS=1 python benchmarks/fab.py
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attacks import create_attack  # noqa: E402
from bastion.data import load_dataset  # noqa: E402
from bastion.threat import lp_norm  # noqa: E402
from defenses.pgd_at import PGDObjective, PGDParams  # noqa: E402


def _train_model():
    """benchmarks/attacks.py's small-CNN trainer (loaded by path: its module name is taken by the package)."""
    spec = importlib.util.spec_from_file_location("bench_attacks", Path(__file__).with_name("attacks.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.train_model


def main() -> int:
    from pyautoattack.fab_pt import FABAttack_PT

    torch.set_num_threads(1)
    train_model = _train_model()
    test = load_dataset("digits", "test")
    checks: list[tuple[str, bool]] = []
    model = train_model().eval()
    x, y = test.images[:100], test.labels[:100]
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    x, y = x[ok], y[ok]
    print(f"(a) minimal norms, standard small CNN, {len(y)} correctly classified test images")
    for norm in ("linf", "l2"):
        ours = create_attack("fab", f"{norm}:10", progress=False).run(model, x, y).norms
        ref = FABAttack_PT(model, norm={"linf": "Linf", "l2": "L2"}[norm], n_restarts=1, n_iter=100, eps=10.0, seed=0,
                           device=x.device)
        xa = ref.perturb(x, y)
        with torch.no_grad():
            fooled = model(xa).argmax(1) != y
        theirs = torch.where(fooled, lp_norm(xa - x, norm), torch.full_like(ours, float("inf")))
        both = torch.isfinite(ours) & torch.isfinite(theirs)
        m_ours, m_theirs = float(ours[both].median()), float(theirs[both].median())
        print(f"  fab {norm}: median minimal norm {m_ours:.4f} (found {int(torch.isfinite(ours).sum())}), "
              f"pyautoattack {m_theirs:.4f} (found {int(torch.isfinite(theirs).sum())})")
        checks.append((f"(a) fab {norm} median norm <= 1.02x pyautoattack's", m_ours <= m_theirs * 1.02))
    model = train_model(objective=PGDObjective(PGDParams(eps=0.1, norm="linf", steps=5))).eval()
    x, y = test.images, test.labels
    print(f"(b) FAB-T, PGD-trained small CNN, {len(y)} test images")
    for threat in ("linf:0.1", "l2:0.5"):
        t0 = time.perf_counter()
        res = create_attack("fab-t", threat, progress=False).run(model, x, y)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = create_attack("autoattack", threat, version="custom", attacks=("fab-t",), restarts=1,
                            progress=False).run(model, x, y)
        t_ref = time.perf_counter() - t0
        with torch.no_grad():
            acc = (model(res.x_adv).argmax(1) == y).float().mean().item()
            acc_ref = (model(ref.x_adv).argmax(1) == y).float().mean().item()
        print(f"  fab-t {threat}: robust {100 * acc:.2f}% in {t_ours:.1f} s; pyautoattack {100 * acc_ref:.2f}% in "
              f"{t_ref:.1f} s (wall ratio {t_ours / t_ref:.2f})")
        checks.append((f"(b) fab-t {threat} within 1 point of pyautoattack", abs(acc - acc_ref) <= 0.01))
    for what, met in checks:
        print(f"{'met ' if met else 'MISS'} {what}")
    return 0 if all(met for _, met in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Each attack of a detector entry's suite alone, plus the CE-sum variant it replaced: robust accuracy
(an example is lost when the attack's output is misclassified AND not detected) on the leaderboard's
test examples, to judge how strong the detector-aware attacks are.

    python -m experiments.leaderboard.adaptive_check runs/leaderboard-digits_fast \
        experiments/configs/leaderboard_digits_fast.toml standard-mahalanobis --eps 0.1 --steps 20
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    from attacks import create_attack
    from attacks.adaptive import DetectorObjective
    from bastion.checkpoints import load_checkpoint
    from detection.checkpoint import load_detector
    from experiments.leaderboard import read_config
    from experiments.leaderboard.run import checkpoint_of, load_data

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the leaderboard's output folder (trained models and OUT/detectors)")
    ap.add_argument("config", help="the leaderboard config")
    ap.add_argument("entry", help="a detector entry's name")
    ap.add_argument("--eps", type=float, default=0.1, help="Linf radius")
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 100])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = read_config(args.config)
    entry = next(e for e in cfg.entries if e.name == args.entry)
    trained = {t: Path(args.out) / "train" / t / "model.safetensors" for t in cfg.train}
    ckpt = checkpoint_of(cfg, entry, trained)
    clf = load_checkpoint(ckpt)[0].eval()
    det = load_detector(f"{args.out}/detectors/{entry.name}", classifier=clf)
    data = load_data(cfg, None)
    x, y, thr = data.images, data.labels, det.threshold
    with torch.no_grad():
        ok = (clf(x).argmax(1) == y) & torch.as_tensor(det.score(x) <= thr)
    n = x.shape[0]
    print(f"{n} test examples, accepted and correct {100 * ok.float().mean():.2f}%, threshold {thr:.6g}")
    mod = det.differentiable()
    t = mod.standardize(thr)
    threat = f"linf:{args.eps}"
    attacks = {
        "apgd-ce (oblivious)": lambda s: create_attack("apgd-ce", threat, steps=s, seed=0),
        "apgd, CE sum w 0.5": lambda s: create_attack("apgd-ce", threat, steps=s, seed=0,
                                                      objective=DetectorObjective(mod, 0.5, t)),
        "apgd, margin sum w 0.5": lambda s: create_attack("apgd-ce", threat, steps=s, seed=0,
                                                          objective=DetectorObjective(mod, 0.5, t, base="margin")),
        "apgd, selective": lambda s: create_attack("apgd-ce", threat, steps=s, seed=0,
                                                   objective=DetectorObjective(mod, threshold=t, mode="selective")),
        "pgd, selective": lambda s: create_attack("pgd", threat, steps=s, seed=0,
                                                  objective=DetectorObjective(mod, threshold=t, mode="selective")),
    }
    idx = ok.nonzero().flatten()
    print("| steps | attack | robust acc. (%) | misclassified | misclassified and detected | seconds |")
    print("|---|---|---|---|---|---|")
    for steps in args.steps:
        for name, make in attacks.items():
            t0 = time.perf_counter()
            xa = make(steps).run(clf, x[idx], y[idx], generator=torch.Generator().manual_seed(0)).x_adv
            with torch.no_grad():
                fooled = clf(xa).argmax(1) != y[idx]
            detected = torch.as_tensor(det.score(xa) > thr)
            robust = (int(ok.sum()) - int((fooled & ~detected).sum())) / n
            print(f"| {steps} | {name} | {100 * robust:.2f} | {int(fooled.sum())} | {int((fooled & detected).sum())} "
                  f"| {time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()

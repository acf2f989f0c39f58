"""``bastion evaluate``: clean and adversarial accuracy of a checkpoint, resumable."""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.common import add_data_args, data_from_args, run_config

HELP = """examples:
  bastion evaluate --model runs/pgd/model.safetensors --eps 0.1,0.2 --out runs/eval-pgd
  bastion evaluate --model M --dataset cifar10 --data-root ~/data --eps 8/255 --steps 20 --max 1000"""


def register(sub, common) -> None:
    p = sub.add_parser("evaluate", parents=[common], help="clean and robust accuracy of a checkpoint (resumable)",
                       description="Evaluate a checkpoint: clean accuracy and PGD robust accuracy at each "
                                   "epsilon, per class. Records are appended as produced; rerun the same "
                                   "command to resume.", epilog=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint (NAME.safetensors with NAME.json beside it)")
    add_data_args(p, default=None)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--eps", default="8/255", help="comma-separated radii, e.g. 8/255,16/255")
    p.add_argument("--steps", type=int, default=10, help="PGD steps")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=None, help="run directory (default runs/eval-<checkpoint name>)")
    p.set_defaults(func=run)


def threats_from_args(args: argparse.Namespace):
    from bastion.threat import ThreatModel

    return [ThreatModel(args.norm, e.strip()) for e in str(args.eps).split(",") if e.strip()]


def run(args: argparse.Namespace) -> int:
    from bastion.checkpoints import load_checkpoint
    from bastion.evaluate import CleanProbe, PGDProbe, evaluate_model
    from bastion.report import write_report

    model, card = load_checkpoint(args.model, args.device)
    threats = threats_from_args(args)
    data = data_from_args(args, args.split, dataset=args.dataset or card.get("dataset") or "digits",
                          image_size=card["input_shape"][-1])
    out = Path(args.out or f"runs/eval-{Path(args.model).with_suffix('').name}")
    probes = [CleanProbe()] + [PGDProbe(t, steps=args.steps) for t in threats]
    config = run_config(args) | {"model_sha256": card.get("sha256")}
    metrics = evaluate_model(model, data, probes, out, config, batch_size=args.batch_size, seed=args.seed,
                             quiet=args.quiet, class_names=card.get("class_names"))
    write_report(out)
    if not args.quiet:
        line = ", ".join(f"{t}: {100 * b['accuracy']:.1f}%" for t, b in metrics["robust"].items())
        print(f"clean {100 * metrics['clean']['accuracy']:.1f}% | robust {line} | report {out / 'report.html'}")
    return 0

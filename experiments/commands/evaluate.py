"""``bastion evaluate``: clean and adversarial accuracy of a checkpoint, resumable.

Attacks run per threat model in the given order (list them cheapest first), each only on the
examples still robust; every adversarial batch is checked against the threat model (a violation
stops the run with an error) and re-predicted by the evaluator. Sanity flags (randomized output,
probability outputs, zero gradients, gradient-free or weaker attacks beating stronger white-box
ones) go into the report."""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.common import (
    add_command,
    add_data_args,
    attacks_help,
    check_data_fits,
    data_from_args,
    eps_text,
    model_label,
    nonnegative_int,
    positive_int,
    run_config,
)
from experiments.execution import EXECUTION_ONLY, add_execution_args, run_options

HELP = """examples:
  bastion evaluate --model runs/pgd/model.safetensors --eps 0.1,0.2 --out runs/eval-pgd
  bastion evaluate --model M --attacks pgd,apgd-ce,autoattack --eps 8/255,16/255
  bastion evaluate --model M --attacks apgd-ce,autoattack --attack-param autoattack.version=custom \\
      --attack-param autoattack.attacks=apgd-t+square --attack-param apgd-ce.restarts=2
  bastion evaluate --model M --attacks pgd,eot-pgd --attack-param eot-pgd.eot_iter=20   # randomized model
  bastion evaluate --model M --dataset cifar10 --data-root ~/data --eps 8/255 --steps 20 --max 1000
  bastion evaluate --model M --eps 8/255 --workers 2          # or --backend ray --address auto"""


def register(sub, common) -> None:
    p = add_command(sub, common, "evaluate", help="clean and robust accuracy of a checkpoint (resumable)",
                    description="Evaluate a checkpoint: clean accuracy and robust accuracy under a suite of "
                                "attacks at each epsilon, per class. Records are appended as produced; "
                                "rerun the same command to resume.", epilog=HELP)
    p.add_argument("--model", required=True, help="checkpoint (NAME.safetensors with NAME.json beside it)")
    add_data_args(p, default=None)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--eps", default="8/255", type=eps_text, help="comma-separated radii, e.g. 8/255,16/255")
    p.add_argument("--attacks", default="pgd",
                   help=attacks_help("comma-separated attacks run in this order, each on the examples still "
                                     "robust (default pgd)"))
    p.add_argument("--steps", type=positive_int, default=None,
                   help="steps of every native attack in --attacks (default: each attack's own)")
    p.add_argument("--attack-param", action="append", default=None, metavar="ATTACK.KEY=VALUE",
                   help="an attack parameter, e.g. apgd-ce.restarts=2 or autoattack.version=rand (repeatable)")
    p.add_argument("--cross-check", type=nonnegative_int, default=0, metavar="N",
                   help="per batch, re-run the strongest white-box attack on N examples a weaker one broke "
                        "(flags gradient masking; default 0)")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="examples per chunk (default 256; with --seed, determines the records)")
    add_execution_args(p, shard_size=256)
    p.add_argument("--out", default=None,
                   help="run directory (default runs/eval-<checkpoint name, or its folder's for model.safetensors>)")
    p.set_defaults(func=run)


def threats_from_args(args: argparse.Namespace):
    from bastion.threat import ThreatModel

    return [ThreatModel(args.norm, e.strip()) for e in str(args.eps).split(",") if e.strip()]


def attack_params_from_args(names: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """Per-attack parameters from ``--steps`` and ``--attack-param NAME.KEY=VALUE``."""
    from attacks.base import attack_config_fields
    from bastion.errors import ConfigError
    from experiments.config import parse_params

    params: dict[str, dict] = {n: {} for n in names}
    if args.steps is not None:
        for n in names:
            if "steps" in attack_config_fields(n):
                params[n]["steps"] = int(args.steps)
    for item in args.attack_param or []:
        head, sep, _ = item.partition("=")
        name, dot, key = head.rpartition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"bad --attack-param {item!r}: use ATTACK.KEY=VALUE, e.g. apgd-ce.restarts=2")
        if name not in params:
            raise ConfigError(f"--attack-param {item!r} names attack {name!r}, which is not in --attacks "
                              f"({', '.join(names)})")
        params[name].update(parse_params([f"{key}={item.split('=', 1)[1]}"]))
    return params


def run(args: argparse.Namespace) -> int:
    from attacks import AttackProbe
    from bastion.checkpoints import load_checkpoint
    from bastion.errors import ConfigError
    from bastion.evaluate import CleanProbe, evaluate, section_data

    names = [a.strip() for a in str(args.attacks).split(",") if a.strip()]
    if not names:
        raise ConfigError("--attacks is empty; give attack names such as pgd,apgd-ce,autoattack")
    params = attack_params_from_args(names, args)
    threats = threats_from_args(args)
    if not threats:
        raise ConfigError("--eps is empty; give one or more radii such as 8/255,16/255")
    probes = [CleanProbe()] + [AttackProbe(t, names, attack_params=params, cross_check=args.cross_check)
                               for t in threats]
    model, card = load_checkpoint(args.model, args.device)
    data = data_from_args(args, args.split, dataset=args.dataset or card.get("dataset") or "digits",
                          image_size=card["input_shape"][-1])
    check_data_fits(data, card, f"model {args.model!r}")
    out = Path(args.out or f"runs/eval-{model_label(args.model)}")
    config = run_config(args, drop=EXECUTION_ONLY + ("model",)) | {"model_sha256": card.get("sha256")}
    # workers load the checkpoint themselves; in this process the loaded model is used
    spec = model if args.backend == "local" and args.workers <= 1 else str(args.model)
    doc = evaluate(spec, data, probes, out, config, opts=run_options(args, batch_size=args.batch_size),
                   class_names=card.get("class_names"), title=model_label(args.model))
    metrics = section_data(doc, "robustness")
    if not args.quiet:
        line = ", ".join(f"{t}: {100 * b['accuracy']:.1f}%" for t, b in metrics["robust"].items())
        print(f"clean {100 * metrics['clean']['accuracy']:.1f}% | robust {line} | report {out / 'report.html'}")
        for f in metrics["flags"]:
            print(f"warning: {f}")
    return 0

"""``bastion conformal``: provably robust conformal prediction (RSCP+, PTT, RCT) under SmoothAdv."""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.common import (
    add_command,
    add_data_args,
    data_from_args,
    nonnegative_float,
    positive_float,
    positive_int,
    run_config,
)
from experiments.execution import EXECUTION_ONLY, add_execution_args

HELP = """examples:
  bastion run experiments/configs/conformal_digits_train.toml      # the Gaussian-trained MLP (sigma 0.25)
  bastion run experiments/configs/conformal_digits.toml            # RSCP+, PTT, RCT under SmoothAdv
  bastion conformal --model runs/conformal-digits-gaussian/model.safetensors --sigma 0.25 --eps 0.125 --rct
  bastion conformal --model M --sigma 0.5 --eps 0.25 --n-mc 1024 --scores hps aps raps --no-ptt

Per example the run records the base score, the N_MC-draw smoothed score and its Bernstein
half-width, clean and under SmoothAdv (fresh scoring noise); the fold then evaluates split
conformal, smoothed, RSCP (not provably valid) and RSCP+ over --splits calibration/test splits.
A killed run resumes when the same command is run again. Output: OUT/records.jsonl,
OUT/metrics.json, OUT/report.md/html (and OUT/rct/ with --rct)."""


def register(sub, common) -> None:
    p = add_command(sub, common, "conformal", help="provably robust conformal prediction (RSCP+, PTT, RCT)",
                    description="Robust conformal prediction sets of a Gaussian-noise-trained classifier "
                                "(Yan et al. 2024): coverage and set size, clean and under a SmoothAdv attack, "
                                "over many calibration/test splits.", epilog=HELP)
    p.add_argument("--model", required=True, help="checkpoint made by bastion train (Gaussian-noise-trained)")
    add_data_args(p, default=None)
    p.add_argument("--split", default="test", choices=["train", "test"],
                   help="data split holding holdout, calibration and test examples (default test)")
    c = p.add_argument_group("conformal")
    c.add_argument("--alpha", type=positive_float, default=0.1, help="target miscoverage (default 0.1)")
    c.add_argument("--sigma", type=positive_float, default=0.25, help="smoothing noise std (default 0.25)")
    c.add_argument("--eps", type=nonnegative_float, default=0.125, help="L2 attack radius (default 0.125)")
    c.add_argument("--n-mc", type=positive_int, default=256, help="Monte-Carlo draws per input (default 256)")
    c.add_argument("--beta", type=positive_float, default=0.001, help="Monte-Carlo failure budget (default 0.001)")
    c.add_argument("--scores", nargs="+", default=["hps", "aps"], choices=["hps", "aps", "raps"],
                   help="base scores (default hps aps)")
    c.add_argument("--no-randomized", dest="randomized", action="store_false",
                   help="APS/RAPS with u = 1 instead of u ~ U[0, 1]")
    c.add_argument("--no-ptt", dest="ptt", action="store_false", help="skip the PTT versions of the scores")
    c.add_argument("--holdout", type=int, default=150, help="holdout examples for PTT (default 150)")
    c.add_argument("--splits", type=positive_int, default=50, help="calibration/test splits (default 50)")
    c.add_argument("--test-bound", default="bernstein", choices=["bernstein", "hoeffding"],
                   help="RSCP+ test-side Monte-Carlo bound (default bernstein)")
    c.add_argument("--attack-noise", type=positive_int, default=64, help="SmoothAdv draws per step (default 64)")
    c.add_argument("--attack-steps", type=positive_int, default=20, help="SmoothAdv steps (default 20)")
    c.add_argument("--chunk", type=positive_int, default=50, help="examples per chunk (default 50)")
    r = p.add_argument_group("robust conformal training (RCT)")
    r.add_argument("--rct", action="store_true",
                   help="also train an RCT head on the train split on top of --model and evaluate it beside")
    r.add_argument("--rct-epochs", type=positive_int, default=150, help="RCT epochs (default 150)")
    r.add_argument("--rct-batch-size", type=positive_int, default=500, help="RCT batch size (default 500)")
    r.add_argument("--rct-lr", type=positive_float, default=0.05, help="RCT learning rate (default 0.05)")
    r.add_argument("--rct-temperature", type=positive_float, default=0.1, help="soft-set temperature (default 0.1)")
    r.add_argument("--rct-size-weight", type=nonnegative_float, default=1.0, help="size penalty lambda (default 1)")
    add_execution_args(p, shard_size=100)
    p.add_argument("--out", default=None, help="run directory (default runs/conformal-<model name>-eps<eps>)")
    p.set_defaults(func=run)


def train_rct(base_path: str, out: Path, args: argparse.Namespace):
    """The RCT model: --model's network with a re-initialised last layer trained by the ``rct``
    objective on the train split (resumes; reuses a finished OUT/rct/model.safetensors)."""
    from bastion.checkpoints import load_checkpoint, save_checkpoint
    from bastion.train import TrainConfig, create_objective, fit
    from certify.rscp import prepare_rct

    final = out / "rct" / "model.safetensors"
    if final.is_file():
        return str(final)
    model, card = load_checkpoint(base_path, args.device)
    prepare_rct(model, seed=args.seed)
    train = data_from_args(args, "train", dataset=args.dataset or card.get("dataset") or "digits",
                           image_size=card["input_shape"][-1])
    obj = create_objective("rct", sigma=args.sigma, eps=args.eps, alpha=args.alpha,
                           temperature=args.rct_temperature, size_weight=args.rct_size_weight)
    cfg = TrainConfig(epochs=args.rct_epochs, batch_size=args.rct_batch_size, lr=args.rct_lr, momentum=0.9,
                      nesterov=True, weight_decay=5e-4, schedule="step", milestones=(0.4, 0.6, 0.8), seed=args.seed)
    card = dict(card) | {"recipe": obj.config(), "base_model": str(base_path)}
    res = fit(model, train, obj, cfg, run_dir=out / "rct", device=args.device, quiet=args.quiet,
              checkpoint_card=card)
    save_checkpoint(final.with_suffix(""), res.model, card)
    return str(final)


def run(args: argparse.Namespace) -> int:
    from bastion.checkpoints import read_card
    from certify.conformal_eval import ConformalSettings, run_conformal
    from experiments.execution import run_options

    card = read_card(args.model)
    data = data_from_args(args, args.split, dataset=args.dataset or card.get("dataset") or "digits",
                          image_size=card["input_shape"][-1])
    settings = ConformalSettings(sigma=args.sigma, eps=args.eps, n_mc=args.n_mc, beta=args.beta, alpha=args.alpha,
                                 scores=tuple(args.scores), randomized=args.randomized, ptt=args.ptt,
                                 attack_noise=args.attack_noise, attack_steps=args.attack_steps, splits=args.splits,
                                 split_seed=args.seed, test_bound=args.test_bound, chunk=args.chunk)
    out = Path(args.out or f"runs/conformal-{Path(args.model).with_suffix('').name}-eps{args.eps:g}")
    models = {"gaussian": args.model}
    if args.rct:
        models["rct"] = train_rct(args.model, out, args)
    config = run_config(args, drop=EXECUTION_ONLY) | {"model_sha256": card.get("sha256")}
    opts = run_options(args, batch_size=settings.chunk)
    doc = run_conformal(models, data, out, settings, holdout=args.holdout, seed=args.seed, device=args.device,
                        config=config, opts=opts, quiet=args.quiet)
    if not args.quiet:
        print_summary(doc)
        print(f"records, metrics and report in {out} (report.html)")
    return 0


def print_summary(doc: dict) -> None:
    """One line per (model, score, method): attacked coverage and size, mean over splits."""
    d = next(s["data"] for s in doc["sections"] if s["type"] == "conformal")
    for p in d["probes"]:
        for r in p["results"]:
            cond = r.get("adv") or r.get("clean")
            tag = "attacked" if r.get("adv") else "clean"
            cov = cond["coverage"]
            print(f"{p['name']:9s} {r['score']:8s} {r['method']:8s} {tag:8s} coverage {100 * cov['mean']:5.1f}%"
                  f" (min {100 * cov['min']:5.1f}%)  size {cond['size']['mean']:5.2f} "
                  f"± {cond['size']['std']:.2f}")

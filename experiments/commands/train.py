"""``bastion train``: train a registered model with any registered objective."""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.common import add_command, add_data_args, data_from_args, run_config
from experiments.config import parse_params

HELP = """examples:
  bastion train --model small_cnn --objective standard --epochs 10 --out runs/std
  bastion train --model small_cnn --objective pgd --eps 0.1 --steps 7 --out runs/pgd
  bastion train --objective gaussian --sigma 0.25 --out runs/gauss
  bastion train --dataset cifar10 --data-root ~/data --model preact_resnet18 --objective pgd --eps 8/255
  bastion train --dataset digits --image-size 32 --model conv_linear --objective aaer --eps 0.2 \
      --param variant=rs --param lambda3=1.5 --optimizer adam --lr 0.003 --schedule cyclic --epochs 30
  bastion run experiments/configs/aaer_cifar10_rs_8.toml   (set data_root in the file)"""


def register(sub, common) -> None:
    p = add_command(sub, common, "train", help="train a model (any objective); resumes after a kill",
                    description="Train a model with one of the registered objectives. Checkpoints every "
                                "epoch into OUT/checkpoints and resumes from the last one.",
                    epilog=HELP)
    add_data_args(p)
    m = p.add_argument_group("model")
    m.add_argument("--model", default="small_cnn", help="architecture name (see bastion.models.list_models)")
    m.add_argument("--model-arg", action="append", default=[], metavar="K=V", help="architecture argument")
    o = p.add_argument_group("objective")
    o.add_argument("--objective", default="standard", help="training objective (standard, pgd, gaussian, fgsm, ...)")
    o.add_argument("--eps", default=None, help="attack radius for adversarial objectives, e.g. 8/255")
    o.add_argument("--norm", default=None, help="linf or l2 (adversarial objectives)")
    o.add_argument("--steps", type=int, default=None, help="attack steps (pgd)")
    o.add_argument("--alpha", default=None, help="attack step size")
    o.add_argument("--sigma", type=float, default=None, help="noise level (gaussian)")
    o.add_argument("--param", action="append", default=[], metavar="K=V", help="any other objective parameter")
    t = p.add_argument_group("optimization")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--schedule", default="cosine", choices=["constant", "cosine", "step", "cyclic"])
    t.add_argument("--augment", default="none", choices=["none", "crop_flip", "flip"])
    t.add_argument("--cyclic-peak", type=float, default=0.5,
                   help="cyclic schedule: fraction of training at which the LR peaks (default 0.5)")
    t.add_argument("--no-cycle-momentum", dest="cycle_momentum", action="store_false",
                   help="cyclic schedule with SGD: keep momentum fixed (default: cycle 0.9 -> 0.8 -> 0.9)")
    t.add_argument("--warmup-epochs", type=float, default=None,
                   help="single-step objectives: epsilon warm-up over this many epochs (step and radius)")
    c = p.add_argument_group("catastrophic-overfitting monitor (single-step objectives)")
    c.add_argument("--monitor", default="auto", choices=["auto", "on", "off"],
                   help="per-epoch clean/FGSM/PGD accuracy + AAE fraction on held-out test data and the CO "
                        "detector (auto: on for fgsm, fgsm_rs, n_fgsm, rs_aaer, n_aaer, aaer)")
    c.add_argument("--monitor-every", type=int, default=0, metavar="K",
                   help="also check every K iterations (written to OUT/monitor.jsonl; 0 = per epoch only)")
    c.add_argument("--monitor-examples", type=int, default=None, metavar="N",
                   help="held-out test examples used by the monitor (default: the whole test split)")
    c.add_argument("--monitor-pgd-steps", type=int, default=20, help="PGD steps of the monitor (step eps/4)")
    c.add_argument("--co-stop", action="store_true", help="stop training when catastrophic overfitting is flagged")
    c.add_argument("--log-batches", action="store_true",
                   help="write every iteration's statistics (loss, AAE count, V_A, V_N, ...) to OUT/batches.jsonl")
    p.add_argument("--out", default=None, help="run directory (default runs/train-<objective>)")
    p.set_defaults(func=run)


def objective_params(args: argparse.Namespace) -> dict:
    from bastion.threat import parse_eps

    params = {}
    for key in ("eps", "norm", "steps", "alpha", "sigma"):
        val = getattr(args, key, None)
        if val is not None:
            params[key] = parse_eps(val) if key in ("eps", "alpha") else val
    if getattr(args, "warmup_epochs", None) is not None:
        params["warmup_epochs"] = args.warmup_epochs
    params.update(parse_params(args.param))
    return params


def co_monitor(args: argparse.Namespace, objective, out: Path):
    """The CO monitor callback for this run, or None (see --monitor)."""
    from bastion.data import load_dataset
    from bastion.errors import ConfigError

    single_step = getattr(objective, "name", "") in ("fgsm", "fgsm_rs", "n_fgsm", "rs_aaer", "n_aaer", "aaer")
    mode = getattr(args, "monitor", "off")
    if mode == "off" or (mode == "auto" and not single_step):
        return None
    eps = getattr(objective, "eps", None) if single_step else None
    if eps is None:
        from bastion.threat import parse_eps

        if args.eps is None:
            raise ConfigError("--monitor on needs --eps (the radius of the monitor's FGSM/PGD attacks)")
        eps = parse_eps(args.eps)
    from defenses.co_monitor import COMonitor

    held_out = load_dataset(args.dataset, "test", args.data_root, image_size=args.image_size)
    if args.monitor_examples is not None:
        held_out = held_out.subset(slice(0, args.monitor_examples))
    return COMonitor(held_out, eps, pgd_steps=args.monitor_pgd_steps, every=args.monitor_every,
                     co_stop=args.co_stop, seed=args.seed, run_dir=out, quiet=args.quiet)


def run(args: argparse.Namespace) -> int:
    import torch

    from bastion.checkpoints import make_card, save_checkpoint
    from bastion.models import create_model
    from bastion.records import RunDir
    from bastion.report import metrics_document, section, write_report
    from bastion.train import TrainConfig, create_objective, fit

    torch.manual_seed(args.seed)
    out = Path(args.out or f"runs/train-{args.objective}")
    run_dir = RunDir(out, run_config(args))
    data = data_from_args(args, "train")
    c, h, _ = data.input_shape
    arch_kwargs = parse_params(args.model_arg)
    model = create_model(args.model, data.num_classes, c, h, **arch_kwargs).to(args.device)
    objective = create_objective(args.objective, **objective_params(args))
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                      momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                      augment=args.augment, seed=args.seed, cyclic_peak=getattr(args, "cyclic_peak", 0.5),
                      cycle_momentum=getattr(args, "cycle_momentum", True))
    callbacks = list(getattr(args, "callbacks", []))
    monitor = co_monitor(args, objective, out)
    if monitor is not None:
        callbacks.append(monitor)
    card = make_card(model, args.model, data.num_classes, data.input_shape, arch_kwargs, data.class_names,
                     dataset=args.dataset, seed=args.seed)
    result = fit(model, data, objective, cfg, run_dir=out, device=args.device, quiet=args.quiet,
                 checkpoint_card=card, callbacks=callbacks, log_batches=getattr(args, "log_batches", False))
    card["recipe"] = {"train": vars(cfg) | {"milestones": list(cfg.milestones)}, **objective.config()}
    card["metrics"] = {k: v for k, v in result.history[-1].items() if isinstance(v, (int, float))}
    final = save_checkpoint(out / "model", result.model, card)
    doc = metrics_document([section("training", f"{args.objective} training of {args.model}",
                                    {"objective": objective.config(), "model": args.model,
                                     "history": result.history, "stopped_early": result.stopped_early})],
                           title=f"Bastion training: {args.objective}")
    run_dir.write_json("metrics.json", doc)
    write_report(out, doc)
    if not args.quiet:
        print(f"model saved to {final} (card {final.with_suffix('.json')}); report {out / 'report.html'}")
    return 0

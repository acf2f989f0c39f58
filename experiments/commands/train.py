"""``bastion train``: train a registered model with any registered objective."""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.common import (
    LazyText,
    add_command,
    add_data_args,
    check_out,
    data_from_args,
    eps_text,
    nonnegative_float,
    nonnegative_int,
    objectives_help,
    open_run_dir,
    positive_float,
    positive_int,
    run_config,
)
from experiments.config import parse_params

# objectives the CO monitor watches by default (--monitor auto)
SINGLE_STEP = ("fgsm", "fgsm_rs", "n_fgsm", "rs_aaer", "n_aaer", "aaer")

HELP = """examples:
  bastion train --model small_cnn --objective standard --epochs 10 --out runs/std
  bastion train --model small_cnn --objective pgd --eps 0.1 --steps 7 --out runs/pgd
  bastion train --objective gaussian --sigma 0.25 --out runs/gauss
  bastion train --dataset cifar10 --data-root ~/data --model preact_resnet18 --objective pgd --eps 8/255
  bastion train --dataset digits --image-size 32 --model conv_linear --objective aaer --eps 0.2 \
      --param variant=rs --param lambda3=1.5 --optimizer adam --lr 0.003 --schedule cyclic --epochs 30
  bastion run experiments/configs/aaer_cifar10_rs_8.toml   (set data_root in the file)
  torchrun --nproc_per_node 2 -m experiments.cli train --objective pgd --eps 0.1 --batch-size 32 --out runs/ddp
      (DistributedDataParallel, detected from torchrun's environment: --batch-size is per process, the
       global batch 64 gives the same weights as one process with --batch-size 64; gloo on CPU, nccl on CUDA)"""


def register(sub, common) -> None:
    p = add_command(sub, common, "train", help="train a model (any objective); resumes after a kill",
                    description="Train a model with one of the registered objectives. Checkpoints every "
                                "epoch into OUT/checkpoints and resumes from the last one.",
                    epilog=HELP)
    add_data_args(p)
    m = p.add_argument_group("model")
    m.add_argument("--model", default="small_cnn",
                   help=LazyText(lambda: f"architecture: {', '.join(_model_names())} (default small_cnn)"))
    m.add_argument("--model-arg", action="append", default=[], metavar="K=V",
                   help="architecture argument, e.g. width=8 (repeatable)")
    o = p.add_argument_group("objective")
    o.add_argument("--objective", default="standard", help=objectives_help("training objective (default standard)"))
    o.add_argument("--eps", default=None, type=single_eps,
                   help="attack radius of adversarial objectives, e.g. 0.1 or 8/255 (default: the objective's)")
    o.add_argument("--norm", default=None, choices=["linf", "l2"],
                   help="threat-model norm of adversarial objectives (default: the objective's, linf)")
    o.add_argument("--steps", type=positive_int, default=None, help="attack steps (pgd; default: the objective's)")
    o.add_argument("--alpha", default=None, type=single_eps,
                   help="attack step size, e.g. 0.05 or 2/255 (default: the objective's)")
    o.add_argument("--sigma", type=positive_float, default=None, help="noise level (gaussian; default 0.25)")
    o.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="any other objective parameter, e.g. lambda3=1.5 (repeatable)")
    t = p.add_argument_group("optimization")
    t.add_argument("--epochs", type=positive_int, default=20, help="training epochs (default 20)")
    t.add_argument("--batch-size", type=positive_int, default=64, help="examples per step (default 64)")
    t.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="optimizer (default sgd)")
    t.add_argument("--lr", type=positive_float, default=0.05, help="peak learning rate (default 0.05)")
    t.add_argument("--momentum", type=nonnegative_float, default=0.9, help="SGD momentum (default 0.9)")
    t.add_argument("--weight-decay", type=nonnegative_float, default=5e-4, help="L2 weight decay (default 5e-4)")
    t.add_argument("--schedule", default="cosine", choices=["constant", "cosine", "step", "cyclic"],
                   help="learning-rate schedule: constant, cosine decay, step (x0.1 at 50%% and 75%% of "
                        "training) or cyclic (0 -> lr -> 0; default cosine)")
    t.add_argument("--augment", default="none", choices=["none", "crop_flip", "flip"],
                   help="data augmentation: none, flip (horizontal) or crop_flip (random crop after padding by size/8 "
                        "+ flip; default none)")
    t.add_argument("--cyclic-peak", type=nonnegative_float, default=0.5,
                   help="cyclic schedule: fraction of training at which the LR peaks (default 0.5)")
    t.add_argument("--no-cycle-momentum", dest="cycle_momentum", action="store_false",
                   help="cyclic schedule with SGD: keep momentum fixed (default: cycle 0.9 -> 0.8 -> 0.9)")
    t.add_argument("--warmup-epochs", type=nonnegative_float, default=None,
                   help="single-step objectives: epsilon warm-up over this many epochs (step and radius; "
                        "default: none)")
    c = p.add_argument_group("catastrophic-overfitting monitor (single-step objectives)")
    c.add_argument("--monitor", default="auto", choices=["auto", "on", "off"],
                   help="per-epoch clean/FGSM/PGD accuracy + AAE fraction on held-out test data and the CO "
                        f"detector (auto: on for {', '.join(SINGLE_STEP)}; default auto)")
    c.add_argument("--monitor-every", type=nonnegative_int, default=0, metavar="K",
                   help="also check every K iterations (written to OUT/monitor.jsonl; 0 = per epoch only)")
    c.add_argument("--monitor-examples", type=positive_int, default=None, metavar="N",
                   help="held-out test examples used by the monitor (default: the whole test split)")
    c.add_argument("--monitor-pgd-steps", type=positive_int, default=20,
                   help="PGD steps of the monitor (step eps/4; default 20)")
    c.add_argument("--co-stop", action="store_true", help="stop training when catastrophic overfitting is flagged")
    c.add_argument("--log-batches", action="store_true",
                   help="write every iteration's statistics (loss, AAE count, V_A, V_N, ...) to OUT/batches.jsonl")
    p.add_argument("--out", default=None,
                   help="run directory (default runs/train-<objective>[-<eps>|-sigma<sigma>])")
    p.set_defaults(func=run)


def _model_names() -> list[str]:
    from bastion.models import list_models

    return list_models()


def single_eps(text: str) -> str:
    """One radius such as ``0.1`` or ``8/255``, checked now, kept as written."""
    if "," in str(text):
        raise argparse.ArgumentTypeError(f"takes one radius, got {text!r}")
    return eps_text(text)


def default_train_out(args: argparse.Namespace) -> Path:
    """``runs/train-<objective>``, plus the radius or noise level when given (no collisions)."""
    name = args.objective
    if args.eps is not None:
        name += "-" + str(args.eps).replace("/", "_")
    if args.sigma is not None:
        name += f"-sigma{args.sigma:g}"
    return Path("runs") / f"train-{name}"


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

    single_step = getattr(objective, "name", "") in SINGLE_STEP
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
    """Train; under torchrun (RANK/WORLD_SIZE/... set) every rank runs this with DDP and rank 0 writes."""
    from bastion import distributed as dist

    env = dist.from_env()
    if not env.distributed:
        return _run(args)
    args.device = str(dist.device_for(env, args.device))
    dist.init(env, args.device)
    try:
        if not env.is_main:
            args.quiet = True
        return _run(args)
    finally:
        dist.shutdown()


def _run(args: argparse.Namespace) -> int:
    import torch

    from bastion import distributed as dist
    from bastion.checkpoints import make_card, save_checkpoint
    from bastion.models import create_model
    from bastion.report import metrics_document, section, write_report
    from bastion.train import TrainConfig, create_objective, fit

    # everything that can be wrong with the inputs is checked before the run directory exists
    out = check_out(args.out or default_train_out(args))
    objective = create_objective(args.objective, **objective_params(args))
    data = data_from_args(args, "train")
    c, h, _ = data.input_shape
    arch_kwargs = parse_params(args.model_arg)
    torch.manual_seed(args.seed)
    model = create_model(args.model, data.num_classes, c, h, **arch_kwargs).to(args.device)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                      momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                      augment=args.augment, seed=args.seed, cyclic_peak=getattr(args, "cyclic_peak", 0.5),
                      cycle_momentum=getattr(args, "cycle_momentum", True))
    callbacks = list(getattr(args, "callbacks", []))
    monitor = co_monitor(args, objective, out)
    # the stamp holds the global batch: a run resumes under any process count that keeps it (as `fit` does)
    stamp = run_config(args) | {"batch_size": args.batch_size * dist.world_size()}
    run_dir = open_run_dir(out, stamp) if dist.is_main() else None
    dist.barrier()  # the run directory exists before any rank writes into it
    if monitor is not None:
        callbacks.append(monitor)
    card = make_card(model, args.model, data.num_classes, data.input_shape, arch_kwargs, data.class_names,
                     dataset=args.dataset, seed=args.seed)
    result = fit(model, data, objective, cfg, run_dir=out, device=args.device, quiet=args.quiet,
                 checkpoint_card=card, callbacks=callbacks, log_batches=getattr(args, "log_batches", False))
    card["recipe"] = {"train": vars(cfg) | {"milestones": list(cfg.milestones)}, **objective.config()}
    card["metrics"] = {k: v for k, v in result.history[-1].items() if isinstance(v, (int, float))}
    if not dist.is_main():
        return 0
    final = save_checkpoint(out / "model", result.model, card)
    doc = metrics_document([section("training", f"{args.objective} training of {args.model}",
                                    {"objective": objective.config(), "model": args.model,
                                     "history": result.history, "stopped_early": result.stopped_early})],
                           title=f"Bastion training: {args.objective}")
    run_dir.write_json("metrics.json", doc)  # type: ignore[union-attr]
    write_report(out, doc)
    if not args.quiet:
        print(f"model saved to {final} (card {final.with_suffix('.json')}); report {out / 'report.html'}")
    return 0

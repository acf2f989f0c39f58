"""``bastion certify``: randomized-smoothing CERTIFY (or PREDICT) of checkpoints, resumable and shardable."""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.common import add_command, add_data_args, check_data_fits, data_from_args, model_label, run_config
from experiments.execution import EXECUTION_ONLY, add_execution_args

HELP = """examples:
  bastion certify --model runs/gauss/model.safetensors --sigma 0.25 --n0 100 --n 100000 --alpha 0.001 --skip 20
  bastion certify --model runs/g25/model.safetensors runs/g50/model.safetensors --sigma 0.25 0.5 --n 10000 --max 100
  bastion certify --model M --sigma 0.25 --sequential --max-radius 0.5 --workers 2 --threads 1
  bastion certify --model M --sigma 0.25 --backend ray --address auto --shard-size 100
  bastion certify --model M --sigma 0.25 --predict --n 1000

A killed run resumes when the same command is run again. Logs: OUT/certify-<setting>.tsv
(idx, label, predict, radius, correct, time), OUT/records.jsonl, OUT/metrics.json, OUT/report.html."""


def register(sub, common) -> None:
    p = add_command(sub, common, "certify", help="randomized-smoothing certification (Cohen et al.)",
                    description="Certify (or, with --predict, predict with) the Gaussian-smoothed classifier "
                                "of one or more checkpoints: certified accuracy at radii and its curve, "
                                "abstention, ACR, time per example. Resumable; shards over local processes "
                                "or Ray.", epilog=HELP)
    p.add_argument("--model", nargs="+", required=True,
                   help="checkpoint(s) made by bastion train (NAME.safetensors with NAME.json beside it)")
    p.add_argument("--sigma", nargs="+", type=float, required=True,
                   help="noise level(s); one model with several sigmas, several models with one sigma, "
                        "or one sigma per model")
    add_data_args(p, default=None)
    p.add_argument("--split", default="test", choices=["train", "test"])
    s = p.add_argument_group("smoothing")
    s.add_argument("--n0", type=int, default=100, help="selection samples (default 100)")
    s.add_argument("--n", type=int, default=100_000, help="estimation samples (default 100000)")
    s.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    s.add_argument("--batch", type=int, default=1000, help="noise samples per forward pass (default 1000)")
    s.add_argument("--predict", action="store_true", help="run PREDICT (n samples, two-sided binomial test)")
    s.add_argument("--sequential", action="store_true",
                   help="stop each example once settled (radius >= --max-radius, or cannot reach 1/2); "
                        "same alpha guarantee, far fewer samples")
    s.add_argument("--seq-start", type=int, default=1000, help="first look of sequential mode (default 1000)")
    s.add_argument("--anytime", action="store_true",
                   help="confidence-sequence mode: stop each example once its certificate at every table radius "
                        "is decided (n is the cap); same alpha guarantee at every sample count")
    s.add_argument("--precision", type=float, default=None,
                   help="with --anytime: also pin each radius down to this many L2 units")
    s.add_argument("--bound", default="cp", choices=["cp", "randomized"],
                   help="exact mode's lower bound: Clopper-Pearson (default) or randomized Clopper-Pearson "
                        "(exact coverage 1 - alpha, never looser; seeded per example)")
    s.add_argument("--max-radius", type=float, default=None,
                   help="largest reported radius (curve and table; sequential stop radius); default 4 x max sigma")
    s.add_argument("--autocast", default="none", choices=["none", "bf16", "fp16"],
                   help="run the base model under CUDA autocast (a different base classifier; still valid)")
    add_execution_args(p, shard_size=100)
    p.add_argument("--out", default=None,
                   help="run directory (default runs/certify-<first model name>-sigma<sigmas>[-sequential])")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    from bastion.checkpoints import read_card
    from bastion.errors import ConfigError
    from certify.runner import Setting

    models, sigmas = list(args.model), [float(s) for s in args.sigma]
    if len(models) == 1:
        pairs = [(models[0], s) for s in sigmas]
    elif len(sigmas) == 1:
        pairs = [(m, sigmas[0]) for m in models]
    elif len(models) == len(sigmas):
        pairs = list(zip(models, sigmas))
    else:
        raise ConfigError(f"{len(models)} models and {len(sigmas)} sigmas: give one model, one sigma, "
                          f"or one sigma per model")
    cards = {m: read_card(m) for m in models}
    stems = [Path(m).with_suffix("").name for m in models]
    if len(set(stems)) != len(stems):
        stems = [f"m{k}" for k in range(len(models))]
    stem = dict(zip(models, stems))
    settings = []
    for m, s in pairs:
        name = f"sigma{s:g}" if len(models) == 1 else f"{stem[m]}-sigma{s:g}"
        settings.append(Setting(name, m, s, cards[m]["num_classes"]))
    return settings, cards


def default_out_dir(args: argparse.Namespace) -> str:
    """runs/<task>-<first model>-sigma<s1>_<s2>[-sequential]: runs that differ in what they compute
    do not collide on the default."""
    sig = "_".join(f"{float(s):g}" for s in args.sigma)
    task = "predict" if args.predict else "certify"
    mode = ("-sequential" if args.sequential else "") + ("-anytime" if getattr(args, "anytime", False) else "") + (
        "-randomized" if getattr(args, "bound", "cp") == "randomized" else "")
    return f"runs/{task}-{model_label(args.model[0])}-sigma{sig}{mode}"


def run(args: argparse.Namespace) -> int:
    from bastion.errors import ConfigError
    from certify.runner import CertifyOptions, run_certification

    settings, cards = settings_from_args(args)
    first = next(iter(cards.values()))
    shapes = {tuple(c["input_shape"]) for c in cards.values()}
    if len(shapes) > 1:
        raise ConfigError(f"the models take different input shapes {sorted(shapes)}; certify them separately")
    data = data_from_args(args, args.split, dataset=args.dataset or first.get("dataset") or "digits",
                          image_size=first["input_shape"][-1])
    for m, card in cards.items():
        check_data_fits(data, card, f"model {m!r}")
    opts = CertifyOptions(n0=args.n0, n=args.n, alpha=args.alpha, batch=args.batch, seed=args.seed,
                          task="predict" if args.predict else "certify", sequential=args.sequential,
                          seq_start=args.seq_start, max_radius=args.max_radius, anytime=args.anytime,
                          precision=args.precision, bound=args.bound,
                          autocast=None if args.autocast == "none" else args.autocast,
                          shard_size=args.shard_size, device=args.device)
    if opts.autocast and not str(args.device).startswith("cuda"):
        raise ConfigError("--autocast needs a CUDA device (--device cuda)")
    out = Path(args.out or default_out_dir(args))
    config = run_config(args, drop=EXECUTION_ONLY) | {"model_sha256": [c.get("sha256") for c in cards.values()]}
    doc = run_certification(settings, data, out, opts, config=config, backend=args.backend, workers=args.workers,
                            threads=args.threads, address=args.address, retries=args.retries,
                            num_gpus=args.num_gpus, quiet=args.quiet)
    if not args.quiet:
        d = doc["sections"][0]["data"]
        for s in d["settings"]:
            if opts.task == "predict":
                print(f"{s['name']}: accuracy {100 * s['accuracy']:.1f}%, abstained {100 * s['abstention_rate']:.1f}% "
                      f"({s['num_examples']} examples)")
            else:
                table = ", ".join(f"r={r:g}: {100 * a:.1f}%" for r, a in zip(s["radii"], s["certified_accuracy"]))
                print(f"{s['name']}: {table} | abstained {100 * s['abstention_rate']:.1f}%, ACR {s['acr']:.3f}, "
                      f"{s['mean_time_s'] or 0:.3f} s/example ({s['num_examples']} examples)")
        print(f"logs and report in {out} (report.html)")
    return 0

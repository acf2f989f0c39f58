"""``bastion leaderboard CONFIG.toml``: entries x threat models, RobustBench JSON and a static site."""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.common import add_command
from experiments.execution import add_execution_args, run_options

HELP = """examples:
  bastion leaderboard experiments/configs/leaderboard_digits.toml
  bastion leaderboard experiments/configs/leaderboard_digits.toml --workers 2 --out runs/lb
  bastion leaderboard CONFIG.toml --backend ray --address auto

Each entry's defense kind picks its attacks (plain: AutoAttack; randomized: AutoAttack rand / EOT;
smoothed: SmoothAdv + EOT-APGD + CERTIFY; mixed: the adaptive composite suite). A killed run
resumes when the same command is run again. Outputs: OUT/model_info/<dataset>/<Linf|L2>/<entry>.json
(RobustBench format, numbers as numbers), OUT/leaderboard.json, OUT/site/index.html."""


def register(sub, common) -> None:
    p = add_command(sub, common, "leaderboard", help="evaluate many entries x threat models; RobustBench JSON + site",
                    description="Train the config's [train.*] steps, evaluate every entry under every threat model "
                                "with the attacks its defense needs (one resumable evaluator run each), write one "
                                "RobustBench-format JSON per entry and threat model, and a static HTML site.",
                    epilog=HELP)
    p.add_argument("config", help="leaderboard TOML (see experiments/configs/leaderboard_*.toml)")
    add_execution_args(p, shard_size=256)
    p.add_argument("--out", default=None, help="output folder (default runs/leaderboard-<name>)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.leaderboard import read_config, run_leaderboard

    cfg = read_config(args.config)
    if args.seed:
        raise_seed(cfg, args.seed)
    out = Path(args.out or f"runs/leaderboard-{cfg.name}")
    ex = run_options(args)
    board = run_leaderboard(cfg, out, ex, log=(lambda m: None) if args.quiet else print)
    if not args.quiet:
        for r in board["entries"]:
            b = r["bastion"]
            cert = f", certified {b['certified']['certified_acc']:.2f}%" if b.get("certified") else ""
            print(f"{r['name']:<20} {b['norm'] + ':' + r['eps']:<10} clean {r['clean_acc']:6.2f}%  robust "
                  f"{r['autoattack_acc']:6.2f}%{cert}  ({', '.join(b['attacks'])})")
        print(f"site: {out / 'site' / 'index.html'}")
    return 0


def raise_seed(cfg, seed: int) -> None:
    from bastion.errors import ConfigError

    if seed != cfg.seed:
        raise ConfigError(f"--seed {seed}: a leaderboard's seed is part of its config; set seed = {seed} in "
                          f"the TOML file instead")

"""The execution options of every command that runs probes (evaluate, certify, ...): where and
how the run loop computes, never what it computes."""

from __future__ import annotations

import argparse
from typing import Any

# options that change how a run executes but not its results (left out of the run's config stamp)
EXECUTION_ONLY = ("backend", "workers", "threads", "address", "retries", "num_gpus", "shard_size", "out")


def add_execution_args(p: argparse.ArgumentParser, shard_size: int) -> None:
    """--backend, --workers, --address, --shard-size, --retries, --num-gpus (``--threads``, torch
    threads per process, is a common option of every command)."""
    x = p.add_argument_group("execution (does not change results)")
    x.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local: this process or --workers local processes; ray: Ray tasks (default local)")
    x.add_argument("--workers", type=int, default=1, help="local worker processes (default 1: in-process)")
    x.add_argument("--address", default=None, help="Ray cluster address, e.g. auto (default: start a local Ray)")
    x.add_argument("--shard-size", type=int, default=shard_size,
                   help=f"examples per task (default {shard_size}; records are the same for any shard size)")
    x.add_argument("--retries", type=int, default=2, help="retries of a failed task (default 2)")
    x.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per Ray task (fractions allowed; default 0)")


def run_options(args: argparse.Namespace, **overrides: Any):
    """`bastion.runner.RunOptions` from the parsed execution options."""
    from bastion.runner import RunOptions

    kw: dict[str, Any] = dict(seed=args.seed, device=args.device, quiet=args.quiet, backend=args.backend,
                              workers=args.workers, threads=args.threads, address=args.address,
                              retries=args.retries, num_gpus=args.num_gpus, shard_size=args.shard_size)
    return RunOptions(**(kw | overrides))

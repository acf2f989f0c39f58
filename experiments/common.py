"""Option groups and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bastion.data import DATASETS, ImageDataset, load_dataset


def add_command(sub, common: argparse.ArgumentParser, name: str, *, help: str, description: str,
                epilog: str) -> argparse.ArgumentParser:
    """One ``bastion NAME`` subcommand with the common options and a verbatim examples epilog."""
    return sub.add_parser(name, parents=[common], help=help, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def add_data_args(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=default,
                   help=f"data set name ({', '.join(DATASETS)}); default {default}")
    g.add_argument("--data-root", default=None,
                   help="folder with the data set's files (mnist, cifar10/100, imagefolder)")
    g.add_argument("--image-size", type=int, default=None, help="resize images to SIZE x SIZE")
    g.add_argument("--max", dest="max_examples", type=int, default=None, help="use at most N examples")
    g.add_argument("--skip", type=int, default=1, help="use every SKIP-th example (default 1)")


def data_from_args(args: argparse.Namespace, split: str, dataset: str | None = None,
                   image_size: int | None = None) -> ImageDataset:
    name = dataset or args.dataset
    size = args.image_size if args.image_size is not None else image_size
    ds = load_dataset(name, split, args.data_root, image_size=size, seed=getattr(args, "data_seed", 0))
    if args.skip != 1 or args.max_examples is not None:
        ds = ds.every(args.skip, args.max_examples)
    return ds


def run_config(args: argparse.Namespace, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The options that define a run (for the run directory's config stamp)."""
    skip = {"func", "quiet", "device", "command", "config", *drop}
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip and v is not None}


def default_out(kind: str, name: str) -> Path:
    return Path("runs") / f"{kind}-{name}"

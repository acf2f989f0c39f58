"""Option groups, argument types and helpers shared by the subcommands.

Nothing here imports torch at module level: building the parser (``bastion --help``) must stay
fast, so help texts that come from registries are `LazyText` and heavy imports sit inside the
functions that run a command."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.errors import BastionError, ConfigError, DataError

if TYPE_CHECKING:
    from bastion.data import ImageDataset
    from bastion.records import RunDir

# options that change how a run executes, not its results: never part of a run's config digest
EXECUTION_ONLY = ("func", "command", "config", "callbacks", "quiet", "device", "threads", "workers", "backend",
                  "address", "retries", "num_gpus", "shard_size", "out")


class LazyText:
    """Help text computed when help is printed (e.g. a registry listing that needs torch)."""

    def __init__(self, make: Callable[[], str]):
        self._make = make

    def __str__(self) -> str:
        return self._make()

    def strip(self) -> str:
        return str(self).strip()

    def __mod__(self, params: Any) -> str:
        return str(self) % params

    def __contains__(self, item: str) -> bool:
        return item in str(self)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Verbatim epilogs (examples) and `LazyText` help strings."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return str(action.help) if action.help is not None else ""


def add_command(sub, common: argparse.ArgumentParser, name: str, *, help: str, description: str,
                epilog: str) -> argparse.ArgumentParser:
    """One ``bastion NAME`` subcommand with the common options and a verbatim examples epilog.

    A command may redefine a common option (``conflict_handler="resolve"``): its own wins."""
    return sub.add_parser(name, parents=[common], help=help, description=description, epilog=epilog,
                          formatter_class=HelpFormatter, conflict_handler="resolve")


# --- argument types (argparse calls them on strings; TOML values are checked first) -------------

def _number(text: str, kind: type) -> Any:
    try:
        return kind(str(text).strip())
    except ValueError:
        word = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {word}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    v = _number(text, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {text!r}")
    return v


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    v = _number(text, int)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return v


def finite_float(text: str) -> float:
    """Any finite number (no nan, no inf)."""
    v = _number(text, float)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    v = finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0."""
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def eps_text(text: str) -> str:
    """An epsilon (or comma-separated list of them) such as ``8/255`` or ``0.1,0.2``; kept as text."""
    from bastion.threat import parse_eps

    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise argparse.ArgumentTypeError("is empty; give a radius such as 0.1 or 8/255")
    for p in parts:
        if not p:
            raise argparse.ArgumentTypeError(f"has an empty item in {text!r}")
        try:
            parse_eps(p)
        except BastionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return str(text).strip()


# --- threads ---------------------------------------------------------------------------------

def physical_cores() -> int:
    """Physical CPU cores available to this process (logical CPUs when the topology is unknown)."""
    try:
        logical = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        logical = os.cpu_count() or 1
    try:
        text = Path("/proc/cpuinfo").read_text()
        cores = {(b.get("physical id"), b.get("core id"))
                 for b in (dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
                           for block in text.split("\n\n")) if b.get("core id") is not None}
        if cores:
            return max(1, min(logical, len(cores)))
    except OSError:
        pass
    return max(1, logical)


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when set; else physical cores minus the 1-minute load average (rounded),
    at least 1.

    Torch's own default (one thread per core) collapses when other work already uses the cores
    (the quickstart's robustness section took 224 s instead of 41 s at a load average of 3); a
    thread per idle core keeps a busy machine from thrashing."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, physical_cores() - round(load))


def apply_threads(n: int | None) -> int:
    """Set torch's intra-op threads: ``n``, or `default_threads()` when None; returns the count."""
    import torch

    n = n or default_threads()
    torch.set_num_threads(n)
    return n


def add_threads_arg(g: argparse._ActionsContainer) -> None:
    g.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch CPU threads (default: $OMP_NUM_THREADS if set, else physical cores minus "
                        "the current load average, at least 1)")


# --- data --------------------------------------------------------------------------------------

def _dataset_help(default: str | None) -> LazyText:
    def text() -> str:
        from bastion.data import DATASETS

        tail = f"default {default}" if default else "default: the data set named in the model card"
        return f"data set name ({', '.join(DATASETS)}); {tail}"
    return LazyText(text)


def add_data_args(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=default, help=_dataset_help(default))
    g.add_argument("--data-root", default=None,
                   help="folder with the data set's files (mnist, cifar10/100, imagefolder)")
    g.add_argument("--image-size", type=positive_int, default=None, metavar="SIZE",
                   help="resize images to SIZE x SIZE (default: the data set's own size)")
    g.add_argument("--max", dest="max_examples", type=positive_int, default=None, metavar="N",
                   help="use at most N examples (default: all)")
    g.add_argument("--skip", type=positive_int, default=1, help="use every SKIP-th example (default 1)")


def data_from_args(args: argparse.Namespace, split: str, dataset: str | None = None,
                   image_size: int | None = None) -> ImageDataset:
    """The data set the options name; unreadable or hostile files are a `DataError`."""
    from PIL import Image

    from bastion.data import load_dataset

    name = dataset or args.dataset
    size = args.image_size if args.image_size is not None else image_size
    try:
        ds = load_dataset(name, split, args.data_root, image_size=size, seed=getattr(args, "data_seed", 0))
    except Image.DecompressionBombError as exc:
        raise DataError(f"refusing a decompression-bomb image in {args.data_root!r}: {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot read data set {name!r}: {exc}") from None
    if args.skip != 1 or args.max_examples is not None:
        ds = ds.every(args.skip, args.max_examples)
    return ds


def check_data_fits(data: ImageDataset, card: dict[str, Any], what: str) -> None:
    """The data must match what the model card says the model takes (before any work)."""
    shape = tuple(int(v) for v in card.get("input_shape") or ())
    if shape and tuple(data.input_shape) != shape:
        raise DataError(f"{what} takes inputs of shape {list(shape)} (channels, height, width) but the data "
                        f"set {data.name!r} has {list(data.input_shape)}; use data like the model's "
                        f"(--image-size, a {shape[0]}-channel data set)")
    k = card.get("num_classes")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise DataError(f"{what}: the model card's num_classes is {k!r}, not a positive integer")
    names = card.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != k):
        raise DataError(f"{what}: the model card lists {len(names) if isinstance(names, list) else names!r} "
                        f"class names for {k} classes")
    if data.num_classes > k:
        raise DataError(f"{what} has {k} classes but the data set {data.name!r} has {data.num_classes}")


# --- run directories ---------------------------------------------------------------------------

def run_config(args: argparse.Namespace, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The options that determine a run's results (the run directory's config stamp).

    Where the run lives (``out``) and how it executes (threads, workers, device, ...) are left
    out, so a run directory reopened by another path, or moved, resumes."""
    skip = {*EXECUTION_ONLY, *drop}
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip and v is not None}


def check_out(path: str | Path) -> Path:
    """Check that ``path`` can be (or is) a run directory without creating anything."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {str(p)!r} is a file, not a directory; name a directory")
    parent = p
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {str(p)!r}: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {str(p)!r}: {str(parent)!r} is not writable; choose another --out")
    return p


def open_run_dir(path: str | Path, config: dict[str, Any]) -> RunDir:
    """`RunDir` (created or reopened) with file-system errors as one-line `ConfigError`s."""
    from bastion.records import RunDir

    try:
        return RunDir(path, config)
    except OSError as exc:
        raise ConfigError(f"cannot create run directory {str(path)!r}: {exc.strerror or exc}") from None


def model_label(path: str | Path) -> str:
    """A short name of a checkpoint for default run directories: its stem, or its folder's name
    when the stem says nothing (``runs/gauss/model.safetensors`` -> ``gauss``)."""
    p = Path(path).with_suffix("")
    if p.name in ("model", "last", "best", "checkpoint") and p.parent.name not in ("", ".", "checkpoints"):
        return p.parent.name
    if p.name in ("last", "best") and p.parent.name == "checkpoints" and p.parent.parent.name:
        return f"{p.parent.parent.name}-{p.name}"
    return p.name


def default_out(kind: str, name: str) -> Path:
    return Path("runs") / f"{kind}-{name}"


# --- registry listings for help texts (computed when help is printed) --------------------------

def objective_names() -> list[str]:
    """Registered training objectives (plugins included)."""
    import experiments.plugins  # noqa: F401  (registers the objectives of defenses/)
    from bastion import train

    lister = getattr(train, "list_objectives", None)
    return sorted(lister() if lister is not None else train.OBJECTIVES)


def attack_names() -> list[str]:
    """Registered attacks (prefix families as ``prefix:<Name>``)."""
    from attacks import list_attacks

    return list_attacks()


def objectives_help(head: str) -> LazyText:
    return LazyText(lambda: f"{head}: {', '.join(objective_names())}")


def attacks_help(head: str) -> LazyText:
    return LazyText(lambda: f"{head}: {', '.join(attack_names())}")

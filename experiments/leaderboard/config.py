"""Leaderboard configs (TOML): a data set, threat models, a protocol, optional training steps and
the entries.

    name = "digits"
    dataset = "digits"
    threats = ["linf:0.1", "l2:0.5"]          # one RobustBench entry per (entry, threat model)
    curve_eps = { linf = [0.05, 0.1, 0.15] }   # extra radii for the robust-accuracy-vs-eps curve
    protocol = "standard"                      # standard (AutoAttack + adaptive) | fast (APGD, few steps)
    published = "robustbench/model_info"       # RobustBench JSON shown beside local rows (optional)

    [train.pgd]                                # a `bastion train` step (its options); made once, resumable
    objective = "pgd"
    eps = "0.1"

    [[entry]]
    name = "pgd-at"
    train = "pgd"                              # or checkpoint = "path/model.safetensors"
    defense = "plain"                          # plain | randomized | smoothed | mixed | detector
    detector = { kind = "mahalanobis", fpr = 0.05 }   # defense "detector" only (experiments.leaderboard.detector)

Relative paths (``checkpoint``, ``published``, ``data_root``) are read relative to the config
file's folder, never the working directory. Unknown keys are a one-line `ConfigError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion.errors import ConfigError
from bastion.threat import ThreatModel, parse_eps

TOP_KEYS = ("name", "description", "dataset", "data_root", "image_size", "split", "max", "skip", "threats",
            "curve_eps", "protocol", "steps", "batch_size", "seed", "published", "train", "entry")
ENTRY_KEYS = ("name", "train", "checkpoint", "defense", "sigma", "num_noise", "eot_iter", "certify", "link",
              "authors", "venue", "architecture", "additional_data", "footnote", "reported", "detector")
META_KEYS = ("link", "authors", "venue", "architecture", "additional_data", "footnote", "reported")
CERTIFY_KEYS = ("n0", "n", "alpha", "batch")
PROTOCOLS = ("standard", "fast")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclass(frozen=True)
class Entry:
    """One leaderboard row: a model (``checkpoint`` or the checkpoint a ``train`` step makes) and
    the defense kind that says how it is attacked (see `experiments.leaderboard.defenses`)."""

    name: str
    defense: str = "plain"
    checkpoint: str | None = None
    train: str | None = None
    sigma: float | None = None
    num_noise: int = 32
    eot_iter: int = 20
    certify: dict[str, Any] = field(default_factory=dict)
    detector: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LeaderboardConfig:
    name: str
    dataset: str
    threats: tuple[ThreatModel, ...]
    entries: tuple[Entry, ...]
    base: Path                                  # the config file's folder (relative paths)
    description: str = ""
    data_root: str | None = None
    image_size: int | None = None
    split: str = "test"
    max: int | None = None
    skip: int = 1
    curve_eps: dict[str, tuple[float, ...]] = field(default_factory=dict)
    protocol: str = "standard"
    steps: int | None = None
    batch_size: int = 256
    seed: int = 0
    published: str | None = None
    train: dict[str, dict[str, Any]] = field(default_factory=dict)

    def path(self, p: str | None) -> Path | None:
        """A path of the config, relative to its folder unless absolute."""
        if p is None:
            return None
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base / q

    def eval_config(self) -> dict[str, Any]:
        """What determines every entry's records besides its model (stamped in each run dir)."""
        return {"dataset": self.dataset, "split": self.split, "max": self.max, "skip": self.skip,
                "image_size": self.image_size, "protocol": self.protocol, "steps": self.steps,
                "batch_size": self.batch_size, "seed": self.seed}


def _check_keys(table: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; known keys: {', '.join(known)}")


def _typed(value: Any, kind: type | tuple[type, ...], key: str, where: str) -> Any:
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"key {key!r} in {where} has the wrong type: {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"key {key!r} in {where} has the wrong type: {value!r}")
    return value


def _entry(raw: Any, k: int, train: dict[str, Any], where: str) -> Entry:
    w = f"[[entry]] #{k + 1} of {where}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{w} is not a table")
    _check_keys(raw, ENTRY_KEYS, w)
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{w} needs a name of letters, digits and _.+- (got {name!r})")
    if ("train" in raw) == ("checkpoint" in raw):
        raise ConfigError(f"entry {name!r} in {where} needs exactly one of 'train' (a [train.NAME] step) or "
                          f"'checkpoint' (a path)")
    if "train" in raw and raw["train"] not in train:
        raise ConfigError(f"entry {name!r} in {where} names train step {raw['train']!r}, which is not a "
                          f"[train.*] table (have {sorted(train)})")
    sigma = raw.get("sigma")
    if sigma is not None:
        _typed(sigma, (int, float), "sigma", w)
        if sigma <= 0:
            raise ConfigError(f"entry {name!r}: sigma must be > 0, got {sigma}")
    certify = dict(_typed(raw.get("certify", {}), dict, "certify", w))
    _check_keys(certify, CERTIFY_KEYS, f"the certify table of entry {name!r}")
    meta = {k: raw[k] for k in META_KEYS if k in raw}
    if "additional_data" in meta:
        _typed(meta["additional_data"], bool, "additional_data", w)
    for key in ("num_noise", "eot_iter"):
        if key in raw and (_typed(raw[key], int, key, w) < 1):
            raise ConfigError(f"entry {name!r}: {key} must be >= 1")
    return Entry(name=name, defense=str(raw.get("defense", "plain")), checkpoint=raw.get("checkpoint"),
                 train=raw.get("train"), sigma=float(sigma) if sigma is not None else None,
                 num_noise=int(raw.get("num_noise", 32)), eot_iter=int(raw.get("eot_iter", 20)),
                 certify=certify, detector=dict(_typed(raw.get("detector", {}), dict, "detector", w)), meta=meta)


def parse_config(cfg: dict[str, Any], where: str, base: Path) -> LeaderboardConfig:
    """A checked `LeaderboardConfig` from a parsed TOML table."""
    _check_keys(cfg, TOP_KEYS, where)
    for key in ("name", "dataset", "threats", "entry"):
        if key not in cfg:
            raise ConfigError(f"leaderboard config {where} lacks the key {key!r}")
    name = _typed(cfg["name"], str, "name", where)
    if not _NAME.fullmatch(name):
        raise ConfigError(f"leaderboard name {name!r} in {where}: use letters, digits and _.+-")
    threats_raw = cfg["threats"] if isinstance(cfg["threats"], list) else [cfg["threats"]]
    if not threats_raw:
        raise ConfigError(f"'threats' in {where} is empty; give e.g. [\"linf:8/255\"]")
    threats = tuple(ThreatModel.parse(str(t)) for t in threats_raw)
    if len({str(t) for t in threats}) != len(threats):
        raise ConfigError(f"'threats' in {where} lists a threat model twice")
    curve = {}
    for norm, values in _typed(cfg.get("curve_eps", {}), dict, "curve_eps", where).items():
        if norm not in {t.norm for t in threats}:
            raise ConfigError(f"curve_eps.{norm} in {where}: no threat model of norm {norm!r} in 'threats'")
        curve[norm] = tuple(sorted({parse_eps(v) for v in _typed(values, list, f"curve_eps.{norm}", where)}))
    protocol = cfg.get("protocol", "standard")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol {protocol!r} in {where}: use one of {', '.join(PROTOCOLS)}")
    train = _typed(cfg.get("train", {}), dict, "train", where)
    for tname, t in train.items():
        if not isinstance(t, dict):
            raise ConfigError(f"[train.{tname}] in {where} is not a table of `bastion train` options")
        if "out" in t:
            raise ConfigError(f"[train.{tname}] in {where}: drop 'out' (train steps live in OUT/train/{tname})")
    entries_raw = cfg["entry"] if isinstance(cfg["entry"], list) else [cfg["entry"]]
    entries = tuple(_entry(e, k, train, where) for k, e in enumerate(entries_raw))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"entry names in {where} must be unique, got {names}")
    for key in ("max", "steps", "image_size", "batch_size", "skip"):
        if key in cfg and (_typed(cfg[key], int, key, where) < 1):
            raise ConfigError(f"key {key!r} in {where} must be >= 1")
    return LeaderboardConfig(
        name=name, dataset=_typed(cfg["dataset"], str, "dataset", where), threats=threats, entries=entries, base=base,
        description=str(cfg.get("description", "")), data_root=cfg.get("data_root"),
        image_size=cfg.get("image_size"), split=str(cfg.get("split", "test")), max=cfg.get("max"),
        skip=int(cfg.get("skip", 1)), curve_eps=curve, protocol=protocol, steps=cfg.get("steps"),
        batch_size=int(cfg.get("batch_size", 256)), seed=int(_typed(cfg.get("seed", 0), int, "seed", where)),
        published=cfg.get("published"), train=train)


def read_config(path: str | Path) -> LeaderboardConfig:
    from experiments.config import read_toml

    p = Path(path)
    return parse_config(read_toml(p), repr(str(p)), p.resolve().parent)

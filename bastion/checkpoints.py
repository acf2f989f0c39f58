"""Checkpoints: safetensors weights plus a JSON model card; nothing is ever unpickled.

A checkpoint ``NAME`` is the pair ``NAME.safetensors`` + ``NAME.json``. The card records the
architecture and its arguments, classes, input shape, normalization, data set, training recipe
and seed, metrics, and the sha256 of the weights file, which is verified on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion.errors import CheckpointError, ModelError
from bastion.models import NormalizedModel, create_model

CARD_VERSION = 1
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+ / torch zip archive


def _paths(path: str | Path) -> tuple[Path, Path]:
    """NAME, NAME.safetensors or NAME.json -> (NAME.safetensors, NAME.json); dots inside NAME
    (``wrn.eps8``) are kept."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_card(model: NormalizedModel, arch: str, num_classes: int, input_shape: tuple[int, int, int],
              arch_kwargs: dict | None = None, class_names: list[str] | None = None,
              dataset: str | None = None, recipe: dict | None = None, seed: int | None = None,
              metrics: dict | None = None) -> dict[str, Any]:
    """Build a model card for a `NormalizedModel` made by `create_model`."""
    return {
        "card_version": CARD_VERSION,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "num_classes": int(num_classes),
        "input_shape": [int(s) for s in input_shape],
        "mean": model.normalize.mean.flatten().tolist(),
        "std": model.normalize.std.flatten().tolist(),
        "class_names": list(class_names) if class_names else [str(i) for i in range(num_classes)],
        "dataset": dataset,
        "recipe": dict(recipe or {}),
        "seed": seed,
        "metrics": dict(metrics or {}),
    }


def save_checkpoint(path: str | Path, model: nn.Module, card: dict[str, Any]) -> Path:
    """Write ``path.safetensors`` and ``path.json`` atomically; returns the weights path."""
    from safetensors.torch import save_file

    wpath, cpath = _paths(path)
    wpath.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = wpath.with_name(wpath.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "bastion_card_version": str(CARD_VERSION)})
    card = dict(card)
    card["sha256"] = sha256_file(tmp)
    os.replace(tmp, wpath)
    ctmp = cpath.with_name(cpath.name + ".tmp")
    ctmp.write_text(json.dumps(card, indent=2, sort_keys=True))
    os.replace(ctmp, cpath)
    return wpath


def read_card(path: str | Path) -> dict[str, Any]:
    """Read and validate the JSON card of a checkpoint."""
    wpath, cpath = _paths(path)
    if not cpath.is_file():
        raise CheckpointError(f"checkpoint card {str(cpath)!r} not found "
                              f"(a checkpoint is NAME.safetensors + NAME.json)")
    try:
        card = json.loads(cpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint card {str(cpath)!r} is not valid JSON: {exc}") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"checkpoint card {str(cpath)!r} must be a JSON object")
    missing = [k for k in ("arch", "num_classes", "input_shape", "mean", "std") if k not in card]
    if missing:
        raise CheckpointError(f"checkpoint card {str(cpath)!r} lacks {missing}")
    shape = card["input_shape"]
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise CheckpointError(f"checkpoint card {str(cpath)!r}: input_shape must be [C, H, W], got {shape!r}")
    if not isinstance(card.get("arch_kwargs", {}), dict):
        raise CheckpointError(f"checkpoint card {str(cpath)!r}: arch_kwargs must be an object")
    sha = card.get("sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        raise CheckpointError(f"checkpoint card {str(cpath)!r}: sha256 must be a 64-digit hex string")
    return card


def _refuse_pickle(p: Path) -> None:
    with open(p, "rb") as f:
        head = f.read(9)
    if head[:1] == _PICKLE_MAGIC[0] or head[:4] == _PICKLE_MAGIC[1]:
        raise CheckpointError(f"{str(p)!r} is a pickle/torch.save file, which Bastion never loads (it can run "
                              f"arbitrary code); convert it to safetensors first")
    if len(head) < 9 or head[8:9] != b"{":
        raise CheckpointError(f"{str(p)!r} is not a safetensors file (corrupt, truncated or another format); "
                              f"re-save it with bastion.checkpoints.save_checkpoint")


def load_state(path: str | Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict, refusing pickles and corrupt/truncated files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint weights {str(p)!r} not found")
    _refuse_pickle(p)
    if expected_sha256 is not None and sha256_file(p) != expected_sha256:
        raise CheckpointError(f"checkpoint weights {str(p)!r} do not match the sha256 in their card "
                              f"(corrupt, truncated or replaced)")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"checkpoint weights {str(p)!r} are corrupt or not safetensors: {exc}; "
                              f"re-save or re-download the checkpoint") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[NormalizedModel, dict]:
    """Rebuild the model described by the card and load its weights. Returns (model in eval mode, card)."""
    given = Path(path)
    if given.is_file() and given.suffix not in (".safetensors", ".json"):
        _refuse_pickle(given)
        raise CheckpointError(f"{str(given)!r} is not a Bastion checkpoint: pass NAME or NAME.safetensors "
                              f"(with NAME.json next to it)")
    wpath, _ = _paths(path)
    card = read_card(path)
    state = load_state(wpath, card.get("sha256"))
    c, h, _w = card["input_shape"]
    try:
        model = create_model(card["arch"], card["num_classes"], c, h, card["mean"], card["std"],
                             **card.get("arch_kwargs", {}))
    except ModelError as exc:
        raise CheckpointError(f"checkpoint card {str(path)!r} describes a model that cannot be built: "
                              f"{exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "mismatch"
        raise CheckpointError(f"weights in {str(wpath)!r} do not match the card's architecture "
                              f"{card['arch']!r}: {first}") from None
    return model.to(device).eval(), card

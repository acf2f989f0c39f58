"""Checkpoints: safetensors weights plus a JSON model card; nothing is ever unpickled.

A checkpoint ``NAME`` is the pair ``NAME.safetensors`` + ``NAME.json``. The card records the
architecture and its arguments, classes, input shape, normalization, data set, training recipe
and seed, metrics, and the sha256 of the weights file, which is verified on load.

A card whose ``arch`` is null (written by `bastion.train.fit` for a model it could not name)
loads only into a module the caller builds: ``load_checkpoint(path, model=...)``.

A *composite* checkpoint describes one model assembled from parts (two bases + a mixing
network, a denoiser + a classifier, an encoder + a head): every part is its own checkpoint
``NAME.<part>.safetensors`` + ``NAME.<part>.json``, and the card ``NAME.json`` names a registered
composite builder, its JSON arguments and the sha256 of every part (see `save_composite`).

Files are byte-reproducible: the same tensors and card give the same bytes in any process
(safetensors metadata and card keys are written in sorted order).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion.errors import CheckpointError, ModelError
from bastion.models import NormalizedModel, create_model

CARD_VERSION = 1
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+ / torch zip archive
_PART_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


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


# ---------------------------------------------------------------------------------------------
# Byte-reproducible writing
# ---------------------------------------------------------------------------------------------

def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors encoding of ``tensors`` with ``metadata`` in sorted key order.

    The safetensors library writes its metadata map in a per-process random order; this writes
    the library's own (deterministic) tensor layout and re-encodes the header with sorted
    metadata, so identical tensors give identical bytes in every process."""
    from safetensors.torch import save

    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError("safetensors metadata must map strings to strings")
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    raw = save(cpu)  # no metadata: deterministic
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    if metadata:
        header = {"__metadata__": dict(sorted(metadata.items())), **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as the library does
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Atomically write ``tensors`` (+ ``metadata``) as a byte-reproducible safetensors file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(safetensors_bytes(tensors, metadata))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Single checkpoints
# ---------------------------------------------------------------------------------------------

def make_card(model: NormalizedModel, arch: str | None, num_classes: int, input_shape: tuple[int, int, int],
              arch_kwargs: dict | None = None, class_names: list[str] | None = None,
              dataset: str | None = None, recipe: dict | None = None, seed: int | None = None,
              metrics: dict | None = None) -> dict[str, Any]:
    """Build a model card for a `NormalizedModel` made by `create_model`.

    ``arch=None`` writes an architecture-less card (mean/std null unless the model has a
    ``normalize`` layer): it loads only with ``load_checkpoint(path, model=...)``."""
    norm = getattr(model, "normalize", None)
    mean = norm.mean.flatten().tolist() if norm is not None else None
    std = norm.std.flatten().tolist() if norm is not None else None
    return {
        "card_version": CARD_VERSION,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "num_classes": int(num_classes),
        "input_shape": [int(s) for s in input_shape],
        "mean": mean,
        "std": std,
        "class_names": list(class_names) if class_names else [str(i) for i in range(num_classes)],
        "dataset": dataset,
        "recipe": dict(recipe or {}),
        "seed": seed,
        "metrics": dict(metrics or {}),
    }


def save_checkpoint(path: str | Path, model: nn.Module, card: dict[str, Any]) -> Path:
    """Write ``path.safetensors`` and ``path.json`` atomically; returns the weights path.

    Both files are byte-reproducible (sorted metadata, card JSON with sorted keys)."""
    wpath, cpath = _paths(path)
    wpath.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(wpath, model.state_dict(), {"format": "pt", "bastion_card_version": str(CARD_VERSION)})
    card = dict(card)
    card["sha256"] = sha256_file(wpath)
    try:
        _write_json(cpath, card)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"model card for {str(cpath)!r} is not JSON-serializable: {exc}") from None
    return wpath


def _read_json_card(cpath: Path) -> dict[str, Any]:
    if not cpath.is_file():
        raise CheckpointError(f"checkpoint card {str(cpath)!r} not found "
                              f"(a checkpoint is NAME.safetensors + NAME.json)")
    try:
        card = json.loads(cpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint card {str(cpath)!r} is not valid JSON: {exc}") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"checkpoint card {str(cpath)!r} must be a JSON object")
    sha = card.get("sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise CheckpointError(f"checkpoint card {str(cpath)!r}: sha256 must be a 64-digit hex string")
    return card


def read_card(path: str | Path) -> dict[str, Any]:
    """Read and validate the JSON card of a checkpoint (plain or composite)."""
    _, cpath = _paths(path)
    card = _read_json_card(cpath)
    required = ["num_classes", "input_shape"] if "composite" in card else \
        ["arch", "num_classes", "input_shape", "mean", "std"]
    missing = [k for k in required if k not in card]
    if missing:
        raise CheckpointError(f"checkpoint card {str(cpath)!r} lacks {missing}")
    shape = card["input_shape"]
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise CheckpointError(f"checkpoint card {str(cpath)!r}: input_shape must be [C, H, W], got {shape!r}")
    if not isinstance(card.get("arch_kwargs", {}), dict):
        raise CheckpointError(f"checkpoint card {str(cpath)!r}: arch_kwargs must be an object")
    if card.get("arch") is not None and not isinstance(card["arch"], str):
        raise CheckpointError(f"checkpoint card {str(cpath)!r}: arch must be a string or null")
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


def _check_shapes(module: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Same keys and shapes as ``module.state_dict()``, else a one-line `CheckpointError`."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"{where}: weights do not fit the module ({what})")
    for k, v in own.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise CheckpointError(f"{where}: {k!r} has shape {tuple(state[k].shape)}, the module expects "
                                  f"{tuple(v.shape)}")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model described by the card and load its weights. Returns (model in eval mode, card).

    ``model``: load the weights into this module instead of building one from the card (needed
    for a card without ``arch``). A composite card is assembled by its registered builder."""
    given = Path(path)
    if given.is_file() and given.suffix not in (".safetensors", ".json"):
        _refuse_pickle(given)
        raise CheckpointError(f"{str(given)!r} is not a Bastion checkpoint: pass NAME or NAME.safetensors "
                              f"(with NAME.json next to it)")
    wpath, _ = _paths(path)
    card = read_card(path)
    if "composite" in card:
        return _load_composite(path, card, device), card
    if model is None and card["arch"] is None:
        raise CheckpointError(f"checkpoint {str(path)!r} does not record its architecture (written by fit "
                              f"without a model card or arch); load it with load_checkpoint(path, "
                              f"model=create_model(...)) or retrain with fit(..., arch=NAME)")
    state = load_state(wpath, card.get("sha256"))
    if model is None:
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


# ---------------------------------------------------------------------------------------------
# Composite checkpoints
# ---------------------------------------------------------------------------------------------

_COMPOSITES: dict[str, Callable[..., nn.Module]] = {}


def register_composite(name: str, fn: Callable[..., nn.Module]) -> None:
    """Register a composite builder: ``fn(**args) -> nn.Module`` whose parts are submodules.

    The builder only builds the structure (any initialization); `load_checkpoint` then loads each
    part's weights into ``module.get_submodule(part)``. ``args`` must be JSON values."""
    if name in _COMPOSITES and _COMPOSITES[name] is not fn:
        raise CheckpointError(f"composite builder {name!r} is registered twice")
    _COMPOSITES[name] = fn


def list_composites() -> list[str]:
    """Registered composite builder names, sorted."""
    return sorted(_COMPOSITES)


def _build_composite(builder: str, args: dict[str, Any], where: str) -> nn.Module:
    if builder not in _COMPOSITES:
        from bastion.plugins import load_plugins

        load_plugins()  # the package that registers the builder (e.g. defenses.adaptive_smoothing)
    if builder not in _COMPOSITES:
        known = ", ".join(list_composites()) or "none registered"
        raise CheckpointError(f"{where}: unknown composite builder {builder!r} (registered: {known}); import "
                              f"the module that registers it")
    try:
        module = _COMPOSITES[builder](**args)
    except (TypeError, ValueError, ModelError) as exc:
        raise CheckpointError(f"{where}: composite builder {builder!r} cannot build from {args}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise CheckpointError(f"{where}: composite builder {builder!r} returned {type(module).__name__}, "
                              f"not an nn.Module")
    return module


def _part_module(module: nn.Module, part: str, where: str) -> nn.Module:
    try:
        return module.get_submodule(part)
    except AttributeError:
        raise CheckpointError(f"{where}: the assembled model has no submodule {part!r}") from None


def _check_coverage(module: nn.Module, parts: list[str], where: str) -> None:
    """Every weight of the composite must come from a part (none left at its initialization)."""
    uncovered = [k for k in module.state_dict() if not any(k.startswith(p + ".") for p in parts)]
    if uncovered:
        raise CheckpointError(f"{where}: weights {uncovered[:3]} of the assembled model belong to no part")


def _is_plain_name(name: str) -> bool:
    """A file name in the card's own folder (a tampered card must not point elsewhere)."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".") and "\0" not in name


def _composite_digest(shas: Mapping[str, str]) -> str:
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(shas.items())).encode()).hexdigest()


def save_composite(path: str | Path, builder: str, parts: Mapping[str, tuple[nn.Module, dict[str, Any] | None]],
                   args: dict[str, Any] | None = None, card: dict[str, Any] | None = None) -> Path:
    """Save a model built from parts: ``NAME.<part>.safetensors`` + ``.json`` per part, then ``NAME.json``.

    builder: a name given to `register_composite`; ``builder(**args)`` must rebuild the model with
    every part as a submodule (``parts`` keys are submodule paths) and no weights outside them.
    parts: part name -> (module, its own card or None). card: fields of the composite card
    (num_classes, input_shape, class_names, dataset, ...); num_classes / input_shape /
    class_names not given are taken from the first part card that has them. The composite card's
    ``sha256`` is a digest of the parts' sha256 values. Returns the path of ``NAME.json``."""
    args = dict(args or {})
    _, cpath = _paths(path)
    where = f"composite checkpoint {str(cpath)!r}"
    try:
        json.dumps(args, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: builder args must be JSON values: {exc}") from None
    if not parts:
        raise CheckpointError(f"{where}: needs at least one part")
    bad = [p for p in parts if not _PART_NAME.fullmatch(p)]
    if bad:
        raise CheckpointError(f"{where}: part names must be submodule paths like 'base_a' or 'bases.0', got {bad}")
    assembled = _build_composite(builder, args, where)
    for name, (module, _) in parts.items():
        _check_shapes(_part_module(assembled, name, where), module.state_dict(), f"{where}, part {name!r}")
    _check_coverage(assembled, list(parts), where)
    out = dict(card or {})
    stem = cpath.with_name(cpath.name[: -len(".json")])
    entries: dict[str, dict[str, str]] = {}
    for name, (module, part_card) in sorted(parts.items()):
        part_card = dict(part_card or {})
        for key in ("num_classes", "input_shape", "class_names"):
            if key not in out and key in part_card:
                out[key] = part_card[key]
        wpath = save_checkpoint(stem.with_name(f"{stem.name}.{name}"), module, part_card)
        entries[name] = {"file": wpath.name[: -len(".safetensors")], "sha256": sha256_file(wpath)}
    out["card_version"] = CARD_VERSION
    out["composite"] = {"builder": builder, "args": args, "parts": entries}
    out["sha256"] = _composite_digest({k: v["sha256"] for k, v in entries.items()})
    out.setdefault("arch", None)
    try:
        _write_json(cpath, out)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: card is not JSON-serializable: {exc}") from None
    return cpath


def _load_composite(path: str | Path, card: dict[str, Any], device: str | torch.device) -> nn.Module:
    _, cpath = _paths(path)
    where = f"composite checkpoint {str(cpath)!r}"
    spec = card["composite"]
    if not (isinstance(spec, dict) and isinstance(spec.get("builder"), str) and isinstance(spec.get("args", {}), dict)
            and isinstance(spec.get("parts"), dict) and spec["parts"]):
        raise CheckpointError(f"{where}: 'composite' must hold builder, args and a non-empty parts object")
    parts: dict[str, Any] = spec["parts"]
    for name, entry in parts.items():
        if not (_PART_NAME.fullmatch(str(name)) and isinstance(entry, dict)
                and isinstance(entry.get("file"), str) and _is_plain_name(entry["file"])
                and isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise CheckpointError(f"{where}: part {name!r} needs a file name in the card's folder and a sha256")
    if card.get("sha256") is not None and card["sha256"] != _composite_digest(
            {k: v["sha256"] for k, v in parts.items()}):
        raise CheckpointError(f"{where}: the parts' sha256 values do not match the card's sha256 (card edited)")
    module = _build_composite(spec["builder"], dict(spec.get("args", {})), where)
    _check_coverage(module, list(parts), where)
    for name, entry in sorted(parts.items()):
        part_where = f"{where}, part {name!r}"
        wpath, pcard_path = _paths(cpath.with_name(entry["file"]))
        try:
            pcard = _read_json_card(pcard_path)
            if pcard.get("sha256") != entry["sha256"]:
                raise CheckpointError(f"card {str(pcard_path)!r} names other weights than the composite card")
            state = load_state(wpath, entry["sha256"])
        except CheckpointError as exc:
            raise CheckpointError(f"{part_where}: {exc}") from None
        target = _part_module(module, name, where)
        _check_shapes(target, state, part_where)
        target.load_state_dict(state, strict=True)
    return module.to(device).eval()

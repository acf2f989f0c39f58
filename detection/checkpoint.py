"""Detector checkpoints: one safe format for every fitted detector (never pickle).

A detector ``NAME`` is the pair ``NAME.safetensors`` (its tensors) + ``NAME.json`` (its card):

    {"format": "bastion-detector", "card_version": 1, "detector": "mahalanobis" | "eps-deep" | ...,
     "name": ..., "threshold": ..., "center": ..., "scale": ..., "fpr": ...,
     "classifier": {"path": ..., "sha256": ...} | null,     # what the detector's layers belong to
     "score_model": {"path": ..., "levels": ...} | null,    # EPS detectors
     "state": {kind-specific JSON}, "sha256": <sha256 of NAME.safetensors>}

Both files are tamper-evident: the card holds the sha256 of the tensors file, and the tensors
file's safetensors metadata holds the digest of the card (every key but ``sha256``), so an edit
of either file (a changed threshold, swapped tensors, a truncated file) is refused on load with
a one-line `CheckpointError`. Paths inside the card are relative to the card's folder.

    save_detector(det, "runs/x/maha", classifier_path="runs/x/model.safetensors")
    det = load_detector("runs/x/maha")                 # classifier loaded from the card's path
    det = load_detector("runs/x/maha", classifier=model)   # or the module you already hold
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bastion.errors import CheckpointError

FORMAT = "bastion-detector"
CARD_VERSION = 1
KINDS = ("mahalanobis", "eps-deep", "eps-gaussian", "eps-norm")


def detector_paths(path: str | Path) -> tuple[Path, Path]:
    """NAME, NAME.safetensors or NAME.json -> (NAME.safetensors, NAME.json)."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def card_digest(card: Mapping[str, Any]) -> str:
    """sha256 of the card's canonical JSON without its ``sha256`` key."""
    body = {k: v for k, v in card.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def relative_ref(target: str | Path | None, card_dir: Path) -> str | None:
    """``target`` as a path relative to the card's folder (absolute when on another drive)."""
    if target is None:
        return None
    try:
        return os.path.relpath(Path(target).resolve(), card_dir.resolve())
    except ValueError:
        return str(Path(target).resolve())


def resolve_ref(ref: str | None, card_path: Path) -> Path | None:
    if ref is None:
        return None
    p = Path(ref)
    return p if p.is_absolute() else card_path.parent / p


def write_detector(path: str | Path, kind: str, tensors: Mapping[str, torch.Tensor], card: dict[str, Any]) -> Path:
    """Write ``path.safetensors`` + ``path.json`` (byte-reproducible, atomic); returns the card path.

    ``card`` holds the kind-independent fields (name, threshold, ...) and ``state``; format,
    version, kind and the two digests are added here."""
    from bastion.checkpoints import sha256_file, write_safetensors

    if kind not in KINDS:
        raise CheckpointError(f"unknown detector kind {kind!r}; known: {', '.join(KINDS)}")
    wpath, cpath = detector_paths(path)
    wpath.parent.mkdir(parents=True, exist_ok=True)
    card = {"format": FORMAT, "card_version": CARD_VERSION, "detector": kind} | dict(card)
    card.pop("sha256", None)
    try:
        digest = card_digest(card)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"detector card for {str(cpath)!r} is not JSON-serializable: {exc}") from None
    write_safetensors(wpath, dict(tensors), {"format": "pt", "bastion_detector_card": digest})
    card["sha256"] = sha256_file(wpath)
    tmp = cpath.with_name(cpath.name + ".tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, cpath)
    return cpath


def read_detector_card(path: str | Path) -> dict[str, Any]:
    """The validated card of a detector checkpoint (its tensors are not read)."""
    _, cpath = detector_paths(path)
    if not cpath.is_file():
        raise CheckpointError(f"detector card {str(cpath)!r} not found (a detector is NAME.safetensors + NAME.json)")
    try:
        card = json.loads(cpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"detector card {str(cpath)!r} is not valid JSON: {exc}") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise CheckpointError(f"{str(cpath)!r} is not a Bastion detector card (no \"format\": \"{FORMAT}\"); "
                              f"save detectors with detection.checkpoint.save_detector")
    if card.get("card_version") != CARD_VERSION:
        raise CheckpointError(f"detector card {str(cpath)!r} has version {card.get('card_version')!r}; this Bastion "
                              f"reads version {CARD_VERSION}")
    if card.get("detector") not in KINDS:
        raise CheckpointError(f"detector card {str(cpath)!r}: unknown kind {card.get('detector')!r} "
                              f"(known: {', '.join(KINDS)})")
    if not isinstance(card.get("sha256"), str) or len(card["sha256"]) != 64:
        raise CheckpointError(f"detector card {str(cpath)!r} lacks the sha256 of its tensors file")
    if not isinstance(card.get("state"), dict):
        raise CheckpointError(f"detector card {str(cpath)!r} lacks its state object")
    return card


def read_detector_tensors(path: str | Path, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a detector checkpoint, after checking both digests (refuses pickles,
    truncated or edited files)."""
    from safetensors import safe_open

    from bastion.checkpoints import load_state

    wpath, cpath = detector_paths(path)
    tensors = load_state(wpath, expected_sha256=card["sha256"])
    try:
        with safe_open(str(wpath), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - any reader failure is a corrupt file
        raise CheckpointError(f"detector tensors {str(wpath)!r} are unreadable: {exc}") from None
    if meta.get("bastion_detector_card") != card_digest(card):
        raise CheckpointError(f"detector card {str(cpath)!r} does not match its tensors file (the card was edited "
                              f"or belongs to another detector); re-save the detector")
    return tensors


def save_detector(detector: Any, path: str | Path, **refs: Any) -> Path:
    """Save any fitted detector (`MahalanobisDetector`, `EPSDetector`); ``refs`` are the paths of
    what it needs to be rebuilt (``classifier_path`` / ``score_model_path``). Returns the card path."""
    if not hasattr(detector, "save"):
        raise CheckpointError(f"{type(detector).__name__} has no save(); it is not a Bastion detector")
    return Path(detector.save(path, **refs))


def load_detector(path: str | Path, *, classifier: torch.nn.Module | None = None, extractor: Any = None,
                  device: str | torch.device = "cpu") -> Any:
    """Load a detector of any kind. Mahalanobis needs its classifier: ``classifier`` (a module)
    or the checkpoint the card names (its sha256 checked). EPS detectors need an
    `EPSExtractor`: ``extractor`` or the score model the card names."""
    card = read_detector_card(path)
    kind = card["detector"]
    if kind == "mahalanobis":
        from detection.mahalanobis import MahalanobisDetector

        return MahalanobisDetector.load(path, classifier=classifier, device=device)
    from detection.detector import EPSDetector

    return EPSDetector.load(path, extractor, device=device)


def classifier_from_card(card: dict[str, Any], cpath: Path, device: str | torch.device) -> torch.nn.Module:
    """Load the classifier a detector card names, refusing one whose weights changed since."""
    from bastion.checkpoints import load_checkpoint, read_card

    ref = card.get("classifier") or {}
    p = resolve_ref(ref.get("path"), cpath)
    if p is None:
        raise CheckpointError(f"detector {str(cpath)!r} names no classifier checkpoint; pass classifier=<module>")
    have = read_card(p).get("sha256")
    if ref.get("sha256") and have != ref["sha256"]:
        raise CheckpointError(f"detector {str(cpath)!r} was fitted on another classifier than {str(p)!r} "
                              f"(sha256 differs); refit the detector")
    return load_checkpoint(p, device)[0].eval()

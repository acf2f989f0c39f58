"""RobustBench's per-model entry format: writing ours, validating, and reading published ones.

RobustBench keeps one JSON per (dataset, threat model, model) under
``model_info/<dataset>/<Linf|L2|corruptions>/<name>.json`` with the fields of `ENTRY_FIELDS`,
accuracies as percent *strings*. Ours have the same fields with numbers as numbers (percent,
two decimals) and Bastion's extras under ``"bastion"`` (per-class accuracies and disparity,
sanity flags, attack attribution, run config digest, ...). Published files are read from a
local folder, converted to numbers and marked ``"source": "published"``; nothing is fetched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bastion.errors import ConfigError, RunError

# field -> accepted types of our entries (RobustBench's README and model_info files)
ENTRY_FIELDS: dict[str, tuple[type, ...]] = {
    "link": (str,), "name": (str,), "authors": (str,), "venue": (str,), "architecture": (str,),
    "dataset": (str,), "additional_data": (bool,), "number_forward_passes": (int,), "eps": (str, type(None)),
    "clean_acc": (float, int), "reported": (float, int, type(None)), "autoattack_acc": (float, int),
    "footnote": (str, type(None)), "unreliable": (bool,),
}
OPTIONAL_FIELDS = {"external": (float, int, type(None))}
THREAT_DIRS = {"linf": "Linf", "l2": "L2"}


def pct(v: float | None) -> float | None:
    """A fraction as a percent number with two decimals (RobustBench's precision)."""
    return None if v is None else round(100.0 * float(v), 2)


def validate_entry(d: dict[str, Any], where: str = "entry") -> None:
    """Raise `RunError` unless ``d`` has every RobustBench field with a numeric type for accuracies."""
    for key, types in (ENTRY_FIELDS | OPTIONAL_FIELDS).items():
        if key not in d:
            if key in OPTIONAL_FIELDS:
                continue
            raise RunError(f"{where} lacks the RobustBench field {key!r}")
        v = d[key]
        if isinstance(v, bool) and bool not in types:
            raise RunError(f"{where}: field {key!r} is a boolean, want {[t.__name__ for t in types]}")
        if not isinstance(v, types):
            raise RunError(f"{where}: field {key!r} = {v!r} has type {type(v).__name__}, want "
                           f"{[t.__name__ for t in types]}")
    for key in ("clean_acc", "autoattack_acc"):
        if not 0 <= d[key] <= 100:
            raise RunError(f"{where}: {key} = {d[key]} is not a percentage in [0, 100]")


def _num(v: Any) -> float | None:
    """A published accuracy ("89.69", 89.69, "" or null) as a number or None."""
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def read_published(folder: str | Path) -> list[dict[str, Any]]:
    """Every RobustBench model JSON under ``folder`` (any depth), numbers as numbers, marked
    ``source = "published"``; ``threat`` from the parent folder name (Linf, L2, corruptions)."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"published folder {str(root)!r} does not exist; point 'published' at a local copy "
                          f"of RobustBench's model_info (nothing is downloaded)")
    out = []
    for f in sorted(root.rglob("*.json")):
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunError(f"published entry {str(f)!r} is not valid JSON ({exc})") from None
        if not isinstance(d, dict) or "clean_acc" not in d:
            continue
        threat_dir = f.parent.name
        norm = {v.lower(): k for k, v in THREAT_DIRS.items()}.get(threat_dir.lower(), threat_dir.lower())
        row = {k: d.get(k) for k in ENTRY_FIELDS if k in d}
        row.update({"name": str(d.get("name") or f.stem), "id": f.stem, "dataset": str(d.get("dataset") or
                    f.parent.parent.name), "clean_acc": _num(d.get("clean_acc")),
                    "autoattack_acc": _num(d.get("autoattack_acc", d.get("corruptions_acc"))),
                    "reported": _num(d.get("reported")), "external": _num(d.get("external")),
                    "norm": norm, "source": "published", "file": str(f)})
        out.append(row)
    return out


def entry_path(out: Path, dataset: str, norm: str, name: str) -> Path:
    return out / "model_info" / dataset / THREAT_DIRS.get(norm, norm) / f"{name}.json"


def write_entry(path: Path, d: dict[str, Any]) -> Path:
    """Write an entry deterministically (sorted keys, fixed indentation, trailing newline)."""
    validate_entry(d, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(d, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path

"""Per-example records and the append-only run log.

A run is a directory (``runs/<name>/``). Components emit one record per (example, probe): a
flat JSON object with at least ``index`` (dataset index) and ``probe`` (a name such as
``clean`` or ``pgd@linf:8/255``). Records are appended to ``records.jsonl`` and flushed per
batch, so a run killed at any moment resumes by skipping recorded (index, probe) pairs, and
shards of the same run merge by concatenation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from bastion.errors import RunError

Record = dict[str, Any]


def _clean(value: Any) -> Any:
    """Make a value JSON-safe (tensors/numpy scalars to Python numbers)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class LineLog:
    """An append-only text file of lines, flushed (and fsynced) on every `append_lines`.

    A torn last line (the process died mid-write) is dropped on open, never misread; `rewrite_lines`
    replaces the file atomically. `JsonlLog` and certify's TSV log are this with an encoding."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()

    def _repair(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            # Truncate in place (never rewrite): a crash during repair cannot lose complete lines.
            os.truncate(self.path, data.rfind(b"\n") + 1)

    def append_lines(self, lines: list[str]) -> int:
        if not lines:
            return 0
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
        return len(lines)

    def rewrite_lines(self, lines: Iterable[str]) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        os.replace(tmp, self.path)


class JsonlLog(LineLog):
    """A JSON-lines `LineLog`: one record (a flat JSON object) per line."""

    @staticmethod
    def _encode(r: Record) -> str:
        return json.dumps(_clean(r), sort_keys=True, separators=(",", ":"))

    def append(self, rows: Iterable[Record]) -> int:
        return self.append_lines([self._encode(r) for r in rows])

    def __iter__(self) -> Iterator[Record]:
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    raise RunError(f"{str(self.path)!r} line {n} is not valid JSON; the run log is damaged "
                                   f"(delete that line, or the run directory to start over)") from None

    def read(self) -> list[Record]:
        return list(self)

    def rewrite(self, rows: Iterable[Record]) -> None:
        """Atomically replace the whole file (used when truncating to a checkpoint)."""
        self.rewrite_lines(self._encode(r) for r in rows)


class RecordLog(JsonlLog):
    """``records.jsonl``: per-example records keyed by (index, probe)."""

    def done_keys(self) -> set[tuple[int, str]]:
        return {(int(r["index"]), str(r["probe"])) for r in self}


def merge_records(logs: Iterable[RecordLog | Iterable[Record]]) -> list[Record]:
    """Merge shard logs: one record per (index, probe) (the first seen), sorted by probe then index."""
    seen: dict[tuple[int, str], Record] = {}
    for log in logs:
        for r in log:
            seen.setdefault((int(r["index"]), str(r["probe"])), r)
    return [seen[k] for k in sorted(seen, key=lambda k: (k[1], k[0]))]


def config_digest(config: dict[str, Any]) -> str:
    """A stable hash of a config dict (keys sorted)."""
    return hashlib.sha256(json.dumps(_clean(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunDir:
    """A run directory: config.toml / records.jsonl / metrics.json / reports / checkpoints/.

    ``RunDir(path, config)`` creates it or reopens it; reopening with a different config raises
    `RunError` (resume must mean the same run). Pass ``config=None`` to open read-only.
    """

    def __init__(self, path: str | Path, config: dict[str, Any] | None = None):
        self.path = Path(path)
        if config is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            stamp = self.path / "config.json"
            digest = config_digest(config)
            if stamp.is_file():
                try:
                    old = json.loads(stamp.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise RunError(f"{str(stamp)!r} is damaged; delete the run directory to start over") from None
                if not isinstance(old, dict) or old.get("digest") != digest:
                    raise RunError(f"run directory {str(self.path)!r} holds a different config; use a new --out "
                                   f"directory or delete it to start over")
            else:
                _write_toml(self.path / "config.toml", config)
                self.write_json("config.json", {"digest": digest, "config": _clean(config)})
        elif not self.path.is_dir():
            raise RunError(f"run directory {str(self.path)!r} does not exist")

    @property
    def records(self) -> RecordLog:
        return RecordLog(self.path / "records.jsonl")

    @property
    def checkpoints(self) -> Path:
        p = self.path / "checkpoints"
        p.mkdir(parents=True, exist_ok=True)
        return p

    def config(self) -> dict[str, Any]:
        stamp = self.path / "config.json"
        return json.loads(stamp.read_text())["config"] if stamp.is_file() else {}

    def write_json(self, name: str, obj: Any) -> Path:
        p = self.path / name
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(_clean(obj), indent=2, sort_keys=True, default=str))
        os.replace(tmp, p)
        return p


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if v is None:
        return '""'
    return json.dumps(str(v))


def _toml_key(k: Any) -> str:
    k = str(k)
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def to_toml(config: dict[str, Any]) -> str:
    """Serialize a (nested) dict of scalars/lists/tables as TOML."""
    lines: list[str] = []
    tables: list[tuple[str, dict]] = []
    for k, v in config.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(_clean(v))}")

    def emit(prefix: str, table: dict) -> None:
        lines.append(f"\n[{prefix}]")
        sub = []
        for k, v in table.items():
            if isinstance(v, dict):
                sub.append((f"{prefix}.{_toml_key(k)}", v))
            else:
                lines.append(f"{_toml_key(k)} = {_toml_value(_clean(v))}")
        for p, t in sub:
            emit(p, t)

    for k, t in tables:
        emit(_toml_key(k), t)
    return "\n".join(lines).lstrip("\n") + "\n"


def _write_toml(path: Path, config: dict[str, Any]) -> None:
    path.write_text(to_toml(config))

"""Per-example records and the append-only run log.

A run is a directory (``runs/<name>/``). Components emit one record per (example, probe): a
flat JSON object with at least ``index`` (dataset index) and ``probe`` (a name such as
``clean`` or ``pgd@linf:8/255``). Records are appended to ``records.jsonl`` and flushed per
batch, so a run killed at any moment resumes by skipping recorded (index, probe) pairs, and
shards of the same run merge by concatenation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from bastion.errors import RunError

Record = dict[str, Any]


def to_jsonable(value: Any) -> Any:
    """Make a value JSON-safe (tensors/numpy scalars to Python numbers, tuples to lists)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
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
        return json.dumps(to_jsonable(r), sort_keys=True, separators=(",", ":"))

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
        return {record_key(r) for r in self}

    def unique(self) -> list[Record]:
        """The log's records, one per (index, probe) (the first written wins; duplicates left by
        an interrupted merge or by an older version's concurrent writers are dropped)."""
        return merge_records([self])


def record_key(r: Record) -> tuple[int, str]:
    """The resume key of a record: (data set index, probe name)."""
    try:
        return int(r["index"]), str(r["probe"])
    except (KeyError, TypeError, ValueError):
        raise RunError(f"a record has no valid 'index'/'probe' (the run log is damaged): {str(r)[:120]}") from None


def merge_records(logs: Iterable[RecordLog | Iterable[Record]]) -> list[Record]:
    """Merge shard logs: one record per (index, probe) (the first seen), sorted by probe then index."""
    seen: dict[tuple[int, str], Record] = {}
    for log in logs:
        for r in log:
            seen.setdefault(record_key(r), r)
    return [seen[k] for k in sorted(seen, key=lambda k: (k[1], k[0]))]


# ---------------------------------------------------------------------------------------------
# Typed records
# ---------------------------------------------------------------------------------------------

SCHEMA_VERSION = 2
_RECORD_TYPES: dict[str, type[BaseRecord]] = {}


@dataclass(frozen=True, kw_only=True)
class BaseRecord:
    """Fields every record has. ``pred`` is the predicted class (-1: abstained), ``correct`` a bool,
    ``split`` the part of the data the example belongs to (``test``; conformal runs also write
    ``calibration``)."""

    kind: ClassVar[str] = ""
    index: int
    probe: str
    label: int
    pred: int
    correct: bool
    split: str = "test"

    @property
    def key(self) -> tuple[int, str]:
        return self.index, self.probe

    def to_record(self) -> Record:
        """The flat JSON object written to ``records.jsonl`` (with ``kind`` and ``schema``)."""
        d = to_jsonable({f.name: getattr(self, f.name) for f in fields(self)})
        return d | {"kind": self.kind, "schema": SCHEMA_VERSION}

    @classmethod
    def from_record(cls, r: Record) -> BaseRecord:
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in r.items() if k in names})
        except TypeError as exc:
            raise RunError(f"a {cls.kind!r} record lacks a field ({exc}): {str(r)[:120]}") from None


def register_record_type(cls: type[BaseRecord]) -> type[BaseRecord]:
    """Class decorator: make ``cls.kind`` readable by `parse_record` (packages add their kinds)."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind")
    _RECORD_TYPES[cls.kind] = cls
    return cls


def record_types() -> dict[str, type[BaseRecord]]:
    return dict(_RECORD_TYPES)


@register_record_type
@dataclass(frozen=True, kw_only=True)
class CleanRecord(BaseRecord):
    kind: ClassVar[str] = "clean"


@register_record_type
@dataclass(frozen=True, kw_only=True)
class RobustRecord(BaseRecord):
    """One example under a suite of attacks at one threat model; ``pred``/``correct`` on the
    strongest adversary found (the clean prediction when the example was already misclassified)."""

    kind: ClassVar[str] = "robust"
    threat: str
    attack: str
    broken_by: str | None = None
    step: int | None = None
    flags: tuple[str, ...] = ()
    # smallest adversarial perturbation (threat model's norm) found by the suite's minimum-norm
    # attacks, within eps or not; 0.0 when misclassified clean; None when none ran or none was found
    min_norm: float | None = None


@register_record_type
@dataclass(frozen=True, kw_only=True)
class CertifyRecord(BaseRecord):
    """Randomized-smoothing CERTIFY: ``pred`` -1 means abstained; ``radius`` in L2 pixel units."""

    kind: ClassVar[str] = "certify"
    sigma: float
    radius: float
    p_lower: float | None = None
    c_a: int | None = None
    n_a: int | None = None
    n0: int | None = None
    n: int | None = None
    samples: int | None = None
    looks: int | None = None
    stopped: str = "final"
    time_s: float | None = None


@register_record_type
@dataclass(frozen=True, kw_only=True)
class PredictRecord(BaseRecord):
    """Randomized-smoothing PREDICT: ``pred`` -1 means abstained."""

    kind: ClassVar[str] = "predict"
    sigma: float
    pvalue: float | None = None
    n1: int | None = None
    n2: int | None = None
    n: int | None = None
    samples: int | None = None
    time_s: float | None = None


@register_record_type
@dataclass(frozen=True, kw_only=True)
class DetectRecord(BaseRecord):
    """A detector's score for one input: higher = more likely adversarial. ``adversarial`` says
    whether the scored input was an adversarial example (the ground truth of the detection task);
    ``label``/``pred``/``correct`` are the classifier's on that input."""

    kind: ClassVar[str] = "detect"
    score: float
    adversarial: bool
    attack: str | None = None
    detector: str | None = None        # the detector ``score`` belongs to
    scores: dict[str, float] | None = None  # every detector's score of this input (``score`` among them)
    threat: str | None = None
    adaptive: bool = False              # produced by an attack aware of ``target``
    target: str | None = None           # the detector the adaptive attack fought
    clean_correct: bool | None = None   # the classifier on the natural input of this example


@register_record_type
@dataclass(frozen=True, kw_only=True)
class ConformalRecord(BaseRecord):
    """One example's conformal scores: per score name, the K-vector of the unsmoothed base score
    (``scores``), of the Monte-Carlo smoothed score (``mean``) and its empirical-Bernstein
    half-width (``bound``), at the clean input and at the attacked input (``adv_*``, absent for
    holdout examples). ``split``: ``calibration`` / ``test`` (the declared split; folds may
    re-split those at random) or ``holdout`` (PTT's reference set). ``pred``/``correct``: the
    smoothed classifier on the clean input; ``adv_pred`` on the attacked one."""

    kind: ClassVar[str] = "conformal"
    scores: tuple[float, ...] | dict[str, Any] = ()
    prediction_set: tuple[int, ...] = ()
    attack: str | None = None
    sigma: float | None = None
    n_mc: int | None = None
    mean: dict[str, Any] | None = None
    bound: dict[str, Any] | None = None
    adv_mean: dict[str, Any] | None = None
    adv_bound: dict[str, Any] | None = None
    adv_pred: int | None = None


def _upgrade(r: Record) -> Record:
    """Read a schema-1 record (Bastion 0.1.0): certify/predict wrote ``predict`` and ``correct``
    as 0/1; no record had ``split`` or ``schema``."""
    if int(r.get("schema", 1)) >= SCHEMA_VERSION:
        return r
    r = dict(r)
    if "pred" not in r and "predict" in r:
        r["pred"] = r.pop("predict")
    if "correct" in r:
        r["correct"] = bool(r["correct"])
    r.setdefault("split", "test")
    return r


def parse_record(r: Record) -> BaseRecord:
    """A typed record from a log line of any schema version (unknown kinds raise `RunError`)."""
    kind = r.get("kind")
    cls = _RECORD_TYPES.get(str(kind))
    if cls is None:
        raise RunError(f"unknown record kind {kind!r} (known: {', '.join(sorted(_RECORD_TYPES))}); "
                       f"is the package that writes it installed?")
    r = _upgrade(r)
    if "flags" in r and isinstance(r["flags"], list):
        r = r | {"flags": tuple(r["flags"])}
    for k in ("scores", "prediction_set"):
        if isinstance(r.get(k), list):
            r = r | {k: tuple(r[k])}
    return cls.from_record(r)


def parse_records(rows: Iterable[Record]) -> list[BaseRecord]:
    return [parse_record(r) for r in rows]


def config_digest(config: dict[str, Any]) -> str:
    """A stable hash of a config dict (keys sorted)."""
    return hashlib.sha256(json.dumps(to_jsonable(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


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
                self.write_json("config.json", {"digest": digest, "config": to_jsonable(config)})
        elif not self.path.is_dir():
            raise RunError(f"run directory {str(self.path)!r} does not exist")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory's writer lock (``.lock``, an advisory ``flock``) for a block.

        A second writer, in this or another process, gets a `RunError` naming the holder at once;
        the lock dies with its process, so a killed run never leaves it stuck."""
        import fcntl
        import socket
        import sys

        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / ".lock", "a+", encoding="utf-8")
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise RunError(f"run directory {str(self.path)!r} is in use by {holder}; wait for it to finish "
                               f"or use another --out") from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv[:3])[:80]})\n")
            f.flush()
            yield
        finally:
            f.close()

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
        tmp.write_text(json.dumps(to_jsonable(obj), indent=2, sort_keys=True, default=str))
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
            lines.append(f"{_toml_key(k)} = {_toml_value(to_jsonable(v))}")

    def emit(prefix: str, table: dict) -> None:
        lines.append(f"\n[{prefix}]")
        sub = []
        for k, v in table.items():
            if isinstance(v, dict):
                sub.append((f"{prefix}.{_toml_key(k)}", v))
            else:
                lines.append(f"{_toml_key(k)} = {_toml_value(to_jsonable(v))}")
        for p, t in sub:
            emit(p, t)

    for k, t in tables:
        emit(_toml_key(k), t)
    return "\n".join(lines).lstrip("\n") + "\n"


def _write_toml(path: Path, config: dict[str, Any]) -> None:
    path.write_text(to_toml(config))

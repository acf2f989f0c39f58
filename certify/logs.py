"""CERTIFY / PREDICT logs in the reference tab-separated format (spec section 5).

CERTIFY: header ``idx\\tlabel\\tpredict\\tradius\\tcorrect\\ttime``; ``radius`` with ``"{:.3}"``;
``correct`` a per-row 0/1 (0 for abstentions); ``time`` as ``str(timedelta)``. PREDICT: header
``idx\\tlabel\\tpredict\\tcorrect\\ttime``. Writers flush every line. `read_log` accepts ``time``
as ``H:MM:SS.ffffff`` (also ``D day(s), H:MM:SS``) or as plain seconds, as published logs do.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any

from bastion.errors import RunError
from bastion.records import LineLog

CERTIFY_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
PREDICT_HEADER = "idx\tlabel\tpredict\tcorrect\ttime"


def format_radius(r: float) -> str:
    """Three significant digits, Python general format: 0.0, 0.378, 0.0451, 3.81, 1.0."""
    return f"{float(r):.3}"


def format_time(seconds: float) -> str:
    return str(datetime.timedelta(seconds=float(seconds)))


_TD = re.compile(r"^(?:(?P<d>-?\d+) days?, )?(?P<h>\d+):(?P<m>\d{2}):(?P<s>\d{2}(?:\.\d+)?)$")


def parse_time(text: str) -> float:
    """Seconds from ``str(timedelta)`` (``H:MM:SS[.ffffff]``, optionally ``D day(s), ``) or plain seconds."""
    t = text.strip()
    m = _TD.match(t)
    if m:
        return (int(m.group("d") or 0) * 86400 + int(m.group("h")) * 3600 + int(m.group("m")) * 60
                + float(m.group("s")))
    try:
        return float(t)
    except ValueError:
        raise RunError(f"cannot read time {text!r} in a certify log: expected H:MM:SS.ffffff or seconds") from None


def certify_line(idx: int, label: int, predict: int, radius: float, time_s: float) -> str:
    correct = int(int(predict) == int(label))
    return f"{int(idx)}\t{int(label)}\t{int(predict)}\t{format_radius(radius)}\t{correct}\t{format_time(time_s)}"


def predict_line(idx: int, label: int, predict: int, time_s: float) -> str:
    correct = int(int(predict) == int(label))
    return f"{int(idx)}\t{int(label)}\t{int(predict)}\t{correct}\t{format_time(time_s)}"


class TsvLog(LineLog):
    """The CERTIFY/PREDICT TSV log: a `LineLog` with a fixed header line, flushed per row."""

    def __init__(self, path: str | Path, header: str):
        super().__init__(path)
        self.header = header
        if self.path.is_file():
            first = self.path.read_text().split("\n", 1)[0]
            if first and first != header:
                raise RunError(f"{str(self.path)!r} has header {first!r}, expected {header!r}")
        if not self.path.is_file() or self.path.stat().st_size == 0:
            self.append_lines([header])

    def append(self, line: str) -> None:
        self.append_lines([line])

    def rewrite(self, lines: list[str]) -> None:
        self.rewrite_lines([self.header, *lines])


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CERTIFY or PREDICT log as dicts (ints, radius float, time in seconds)."""
    p = Path(path)
    if not p.is_file():
        raise RunError(f"certify log {str(p)!r} not found")
    lines = p.read_text().splitlines()
    if not lines:
        return []
    head = lines[0].split("\t")
    if head not in (CERTIFY_HEADER.split("\t"), PREDICT_HEADER.split("\t")):
        raise RunError(f"{str(p)!r} is not a certify/predict log (header {lines[0]!r})")
    rows = []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        vals = line.split("\t")
        if len(vals) != len(head):
            raise RunError(f"{str(p)!r} line {n} has {len(vals)} fields, expected {len(head)}")
        row: dict[str, Any] = {}
        for k, v in zip(head, vals):
            row[k] = float(v) if k == "radius" else parse_time(v) if k == "time" else int(v)
        rows.append(row)
    return rows

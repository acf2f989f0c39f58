"""Small inline SVG charts for the static site (grouped bars and a line plot), no dependencies."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

COLORS = ("#4a78b5", "#d1603d", "#5a9e5a", "#8e6bb0")


def _frame(w: int, h: int, inner: str, label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
            f'role="img" aria-label="{escape(label)}">{inner}</svg>')


def _y_axis(x0: int, y0: int, ph: int, pw: int) -> str:
    out = []
    for k in range(0, 101, 25):
        y = y0 + ph - ph * k / 100
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + pw}" y2="{y:.1f}" stroke="#e3e3e3"/>'
                   f'<text x="{x0 - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{k}</text>')
    return "".join(out)


def grouped_bars(categories: Sequence[str], series: dict[str, Sequence[float | None]], label: str,
                 height: int = 220) -> str:
    """Bars per category, one per series; values in percent (None: no bar)."""
    n, k = len(categories), max(1, len(series))
    x0, y0, ph = 36, 10, height - 50
    slot = max(18, 10 * k + 8)
    pw = slot * max(1, n)
    w = x0 + pw + 130
    parts = [_y_axis(x0, y0, ph, pw)]
    for i, cat in enumerate(categories):
        for j, (name, vals) in enumerate(series.items()):
            v = vals[i]
            if v is None:
                continue
            bh = ph * float(v) / 100
            x = x0 + i * slot + 4 + j * 10
            parts.append(f'<rect x="{x}" y="{y0 + ph - bh:.1f}" width="9" height="{bh:.1f}" '
                         f'fill="{COLORS[j % len(COLORS)]}"><title>{escape(str(cat))} {escape(name)}: '
                         f'{float(v):.2f}%</title></rect>')
        parts.append(f'<text x="{x0 + i * slot + slot / 2:.1f}" y="{y0 + ph + 14}" font-size="10" '
                     f'text-anchor="middle">{escape(str(cat))}</text>')
    for j, name in enumerate(series):
        parts.append(f'<rect x="{x0 + pw + 12}" y="{y0 + 8 + 16 * j}" width="10" height="10" '
                     f'fill="{COLORS[j % len(COLORS)]}"/><text x="{x0 + pw + 26}" y="{y0 + 17 + 16 * j}" '
                     f'font-size="11">{escape(name)}</text>')
    parts.append(f'<text x="{x0 + pw / 2:.1f}" y="{height - 6}" font-size="11" text-anchor="middle">class</text>')
    return _frame(w, height, "".join(parts), label)


def line_plot(xs: Sequence[float], series: dict[str, Sequence[float | None]], label: str, xlabel: str,
              width: int = 420, height: int = 240) -> str:
    """Lines (with dots) of percent values over ``xs``."""
    x0, y0, ph, pw = 40, 10, height - 50, width - 170
    lo, hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    span = (hi - lo) or 1.0

    def px(x: float) -> float:
        return x0 + pw * (x - lo) / span

    parts = [_y_axis(x0, y0, ph, pw)]
    for x in xs:
        parts.append(f'<text x="{px(x):.1f}" y="{y0 + ph + 14}" font-size="10" text-anchor="middle">{x:g}</text>')
    for j, (name, vals) in enumerate(series.items()):
        c = COLORS[j % len(COLORS)]
        pts = [(px(x), y0 + ph - ph * float(v) / 100, v) for x, v in zip(xs, vals) if v is not None]
        if len(pts) > 1:
            parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                         + " ".join(f"{a:.1f},{b:.1f}" for a, b, _ in pts) + '"/>')
        for a, b, v in pts:
            parts.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{c}"><title>{escape(name)}: '
                         f'{float(v):.2f}%</title></circle>')
        parts.append(f'<rect x="{x0 + pw + 12}" y="{y0 + 8 + 16 * j}" width="10" height="10" fill="{c}"/>'
                     f'<text x="{x0 + pw + 26}" y="{y0 + 17 + 16 * j}" font-size="11">{escape(name)}</text>')
    parts.append(f'<text x="{x0 + pw / 2:.1f}" y="{height - 6}" font-size="11" text-anchor="middle">'
                 f'{escape(xlabel)}</text>')
    return _frame(width, height, "".join(parts), label)

"""Reports: ``metrics.json`` (versioned) -> ``report.md`` and a self-contained ``report.html``.

``metrics.json`` is ``{"schema_version": 1, "title": ..., "sections": [section, ...]}`` where a
section is ``{"type": str, "title": str, "data": dict}``. Each section type has a renderer,
``fn(section) -> (markdown, [(caption, matplotlib Figure), ...])``; packages register theirs
with `register_renderer`. Figures are embedded in the HTML as inline PNGs and also written as
``<run>/fig_<k>.png`` files.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bastion.errors import RunError

SCHEMA_VERSION = 1
Renderer = Callable[[dict[str, Any]], tuple[str, list[tuple[str, Any]]]]
_RENDERERS: dict[str, Renderer] = {}


def register_renderer(section_type: str, fn: Renderer) -> None:
    """Register the renderer of a section type (later registration wins)."""
    _RENDERERS[section_type] = fn


def renderer(section_type: str) -> Renderer | None:
    """The renderer registered for ``section_type`` (plugins loaded on demand), or None."""
    if section_type not in _RENDERERS:
        from bastion.plugins import load_plugins

        load_plugins()
    return _RENDERERS.get(section_type)


def section(section_type: str, title: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": section_type, "title": title, "data": data}


def metrics_document(sections: list[dict[str, Any]], title: str = "Bastion report") -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "title": title, "sections": sections}


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (renderers draw figures with it)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# --- built-in renderers -----------------------------------------------------------------------

def _render_robustness(sec: dict[str, Any]) -> tuple[str, list]:
    d = sec["data"]
    clean = d["clean"]
    robust = d.get("robust", {})
    parts = []
    if d.get("model"):
        parts.append(f"Model: `{d['model']}`" + (f" — {d['description']}" if d.get("description") else ""))
    rows = [["clean", pct(clean["accuracy"]), clean["n"], f"{100 * clean['disparity']['max_minus_min']:.1f}",
             f"{100 * clean['disparity']['std']:.1f}", "–"]]
    for threat, b in robust.items():
        attacks = ", ".join(f"{a} {pct(v)}" for a, v in b.get("per_attack", {}).items())
        broken = ", ".join(f"{a} {k}" for a, k in sorted(b.get("broken_by", {}).items(), key=lambda t: -t[1]))
        rows.append([f"robust {threat}", pct(b["accuracy"]), b["n"], f"{100 * b['disparity']['max_minus_min']:.1f}",
                     f"{100 * b['disparity']['std']:.1f}", attacks or "–", broken or "–"])
    rows[0].append("–")
    parts.append(md_table(["metric", "accuracy", "n", "class gap (max-min, pts)", "class std (pts)",
                           "attack suite", "examples broken by"], rows))
    classes = list(clean["per_class"])
    pc_rows = [[c, pct(clean["per_class"][c])] + [pct(b["per_class"].get(c)) for b in robust.values()]
               for c in classes]
    parts.append("Per class:\n\n" + md_table(["class", "clean"] + [f"robust {t}" for t in robust], pc_rows))
    for flag in d.get("flags", []) or []:
        text = flag if isinstance(flag, str) else f"**{flag.get('name', 'flag')}**: {flag.get('message', '')}"
        parts.append(f"> ⚠ {text}")
    figs = []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3))
    series = [("clean", clean)] + [(f"robust {t}", b) for t, b in robust.items()]
    width = 0.8 / len(series)
    for k, (name, b) in enumerate(series):
        vals = [b["per_class"].get(c) or 0.0 for c in classes]
        ax.bar([i + k * width for i in range(len(classes))], vals, width=width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(classes))], classes, rotation=0)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    ax.set_title(f"{sec['title']}: per-class accuracy")
    fig.tight_layout()
    figs.append((f"{sec['title']}: per-class accuracy", fig))
    by_norm: dict[str, list[tuple[float, float]]] = {}
    for threat, b in robust.items():
        norm, _, eps = threat.partition(":")
        try:
            from bastion.threat import parse_eps

            by_norm.setdefault(norm, []).append((parse_eps(eps), b["accuracy"]))
        except Exception:
            continue
    if any(len(v) > 1 for v in by_norm.values()):
        fig, ax = plt.subplots(figsize=(5, 3))
        for norm, pts in by_norm.items():
            pts = sorted([(0.0, clean["accuracy"])] + pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=norm)
        ax.set_xlabel("epsilon")
        ax.set_ylabel("robust accuracy")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title(f"{sec['title']}: robust accuracy vs epsilon")
        fig.tight_layout()
        figs.append((f"{sec['title']}: robust accuracy vs epsilon", fig))
    return "\n\n".join(parts), figs


def _render_robustness_curves(sec: dict[str, Any]) -> tuple[str, list]:
    """Several models' robust accuracy vs epsilon on one plot: data = {model: {eps: acc}}."""
    d = sec["data"]["models"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    rows = []
    for name, curve in d.items():
        pts = sorted((float(e), float(a)) for e, a in curve.items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        rows.append([name] + [pct(a) for _, a in pts])
    eps_header = [f"eps={e:.4g}" for e, _ in sorted((float(e), 0) for e in next(iter(d.values())))] if d else []
    ax.set_xlabel(f"epsilon ({sec['data'].get('norm', 'linf')})")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(sec["title"])
    fig.tight_layout()
    return md_table(["model"] + eps_header, rows), [(sec["title"], fig)]


def _render_text(sec: dict[str, Any]) -> tuple[str, list]:
    return str(sec["data"].get("text", "")), []


def _render_fallback(sec: dict[str, Any]) -> tuple[str, list]:
    return "```json\n" + json.dumps(sec.get("data", {}), indent=2, sort_keys=True)[:20000] + "\n```", []


register_renderer("robustness", _render_robustness)
register_renderer("robustness_curves", _render_robustness_curves)
register_renderer("text", _render_text)


# --- writing ----------------------------------------------------------------------------------

def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    pyplot().close(fig)
    return buf.getvalue()


def _md_to_html(md: str) -> str:
    """Tiny Markdown subset (tables, headings, paragraphs, code, quotes, bold) to HTML."""
    out, lines, i = [], md.splitlines(), 0
    inline = [(r"\*\*(.+?)\*\*", r"<b>\1</b>"), (r"`([^`]+)`", r"<code>\1</code>")]

    def fmt(s: str) -> str:
        s = html.escape(s)
        for pat, rep in inline:
            s = re.sub(pat, rep, s)
        return s

    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre>" + html.escape("\n".join(lines[i + 1:j])) + "</pre>")
            i = j + 1
            continue
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not re.fullmatch(r"\|(\s*-+\s*\|)+", lines[i].replace(":", "")):
                    rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, body = rows[0], rows[1:]
            out.append("<table><tr>" + "".join(f"<th>{fmt(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
            continue
        m = re.match(r"(#{1,6}) (.*)", line)
        if m:
            n = len(m.group(1))
            out.append(f"<h{n}>{fmt(m.group(2))}</h{n}>")
        elif line.startswith("> "):
            out.append(f"<blockquote>{fmt(line[2:])}</blockquote>")
        elif line.startswith("- "):
            out.append(f"<ul><li>{fmt(line[2:])}</li></ul>")
        elif line.strip():
            out.append(f"<p>{fmt(line)}</p>")
        i += 1
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px}"
        "th{background:#f3f3f3}img{max-width:100%}blockquote{background:#fff4e0;border-left:4px solid #f0a000;"
        "margin:0.5em 0;padding:0.4em 0.8em}code,pre{background:#f6f6f6}figure{margin:1em 0}")


def write_report(run_dir: str | Path, doc: dict[str, Any] | None = None) -> dict[str, Path]:
    """Render ``doc`` (default: the run's metrics.json) into report.md, report.html and fig_*.png."""
    run_dir = Path(run_dir)
    if doc is None:
        mpath = run_dir / "metrics.json"
        if not mpath.is_file():
            raise RunError(f"no metrics.json in {str(run_dir)!r}: run an evaluation there first")
        doc = json.loads(mpath.read_text())
    if doc.get("schema_version") != SCHEMA_VERSION or not isinstance(doc.get("sections"), list):
        raise RunError(f"{str(run_dir)!r}/metrics.json has an unknown schema (want schema_version {SCHEMA_VERSION})")
    title = doc.get("title", "Bastion report")
    md_parts, html_parts = [f"# {title}"], [f"<h1>{html.escape(title)}</h1>"]
    fig_no = 0
    if any(sec.get("type") not in _RENDERERS for sec in doc["sections"]):
        from bastion.plugins import load_plugins

        load_plugins()
    for sec in doc["sections"]:
        fn = _RENDERERS.get(sec.get("type", ""), _render_fallback)
        md, figs = fn(sec)
        md_parts.append(f"## {sec.get('title', sec.get('type'))}\n\n{md}")
        html_parts.append(f"<h2>{html.escape(str(sec.get('title', sec.get('type'))))}</h2>\n{_md_to_html(md)}")
        for caption, fig in figs:
            fig_no += 1
            png = _fig_png(fig)
            name = f"fig_{fig_no}.png"
            (run_dir / name).write_bytes(png)
            md_parts.append(f"![{caption}]({name})")
            html_parts.append(f"<figure><img alt=\"{html.escape(caption)}\" src=\"data:image/png;base64,"
                              f"{base64.b64encode(png).decode()}\"><figcaption>{html.escape(caption)}"
                              f"</figcaption></figure>")
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    md_path.write_text("\n\n".join(md_parts) + "\n")
    html_path.write_text(f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                         f"<style>{_CSS}</style></head><body>\n" + "\n".join(html_parts) + "\n</body></html>\n")
    return {"md": md_path, "html": html_path}

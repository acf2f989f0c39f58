"""The leaderboard's static site: ``index.html`` (one sortable table per threat model, published
RobustBench rows beside local ones, clearly marked) and one detail page per local entry x threat
model (attacks that ran and what broke each example, per-class bars, robust accuracy vs eps,
sanity flags, certified accuracy). Plain HTML with inline CSS, JS and SVG: open it from disk,
no server and no external assets. Pages are written deterministically (same rows, same bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from experiments.site.svg import grouped_bars, line_plot
from experiments.site.templates import CSS, PAGE, SORT_JS

__all__ = ["detail_name", "page", "write_site"]


def page(title: str, body: str) -> str:
    return PAGE.format(title=escape(title), css=CSS, js=SORT_JS, body=body)


def detail_name(row: dict[str, Any]) -> str:
    b = row["bastion"]
    return f"{row['name']}-{b['norm']}-{row['eps'].replace('/', '_')}.html"


def _num(v: float | None, nd: int = 2) -> str:
    return "–" if v is None else f"{float(v):.{nd}f}"


def _td(v: float | None) -> str:
    return f'<td class="num" data-sort="{"" if v is None else v}">{_num(v)}</td>'


def _table(head: Sequence[str], rows: Sequence[str], cls: str = "") -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _index(board: dict[str, Any]) -> str:
    parts = [f"<h1>Leaderboard: {escape(board['name'])}</h1>",
             f"<p>Data set <b>{escape(board['dataset'])}</b> ({escape(board['split'])} split), protocol "
             f"<b>{escape(board['protocol'])}</b>. Robust accuracy is the per-example worst case over every attack "
             f"the entry's defense calls for (AutoAttack-grade protocol plus adaptive attacks; see each entry's "
             f"page). Click a column header to sort.</p>"]
    if board.get("description"):
        parts.append(f"<p>{escape(board['description'])}</p>")
    head = ["rank", "model", "source", "defense", "eps", "clean acc. (%)", "robust acc. (%)", "certified (%)",
            "forward passes", "architecture", "flags"]
    for threat in board["threats"]:
        norm = threat.split(":")[0]
        local = [r for r in board["entries"] if f"{r['bastion']['norm']}:{r['eps']}" == threat]
        pub = [r for r in board.get("published", []) if r.get("norm") == norm]
        ordered = sorted(local + pub, key=lambda r: (-(r.get("autoattack_acc") or 0), r["name"]))
        rows = []
        for k, r in enumerate(ordered, 1):
            if r.get("source") == "published":
                name = escape(r["name"]) + (f' <a href="{escape(r["link"])}">paper</a>' if r.get("link") else "")
                rows.append(f'<tr class="published"><td class="num" data-sort="{k}">{k}</td><td>{name}</td>'
                            f'<td><span class="badge published">published (RobustBench)</span></td><td>–</td>'
                            f'<td>{escape(str(r.get("eps") or ""))} ({escape(str(r.get("dataset")))})</td>'
                            f'{_td(r.get("clean_acc"))}{_td(r.get("autoattack_acc"))}{_td(None)}'
                            f'<td class="num">{escape(str(r.get("number_forward_passes", "–")))}</td>'
                            f'<td>{escape(str(r.get("architecture", "")))}</td><td>–</td></tr>')
                continue
            b = r["bastion"]
            cert = (b.get("certified") or {}).get("certified_acc")
            nflags = len(b["sanity_flags"])
            flag = (f'<span class="badge warn">{nflags}</span>' if r["unreliable"] else str(nflags))
            rows.append(f'<tr><td class="num" data-sort="{k}">{k}</td><td><a href="{escape(detail_name(r))}">'
                        f'{escape(r["name"])}</a></td><td><span class="badge">local</span></td>'
                        f'<td>{escape(b["defense"])}</td><td>{escape(r["eps"])}</td>{_td(r["clean_acc"])}'
                        f'{_td(r["autoattack_acc"])}{_td(cert)}<td class="num">{r["number_forward_passes"]}</td>'
                        f'<td>{escape(r["architecture"])}</td><td data-sort="{nflags}">{flag}</td></tr>')
        parts.append(f"<h2>Threat model {escape(threat)}</h2>")
        parts.append(_table(head, rows, "sortable leaderboard") if rows else "<p class='muted'>no entries</p>")
    if board.get("published"):
        parts.append("<p class='muted'>Rows marked <i>published (RobustBench)</i> are read from RobustBench's "
                     "model_info JSON in a local folder; they were evaluated by their authors and RobustBench "
                     "on their own data set, not by this run.</p>")
    return page(f"Leaderboard {board['name']}", "\n".join(parts))


def _detail(board: dict[str, Any], r: dict[str, Any]) -> str:
    b = r["bastion"]
    parts = [f'<p><a href="index.html">&larr; leaderboard {escape(board["name"])}</a></p>',
             f"<h1>{escape(r['name'])} @ {escape(b['norm'])}:{escape(r['eps'])}</h1>"]
    meta = [("defense", b["defense"]), ("architecture", r["architecture"]), ("data set", r["dataset"]),
            ("examples", b["n_examples"]), ("clean accuracy (%)", _num(r["clean_acc"])),
            ("robust accuracy (%)", _num(r["autoattack_acc"])), ("forward passes", r["number_forward_passes"]),
            ("protocol", b["protocol"]), ("unreliable", "yes" if r["unreliable"] else "no"),
            ("config digest", b["config_digest"]), ("authors", r["authors"] or "–"), ("venue", r["venue"] or "–")]
    if b.get("certified"):
        c = b["certified"]
        meta.append((f"certified accuracy at L2 radius {c['radius_l2']:g} (%)", _num(c["certified_acc"])))
    parts.append(_table(["field", "value"], [f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>"
                                             for k, v in meta]))
    parts.append("<h2>Attacks that ran</h2>")
    att = b["attack_attribution"]
    rows = [f"<tr><td>{escape(str(a))}</td><td class='num'>{att.get(a, 0)}</td></tr>" for a in b["attacks"]]
    rows += [f"<tr><td>{escape(a)}</td><td class='num'>{att[a]}</td></tr>"
             for a in sorted(set(att) - set(b["attacks"]))]
    parts.append(f"<p>Run in this order, each on the examples still robust; robust accuracy "
                 f"{_num(r['autoattack_acc'])}% is the worst case over all of them.</p>")
    parts.append(_table(["attack (or AutoAttack part)", "examples it broke first"], rows, "sortable attacks"))
    if b.get("notes"):
        parts.append("<ul>" + "".join(f"<li>{escape(n)}</li>" for n in b["notes"]) + "</ul>")
    classes = list(b["per_class_clean_acc"])
    parts.append("<h2>Per-class accuracy</h2>")
    bars = grouped_bars(classes, {"clean": list(b["per_class_clean_acc"].values()),
                                  "robust": list(b["per_class_robust_acc"].values())}, "per-class accuracy")
    parts.append(f"<figure>{bars}<figcaption>Per-class clean and robust accuracy (%). Disparity (max − min): clean "
                 f"{_num(b['disparity']['clean'].get('max_minus_min'))}, robust "
                 f"{_num(b['disparity']['robust'].get('max_minus_min'))} points.</figcaption></figure>")
    curve = b["robust_acc_vs_eps"]
    parts.append("<h2>Robust accuracy vs eps</h2>")
    plot = line_plot([c["eps"] for c in curve], {"robust": [c["robust_acc"] for c in curve]},
                     "robust accuracy vs eps", f"eps ({b['norm']})")
    parts.append(f"<figure>{plot}<figcaption>Robust accuracy (%) of the same attack suite at each radius "
                 f"(eps 0: clean).</figcaption></figure>")
    parts.append(_table(["eps", "robust accuracy (%)"], [f"<tr><td>{escape(c['eps_text'])}</td>{_td(c['robust_acc'])}"
                                                         f"</tr>" for c in curve]))
    parts.append("<h2>Sanity flags</h2>")
    if b["sanity_flags"]:
        parts.append("<ul class='flags'>" + "".join(f"<li>{escape(f)}</li>" for f in b["sanity_flags"]) + "</ul>")
    else:
        parts.append("<p>None raised (no randomized output, probability output, zero gradients or gradient-free "
                     "wins over white-box attacks).</p>")
    parts.append(f'<p>Full evaluator report: <a href="../{escape(b["run_dir"])}/report.html">report.html</a> '
                 f'(per-example records in <code>{escape(b["run_dir"])}/records.jsonl</code>).</p>')
    return page(f"{r['name']} @ {b['norm']}:{r['eps']}", "\n".join(parts))


def write_site(board: dict[str, Any], out: str | Path) -> Path:
    """Write ``index.html`` and one page per local entry into ``out``; returns the index path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for r in board["entries"]:
        (out / detail_name(r)).write_text(_detail(board, r), encoding="utf-8")
    index = out / "index.html"
    index.write_text(_index(board), encoding="utf-8")
    return index

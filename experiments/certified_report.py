"""Certified-accuracy report over several certify runs (methods x sigmas) and imported TSV logs.

Sources: a run directory of ``bastion certify`` (its CERTIFY records; its ``certify-*.tsv`` logs
when it has no records), or a CERTIFY log in Cohen et al.'s tab-separated format (published or
foreign; ``idx label predict radius correct time``). Write ``METHOD=PATH`` to name the method
(default: the run directory's name, or the log's parent folder). A log's sigma comes from its
records, else from its path (``sigma_0.25``, ``noise_0.50``, ``sigma0.25``).

Every setting is folded with `certify.analysis.fold_rows` on one radius grid, so the table, the
curves and the best-over-sigma envelope per method line up: certified accuracy at the chosen
radii, ACR, abstention, time per example; imported logs are marked as such.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bastion.errors import ConfigError, RunError
from bastion.report import md_table, pct, register_renderer

_SIGMA = re.compile(r"(?:sigma|noise)[_-]?([0-9]*\.?[0-9]+)")


def sigma_from_path(path: Path) -> float | None:
    for part in reversed(path.parts):
        m = _SIGMA.search(part)
        if m:
            return float(m.group(1))
    return None


def _records(run: Path) -> dict[str, list[dict[str, Any]]]:
    by: dict[str, list[dict[str, Any]]] = {}
    path = run / "records.jsonl"
    if not path.is_file():
        return by
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("kind") == "certify":
            by.setdefault(str(r["probe"]), []).append(r)
    return by


def load_source(spec: str) -> list[dict[str, Any]]:
    """The settings of one source: ``[METHOD=]PATH`` -> [{method, name, sigma, source, rows}]."""
    from certify.logs import read_log

    method, sep, path_text = spec.partition("=")
    if not sep or not method or "/" in method:
        method, path_text = "", spec
    path = Path(path_text)
    if not path.exists():
        raise ConfigError(f"{path_text!r} is neither a certify run directory nor a TSV log")
    out = []
    if path.is_dir():
        recs = _records(path)
        method = method or path.name
        if recs:
            for probe, rs in recs.items():
                seen: dict[int, dict[str, Any]] = {}
                for r in rs:
                    seen.setdefault(int(r["index"]), r)
                rows = [{"label": r["label"], "predict": r["pred"], "radius": r["radius"], "time": r.get("time_s"),
                         "samples": r.get("samples")} for _, r in sorted(seen.items())]
                out.append({"method": method, "name": probe, "sigma": rs[0].get("sigma"), "source": "local",
                            "path": str(path), "rows": rows})
            return out
        logs = sorted(path.glob("certify-*.tsv"))
        if not logs:
            raise RunError(f"{str(path)!r} holds no CERTIFY records or certify-*.tsv logs; run bastion certify there")
        return [{"method": method, "name": f.stem.removeprefix("certify-"), "sigma": sigma_from_path(f),
                 "source": "local", "path": str(f), "rows": read_log(f)} for f in logs]
    rows = read_log(path)
    if rows and "radius" not in rows[0]:
        raise RunError(f"{str(path)!r} is a PREDICT log; the certified report reads CERTIFY logs")
    return [{"method": method or path.parent.name or path.stem, "name": path.name, "sigma": sigma_from_path(path),
             "source": "imported", "path": str(path), "rows": rows}]


def certified_report(sources: Sequence[str], *, radii: Sequence[float] | None = None, max_radius: float | None = None,
                     alpha: float = 0.001) -> dict[str, Any]:
    """The ``certified_report`` section data: settings folded on one grid, envelopes per method."""
    from certify.analysis import default_max_radius, envelope, fold_rows, table_radii

    settings = [s for spec in sources for s in load_source(spec)]
    if not settings:
        raise ConfigError("give at least one certify run directory or CERTIFY log")
    sigmas = [float(s["sigma"]) for s in settings if s["sigma"] is not None]
    mx = float(max_radius or max([default_max_radius(sigmas)] + list(radii or [])))
    grid = [float(r) for r in radii] if radii else table_radii(mx)
    folded = []
    for s in settings:
        f = fold_rows(s["rows"], sigma=s["sigma"], alpha=alpha, max_radius=mx, radii=grid)
        folded.append({k: v for k, v in s.items() if k != "rows"} | f)
    methods: dict[str, list[dict[str, Any]]] = {}
    for s in folded:
        methods.setdefault(s["method"], []).append(s)
    env = {m: (envelope(ss) if len(ss) > 1 else None) for m, ss in methods.items()}
    return {"radii": grid, "max_radius": mx, "alpha": alpha, "settings": folded, "methods": list(methods),
            "envelopes": env}


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def render_certified_report(sec: dict[str, Any]) -> tuple[str, list]:
    d = sec["data"]
    radii = d["radii"]
    head = ["method", "setting", "sigma", "source", "examples"] + [f"r={r:g}" for r in radii]
    rows = []
    for m in d["methods"]:
        for s in (x for x in d["settings"] if x["method"] == m):
            rows.append([m, s["name"], "–" if s["sigma"] is None else f"{s['sigma']:g}",
                         "imported log" if s["source"] == "imported" else "local run", s["num_examples"]]
                        + [pct(a) for a in s["certified_accuracy"]])
        e = d["envelopes"].get(m)
        if e:
            rows.append([f"**{m}**", "**best over sigma**", "–", "–", "–"] + [f"**{pct(a)}**"
                                                                             for a in e["certified_accuracy"]])
    parts = [f"Approximate certified accuracy at L2 radius r (pixel units in [0, 1]); alpha = {d['alpha']}.",
             md_table(head, rows)]
    rows = [[s["method"], s["name"], pct(s["clean_accuracy"]), pct(s["abstention_rate"]), f"{s['acr']:.3f}",
             _fmt_s(s.get("mean_time_s"))] for s in d["settings"]]
    parts.append(md_table(["method", "setting", "accuracy of g (r=0)", "abstained", "ACR", "time / example"], rows))
    from bastion.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, m in enumerate(d["methods"]):
        c = colors[k % len(colors)]
        for j, s in enumerate(x for x in d["settings"] if x["method"] == m):
            cv = s["curve"]
            xs = [i * cv["step"] for i in range(len(cv["accuracy"]))]
            sig = "" if s["sigma"] is None else f" sigma={s['sigma']:g}"
            ax.plot(xs, cv["accuracy"], color=c, lw=1.1, alpha=0.55 + 0.45 / (j + 1),
                    ls=":" if s["source"] == "imported" else "-", label=f"{m}{sig}")
        e = d["envelopes"].get(m)
        if e:
            xs = [i * e["step"] for i in range(len(e["accuracy"]))]
            ax.plot(xs, e["accuracy"], color=c, lw=2.2, ls="--", label=f"{m}: best over sigma")
    ax.set_xlabel("L2 radius r")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, d["max_radius"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return "\n\n".join(parts), [("certified accuracy vs radius (dotted: imported logs; dashed: envelope)", fig)]


register_renderer("certified_report", render_certified_report)


def write_certified_report(sources: Sequence[str], out: str | Path, **kw: Any) -> dict[str, Any]:
    """Fold ``sources`` and write ``out``/metrics.json, report.md and report.html; returns the document."""
    from bastion.report import metrics_document, section, write_report

    data = certified_report(sources, **kw)
    doc = metrics_document([section("certified_report", "Certified accuracy: methods x sigmas", data)],
                           title="Bastion certified-accuracy report")
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    (outp / "metrics.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    write_report(outp, doc)
    return doc

"""Write the README's quickstart result tables from the quickstart's metrics.json.

    python scripts/readme_tables.py [runs/quickstart/metrics.json] > tables.md

The block states the torch version, device and thread count the figures come from, so the README
never shows numbers that the quickstart no longer prints. Reads only the JSON (no torch import)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def robustness_table(sections: list[dict[str, Any]]) -> list[str]:
    rows = [s for s in sections if s["type"] == "robustness"]
    if not rows:
        return []
    threats = list(rows[0]["data"]["robust"])
    attack = next((s["title"].split("(")[-1].rstrip(")") for s in sections if s["type"] == "robustness_curves"),
                  "PGD")
    n = rows[0]["data"]["clean"]["n"]
    head = f"| model (digits test set, {n} images) | clean | " + " | ".join(
        f"{attack} eps {t.split(':', 1)[1]}" for t in threats) + " |"
    out = [head, "|---|---|" + "---|" * len(threats)]
    for s in rows:
        d = s["data"]
        out.append(f"| {s['title']} | {pct(d['clean']['accuracy'])} | "
                   + " | ".join(pct(d["robust"][t]["accuracy"]) for t in threats) + " |")
    return out


def _summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    mon = [r for r in history if "val_pgd" in r]
    peak = max(mon, key=lambda r: r["val_pgd"])
    co = [r["epoch"] + 1 for r in mon if r.get("co")]
    return {"peak": peak["val_pgd"], "peak_epoch": peak["epoch"] + 1, "final": mon[-1]["val_pgd"],
            "fgsm": mon[-1]["val_fgsm"], "co": co, "epochs": len(history)}


def training_table(sections: list[dict[str, Any]]) -> list[str]:
    runs = [r for s in sections if s["type"] == "training" for r in s["data"].get("runs", [])]
    if not runs:
        return []
    epochs = len(runs[0]["history"])
    out = [f"| single-step AT, digits-x4, eps 0.2, {epochs} epochs | peak PGD-10 | final PGD-10 | final FGSM "
           f"| CO flagged |", "|---|---|---|---|---|"]
    seen: dict[str, str] = {}
    for r in runs:
        s = _summary(r["history"])
        key = json.dumps([(h.get("val_pgd"), h.get("val_fgsm")) for h in r["history"]])
        same = seen.get(key)
        seen.setdefault(key, r["name"])
        co = f"epoch {s['co'][0]}" if s["co"] else "no"
        if s["co"] and s["co"][-1] != s["epochs"] and s["final"] >= 0.5 * s["peak"]:
            co += " (a transient dip)"
        note = f" (curves identical to {same})" if same else ""
        out.append(f"| {r['name']}{note} | {pct(s['peak'])} (epoch {s['peak_epoch']}) | {pct(s['final'])} | "
                   f"{pct(s['fgsm'])} | {co} |")
    return out


def certification_table(sections: list[dict[str, Any]]) -> list[str]:
    sec = next((s for s in sections if s["type"] == "certification"), None)
    if sec is None:
        return []
    d = sec["data"]
    radii = [0.0, 0.25, 0.5]
    n_ex = d["settings"][0]["num_examples"]
    out = [f"| randomized smoothing ({n_ex} test images, n = {d['n']:,}) | "
           + " | ".join(f"r = {r:g}" for r in radii) + " | ACR |", "|---|" + "---|" * (len(radii) + 1)]
    for s in d["settings"]:
        acc = dict(zip(s["radii"], s["certified_accuracy"]))
        label = (f"Gaussian-trained, sigma {s['sigma']:g}" if s["name"].startswith("gaussian")
                 else f"{s['name'].split('-sigma')[0]} model, sigma {s['sigma']:g}")
        out.append(f"| {label} | " + " | ".join(pct(acc.get(r), 0) for r in radii) + f" | {s['acr']:.3f} |")
    return out


def readme_block(doc: dict[str, Any]) -> str:
    env = doc.get("environment", {})
    times = doc.get("timings_seconds", {})
    total = sum(times.values())
    head = (f"Figures from `bastion quickstart` (seed 0) with torch {env.get('torch', '?')} on "
            f"{env.get('device', 'cpu')}, {env.get('threads', '?')} thread(s); {total:.0f} s in total ("
            + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + "). Regenerate with "
            "`python scripts/readme_tables.py runs/quickstart/metrics.json`.")
    parts = [head]
    for table in (robustness_table, training_table, certification_table):
        lines = table(doc["sections"])
        if lines:
            parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "runs/quickstart/metrics.json")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        print(f"readme_tables: error: cannot read {str(path)!r}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(readme_block(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

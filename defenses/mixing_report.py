"""Reports of adaptive smoothing: the accuracy-robustness trade-off and the robust base's margins.

- ``adaptive_tradeoff`` section (`tradeoff_section`): one point per model (accurate base, robust
  base, fixed-alpha sweep, logit mixing, mixing network at several operating points) with clean
  accuracy, robust accuracy under the full adaptive suite (the reported number) and under the
  weak suite (shown beside it); rendered as one plot and one table.
- ``margin`` records (`MarginProbe`, one per example: the robust base's top-1 minus top-2
  probability on the clean input and on its PGD adversary, and whether each was correct), folded
  into a ``robust_margins`` section: histograms for correct vs incorrect, clean vs attacked (the
  "benign confidence" that makes mixing work).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bastion.folds import FoldContext, register_fold
from bastion.records import BaseRecord, Record, register_record_type
from bastion.report import md_table, pct, pyplot, register_renderer, section

KINDS = ("accurate", "robust", "fixed", "logit", "mixing")


# ---------------------------------------------------------------------------------------------
# Trade-off
# ---------------------------------------------------------------------------------------------

def tradeoff_point(name: str, kind: str, doc_section: dict[str, Any], threat: str, full_suite: str,
                   weak_suite: str | None = None, **extra: Any) -> dict[str, Any]:
    """One model's point from its ``robustness`` section data: clean, robust under the union of
    suites (worst case per example: the reported number), and the weak suite's own accuracy."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    rob = doc_section["robust"][threat]
    per = rob.get("per_attack", {})
    return {"name": name, "kind": kind, "clean": doc_section["clean"]["accuracy"], "robust": rob["accuracy"],
            "robust_full_suite": per.get(full_suite), "robust_weak": per.get(weak_suite) if weak_suite else None,
            "broken_by": rob.get("broken_by", {}), **extra}


def tradeoff_section(title: str, points: list[dict[str, Any]], threat: str, notes: list[str] | None = None
                     ) -> dict[str, Any]:
    return section("adaptive_tradeoff", title, {"threat": threat, "points": points, "notes": list(notes or [])})


def render_tradeoff(sec: dict[str, Any]) -> tuple[str, list]:
    d = sec["data"]
    pts = d["points"]
    rows = [[p["name"], p["kind"], pct(p["clean"]), pct(p["robust"]), pct(p.get("robust_weak")),
             ", ".join(f"{k} {v}" for k, v in sorted(p.get("broken_by", {}).items(), key=lambda kv: -kv[1])[:4])]
            for p in pts]
    md = [f"Threat model `{d['threat']}`. Robust accuracy = per-example worst case over the full adaptive suite "
          f"(and the weak suite); the weak suite's own number is shown beside it, never reported alone.",
          md_table(["model", "kind", "clean", "robust (adaptive suite)", "robust (weak suite)",
                    "broken by (first attack, top 4)"], rows)]
    md += [f"> {n}" for n in d.get("notes", [])]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    style = {"accurate": ("s", "tab:blue"), "robust": ("D", "tab:red"), "fixed": ("o", "tab:gray"),
             "logit": ("x", "tab:purple"), "mixing": ("*", "tab:green")}
    fixed = sorted([p for p in pts if p["kind"] in ("fixed", "accurate", "robust")], key=lambda p: p["robust"])
    if fixed:
        ax.plot([100 * p["robust"] for p in fixed], [100 * p["clean"] for p in fixed], "-", color="tab:gray",
                lw=1, label="fixed alpha (adaptive suite)")
    for p in pts:
        m, c = style[p["kind"]]
        ax.plot(100 * p["robust"], 100 * p["clean"], m, color=c, ms=9 if p["kind"] == "mixing" else 6)
        ax.annotate(p["name"], (100 * p["robust"], 100 * p["clean"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
        if p.get("robust_weak") is not None and p["kind"] == "mixing":
            ax.plot(100 * p["robust_weak"], 100 * p["clean"], m, color=c, mfc="none", ms=9)
            ax.plot([100 * p["robust"], 100 * p["robust_weak"]], [100 * p["clean"]] * 2, ":", color=c, lw=1)
    ax.plot([], [], "*", color="tab:green", mfc="none", label="mixing net, weak suite (not reported)")
    ax.set_xlabel(f"robust accuracy (%) at {d['threat']}")
    ax.set_ylabel("clean accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(sec.get("title", "trade-off"), fontsize=9)
    fig.tight_layout()
    return "\n\n".join(md), [(f"{sec.get('title', 'trade-off')}: clean vs robust accuracy", fig)]


register_renderer("adaptive_tradeoff", render_tradeoff)


# ---------------------------------------------------------------------------------------------
# Margins of the robust base
# ---------------------------------------------------------------------------------------------

@register_record_type
@dataclass(frozen=True, kw_only=True)
class MarginRecord(BaseRecord):
    """The model's top-1 minus top-2 probability margin on the clean input (``margin``) and on an
    adversary (``margin_adv``, ``pred_adv``); ``pred``/``correct`` are on the clean input."""

    kind: ClassVar[str] = "margin"
    margin: float
    margin_adv: float
    pred_adv: int
    correct_adv: bool
    attack: str = ""


class MarginProbe:
    """Margins of the evaluated model (the robust base) on clean inputs and under ``attack``
    (an `attacks.Attack`; its own broken/not-broken decision is not used, only its adversary)."""

    def __init__(self, attack: Any, temperature: float = 1.0, name: str = "margins"):
        self.attack = attack
        self.temperature = float(temperature)
        self.name = name

    def describe(self) -> dict[str, Any]:
        return {"kind": "margin", "attack": self.attack.describe(), "temperature": self.temperature}

    def run(self, model, x, y, indices, generator) -> list[Record]:
        x_adv = self.attack(model, x, y, generator=generator)
        with torch.no_grad():
            p, pa = (F.softmax(self.temperature * model(z), dim=1) for z in (x, x_adv))
        t, ta = p.topk(2, dim=1), pa.topk(2, dim=1)
        m, ma = t.values[:, 0] - t.values[:, 1], ta.values[:, 0] - ta.values[:, 1]
        pred, pred_a = t.indices[:, 0], ta.indices[:, 0]
        return [MarginRecord(index=int(i), probe=self.name, label=int(lab), pred=int(a), correct=int(a) == int(lab),
                             margin=float(mm), margin_adv=float(mma), pred_adv=int(b), correct_adv=int(b) == int(lab),
                             attack=self.attack.name).to_record()
                for i, lab, a, b, mm, mma in zip(indices.tolist(), y.tolist(), pred.tolist(), pred_a.tolist(),
                                                 m.tolist(), ma.tolist())]


BINS = [i / 20 for i in range(21)]


def fold_margins(records: list[BaseRecord], ctx: FoldContext) -> list[dict[str, Any]]:
    groups: dict[str, list[float]] = {"clean, correct": [], "clean, incorrect": [], "attacked, correct": [],
                                      "attacked, incorrect": []}
    for r in records:
        groups["clean, " + ("correct" if r.correct else "incorrect")].append(r.margin)
        groups["attacked, " + ("correct" if r.correct_adv else "incorrect")].append(r.margin_adv)
    data = {"bins": BINS, "attack": records[0].attack if records else "",
            "groups": {k: {"n": len(v), "mean": float(np.mean(v)) if v else None,
                           "counts": np.histogram(v, bins=BINS)[0].tolist()} for k, v in groups.items()}}
    return [section("robust_margins", f"{ctx.title}: margins of the robust base", data)]


register_fold("margin", fold_margins, kinds=("margin",))


def render_margins(sec: dict[str, Any]) -> tuple[str, list]:
    d = sec["data"]
    rows = [[k, g["n"], "–" if g["mean"] is None else f"{g['mean']:.3f}"] for k, g in d["groups"].items()]
    md = (f"Top-1 minus top-2 probability of the robust base, clean and under `{d['attack']}`: confident when "
          f"right, unsure when wrong, which lets the accurate base overturn it where it is unsure.\n\n"
          + md_table(["group", "examples", "mean margin"], rows))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3), sharey=False)
    centers = [(a + b) / 2 for a, b in zip(d["bins"][:-1], d["bins"][1:])]
    for ax, where in zip(axes, ("clean", "attacked")):
        for ok, color in (("correct", "tab:green"), ("incorrect", "tab:red")):
            g = d["groups"][f"{where}, {ok}"]
            total = max(1, g["n"])
            ax.bar(centers, [c / total for c in g["counts"]], width=0.045, alpha=0.6, color=color,
                   label=f"{ok} (n={g['n']})")
        ax.set_title(f"{where} inputs", fontsize=9)
        ax.set_xlabel("margin p_top1 - p_top2")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("fraction of group")
    fig.tight_layout()
    return md, [(f"{sec.get('title', 'margins')}: histograms", fig)]


register_renderer("robust_margins", render_margins)

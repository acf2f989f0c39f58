"""Report renderer for ``training`` sections: per-epoch curves that make catastrophic
overfitting (CO) visible at a glance.

Section data: either one run, ``{"objective": {...}, "model": str, "history": [epoch records]}``
(as `bastion train` writes it), or several runs side by side,
``{"runs": [{"name": str, "history": [...], "objective": {...}}, ...]}``. Epoch records are those
of `bastion.train.fit` merged with `defenses.co_monitor.COMonitor` fields (``val_clean``,
``val_fgsm``, ``val_pgd``, ``aae_frac``, ``v_gap``, ``gate_open_frac``, ``co``, ``co_event``).
"""

from __future__ import annotations

from typing import Any

from bastion.report import md_table, register_renderer


def _runs(data: dict[str, Any]) -> list[dict[str, Any]]:
    if "runs" in data:
        return list(data["runs"])
    name = (data.get("objective") or {}).get("objective", "run") if isinstance(data.get("objective"), dict) else \
        str(data.get("objective", "run"))
    return [{"name": name, "history": data.get("history", []), "objective": data.get("objective"),
             "stopped_early": data.get("stopped_early", False)}]


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else ""
    return f"{float(v):.{digits}f}"


def run_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Peak / final PGD accuracy, final FGSM and clean accuracy, first CO epoch (1-based) of a run."""
    mon = [r for r in history if "val_pgd" in r]
    if not mon:
        return {}
    peak = max(mon, key=lambda r: r["val_pgd"])
    co_epochs = [r["epoch"] + 1 for r in mon if r.get("co")]
    return {"peak_pgd": peak["val_pgd"], "peak_epoch": peak["epoch"] + 1, "final_pgd": mon[-1]["val_pgd"],
            "final_fgsm": mon[-1]["val_fgsm"], "final_clean": mon[-1]["val_clean"],
            "co": bool(co_epochs), "co_first_epoch": co_epochs[0] if co_epochs else None,
            "co_at_end": bool(mon[-1].get("co")),
            "co_epochs": co_epochs, "epochs": len(history)}


def render_training(sec: dict[str, Any]) -> tuple[str, list]:
    from bastion.report import pyplot

    data = sec.get("data", {})
    runs = _runs(data)
    parts: list[str] = []
    summary_rows = []
    for run in runs:
        s = run_summary(run.get("history", []))
        if s:
            summary_rows.append([run["name"], _f(s["peak_pgd"]), s["peak_epoch"], _f(s["final_pgd"]),
                                 _f(s["final_fgsm"]), _f(s["final_clean"]),
                                 (f"**CO at epoch {s['co_first_epoch']}**"
                                  + ("" if s["co_at_end"] else ", recovered by the last epoch")) if s["co"]
                                 else "no CO"])
    if summary_rows:
        parts.append(md_table(["run", "peak PGD", "peak epoch", "final PGD", "final FGSM", "final clean",
                               "catastrophic overfitting"], summary_rows))
    if data.get("note"):
        parts.append(str(data["note"]))
    for run in runs:
        hist = run.get("history", [])
        for r in hist:
            if r.get("co_event"):
                parts.append(f"> ⚠ **{run['name']}**: {r['co_event']}")
            if r.get("stopped"):
                parts.append(f"> {run['name']}: {r['stopped']}")
    if len(runs) == 1 or data.get("per_epoch_tables", len(runs) <= 2):
        for run in runs:
            hist = run.get("history", [])
            rows = [[r["epoch"] + 1, _f(r.get("train_loss")), _f(r.get("train_acc")), _f(r.get("val_clean")),
                     _f(r.get("val_fgsm")), _f(r.get("val_pgd")), _f(r.get("aae_frac", r.get("train_aae_frac"))),
                     _f(r.get("v_gap"), 2), _f(r.get("gate_open_frac"), 2),
                     "**CO**" if r.get("co") else ""] for r in hist]
            if rows:
                obj = run.get("objective")
                head = f"**{run['name']}**" + (f" — `{obj}`" if obj else "")
                parts.append(head + "\n\n" + md_table(
                    ["epoch", "train loss", "train acc", "clean", "FGSM", "PGD", "AAE frac", "V_A − V_N",
                     "gate open", "CO"], rows))
    figs = []
    monitored = [r for r in runs if any("val_pgd" in e for e in r.get("history", []))]
    if monitored:
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        co_labelled = False
        for i, run in enumerate(monitored):
            c = colors[i % len(colors)]
            hist = [r for r in run["history"] if "val_pgd" in r]
            ep = [r["epoch"] + 1 for r in hist]
            axes[0].plot(ep, [r["val_pgd"] for r in hist], "-", color=c, label=f"{run['name']} PGD")
            axes[0].plot(ep, [r["val_fgsm"] for r in hist], "--", color=c, alpha=0.7, label=f"{run['name']} FGSM")
            co = [(r["epoch"] + 1, r["val_pgd"]) for r in hist if r.get("co")]
            if co:
                axes[0].scatter([p[0] for p in co], [p[1] for p in co], marker="x", color="red", zorder=5,
                                label=None if co_labelled else "CO flagged")
                co_labelled = True
            axes[1].plot(ep, [r.get("aae_frac") if r.get("aae_frac") is not None else float("nan") for r in hist],
                         color=c, label=run["name"])
            axes[2].plot(ep, [r.get("v_gap") if r.get("v_gap") is not None else float("nan") for r in hist],
                         color=c, label=run["name"])
        axes[0].set_ylim(0, 1)
        axes[0].set_title("held-out accuracy (solid PGD, dashed FGSM)")
        axes[1].set_title("training AAE fraction m/B")
        axes[2].set_title("V_A − V_N (mixed batches; symlog)")
        axes[2].axhline(0, color="grey", lw=0.8)
        axes[2].set_yscale("symlog", linthresh=1.0)   # collapsed runs reach |V_A - V_N| of 1e4
        for ax in axes:
            ax.set_xlabel("epoch")
        axes[0].legend(fontsize=6, ncol=2)
        axes[1].legend(fontsize=6)
        fig.suptitle(sec.get("title", "training"), fontsize=9)
        fig.tight_layout()
        figs.append((f"{sec.get('title', 'training')}: per-epoch CO monitor (red x = CO flagged)", fig))
    if not parts:
        parts.append("(no epochs recorded)")
    return "\n\n".join(parts), figs


register_renderer("training", render_training)

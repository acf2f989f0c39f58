"""Report renderer for ``certification`` sections: tables and the certified-accuracy curves
(every sigma and the best-over-sigma envelope on one plot)."""

from __future__ import annotations

from typing import Any

from bastion.report import md_table, pct, register_renderer


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def render_certification(sec: dict[str, Any]) -> tuple[str, list]:
    d = sec["data"]
    settings = d.get("settings", [])
    parts = []
    mode = d.get("mode", "exact")
    parts.append(f"Task `{d.get('task', 'certify')}`, {mode} mode, n0 = {d.get('n0')}, n = {d.get('n')}, "
                 f"alpha = {d.get('alpha')}, data `{d.get('dataset')}`/{d.get('split')}"
                 + (f", autocast {d['autocast']}" if d.get("autocast") else "") + ".")
    if d.get("task") == "predict":
        rows = [[s["name"], s["sigma"], s["num_examples"], pct(s["accuracy"]), pct(s["abstention_rate"]),
                 _fmt_s(s.get("mean_time_s"))] for s in settings]
        parts.append(md_table(["setting", "sigma", "examples", "accuracy", "abstained", "time / example"], rows))
        return "\n\n".join(parts), []
    if not settings:
        return "\n\n".join(parts + ["No examples certified yet."]), []
    radii = settings[0]["radii"]
    rows = []
    for s in settings:
        rows.append([s["name"], s["sigma"], s["num_examples"]] + [pct(a) for a in s["certified_accuracy"]])
    env = d.get("envelope")
    if env:
        rows.append(["best over sigma", "–", settings[0]["num_examples"]] + [pct(a) for a in env["certified_accuracy"]])
    parts.append("Approximate certified accuracy at radius r (L2, pixel units in [0, 1]):\n\n"
                 + md_table(["setting", "sigma", "examples"] + [f"r={r:g}" for r in radii], rows))
    rows = []
    for s in settings:
        st = s.get("stopped") or {}
        rows.append([s["name"], pct(s["clean_accuracy"]), pct(s["abstention_rate"]), f"{s['acr']:.3f}",
                     _fmt_s(s.get("mean_time_s")),
                     f"{s['samples_mean']:.0f}" if s.get("samples_mean") is not None else "–",
                     ", ".join(f"{k} {v}" for k, v in sorted(st.items())) or "–"])
    parts.append(md_table(["setting", "clean acc. of g (r=0)", "abstained", "ACR", "time / example",
                           "samples / example", "stopped"], rows))
    hp = [[s["name"]] + [pct(a) for a in s["certified_accuracy_hp"]] for s in settings]
    parts.append(f"High-probability certified accuracy (Cohen et al. App., rho = 0.001, alpha = {d.get('alpha')}):\n\n"
                 + md_table(["setting"] + [f"r={r:g}" for r in radii], hp))
    if mode == "sequential":
        parts.append(f"> Sequential mode stops once an example is certified at radius >= {d.get('max_radius')} "
                     f"(the largest reported radius) or cannot reach 1/2; its certificates hold at the same alpha, "
                     f"but ACR and radii above the stop radius are lower bounds of exact mode's.")
    if mode == "anytime":
        parts.append("> Anytime mode stops each example once sequential tests per table radius (valid at every "
                     "sample count) decide it at every table radius, or exact mode at the cap would not certify "
                     "it; certificates hold at the same alpha, but radii are only as "
                     "tight as those decisions need: compare certified accuracy at the table radii, not ACR or the "
                     "fine curve, with exact mode.")
    from bastion.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for s in settings:
        c = s["curve"]
        xs = [i * c["step"] for i in range(len(c["accuracy"]))]
        label = s["name"] if f"sigma{s['sigma']:g}" in s["name"] else f"{s['name']} (sigma={s['sigma']:g})"
        ax.plot(xs, c["accuracy"], label=label, lw=1.4)
    if env:
        xs = [i * env["step"] for i in range(len(env["accuracy"]))]
        ax.plot(xs, env["accuracy"], "k--", lw=1.2, label="best over sigma")
    ax.set_xlabel("L2 radius r")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, settings[0]["curve"]["max_radius"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(sec.get("title", "certified accuracy"), 70)), fontsize=9)
    fig.tight_layout()
    return "\n\n".join(parts), [(f"{sec.get('title', 'Certification')}: certified accuracy vs radius", fig)]


register_renderer("certification", render_certification)

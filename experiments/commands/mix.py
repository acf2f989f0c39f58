"""``bastion mix CONFIG``: the adaptive-smoothing study (spec adaptive-smoothing.md sections 5, 6, 9).

One TOML config (experiments/configs/adaptive_*.toml) runs, resumably (every training and every
evaluation is its own run directory under OUT):

1. the bases: an accurate one (``standard``) and a robust one (``pgd`` adversarial training);
2. fixed-alpha mixtures (the sweep) and logit mixing (the ablation), each evaluated with the full
   adaptive suite (`attacks.mixing.adaptive_probe`) and the weak suite beside it;
3. the mixing network trained with the ``adaptive_mixing`` objective of `fit` (bases frozen and
   checked bit-identical), saved as one composite checkpoint, evaluated at several (b_eval,
   alpha range) operating points;
4. the robust base's margins (clean vs attacked, correct vs incorrect);
5. the certificate (Lipschitz form) of a linear softmax robust base mixed with the accurate base,
   and its soundness check (l2 PGD at 0.999 r and 3 r);

then writes OUT/metrics.json + report.md/html (trade-off, margins, certification, checks).
"""

from __future__ import annotations

import argparse
import json
import time
import tomllib
from pathlib import Path
from typing import Any

from bastion.errors import ConfigError
from experiments.common import add_command

HELP = """examples:
  bastion mix experiments/configs/adaptive_digits.toml --out docs/results-adaptive/digits
  bastion mix experiments/configs/adaptive_cifar10.toml --data-root ~/data --device cuda"""

DEFAULTS: dict[str, Any] = {
    "title": "adaptive smoothing", "dataset": "digits", "data_root": None, "image_size": None, "seed": 0,
    "threat": "linf:0.3", "max_examples": None, "batch_size": 256,
    "bases": {"arch": "small_cnn", "arch_kwargs": {"width": 64}, "taps": ["net.1", "net.4"], "epochs": 25,
              "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "batch_size": 64, "schedule": "cosine",
              "augment": "none", "at_eps": 0.3, "at_steps": 7},
    "mixer": {"widths": [32, 64], "blocks": 0, "epochs": 15, "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-5,
              "batch_size": 64, "augment": "none", "temperatures": [1.0, 1.0], "objective": {}},
    "sweep": {"alphas": [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], "logit_alpha": 0.7},
    "operating_points": [{"b_eval": 1.3, "alpha_range": [0.0, 1.0]}],
    "eval": {"steps": 100, "weak_steps": 50, "weights": [0.3, 0.5, 0.7, 0.9], "n_target_classes": 9,
             "transfer_alpha": 0.95, "square_queries": 1000},
    "margins": {"steps": 50},
    "certify": {"enabled": True, "epochs": 30, "lr": 1e-2, "penalty": 0.05, "alphas": [0.4, 0.6, 0.8, 0.95],
                "max_radius": 1.0, "pgd_steps": 100, "pgd_restarts": 2},
}


def merge_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """DEFAULTS updated with ``cfg`` (one level of tables); unknown keys raise `ConfigError`."""
    out = json.loads(json.dumps(DEFAULTS))
    for k, v in cfg.items():
        if k == "command":
            continue
        if k not in out:
            raise ConfigError(f"unknown key {k!r} in the mix config; known: {', '.join(sorted(out))}")
        if isinstance(out[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{k!r} must be a table")
            bad = [x for x in v if x not in out[k]]
            if bad:
                raise ConfigError(f"unknown key {k}.{bad[0]} in the mix config; known: {', '.join(sorted(out[k]))}")
            out[k].update(v)
        else:
            out[k] = v
    return out


def register(sub, common) -> None:
    p = add_command(sub, common, "mix", help="adaptive smoothing: bases, sweep, mixing network, attacks, certificate",
                    description="Run an adaptive-smoothing study from a TOML config: train the bases and the "
                                "mixing network, evaluate every model with the full adaptive attack suite "
                                "(weak suite beside it), certify, and write the trade-off report. Resumable.",
                    epilog=HELP)
    p.add_argument("config", help="TOML config (experiments/configs/adaptive_*.toml)")
    p.add_argument("--out", default=None, help="output folder (default runs/adaptive-<config name>)")
    p.add_argument("--data-root", default=None, help="data folder (CIFAR)")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate on the first N test examples")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    if args.data_root:
        cfg["data_root"] = args.data_root
    if args.max_examples:
        cfg["max_examples"] = args.max_examples
    out = Path(args.out or f"runs/adaptive-{Path(args.config).stem}")
    run_study(cfg, out, device=getattr(args, "device", None) or "cpu", quiet=bool(getattr(args, "quiet", False)))
    return 0


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------

def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


def _train(name: str, out: Path, arch: str, arch_kwargs: dict, train, objective, tc, device: str, quiet: bool):
    """Train a registry model with `fit` into out/name (resumable) or load the finished one."""
    import torch

    from bastion.checkpoints import load_checkpoint, make_card, save_checkpoint
    from bastion.models import create_model
    from bastion.train import fit

    final = out / name / "model"
    if final.with_suffix(".json").is_file():
        m, card = load_checkpoint(final, device)
        return m, card
    c, h, _ = train.input_shape
    torch.manual_seed(tc.seed)
    model = create_model(arch, train.num_classes, c, h, **arch_kwargs).to(device)
    card = make_card(model, arch, train.num_classes, train.input_shape, arch_kwargs, train.class_names,
                     dataset=train.name, seed=tc.seed)
    fit(model, train, objective, tc, run_dir=out / name, device=device, quiet=quiet, checkpoint_card=card)
    card["recipe"] = objective.config()
    save_checkpoint(final, model, card)
    return model.eval(), json.loads(final.with_suffix(".json").read_text())


def run_study(cfg: dict[str, Any], out: str | Path, device: str = "cpu", quiet: bool = False) -> dict[str, Any]:
    """Run the study of ``cfg`` (see `DEFAULTS`) into ``out``; returns the metrics document."""
    import torch

    import defenses.mixing_report as rep
    import defenses.mixing_training  # noqa: F401  (registers adaptive_mixing, spectral_ce)
    import defenses.pgd_at  # noqa: F401
    from attacks import create_attack
    from attacks.mixing import adaptive_probe, weak_probe
    from bastion.data import load_dataset
    from bastion.evaluate import CleanProbe, evaluate, section_data
    from bastion.report import metrics_document, section, write_report
    from bastion.runner import RunOptions
    from bastion.train import TrainConfig, create_objective, fit
    from certify.adaptive import LipschitzCertifyProbe, linear_pairwise_lipschitz, radius_pgd
    from defenses.adaptive_smoothing import MixedClassifier, mixer_for, save_mixed
    from defenses.mixing_training import bases_unchanged, freeze_check

    c = merge_config(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    kw = {"root": c["data_root"]} if c["data_root"] else {}
    if c["image_size"]:
        kw["image_size"] = int(c["image_size"])
    train = load_dataset(c["dataset"], "train", seed=c["seed"], **kw)
    test = load_dataset(c["dataset"], "test", seed=c["seed"], **kw)
    if c["max_examples"]:
        test = test.every(1, int(c["max_examples"]))
    b, m_cfg, ev = c["bases"], c["mixer"], c["eval"]
    threat = c["threat"]

    def tc(sec: dict[str, Any], epochs: int | None = None) -> TrainConfig:
        return TrainConfig(epochs=int(epochs or sec["epochs"]), batch_size=int(sec["batch_size"]),
                           optimizer=sec["optimizer"], lr=float(sec["lr"]), weight_decay=float(sec["weight_decay"]),
                           schedule=sec.get("schedule", "cosine"), augment=sec.get("augment", "none"), seed=c["seed"])

    t0 = time.perf_counter()
    g, g_card = _train("base-accurate", out, b["arch"], b["arch_kwargs"], train, create_objective("standard"), tc(b),
                       device, quiet)
    h, h_card = _train("base-robust", out, b["arch"], b["arch_kwargs"], train,
                       create_objective("pgd", eps=b["at_eps"], steps=b["at_steps"]), tc(b), device, quiet)
    timings["bases_s"] = time.perf_counter() - t0
    temps = [float(t) for t in m_cfg["temperatures"]]
    suite_args = {"steps": int(ev["steps"]), "weights": ev["weights"], "n_target_classes": int(ev["n_target_classes"]),
                  "transfer_alpha": float(ev["transfer_alpha"]), "square_queries": int(ev["square_queries"]),
                  "seed": c["seed"]}
    full, weak = adaptive_probe(threat, **suite_args), weak_probe(threat, steps=int(ev["weak_steps"]), seed=c["seed"])
    opts = RunOptions(batch_size=int(c["batch_size"]), seed=c["seed"], device=device, quiet=quiet)

    def evaluate_point(name: str, kind: str, model: torch.nn.Module, **extra: Any) -> dict[str, Any]:
        t1 = time.perf_counter()
        conf = {"model": name, "threat": threat, "full": full.describe(), "weak": weak.describe(),
                "data": {"name": test.name, "n": len(test)}, "describe": model.describe()}
        doc = evaluate(model, test, [CleanProbe(), full, weak], out / "eval" / name, conf, opts=opts,
                       title=name, write_reports=False)
        p = rep.tradeoff_point(name, kind, section_data(doc, "robustness"), threat, full.suite, weak.suite, **extra)
        p["seconds"] = round(time.perf_counter() - t1, 1)
        _log(quiet, f"  {name:28s} clean {100 * p['clean']:5.1f}  robust {100 * p['robust']:5.1f}  "
                    f"(weak suite {100 * (p['robust_weak'] or 0):5.1f})  {p['seconds']:.0f}s")
        return p

    points = []
    t0 = time.perf_counter()
    _log(quiet, f"fixed-alpha sweep at {threat} ({len(test)} test examples)")
    for a in c["sweep"]["alphas"]:
        a = float(a)
        kind = "accurate" if a == 0 else "robust" if a == 1 else "fixed"
        name = "g (alpha=0)" if a == 0 else "h (alpha=1)" if a == 1 else f"alpha={a:g}"
        points.append(evaluate_point(name, kind, MixedClassifier(g, h, alpha=a, temperatures=temps), alpha=a))
    la = float(c["sweep"]["logit_alpha"])
    points.append(evaluate_point(f"logit mix alpha={la:g}", "logit",
                                 MixedClassifier(g, h, alpha=la, temperatures=temps, mixing="logit"), alpha=la))
    timings["sweep_eval_s"] = time.perf_counter() - t0

    # the mixing network
    t0 = time.perf_counter()
    taps = {"accurate": list(b["taps"]), "robust": list(b["taps"])}
    mixer_args = {"widths": list(m_cfg["widths"]), "blocks": int(m_cfg["blocks"])}
    final = out / "mixed" / "model"
    if final.with_suffix(".json").is_file():
        from bastion.checkpoints import load_checkpoint

        mixed = load_checkpoint(final, device)[0]
        unchanged = json.loads((out / "mixed" / "bases_unchanged.json").read_text())["bases_unchanged"]
    else:
        torch.manual_seed(c["seed"])
        head = mixer_for(g, h, taps, train.input_shape, mixer_args["widths"], mixer_args["blocks"])
        mixed = MixedClassifier(g, h, mixer=head, taps=taps, temperatures=temps).to(device)
        before = freeze_check(mixed)
        params = {"eps": b["at_eps"], **m_cfg["objective"]}
        obj = create_objective("adaptive_mixing", **params).use_pool(train.images)
        fit(mixed, train, obj, tc(m_cfg), run_dir=out / "mixer-train", device=device, quiet=quiet,
            checkpoint_card={"arch": None, "num_classes": train.num_classes,
                             "input_shape": list(train.input_shape)})
        unchanged = bases_unchanged(mixed, before)
        save_mixed(final, mixed.eval(), g_card, h_card, mixer_args, card={"dataset": train.name})
        (out / "mixed" / "bases_unchanged.json").write_text(json.dumps({"bases_unchanged": unchanged}))
    timings["mixer_train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _log(quiet, "mixing network operating points")
    for op in c["operating_points"]:
        be, rng = float(op["b_eval"]), [float(v) for v in op["alpha_range"]]
        model = mixed.operating_point(b_eval=be, alpha_range=rng)
        with torch.no_grad():
            alphas = torch.cat([model.mixing_weight(test.images[i:i + 256].to(device))
                                for i in range(0, len(test), 256)])
        points.append(evaluate_point(f"mixnet b={be:g} [{rng[0]:g},{rng[1]:g}]", "mixing", model, b_eval=be,
                                     alpha_range=rng, mean_alpha_clean=float(alphas.mean())))
    timings["mixer_eval_s"] = time.perf_counter() - t0
    notes = [f"bases bit-identical after mixing-network training: {unchanged}",
             f"suite (full): {full.suite}", f"suite (weak): {weak.suite}"]
    sections = [rep.tradeoff_section(f"{c['title']}: accuracy-robustness trade-off", points, threat, notes)]

    # margins of the robust base
    t0 = time.perf_counter()
    matk = create_attack("pgd", threat, steps=int(c["margins"]["steps"]), seed=c["seed"])
    mdoc = evaluate(h, test, [rep.MarginProbe(matk, temperature=temps[1])], out / "eval" / "margins",
                    {"margins": matk.describe(), "n": len(test)}, opts=opts, title="robust base", write_reports=False)
    sections += [s for s in mdoc["sections"] if s["type"] == "robust_margins"]
    timings["margins_s"] = time.perf_counter() - t0

    # the certificate
    cc = c["certify"]
    if cc["enabled"]:
        t0 = time.perf_counter()
        lin, _ = _train("base-linear", out, "mlp", {"hidden": []}, train,
                        create_objective("spectral_ce", penalty=cc["penalty"]),
                        TrainConfig(epochs=int(cc["epochs"]), batch_size=64, optimizer="adam", lr=float(cc["lr"]),
                                    weight_decay=0.0, seed=c["seed"]), device, quiet)
        L = linear_pairwise_lipschitz(lin, temps[1])
        probes = [LipschitzCertifyProbe(L, alpha=float(a), name=f"lipschitz-alpha{float(a):g}",
                                        max_radius=float(cc["max_radius"])) for a in cc["alphas"]]
        base_mixed = MixedClassifier(g, lin, alpha=0.5, temperatures=temps)
        cdoc = evaluate(base_mixed, test, [CleanProbe()] + probes, out / "eval" / "certify",
                        {"certify": [p.describe() for p in probes], "n": len(test)}, opts=opts,
                        title=f"certificate (Lipschitz form), linear robust base, L={L:.3f}", write_reports=False)
        sections += [s for s in cdoc["sections"] if s["type"] == "certification"]
        rows = []
        from bastion.records import RunDir, parse_record

        recs = [parse_record(r) for r in RunDir(out / "eval" / "certify").records.unique()]
        gen = torch.Generator(device=device).manual_seed(c["seed"])
        for p in probes:
            mine = sorted((r for r in recs if r.probe == p.name and r.radius > 0), key=lambda r: r.index)
            model = MixedClassifier(g, lin, alpha=p.alpha, temperatures=temps).eval()
            row = {"alpha": p.alpha, "certified_points": len(mine)}
            if mine:
                pos = {int(i): k for k, i in enumerate(test.indices.tolist())}
                sel = torch.tensor([pos[r.index] for r in mine])
                x = test.images[sel].to(device)
                y = torch.tensor([r.pred for r in mine], device=device)
                radii = torch.tensor([r.radius for r in mine], device=device)
                for factor in (0.999, 3.0):
                    flips = radius_pgd(model, x, y, factor * radii, steps=int(cc["pgd_steps"]),
                                       restarts=int(cc["pgd_restarts"]), generator=gen)
                    row[f"flipped_at_{factor:g}r"] = int(flips.sum())
            rows.append(row)
        sections.append(section("text", "certificate soundness check", {
            "text": f"l2 PGD (CE and margin, {cc['pgd_restarts']} restarts x {cc['pgd_steps']} steps, per-example "
                    f"radius) on the mixed classifier with the linear robust base (pairwise Lipschitz L = {L:.4f}, "
                    f"exact bound): points certified and predictions flipped inside 0.999 r(x) and at 3 r(x).\n\n"
                    + "\n".join(f"- alpha={r['alpha']:g}: {r['certified_points']} certified, flipped at 0.999r: "
                                f"{r.get('flipped_at_0.999r', 0)}, at 3r: {r.get('flipped_at_3r', 0)}" for r in rows),
            "rows": rows, "lipschitz": L}))
        timings["certify_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    sections.append(section("text", "run", {"text": "Timings (s): " + ", ".join(
        f"{k} {v:.0f}" for k, v in timings.items()) + f"; device {device}, torch threads "
        f"{torch.get_num_threads()}.", "timings": timings, "config": c}))
    doc = metrics_document(sections, title=f"Bastion: {c['title']}")
    (out / "metrics.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
    write_report(out, doc)
    return doc

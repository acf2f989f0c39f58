"""``bastion leaderboard``: train what the config asks, evaluate every entry x threat model through
the common evaluator, write one RobustBench-format JSON per pair and a static site.

Layout of OUT:

    train/<step>/                 `bastion train` run directories (model.safetensors + card)
    runs/<entry>/<norm>-<eps>/    one evaluator run directory per entry x threat model
                                  (records.jsonl, metrics.json, report.md, report.html)
    model_info/<dataset>/<Linf|L2>/<entry>.json   RobustBench entries (numbers as numbers)
    leaderboard.json              every row (local and published) the site shows
    site/index.html, site/<entry>-<threat>.html   the static site (no server, no external assets)

Everything is resumable: a finished train step is reused, an evaluator run continues from its
records, and the JSON and HTML are rewritten from the records, so a killed run ends with the
same bytes. Workers (``--workers``/``--backend``) shard each evaluation like every run.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from bastion.errors import ConfigError
from bastion.runner import RunOptions
from bastion.threat import ThreatModel, format_eps
from experiments.leaderboard.config import Entry, LeaderboardConfig
from experiments.leaderboard.robustbench import entry_path, pct, read_published, write_entry

# How to compute (never what): the run loop's options; each entry's run takes the config's batch size and seed.
Execution = RunOptions


def slug(threat: ThreatModel) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{threat.norm}-{format_eps(threat.eps)}")


def train_steps(cfg: LeaderboardConfig, out: Path, ex: Execution, log=print) -> dict[str, Path]:
    """Run the config's [train.*] steps that entries use (each skipped once its model exists)."""
    from experiments.cli import build_parser
    from experiments.config import namespace_from_config

    used = {e.train for e in cfg.entries if e.train}
    paths: dict[str, Path] = {}
    _, commands = build_parser()
    for name in sorted(used):
        table = dict(cfg.train[name])
        run_dir = out / "train" / name
        paths[name] = run_dir / "model.safetensors"
        if paths[name].is_file() and paths[name].with_suffix(".json").is_file():
            continue
        table.setdefault("dataset", cfg.dataset)
        for key in ("data_root", "image_size"):
            if getattr(cfg, key) is not None:
                table.setdefault(key, getattr(cfg, key))
        if table.get("data_root"):
            table["data_root"] = str(cfg.path(table["data_root"]))
        table.setdefault("seed", cfg.seed)
        ns = namespace_from_config(commands["train"], table, f"[train.{name}]")
        ns.out, ns.quiet, ns.device, ns.threads = str(run_dir), True, ex.device, ex.threads
        log(f"[leaderboard] train step {name!r} -> {run_dir}")
        ns.func(ns)
    return paths


def detector_steps(cfg: LeaderboardConfig, out: Path, trained: dict[str, Path], ex: Execution,
                   log=print) -> dict[str, Path]:
    """The detector card of every ``detector`` entry: its saved ``path``, or one fitted from its
    classifier on the training split into ``OUT/detectors/<entry>`` (reused while unchanged)."""
    from bastion.checkpoints import read_card
    from bastion.data import load_dataset
    from detection.checkpoint import detector_paths
    from experiments.leaderboard.detector import fit_detector, parse_spec

    paths: dict[str, Path] = {}
    for entry in cfg.entries:
        if entry.defense != "detector":
            continue
        spec = parse_spec(entry.detector, entry.name)
        if spec.path:
            card = detector_paths(cfg.path(spec.path))[1]
            if not card.is_file():
                raise ConfigError(f"entry {entry.name!r}: detector {str(card)!r} not found (a saved detector is "
                                  f"NAME.safetensors + NAME.json, see detection.checkpoint)")
            paths[entry.name] = card
            continue
        ckpt = checkpoint_of(cfg, entry, trained)
        size = int(read_card(ckpt)["input_shape"][-1])
        root = cfg.path(cfg.data_root)
        train = load_dataset(cfg.dataset, "train", str(root) if root else None, image_size=cfg.image_size or size)
        paths[entry.name] = fit_detector(spec, ckpt, train, out / "detectors" / entry.name, cfg.seed, ex.device, log)
    return paths


def checkpoint_of(cfg: LeaderboardConfig, entry: Entry, trained: dict[str, Path]) -> str:
    if entry.train:
        return str(trained[entry.train])
    p = cfg.path(entry.checkpoint)
    if p is None or not p.with_suffix(".json").is_file():
        raise ConfigError(f"entry {entry.name!r}: checkpoint {str(p)!r} not found (want NAME.safetensors with "
                          f"NAME.json beside it)")
    return str(p)


def load_data(cfg: LeaderboardConfig, image_size: int | None):
    from bastion.data import load_dataset

    root = cfg.path(cfg.data_root)
    data = load_dataset(cfg.dataset, cfg.split, str(root) if root else None, image_size=cfg.image_size or image_size)
    if cfg.skip != 1 or cfg.max is not None:
        data = data.every(cfg.skip, cfg.max)
    return data


def threats_of_run(cfg: LeaderboardConfig, threat: ThreatModel) -> list[ThreatModel]:
    """The run's threat model first, then the curve radii of its norm."""
    extra = [threat.with_eps(e) for e in cfg.curve_eps.get(threat.norm, ()) if abs(e - threat.eps) > 1e-12]
    return [threat] + extra


def run_leaderboard(cfg: LeaderboardConfig, out: str | Path, ex: Execution | None = None,
                    log=print) -> dict[str, Any]:
    """Run the whole leaderboard into ``out``; returns the ``leaderboard.json`` document."""
    from bastion.checkpoints import read_card
    from bastion.evaluate import evaluate
    from bastion.records import config_digest
    from experiments.common import check_data_fits
    from experiments.leaderboard.defenses import Context, build_defense, check_defenses
    from experiments.site import write_site
    ex = ex or Execution()
    out = Path(out)
    check_defenses(cfg.entries)
    published = read_published(cfg.path(cfg.published)) if cfg.published else []
    trained = train_steps(cfg, out, ex, log)
    detectors = detector_steps(cfg, out, trained, ex, log)
    rows: list[dict[str, Any]] = []
    data_cache: dict[Any, Any] = {}
    for entry in cfg.entries:
        ckpt = checkpoint_of(cfg, entry, trained)
        card = read_card(ckpt)
        size = int(card["input_shape"][-1])
        if size not in data_cache:
            data_cache[size] = load_data(cfg, size)
        data = data_cache[size]
        check_data_fits(data, card, f"entry {entry.name!r}")
        ctx = Context(entry, ckpt, card, cfg.protocol, cfg.steps, cfg.seed, ex.device, ex.workers,
                      detector=str(detectors[entry.name]) if entry.name in detectors else None)
        defense = build_defense(ctx)
        if entry.name in detectors:   # a path that does not depend on where OUT is
            spec_path = entry.detector.get("path")
            defense.info["path"] = spec_path or str(Path("detectors") / f"{entry.name}.json")
        for threat in cfg.threats:
            run_dir = out / "runs" / entry.name / slug(threat)
            threats = threats_of_run(cfg, threat)
            probes = defense.probes(threats)
            config = cfg.eval_config() | {
                "entry": entry.name, "defense": entry.defense, "sigma": entry.sigma, "num_noise": entry.num_noise,
                "eot_iter": entry.eot_iter, "certify": entry.certify, "model_sha256": card.get("sha256"),
                "threats": [str(t) for t in threats]}
            if entry.defense == "detector":   # only here, so the other entries' stamps (and runs) stay valid
                config |= {"detector": entry.detector, "detector_sha256": defense.info.get("sha256"),
                           "adaptive_attacks": defense.info.get("adaptive_attacks")}
            opts = dataclasses.replace(ex, batch_size=cfg.batch_size, seed=cfg.seed)
            log(f"[leaderboard] {entry.name} @ {threat}: {len(probes)} probes -> {run_dir}")
            doc = evaluate(defense.model, data, probes, run_dir, config, opts=opts,
                           class_names=card.get("class_names"), title=f"{entry.name} @ {threat}",
                           doc_title=f"Bastion leaderboard {cfg.name}: {entry.name} @ {threat}")
            row = entry_json(cfg, entry, card, defense, threat, doc, run_dir, config_digest(config))
            write_entry(entry_path(out, cfg.dataset, threat.norm, entry.name), row)
            rows.append(row)
    board = {"name": cfg.name, "description": cfg.description, "dataset": cfg.dataset, "split": cfg.split,
             "protocol": cfg.protocol, "threats": [str(t) for t in cfg.threats], "entries": rows,
             "published": published}
    (out / "leaderboard.json").write_text(json.dumps(board, indent=1, sort_keys=True, allow_nan=False) + "\n",
                                          encoding="utf-8")
    write_site(board, out / "site")
    return board


def _certified(run_dir: Path, radius: float) -> dict[str, Any] | None:
    """Certified accuracy at ``radius`` from the run's CERTIFY records (abstentions count wrong)."""
    from certify.logs import format_radius

    path = run_dir / "records.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    cert = {int(r["index"]): r for r in rows if r.get("kind") == "certify"}
    if not cert:
        return None
    ok = [bool(r["correct"]) and r["radius"] is not None and float(format_radius(r["radius"])) >= radius
          for r in cert.values()]
    return {"radius_l2": round(radius, 6), "certified_acc": pct(sum(ok) / len(ok)), "n": len(ok)}


def entry_json(cfg: LeaderboardConfig, entry: Entry, card: dict[str, Any], defense, threat: ThreatModel,
               doc: dict[str, Any], run_dir: Path, digest: str) -> dict[str, Any]:
    """One RobustBench entry (numbers as numbers, percent) with Bastion's extras under ``bastion``."""
    from bastion.evaluate import section_data

    m = section_data(doc, "robustness")
    key = str(threat)
    rb = m["robust"][key]
    curve = [{"eps": ThreatModel.parse(t).eps, "eps_text": t.split(":", 1)[1], "robust_acc": pct(b["accuracy"])}
             for t, b in m["robust"].items() if ThreatModel.parse(t).norm == threat.norm]
    curve = [{"eps": 0.0, "eps_text": "0", "robust_acc": pct(m["clean"]["accuracy"])}] + \
        sorted(curve, key=lambda c: c["eps"])
    attacks = next((a for a in m.get("attacks", []) if a.get("threat") == key), {})
    flags = [f for f in m.get("flags", []) if f.startswith(key + ":")]
    # a randomized or smoothed model is random by design (its suite uses EOT): that flag is expected
    expected = "model output is randomized" if defense.kind in ("randomized", "smoothed") else None
    unexpected = [f for f in flags if not (expected and expected in f)]
    certified = _certified(run_dir, defense.certify_radius(threat)) if defense.certify_radius else None
    meta = entry.meta
    arch = meta.get("architecture") or card.get("arch") or "unknown"
    row: dict[str, Any] = {
        "link": str(meta.get("link", "")), "name": entry.name, "authors": str(meta.get("authors", "")),
        "venue": str(meta.get("venue", "")), "architecture": str(arch), "dataset": cfg.dataset,
        "additional_data": bool(meta.get("additional_data", False)),
        "number_forward_passes": int(defense.forward_passes), "eps": format_eps(threat.eps),
        "clean_acc": pct(m["clean"]["accuracy"]),
        "reported": float(meta["reported"]) if meta.get("reported") not in (None, "") else None,
        "autoattack_acc": pct(rb["accuracy"]), "footnote": meta.get("footnote"),
        "unreliable": bool(unexpected or rb.get("missing")), "external": None,
    }
    row["bastion"] = {
        "source": "local", "threat_model": THREAT_NAMES.get(threat.norm, threat.norm), "norm": threat.norm,
        "eps_value": threat.eps, "defense": entry.defense, "n_examples": int(rb["n"]),
        "protocol": cfg.protocol, "attacks": [a.get("name") for a in attacks.get("attacks", [])],
        "attack_configs": attacks.get("attacks", []), "attack_attribution": attribution(rb["broken_by"], attacks),
        "per_attack_acc": {k: pct(v) for k, v in sorted(rb["per_attack"].items())},
        "per_class_clean_acc": {k: pct(v) for k, v in m["clean"]["per_class"].items()},
        "per_class_robust_acc": {k: pct(v) for k, v in rb["per_class"].items()},
        "disparity": {"clean": {k: pct(v) for k, v in m["clean"]["disparity"].items()},
                      "robust": {k: pct(v) for k, v in rb["disparity"].items()}},
        "sanity_flags": flags, "robust_acc_vs_eps": curve, "certified": certified, "notes": defense.notes,
        "run_dir": str(Path("runs") / entry.name / slug(threat)), "config_digest": digest,
        "model_sha256": card.get("sha256"), "missing": int(rb.get("missing", 0)),
    }
    if defense.kind == "detector":
        det = row["bastion"]["detector"] = detector_json(defense.info, section_data(doc, "detector_defense"), key)
        rates = ", ".join(f"{k} {'-' if v['detection_rate'] is None else v['detection_rate']}"
                          for k, v in det["per_attack_detection"].items())
        row["bastion"]["notes"] = list(defense.notes) + [
            f"clean test inputs: classifier accuracy {det['classifier_clean_acc']}%, rejected {det['test_fpr']}% "
            f"(test FPR; target {det['fpr_target']}% on calibration)",
            f"detection rate under attack: {det['detection_rate_under_attack']}% of the misclassified adversarial "
            f"examples were flagged (per attack, %: {rates})"]
        if row["footnote"] is None:
            row["footnote"] = ("Classifier + detector: clean accuracy counts rejected clean inputs as errors; an "
                               "adversarial example counts only when misclassified and not detected.")
    return row


def detector_json(info: dict[str, Any], d: dict[str, Any], threat: str) -> dict[str, Any]:
    """The detector fields of an entry (rates as percent numbers): its card's FPR target, threshold
    and realized calibration FPR, the clean test FPR (rejected clean test inputs), and the detection
    rate under each attack at ``threat`` (misclassified adversarial examples that were flagged)."""
    t = d["threats"].get(threat, {})
    per = {k: {"attacked": v["attacked"], "misclassified": v["fooled"], "misclassified_detected": v["fooled_detected"],
               "detection_rate": pct(v["detection_rate"]), "broke": v["broke"]}
           for k, v in sorted(t.get("per_attack", {}).items())}
    info = info | {"fpr_target": pct(info.get("fpr_target")), "calibration_fpr": pct(info.get("calibration_fpr"))}
    return info | {"test_fpr": pct(d["clean_rejection_rate"]),
                   "classifier_clean_acc": pct(d["classifier_clean_accuracy"]),
                   "detection_rate_under_attack": pct(t.get("detection_rate")),
                   "classifier_fooled_rate": pct(t.get("classifier_fooled_rate")), "per_attack_detection": per,
                   "clean_acc_definition": "accepted by the detector and correctly classified",
                   "attacker_success": "misclassified and not detected"}


THREAT_NAMES = {"linf": "Linf", "l2": "L2"}
CLEAN_PASS = "own clean pass (randomized model)"


def attribution(broken_by: dict[str, int], probe: dict[str, Any]) -> dict[str, int]:
    """Examples each attack broke first; the suite's name (no attack broke it: the attack probe's own
    clean forward pass of a randomized model already misclassified it) gets a readable key."""
    suite = "+".join(a.get("name", "") for a in probe.get("attacks", []))
    return {(CLEAN_PASS if k == suite and "+" in k else k): v for k, v in sorted(broken_by.items())}

"""Detection in the common evaluator: the ``detect`` probe, its fold and the ``detection`` renderer.

`DetectProbe` scores one kind of input per example with every detector it holds: the natural
test input (``attack=None``), an oblivious attack's output, or (``target=NAME``) the output of the
detector-aware adaptive attack (`attacks.adaptive.DetectorObjective` through the native PGD/APGD
engines; success = misclassified and not flagged at the detector's calibrated threshold). Adaptive
modes: ``worst`` (the default of ``bastion detect``): the suite `attacks.adaptive.STRONG_DETECTOR_SUITE`
(APGD on ``(1 - w) margin - w * standardized score``, then APGD-selective), each attack on the
examples the earlier ones did not break, keeping per example the worst case; ``sum`` (the
probe's ``attack`` engine on ``(1 - w) CE - w * score``) and ``selective`` (the probe's engine,
Bryniarski's objective) run one attack. Each record (`DetectRecord`) carries every
detector's score, the classifier's prediction on the scored input and on the natural one.

Oblivious attacks run every step on every example (no early exit on success, no filtering by
success: the EPS-AD protocol); they return the highest-loss point seen.

The fold (``detect``) pairs each attack probe with the natural probe and gives, per detector:
AUROC, TPR at 1/5/10% FPR, the threshold at the chosen FPR (from the natural test scores), robust
accuracy without a detector, and detection-aware robust accuracy (an example is lost only when the
attack fools the classifier AND its score is not above the threshold); plus the natural-halves
AUROC (even vs odd indices, a sanity check that should sit near 0.5); and per threat and detector the
worst case over every attack that is oblivious or targets that detector.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from attacks import create_attack
from attacks.adaptive import STRONG_DETECTOR_SUITE, DetectorObjective, detector_aware_attacks
from attacks.objectives import LossObjective, ObjectiveOutput
from bastion.errors import ConfigError
from bastion.folds import FoldContext, register_fold
from bastion.metrics import auroc, tpr_at_fpr
from bastion.records import BaseRecord, DetectRecord, Record
from bastion.report import md_table, pct, register_renderer, section
from bastion.rng import child_generator, forked_rng
from bastion.threat import ThreatModel
from detection.detector import threshold_at_fpr

FPRS = (0.01, 0.05, 0.10)
ADAPTIVE_MODES = ("worst", "sum", "selective")


class FullSteps:
    """A loss objective whose adversaries never count as successful, so the engine runs every
    step on every example and keeps the highest-loss point (no early exit)."""

    def __init__(self, loss: str = "ce"):
        self.inner = LossObjective(loss)

    def __call__(self, model, x, y, target):
        out = self.inner(model, x, y, target)
        return ObjectiveOutput(out.loss, out.logits, torch.zeros_like(out.loss, dtype=torch.bool))

    def describe(self) -> str:
        return f"full-steps({self.inner.describe()})"


def _features_key(det: Any) -> Any:
    ex = getattr(det, "extractor", None)
    return ex.key if ex is not None else id(det)


class DetectProbe:
    """Scores of natural inputs (``attack=None``) or of one attack's outputs under every detector.

    detectors: fitted detectors (`detection.detector.Detector`). attack: a native attack name
    (``pgd``, ``apgd-ce``, ``fgsm`` ...) with ``threat`` and ``attack_params``. target: the name of
    the detector the adaptive attack fights (None: oblivious); ``mode``: ``sum`` or ``selective``
    (one attack: the ``attack`` engine with `DetectorObjective` of that mode, ``weight``, ``base``)
    or ``worst`` (`STRONG_DETECTOR_SUITE` through `detector_aware_attacks`, ``attack`` unused, each
    attack on the examples still unbroken; per example the output kept is the first one
    misclassified and under the target's threshold, else the one with the lowest target score, as
    the AUROC of a single attack counts every attacked input, misclassified or not). The
    objectives' threshold is the target's calibrated ``threshold`` in standardized units. fpr: the
    operating point the fold uses for detection-aware robust accuracy."""

    def __init__(self, detectors: Sequence[Any], *, attack: str | None = None, threat: ThreatModel | str | None = None,
                 attack_params: dict[str, Any] | None = None, target: str | None = None, weight: float = 0.5,
                 base: str = "ce", mode: str = "sum", fpr: float = 0.05, name: str | None = None,
                 chunk_size: int | None = None):
        self.detectors = list(detectors)
        names = [d.name for d in self.detectors]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"a detect probe needs detectors with unique names, got {names}")
        self.attack_name = attack
        self.threat = ThreatModel.parse(threat) if isinstance(threat, str) else threat
        if attack is not None and self.threat is None:
            raise ConfigError("a detect probe with an attack needs a threat model (e.g. linf:8/255)")
        self.attack_params = dict(attack_params or {})
        self.target = target
        self.weight, self.base, self.mode, self.fpr = float(weight), base, mode, float(fpr)
        if mode not in ADAPTIVE_MODES:
            raise ConfigError(f"unknown adaptive mode {mode!r}: use {', '.join(ADAPTIVE_MODES)}")
        if target is not None and target not in names:
            raise ConfigError(f"adaptive target {target!r} is not one of the probe's detectors {names}")
        self.primary = target or names[0]
        if attack is None:
            self.name = name or "detect/natural"
        else:
            how = "" if mode == "sum" else f",{mode}"
            tag = f"{attack}+adaptive[{target}{how}]" if target else attack
            if target and mode == "worst":
                tag = f"adaptive[{target},worst]"
            self.name = name or f"detect/{tag}@{self.threat}"
        self.chunk_size = chunk_size
        self._suite: list[tuple[str, Any]] = []
        self._attack = self._build_attack() if attack is not None else None
        if self._suite:
            self.attack_name = "+".join(n for n, _ in self._suite)

    def _build_attack(self):
        params = dict(self.attack_params)
        if self.target is None:
            params["objective"] = FullSteps(params.pop("loss", "ce"))
            return create_attack(self.attack_name, self.threat, **params)
        det = next(d for d in self.detectors if d.name == self.target)
        if det.threshold is None:
            raise ConfigError(f"detector {det.name!r} has no threshold; call set_threshold() before the adaptive "
                              f"attack")
        module = det.differentiable()
        if self.mode == "worst":
            steps = params.pop("steps", 10)
            params.pop("objective", None)
            self._suite = detector_aware_attacks(module, module.standardize(det.threshold), self.threat,
                                                 STRONG_DETECTOR_SUITE, steps=steps, weight=self.weight, **params)
            return self._suite[0][1]
        params["objective"] = DetectorObjective(module, weight=self.weight, threshold=module.standardize(det.threshold),
                                                base=self.base, mode=self.mode)
        return create_attack(self.attack_name, self.threat, **params)

    def describe(self) -> dict[str, Any]:
        return {"kind": "detect", "name": self.name, "attack": self.attack_name,
                "threat": str(self.threat) if self.threat else None, "adaptive": self.target is not None,
                "target": self.target, "weight": self.weight if self.target else None,
                "mode": self.mode if self.target else None, "fpr": self.fpr,
                "attack_config": ([{"name": n, **a.describe()} for n, a in self._suite] if self._suite else
                                  self._attack.describe() if self._attack is not None else None),
                "detectors": [d.describe() for d in self.detectors]}

    def run(self, model, x, y, indices, generator) -> list[Record]:
        g_attack, g_scores = child_generator(generator), child_generator(generator)
        with torch.no_grad():
            clean_pred = model(x).argmax(1)
        x_in = x
        if self._suite:
            x_in = self._run_suite(model, x, y, g_attack)
        elif self._attack is not None:
            res = self._attack.run(model, x, y, generator=g_attack)
            self.threat.check(x, res.x_adv)
            x_in = res.x_adv
        with torch.no_grad():
            pred = model(x_in).argmax(1)
        scores: dict[str, np.ndarray] = {}
        feats: dict[Any, torch.Tensor] = {}
        for det in self.detectors:
            key = _features_key(det)
            if key not in feats:
                g = child_generator(g_scores)
                with torch.no_grad(), forked_rng(x.device, g):
                    feats[key] = det.features(x_in, g)
            with torch.no_grad():
                scores[det.name] = det.score_features(feats[key]).detach().cpu().numpy()
        adv = self._attack is not None
        out = []
        for j, i in enumerate(indices.tolist()):
            s = {k: float(v[j]) for k, v in scores.items()}
            out.append(DetectRecord(index=int(i), probe=self.name, label=int(y[j]), pred=int(pred[j]),
                                    correct=bool(pred[j] == y[j]), score=s[self.primary], adversarial=adv,
                                    attack=self.attack_name, detector=self.primary, scores=s,
                                    threat=str(self.threat) if self.threat else None, adaptive=self.target is not None,
                                    target=self.target, clean_correct=bool(clean_pred[j] == y[j])).to_record())
        return out

    def _run_suite(self, model, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The worst case over the suite (see the class docstring): (N, C, H, W) adversarial inputs."""
        det = next(d for d in self.detectors if d.name == self.target)
        n = x.shape[0]
        x_best = x.clone()
        rank = torch.full((n,), -1, dtype=torch.long, device=x.device)  # 1 broken, 0 not
        best_score = torch.full((n,), float("inf"), dtype=torch.float64, device=x.device)
        todo = torch.arange(n, device=x.device)
        for _, atk in self._suite:
            g, gs = child_generator(generator), child_generator(generator)
            if todo.numel() == 0:
                continue
            res = atk.run(model, x[todo], y[todo], generator=g)
            self.threat.check(x[todo], res.x_adv)
            with torch.no_grad():
                fooled = model(res.x_adv).argmax(1) != y[todo]
                with forked_rng(x.device, gs):
                    s = torch.as_tensor(np.asarray(det.score(res.x_adv, gs), dtype=np.float64), device=x.device)
            broken = fooled & (s <= det.threshold)
            r = broken.long()
            better = (r > rank[todo]) | ((r == rank[todo]) & (s < best_score[todo]))
            i = todo[better]
            x_best[i], rank[i], best_score[i] = res.x_adv[better].detach(), r[better], s[better]
            todo = todo[~broken]
        return x_best


# ---------------------------------------------------------------------------------------------
# Fold
# ---------------------------------------------------------------------------------------------

def detection_metrics(nat: dict[int, DetectRecord], adv: dict[int, DetectRecord], detector: str,
                      fpr: float) -> dict[str, Any]:
    """Metrics of one detector on one attack probe (examples present in both)."""
    idx = sorted(set(nat) & set(adv))
    neg = np.array([nat[i].scores.get(detector, np.nan) if nat[i].scores else nat[i].score for i in idx])
    pos = np.array([adv[i].scores.get(detector, np.nan) if adv[i].scores else adv[i].score for i in idx])
    ok = ~(np.isnan(neg) | np.isnan(pos))
    neg, pos = neg[ok], pos[ok]
    idx = [i for i, k in zip(idx, ok) if k]
    if len(idx) < 2:
        return {"detector": detector, "n": len(idx)}
    thr = threshold_at_fpr(neg, fpr)
    clean_ok = np.array([bool(adv[i].clean_correct if adv[i].clean_correct is not None else nat[i].correct)
                         for i in idx])
    adv_ok = np.array([bool(adv[i].correct) for i in idx])
    fooled = clean_ok & ~adv_ok
    undetected = pos <= thr
    return {"detector": detector, "n": len(idx), "auroc": auroc(neg, pos),
            "tpr": {f"{int(round(100 * f))}%": tpr_at_fpr(neg, pos, f) for f in FPRS},
            "fpr": fpr, "threshold": thr, "clean_accuracy": float(clean_ok.mean()),
            "robust_accuracy": float((clean_ok & adv_ok).mean()),
            "detection_aware_robust_accuracy": float((clean_ok & ~(fooled & undetected)).mean()),
            "fooled_and_undetected": float((fooled & undetected).mean()),
            "attack_success_rate": float(fooled.sum() / max(1, clean_ok.sum())),
            "mean_score_natural": float(neg.mean()), "mean_score_adversarial": float(pos.mean())}


def natural_halves(nat: dict[int, DetectRecord], detector: str) -> float | None:
    """AUROC between natural scores of even vs odd positions (sorted indices): ~0.5 when the
    detector sees no difference between two halves of the same distribution."""
    idx = sorted(nat)
    s = [nat[i].scores.get(detector) if nat[i].scores else nat[i].score for i in idx]
    a, b = s[0::2], s[1::2]
    if len(a) < 2 or len(b) < 2 or any(v is None for v in s):
        return None
    return auroc(a, b)


def fold_detect(records: list[BaseRecord], ctx: FoldContext) -> list[dict[str, Any]]:
    by_probe: dict[str, dict[int, DetectRecord]] = defaultdict(dict)
    for r in records:
        by_probe[r.probe][r.index] = r
    nat_probes = [p for p, rs in by_probe.items() if not next(iter(rs.values())).adversarial]
    if not nat_probes:
        return [section("detection", ctx.title, {"error": "no natural (detect/natural) records to compare with"})]
    nat = by_probe[nat_probes[0]]
    descs = ctx.probes
    fpr = float(next((d.get("fpr") for d in descs.values() if d.get("kind") == "detect" and d.get("fpr")), 0.05))
    detectors = sorted({k for r in nat.values() for k in (r.scores or {r.detector or "detector": r.score})})
    order = [n for n in descs if n in by_probe] + sorted(n for n in by_probe if n not in descs)
    rows = []
    for p in order:
        if p in nat_probes:
            continue
        first = next(iter(by_probe[p].values()))
        for det in detectors:
            m = detection_metrics(nat, by_probe[p], det, fpr)
            mode = descs.get(p, {}).get("mode") or ((next((m for m in ADAPTIVE_MODES if f",{m}]" in p), "sum"))
                                                    if first.adaptive else None)
            rows.append({"probe": p, "attack": first.attack, "threat": first.threat, "adaptive": first.adaptive,
                         "target": first.target, "adaptive_mode": mode} | m)
    data = {"dataset": ctx.data.get("name"), "split": ctx.data.get("split"), "fpr": fpr,
            "num_examples": len(nat), "detectors": detectors,
            "clean_accuracy": float(np.mean([r.correct for r in nat.values()])),
            "natural_halves_auroc": {d: natural_halves(nat, d) for d in detectors},
            "rows": rows, "side_by_side": side_by_side(rows),
            "worst_case": worst_case(nat, by_probe, [p for p in order if p not in nat_probes], detectors, fpr),
            "detector_info": next((d.get("detectors") for d in descs.values() if d.get("detectors")), None)}
    return [section("detection", ctx.title, data)]


def worst_case(nat: dict[int, DetectRecord], by_probe: dict[str, dict[int, DetectRecord]], probes: list[str],
               detectors: list[str], fpr: float) -> list[dict[str, Any]]:
    """Per (threat, detector): detection-aware robust accuracy under the worst case over every attack
    probe at that threat that is oblivious or targets that detector (an example is lost when any of
    them fooled the classifier undetected), over the examples all of them scored."""
    out = []
    threats = list(dict.fromkeys(next(iter(by_probe[p].values())).threat for p in probes))
    for threat in threats:
        for det in detectors:
            ps = [p for p in probes if (r := next(iter(by_probe[p].values()))).threat == threat
                  and (not r.adaptive or r.target == det)]
            if not ps:
                continue
            idx = sorted(set(nat).intersection(*(by_probe[p] for p in ps)))
            neg = np.array([nat[i].scores.get(det, np.nan) if nat[i].scores else nat[i].score for i in idx])
            if len(idx) < 2 or np.isnan(neg).any():
                continue
            thr = threshold_at_fpr(neg, fpr)
            lost = np.zeros(len(idx), dtype=bool)
            for p in ps:
                recs = [by_probe[p][i] for i in idx]
                score = np.array([r.scores.get(det, np.nan) if r.scores else r.score for r in recs])
                lost |= np.array([not r.correct for r in recs]) & (score <= thr)
            clean_ok = np.array([bool(by_probe[ps[0]][i].clean_correct if by_probe[ps[0]][i].clean_correct
                                      is not None else nat[i].correct) for i in idx])
            out.append({"threat": threat, "detector": det, "probes": ps, "n": len(idx),
                        "detection_aware_robust_accuracy": float((clean_ok & ~lost).mean())})
    return out


def side_by_side(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Oblivious vs adaptive per (attack, threat, targeted detector)."""
    obl = {(r["attack"], r["threat"], r["detector"]): r for r in rows if not r["adaptive"]}
    # a suite (worst mode) has no oblivious twin of its name: the threat's oblivious attack
    by_threat = {(r["threat"], r["detector"]): r for r in rows if not r["adaptive"]}
    out = []
    for r in rows:
        if not r["adaptive"] or r["detector"] != r["target"]:
            continue
        o = obl.get((r["attack"], r["threat"], r["detector"])) or by_threat.get((r["threat"], r["detector"]), {})
        out.append({"attack": r["attack"], "threat": r["threat"], "detector": r["detector"],
                    "adaptive_mode": r.get("adaptive_mode"),
                    "auroc_oblivious": o.get("auroc"), "auroc_adaptive": r.get("auroc"),
                    "tpr5_oblivious": (o.get("tpr") or {}).get("5%"), "tpr5_adaptive": (r.get("tpr") or {}).get("5%"),
                    "robust_accuracy_oblivious": o.get("robust_accuracy"),
                    "robust_accuracy_adaptive": r.get("robust_accuracy"),
                    "da_robust_accuracy_oblivious": o.get("detection_aware_robust_accuracy"),
                    "da_robust_accuracy_adaptive": r.get("detection_aware_robust_accuracy")})
    return out


register_fold("detect", fold_detect, kinds=("detect",))


# ---------------------------------------------------------------------------------------------
# Renderer
# ---------------------------------------------------------------------------------------------

def _f(v: float | None, nd: int = 3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def render_detection(sec: dict[str, Any]) -> tuple[str, list]:
    d = sec["data"]
    if "error" in d:
        return d["error"], []
    fpr = d["fpr"]
    parts = [f"Data `{d.get('dataset')}`/{d.get('split')}, {d['num_examples']} examples, clean accuracy "
             f"{pct(d['clean_accuracy'])}. Detection-aware robust accuracy at {pct(fpr)} FPR: an example is lost "
             f"only when the attack fools the classifier and its score is not above the threshold (set on the "
             f"natural test scores). Oblivious attacks: every step on every example, unfiltered."]
    halves = d.get("natural_halves_auroc") or {}
    parts.append("Natural vs natural (even vs odd test indices; near 0.5 is right):\n\n"
                 + md_table(["detector", "AUROC"], [[k, _f(v)] for k, v in halves.items()]))
    sbs = d.get("side_by_side") or []
    if sbs:
        parts.append("Oblivious vs detector-aware adaptive attack (against the detector it targets):\n\n" + md_table(
            ["attack", "threat", "detector", "adaptive mode", "AUROC obl.", "AUROC adapt.", "TPR@5% obl.",
             "TPR@5% adapt.", "rob. acc. obl.", "rob. acc. adapt.", "det.-aware rob. acc. obl.",
             "det.-aware rob. acc. adapt."],
            [[r["attack"], r["threat"], r["detector"], r.get("adaptive_mode") or "sum", _f(r["auroc_oblivious"]),
              _f(r["auroc_adaptive"]),
              _f(r["tpr5_oblivious"]), _f(r["tpr5_adaptive"]), pct(r["robust_accuracy_oblivious"]),
              pct(r["robust_accuracy_adaptive"]), pct(r["da_robust_accuracy_oblivious"]),
              pct(r["da_robust_accuracy_adaptive"])] for r in sbs]))
    worst = d.get("worst_case") or []
    if worst:
        parts.append("Worst case over every attack at a threat that is oblivious or targets the detector (an "
                     "example is lost when any of them fools the classifier undetected):\n\n" + md_table(
                         ["threat", "detector", "attacks", f"det.-aware rob. acc. @{pct(fpr)}"],
                         [[w["threat"], w["detector"], len(w["probes"]), pct(w["detection_aware_robust_accuracy"])]
                          for w in worst]))
    table = []
    for r in d["rows"]:
        tpr = r.get("tpr") or {}
        how = "" if r.get("adaptive_mode") in (None, "sum") else f" ({r['adaptive_mode']})"
        mode = f"adaptive{how} vs {r['target']}" if r["adaptive"] else "oblivious"
        table.append([r["attack"], r["threat"], mode, r["detector"], _f(r.get("auroc")), _f(tpr.get("1%")),
                      _f(tpr.get("5%")), _f(tpr.get("10%")), pct(r.get("robust_accuracy")),
                      pct(r.get("detection_aware_robust_accuracy"))])
    parts.append("All attacks and detectors:\n\n" + md_table(
        ["attack", "threat", "mode", "detector", "AUROC", "TPR@1%", "TPR@5%", "TPR@10%", "robust acc.",
         f"det.-aware rob. acc. @{pct(fpr)}"], table))
    return "\n\n".join(parts), _figures(sec)


def _figures(sec: dict[str, Any]) -> list:
    d = sec["data"]
    rows = [r for r in d["rows"] if r.get("auroc") is not None and r.get("threat")]
    if not rows:
        return []
    from bastion.report import pyplot

    def eps_of(t: str) -> tuple[str, float]:
        tm = ThreatModel.parse(t)
        return tm.norm, tm.eps * 255

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        norm, e = eps_of(r["threat"])
        if r["adaptive"] and r["detector"] != r["target"]:
            continue
        groups[(r["attack"], norm, r["detector"], r.get("adaptive_mode") or "")].append((e, r["auroc"]))
    for (atk, norm, det, mode), pts in sorted(groups.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if mode else "-", marker="o", ms=3, lw=1.2,
                label=f"{det} {atk}-{norm}" + (f" (adaptive, {mode})" if mode else ""))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("eps x 255")
    ax.set_ylabel("AUROC")
    ax.set_ylim(0.4, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return [(f"{sec.get('title', 'Detection')}: AUROC vs attack radius", fig)]


register_renderer("detection", render_detection)

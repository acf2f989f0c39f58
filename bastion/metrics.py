"""Metrics folded from per-example records.

- clean accuracy; robust accuracy per threat model as the per-example worst case over every
  attack run (an example counts as robust only if it is clean-correct and survives them all);
- per-class accuracies and their disparity (max - min, and population standard deviation);
- certified accuracy at radii, ACR, abstention (randomized smoothing);
- AUROC and TPR at a fixed FPR (detectors); conformal coverage and set size.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from bastion.records import BaseRecord, Record


def _as_dicts(records: Iterable[Record | BaseRecord]) -> list[Record]:
    return [r.to_record() if isinstance(r, BaseRecord) else r for r in records]


def disparity(per_class: Sequence[float | None]) -> dict[str, float]:
    """Spread of per-class accuracies: ``max_minus_min`` and ``std`` (population, ddof=0),
    over classes that have examples."""
    vals = np.array([v for v in per_class if v is not None], dtype=np.float64)
    if vals.size == 0:
        return {"max_minus_min": 0.0, "std": 0.0, "worst_class_accuracy": 0.0}
    return {"max_minus_min": float(vals.max() - vals.min()), "std": float(vals.std()),
            "worst_class_accuracy": float(vals.min())}


def per_class_accuracy(labels: Sequence[int], correct: Sequence[bool], num_classes: int) -> list[float | None]:
    """Accuracy per class (None for a class with no examples)."""
    tot = np.zeros(num_classes)
    ok = np.zeros(num_classes)
    for t, c in zip(labels, correct):
        tot[int(t)] += 1
        ok[int(t)] += bool(c)
    return [float(ok[k] / tot[k]) if tot[k] else None for k in range(num_classes)]


def _accuracy_block(labels: list[int], correct: list[bool], class_names: Sequence[str]) -> dict[str, Any]:
    pc = per_class_accuracy(labels, correct, len(class_names))
    return {"accuracy": float(np.mean(correct)) if correct else 0.0, "n": len(correct),
            "per_class": {name: v for name, v in zip(class_names, pc)}, "disparity": disparity(pc)}


def classification_metrics(records: Iterable[Record | BaseRecord], class_names: Sequence[str]) -> dict[str, Any]:
    """Fold ``clean`` and ``robust`` records into clean/robust accuracy with per-class breakdowns.

    Robust accuracy for threat T: mean over examples with a clean record of
    ``clean correct AND every robust record with threat T correct`` (the per-example worst case
    over attacks). A clean-correct example with no robust record for T was never attacked, so it
    does not count as robust; ``missing`` counts those. ``per_attack`` gives each attack's own
    accuracy (on all examples it saw) and ``broken_by`` counts the first attack (in run order)
    that broke each example."""
    clean: dict[int, Record] = {}
    robust: dict[str, dict[int, list[Record]]] = defaultdict(lambda: defaultdict(list))
    for r in _as_dicts(records):
        kind = r.get("kind")
        if kind == "clean":
            clean[int(r["index"])] = r
        elif kind == "robust":
            robust[str(r["threat"])][int(r["index"])].append(r)
    idx = sorted(clean)
    labels = [int(clean[i]["label"]) for i in idx]
    cc = [bool(clean[i]["correct"]) for i in idx]
    out: dict[str, Any] = {"clean": _accuracy_block(labels, cc, class_names), "robust": {}}
    for threat in sorted(robust, key=_threat_sort_key):
        by_ex = robust[threat]
        rc, per_attack, broken_by = [], defaultdict(list), defaultdict(int)
        for i, c in zip(idx, cc):
            recs = by_ex.get(i, [])
            ok = c and bool(recs) and all(bool(r["correct"]) for r in recs)
            rc.append(ok)
            for r in recs:
                per_attack[str(r.get("attack", r["probe"]))].append(bool(r["correct"]) and c)
            if c and not ok and recs:
                first = next(r for r in recs if not r["correct"])
                broken_by[str(first.get("broken_by") or first.get("attack") or first["probe"])] += 1
        block = _accuracy_block(labels, rc, class_names)
        block["per_attack"] = {a: float(np.mean(v)) for a, v in per_attack.items()}
        block["broken_by"] = dict(broken_by)
        block["missing"] = sum(1 for i, c in zip(idx, cc) if c and not by_ex.get(i))
        out["robust"][threat] = block
    return out


FLAG_MESSAGES = {
    "random_output": "model output is randomized on {n} example(s) (repeated forward passes disagree): "
                     "evaluate with EOT (eot-pgd, eot-apgd) or autoattack-rand",
    "probability_output": "model outputs look like probabilities on {n} example(s): attack logits, "
                          "not softmax outputs",
    "zero_gradient": "the loss gradient is exactly zero at {n} clean input(s): gradient-based attacks "
                     "may be unreliable (gradient masking); for non-differentiable preprocessing try "
                     "attacks.adaptive.bpda(model, forward), for randomness EOT (eot-pgd, eot-apgd)",
    "black_box_win": "a gradient-free attack broke {n} example(s) that every white-box attack before it "
                     "missed: possible gradient masking; try adaptive attacks (attacks.adaptive.bpda for "
                     "non-differentiable preprocessing, EOT for randomness)",
    "weaker_beats_stronger": "the strongest white-box attack failed on {n} example(s) that a weaker "
                             "attack broke: possible gradient masking or a weak configuration",
}


def sanity_flags(records: Iterable[Record | BaseRecord]) -> list[str]:
    """Fold the per-example ``flags`` of robust records into one-line warnings per threat model
    (an example counts once per flag and threat model; ``note:...`` flags pass through)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    seen: dict[str, set] = defaultdict(set)
    for r in _as_dicts(records):
        if r.get("kind") != "robust":
            continue
        threat = str(r.get("threat"))
        for f in r.get("flags") or ():
            key = (int(r["index"]), f)
            if key in seen[threat]:
                continue
            seen[threat].add(key)
            counts[threat][f] += 1
    out: list[str] = []
    for threat in sorted(counts):
        for flag, n in sorted(counts[threat].items()):
            if flag.startswith("note:"):
                out.append(f"{threat}: {flag[5:]}")
            else:
                out.append(f"{threat}: " + FLAG_MESSAGES.get(flag, flag + " on {n} example(s)").format(n=n))
    return out


def _threat_sort_key(threat: str) -> tuple[str, float]:
    from bastion.threat import ThreatModel

    try:
        t = ThreatModel.parse(threat)
        return t.norm, t.eps
    except Exception:
        return threat, 0.0


# --- randomized smoothing ---------------------------------------------------------------------

def radius_grid(max_radius: float, step: float = 0.01) -> np.ndarray:
    """Radii 0, step, 2*step, ... <= max_radius, built from integers (no float drift)."""
    k = int(round(max_radius / step))
    return np.array([i * step for i in range(k + 1)], dtype=np.float64)


def certified_accuracy(radii: Sequence[float], correct: Sequence[bool | int], grid: Sequence[float]) -> np.ndarray:
    """Approximate certified accuracy at each radius r of ``grid``: fraction of examples with
    ``correct`` and ``radius >= r`` (abstentions count as incorrect)."""
    rad = np.asarray(radii, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if rad.size == 0:
        return np.zeros(len(grid))
    return np.array([float(np.mean(ok & (rad >= r))) for r in grid])


def average_certified_radius(radii: Sequence[float], correct: Sequence[bool | int]) -> float:
    """ACR = mean over examples of the radius if correct, else 0 (abstentions, whatever radius
    they carry, e.g. NaN or -1, count 0)."""
    rad = np.asarray(radii, dtype=np.float64)
    if rad.size == 0:
        return 0.0
    ok = np.asarray(correct, dtype=bool) & np.isfinite(rad) & (rad > 0)
    return float(np.mean(np.where(ok, rad, 0.0)))


# --- detection --------------------------------------------------------------------------------

def auroc(scores_negative: Sequence[float], scores_positive: Sequence[float]) -> float:
    """Area under the ROC curve where higher score = more likely positive (adversarial)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(scores_negative)), np.ones(len(scores_positive))]
    return float(roc_auc_score(y, np.r_[scores_negative, scores_positive]))


def tpr_at_fpr(scores_negative: Sequence[float], scores_positive: Sequence[float], fpr: float = 0.05) -> float:
    """TPR at the threshold whose FPR on the negatives is at most ``fpr``."""
    neg = np.sort(np.asarray(scores_negative, dtype=np.float64))
    if neg.size == 0:
        return 0.0
    k = int(np.floor(fpr * neg.size))
    thr = neg[-k - 1] if k < neg.size else -np.inf
    return float(np.mean(np.asarray(scores_positive) > thr))


# --- conformal prediction ---------------------------------------------------------------------

def coverage_and_size(sets: Sequence[Sequence[int]], labels: Sequence[int]) -> dict[str, float]:
    """Marginal coverage (true label in the set) and mean set size."""
    cov = [int(y) in set(s) for s, y in zip(sets, labels)]
    return {"coverage": float(np.mean(cov)) if cov else 0.0,
            "mean_set_size": float(np.mean([len(s) for s in sets])) if sets else 0.0}


def min_norm_curves(records: Iterable[Record | BaseRecord], probes: dict[str, dict[str, Any]] | None = None,
                    points: int = 16) -> dict[str, Any]:
    """Robust accuracy vs eps from the per-example minimal perturbation norms (``min_norm``) of
    robust records whose probe ran minimum-norm attacks: one curve per threat model (norm and
    radius), at ``points + 1`` radii from 0 to twice the largest eps of that norm.

    accuracy(r) = mean over examples with a clean record of ``clean correct AND (no adversarial
    perturbation found OR min_norm > r)``; examples not attacked by such a probe are left out
    (``n``). Returns {threat: {"norm", "eps", "attacks", "n", "median_norm", "curve": {r: acc}}}."""
    clean: dict[int, bool] = {}
    by_threat: dict[str, dict[int, float | None]] = defaultdict(dict)
    for r in _as_dicts(records):
        if r.get("kind") == "clean":
            clean[int(r["index"])] = bool(r["correct"])
    mn_probes = {name for name, d in (probes or {}).items() if d.get("minimum_norm")}
    attacks: dict[str, list[str]] = {}
    for d in (probes or {}).values():
        if d.get("minimum_norm"):
            attacks.setdefault(str(d.get("threat")), []).extend(d["minimum_norm"])
    for r in _as_dicts(records):
        if r.get("kind") != "robust" or (probes is not None and r.get("probe") not in mn_probes):
            continue
        if probes is None and r.get("min_norm") is None:
            continue
        i, t = int(r["index"]), str(r["threat"])
        v = r.get("min_norm")
        old = by_threat[t].get(i, float("inf"))
        by_threat[t][i] = min(old, float("inf") if v is None else float(v))
    from bastion.threat import ThreatModel

    out: dict[str, Any] = {}
    top: dict[str, float] = defaultdict(float)  # one radius grid per norm (the largest eps of that norm)
    for t in by_threat:
        tm = ThreatModel.parse(t)
        top[tm.norm] = max(top[tm.norm], tm.eps)
    for t in sorted(by_threat, key=_threat_sort_key):
        tm = ThreatModel.parse(t)
        norms = [by_threat[t][i] if clean.get(i, False) else 0.0 for i in by_threat[t] if i in clean]
        if not norms:
            continue
        arr = np.asarray(norms, dtype=float)
        radii = [top[tm.norm] * 2 * k / points for k in range(points + 1)]
        found = arr[np.isfinite(arr) & (arr > 0)]
        out[t] = {"norm": tm.norm, "eps": tm.eps, "attacks": sorted(set(attacks.get(t, []))), "n": int(arr.size),
                  "median_norm": float(np.median(found)) if found.size else None,
                  "curve": {f"{r:.6g}": float(np.mean(arr > r)) for r in radii}}
    return out

"""Leaderboard entries of kind ``detector``: a classifier checkpoint guarded by an adversarial-example
detector (reject when the detector's score is above its threshold).

Config (the entry's ``detector`` table):

    detector = { kind = "mahalanobis", fpr = 0.05, calibration = 300, pool = 400, fit_eps = 0.1 }
    detector = { path = "dets/maha" }            # a saved detector (detection.checkpoint), its own threshold

A fitted detector is made once from the entry's classifier on the training split and saved in
``OUT/detectors/<entry>`` (reused while its fit settings and classifier are unchanged, like a
``[train.*]`` step): a seeded permutation of the training split gives a calibration set
(``calibration`` images, never used to fit), a pool (``pool`` images: their FGSM Linf/L2 versions
at ``fit_eps`` and Gaussian-noised copies fit Lee et al.'s regression) and the class statistics
(every training image but the calibration set). The threshold is set at ``fpr`` (default 5%) on
the calibration images' scores.

Metrics (Tramer 2022, "Detecting adversarial examples is (nearly) as hard as classifying them";
Bryniarski et al. 2022): the defended model is right on a clean input when the classifier is
right AND the detector accepts it, so a rejected clean input counts as an error (clean accuracy
is "accepted and correct"). It is robust on an example when it is right on the clean input and
every attack's output is either classified correctly or rejected: an adversarial example is a
success for the attacker only if it is misclassified AND not detected. The attack suite per
threat model, each on the examples still robust: the standard protocol against the classifier
alone (AutoAttack standard; fast: APGD-CE + APGD-T), then the detector-aware attacks
(`attacks.adaptive.DetectorObjective` through native APGD, objective ``(1-w) margin - w *
standardized score``, and APGD and PGD in Bryniarski's ``selective`` mode), whose own success
criterion is misclassified and under the threshold. Records also keep each attack's prediction and detection,
so the report gives the detection rate under attack (misclassified adversarial examples flagged).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from bastion.errors import ConfigError
from bastion.folds import FoldContext, register_fold
from bastion.records import BaseRecord, register_record_type
from bastion.report import md_table, register_renderer, section
from bastion.rng import child_generator, forked_rng
from bastion.threat import ThreatModel

DETECTOR_KEYS = ("path", "kind", "fpr", "calibration", "pool", "fit_eps", "select", "layers", "weight")
FIT_KINDS = ("mahalanobis",)


@dataclass(frozen=True)
class DetectorSpec:
    """An entry's ``detector`` table (see the module docstring)."""

    path: str | None = None
    kind: str = "mahalanobis"
    fpr: float = 0.05
    calibration: int = 300
    pool: int = 400
    fit_eps: float = 0.1
    select: str = "all"
    layers: tuple[str, ...] | None = None
    weight: float = 0.5          # the adaptive attack's w in (1 - w) CE - w * score

    def fit_settings(self, seed: int) -> dict[str, Any]:
        """What determines a fitted detector (stamped in its card; a change refits)."""
        d = dataclasses.asdict(self) | {"seed": seed}
        d.pop("path")
        d.pop("weight")
        d["layers"] = list(self.layers) if self.layers else None
        return d


def parse_spec(raw: dict[str, Any], entry: str) -> DetectorSpec:
    """A checked `DetectorSpec` from an entry's ``detector`` table."""
    w = f"the detector table of entry {entry!r}"
    unknown = sorted(set(raw) - set(DETECTOR_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {w}; known keys: {', '.join(DETECTOR_KEYS)}")
    if "path" in raw:
        extra = sorted(set(raw) - {"path", "weight"})
        if extra:
            raise ConfigError(f"{w}: a saved detector ('path') keeps its own fit and threshold; drop {extra}")
        if not isinstance(raw["path"], str):
            raise ConfigError(f"{w}: 'path' must be a string")
    kind = raw.get("kind", "mahalanobis")
    if kind not in FIT_KINDS:
        raise ConfigError(f"{w}: kind {kind!r} cannot be fitted here; use {', '.join(FIT_KINDS)} or a saved "
                          f"detector ('path', e.g. an EPS-AD detector saved by detection.checkpoint)")
    fpr = raw.get("fpr", 0.05)
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 < fpr < 1:
        raise ConfigError(f"{w}: fpr must be a number in (0, 1), got {fpr!r}")
    ints = {}
    for key, default in (("calibration", 300), ("pool", 400)):
        v = raw.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 10:
            raise ConfigError(f"{w}: {key} must be an integer >= 10, got {v!r}")
        ints[key] = v
    fit_eps = raw.get("fit_eps", 0.1)
    if isinstance(fit_eps, bool) or not isinstance(fit_eps, (int, float)) or not 0 < fit_eps <= 1:
        raise ConfigError(f"{w}: fit_eps must be in (0, 1] (Linf, pixel units), got {fit_eps!r}")
    select = raw.get("select", "all")
    if select not in ("all", "success"):
        raise ConfigError(f"{w}: select must be 'all' or 'success', got {select!r}")
    layers = raw.get("layers")
    if layers is not None and (not isinstance(layers, list) or not all(isinstance(x, str) for x in layers)):
        raise ConfigError(f"{w}: layers must be a list of module names")
    weight = raw.get("weight", 0.5)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise ConfigError(f"{w}: weight must be in [0, 1], got {weight!r}")
    return DetectorSpec(path=raw.get("path"), kind=kind, fpr=float(fpr), calibration=ints["calibration"],
                        pool=ints["pool"], fit_eps=float(fit_eps), select=select,
                        layers=tuple(layers) if layers else None, weight=float(weight))


# ---------------------------------------------------------------------------------------------
# Fitting (a cached step of the leaderboard run)
# ---------------------------------------------------------------------------------------------

def fit_detector(spec: DetectorSpec, classifier_path: str, train, out: Path, seed: int, device: str,
                 log=print) -> Path:
    """Fit (or reuse) the entry's detector on the training split ``train``; returns its card path."""
    from bastion.checkpoints import load_checkpoint, read_card
    from detection.checkpoint import read_detector_card
    from detection.mahalanobis import MahalanobisDetector
    from detection.pipeline import fgsm_sets

    settings = spec.fit_settings(seed)
    sha = read_card(classifier_path).get("sha256")
    cpath = out.with_name(out.name + ".json")
    if cpath.is_file():
        try:
            card = read_detector_card(cpath)
        except Exception:  # noqa: BLE001 - a broken cache is refit
            card = {}
        if (card.get("extra") or {}).get("fit") == settings and (card.get("classifier") or {}).get("sha256") == sha:
            return cpath
        log(f"[leaderboard] detector {str(out)!r} was fitted with other settings or another classifier: refitting")
    n = len(train)
    if spec.calibration + spec.pool >= n:
        raise ConfigError(f"detector calibration + pool ({spec.calibration} + {spec.pool}) must leave statistics "
                          f"images in the {n} training images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cal_i, pool_i, stat_i = perm[:spec.calibration], perm[spec.calibration:spec.calibration + spec.pool], \
        perm[spec.calibration:]
    classifier = load_checkpoint(classifier_path, device)[0].eval().requires_grad_(False)
    pool = train.subset(pool_i)
    log(f"[leaderboard] fitting a {spec.kind} detector on {len(stat_i)} training images ({len(pool)} in the "
        f"regression pool, FGSM at Linf {spec.fit_eps:g}); threshold at {100 * spec.fpr:g}% FPR on "
        f"{len(cal_i)} held-out ones")
    advs = fgsm_sets(classifier, pool, spec.fit_eps, device, seed)
    det = MahalanobisDetector(classifier, layers=spec.layers, noise_std=spec.fit_eps / 4, select=spec.select,
                              seed=seed)
    det.fit(pool.images.to(device), advs, labels=pool.labels.to(device),
            train_images=train.images[stat_i].to(device), train_labels=train.labels[stat_i].to(device))
    cal = det.score(train.images[cal_i].to(device))
    det.set_threshold(cal, spec.fpr)
    extra = {"fit": settings, "split": "train", "calibration_n": int(len(cal_i)), "pool_n": int(len(pool_i)),
             "statistics_n": int(len(stat_i)), "calibration_fpr": float(np.mean(cal > det.threshold))}
    return det.save(out, classifier_path=classifier_path, fpr=spec.fpr, extra=extra)


def load_for_entry(card_path: str | Path, classifier, classifier_path: str, entry: str):
    """The saved detector of an entry on its classifier module, refusing one fitted on other weights."""
    from bastion.checkpoints import read_card
    from detection.checkpoint import load_detector, read_detector_card

    card = read_detector_card(card_path)
    ref = card.get("classifier") or {}
    if ref.get("sha256") and ref["sha256"] != read_card(classifier_path).get("sha256"):
        raise ConfigError(f"entry {entry!r}: detector {str(card_path)!r} was fitted on another classifier than "
                          f"{classifier_path!r}")
    if card.get("threshold") is None:
        raise ConfigError(f"entry {entry!r}: detector {str(card_path)!r} has no threshold; set one "
                          f"(set_threshold on clean calibration scores) and save it again")
    if card["detector"] == "mahalanobis":
        det = load_detector(card_path, classifier=classifier)
    else:
        det = load_detector(card_path)
    return det, card


def detector_digest(card_path: str | Path) -> str:
    return hashlib.sha256(Path(card_path).read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Records and probes
# ---------------------------------------------------------------------------------------------

@register_record_type
@dataclass(frozen=True, kw_only=True)
class GuardRecord(BaseRecord):
    """One example of a classifier + detector. ``threat`` None: the clean input (``pred`` -1 when
    the detector rejected it; ``correct`` = accepted and right). Otherwise the suite of ``attack``
    at ``threat``: ``correct`` False once an attack's output was misclassified and not detected
    (``broken_by``: the attack, ``autoattack/<part>`` for AutoAttack's parts), or when the clean
    input was already wrong or rejected. ``outcomes``: per attack that ran on the example, its
    output's ``pred``, ``detected`` and ``score``."""

    kind: ClassVar[str] = "guarded"
    threat: str | None = None
    attack: str | None = None
    broken_by: str | None = None
    step: int | None = None
    flags: tuple[str, ...] = ()
    clean_pred: int = -1
    clean_score: float = 0.0
    clean_flagged: bool = False
    outcomes: dict[str, dict[str, Any]] | None = None


def _to_device(det, device: torch.device) -> None:
    clf = getattr(det, "classifier", None)
    if clf is not None:
        clf.to(device)


def _scores(det, x: torch.Tensor, generator: torch.Generator) -> np.ndarray:
    with forked_rng(x.device, generator):
        return np.asarray(det.score(x, generator), dtype=np.float64)


class GuardedCleanProbe:
    """Clean inputs through the classifier and the detector (records ``guarded``, threat None)."""

    name = "clean"

    def __init__(self, detector, threshold: float):
        self.detector, self.threshold = detector, float(threshold)

    def describe(self) -> dict[str, Any]:
        return {"kind": "guarded", "threat": None, "threshold": self.threshold, "detector": self.detector.describe()}

    def run(self, model, x, y, indices, generator):
        _to_device(self.detector, x.device)
        with torch.no_grad(), forked_rng(x.device, generator):
            pred = model(x).argmax(dim=1)
        s = _scores(self.detector, x, child_generator(generator))
        out = []
        for j, i in enumerate(indices.tolist()):
            flagged = bool(s[j] > self.threshold)
            ok = bool(pred[j] == y[j])
            out.append(GuardRecord(index=int(i), probe=self.name, label=int(y[j]), pred=-1 if flagged else int(pred[j]),
                                   correct=ok and not flagged, clean_pred=int(pred[j]), clean_score=float(s[j]),
                                   clean_flagged=flagged).to_record())
        return out


class GuardedAttackProbe:
    """A suite of attacks at one threat model against classifier + detector: each attack runs on the
    examples still robust and breaks one only when its output is misclassified and not detected."""

    def __init__(self, threat: ThreatModel, detector, threshold: float, attacks: Sequence[tuple[str, Any]],
                 name: str | None = None):
        self.threat = threat
        self.detector, self.threshold = detector, float(threshold)
        self.attacks = list(attacks)
        for label, atk in self.attacks:
            atk.name = label
        self.suite = "+".join(label for label, _ in self.attacks)
        self.name = name or f"{self.suite}@{threat}"

    def describe(self) -> dict[str, Any]:
        return {"kind": "guarded", "threat": str(self.threat), "attacks": [a.describe() for _, a in self.attacks],
                "threshold": self.threshold, "detector": self.detector.describe()}

    def run(self, model, x, y, indices, generator):
        from attacks.evaluation import AttackProbe

        device = x.device
        _to_device(self.detector, device)
        g_check, g_score = child_generator(generator), child_generator(generator)
        g_attack = [child_generator(generator) for _ in self.attacks]
        g_pred = [child_generator(generator) for _ in self.attacks]
        with torch.no_grad(), forked_rng(device, child_generator(g_check)):
            logits = model(x)
        flags = AttackProbe._checks(model, x, y, g_check, logits)  # the classifier's sanity checks
        clean_pred = logits.argmax(1)
        s0 = _scores(self.detector, x, child_generator(g_score))
        flagged = torch.as_tensor(s0 > self.threshold, device=device)
        robust = (clean_pred == y) & ~flagged
        pred = torch.where(flagged, torch.full_like(clean_pred, -1), clean_pred)
        n = x.shape[0]
        broken_by: list[str | None] = [None] * n
        step: list[int | None] = [None] * n
        outcomes: list[dict[str, dict[str, Any]]] = [{} for _ in range(n)]
        for (label, atk), g, gp in zip(self.attacks, g_attack, g_pred):
            idx = robust.nonzero().flatten()
            if idx.numel() == 0:
                break
            res = atk.run(model, x[idx], y[idx], generator=g)
            self.threat.check(x[idx], res.x_adv)
            with torch.no_grad(), forked_rng(device, gp):
                p = model(res.x_adv).argmax(1)
            s = _scores(self.detector, res.x_adv, child_generator(gp))
            for j, i in enumerate(idx.tolist()):
                det = bool(s[j] > self.threshold)
                outcomes[i][label] = {"pred": int(p[j]), "detected": det, "score": float(s[j])}
                if bool(p[j] != y[i]) and not det:
                    robust[i] = False
                    part = res.broken_by[j] if getattr(res, "broken_by", None) is not None else None
                    broken_by[i], pred[i] = (f"{label}/{part}" if part else label), p[j]
                    st = int(res.step[j]) if res.step is not None else -1
                    step[i] = st if st >= 0 else None
        return [GuardRecord(index=int(i), probe=self.name, label=int(y[j]), pred=int(pred[j]), correct=bool(robust[j]),
                            threat=str(self.threat), attack=self.suite, broken_by=broken_by[j], step=step[j],
                            flags=tuple(flags[j]), clean_pred=int(clean_pred[j]), clean_score=float(s0[j]),
                            clean_flagged=bool(flagged[j]), outcomes=outcomes[j]).to_record()
                for j, i in enumerate(indices.tolist())]


ADAPTIVE_NAMES = ("apgd-margin", "apgd-selective", "pgd-selective")  # attacks.adaptive.DETECTOR_ATTACKS
ADAPTIVE = tuple(f"detector-aware-{n}" for n in ADAPTIVE_NAMES)


def attack_suite(threat: ThreatModel, detector, threshold: float, protocol: str, steps: int | None, seed: int,
                 weight: float) -> list[tuple[str, Any]]:
    """The suite a detector entry needs: the standard protocol against the classifier alone, then
    three detector-aware attacks (`attacks.adaptive.detector_aware_attacks`, success = misclassified
    and under the threshold): APGD on ``(1 - w) margin - w * standardized score``, and APGD and PGD
    with the selective objective (Bryniarski et al.). The margin, not CE, in the sum: with CE (w 0.5)
    the sum left 88.67% robust on digits where the margin sum left 52.00% (20 and 100 steps alike)."""
    from attacks import create_attack
    from attacks.adaptive import detector_aware_attacks

    if protocol == "standard":
        p = {"version": "standard", "seed": seed} | ({"steps": steps} if steps else {})
        suite = [("autoattack", create_attack("autoattack", threat, **p))]
        adaptive_steps = steps or 100
    else:
        s = steps or 20
        suite = [(n, create_attack(n, threat, steps=s, seed=seed)) for n in ("apgd-ce", "apgd-t")]
        adaptive_steps = s
    module = detector.differentiable()
    adaptive = detector_aware_attacks(module, module.standardize(threshold), threat, ADAPTIVE_NAMES,
                                      steps=adaptive_steps, weight=weight, seed=seed)
    return suite + [(f"detector-aware-{name}", atk) for name, atk in adaptive]


# ---------------------------------------------------------------------------------------------
# Fold and renderer
# ---------------------------------------------------------------------------------------------

def _as_standard(r: GuardRecord) -> dict[str, Any]:
    """A guarded record as the clean / robust record the standard robustness fold reads."""
    base = {"index": r.index, "probe": r.probe, "label": r.label, "pred": r.pred, "correct": r.correct}
    if r.threat is None:
        return base | {"kind": "clean"}
    return base | {"kind": "robust", "threat": r.threat, "attack": r.attack, "broken_by": r.broken_by,
                   "step": r.step, "flags": list(r.flags)}


def fold_guarded(records: list[BaseRecord], ctx: FoldContext) -> list[dict[str, Any]]:
    from bastion.metrics import classification_metrics, sanity_flags

    std = [_as_standard(r) for r in records]
    metrics = classification_metrics(std, ctx.class_names)
    metrics["flags"] = sanity_flags(std)
    metrics["attacks"] = [{k: v for k, v in d.items() if k != "detector"} | {"kind": "robust"}
                          for d in ctx.probes.values() if d.get("kind") == "guarded" and d.get("threat")]
    if ctx.model:
        metrics["model"] = ctx.model
    metrics["rejections"] = "a clean input the detector rejects counts as an error"
    clean = {r.index: r for r in records if r.threat is None}
    desc = next((d for d in ctx.probes.values() if d.get("kind") == "guarded"), {})
    data: dict[str, Any] = {
        "detector": desc.get("detector"), "threshold": desc.get("threshold"), "n": len(clean),
        "classifier_clean_accuracy":
            float(np.mean([r.clean_pred == r.label for r in clean.values()])) if clean else None,
        "clean_rejection_rate": float(np.mean([r.clean_flagged for r in clean.values()])) if clean else None,
        "clean_accuracy": float(np.mean([r.correct for r in clean.values()])) if clean else None,
        "threats": {}}
    by_threat: dict[str, list[GuardRecord]] = defaultdict(list)
    for r in records:
        if r.threat is not None:
            by_threat[r.threat].append(r)
    for threat, rs in by_threat.items():
        per: dict[str, dict[str, int]] = defaultdict(lambda: {"attacked": 0, "fooled": 0, "fooled_detected": 0,
                                                               "broke": 0})
        fooled_any = 0
        for r in rs:
            f_any = False
            for name, o in (r.outcomes or {}).items():
                c = per[name]
                c["attacked"] += 1
                fooled = o["pred"] != r.label
                c["fooled"] += int(fooled)
                c["fooled_detected"] += int(fooled and o["detected"])
                c["broke"] += int(r.broken_by is not None and r.broken_by.split("/")[0] == name)
                f_any |= fooled
            fooled_any += int(f_any)
        total_f = sum(c["fooled"] for c in per.values())
        total_d = sum(c["fooled_detected"] for c in per.values())
        for c in per.values():
            c["detection_rate"] = c["fooled_detected"] / c["fooled"] if c["fooled"] else None
        data["threats"][threat] = {
            "robust_accuracy": float(np.mean([r.correct for r in rs])), "n": len(rs),
            "detection_rate": total_d / total_f if total_f else None, "fooled": total_f, "fooled_detected": total_d,
            "classifier_fooled_rate": fooled_any / len(rs), "per_attack": dict(per)}
    return [section("robustness", ctx.title, metrics), section("detector_defense", f"{ctx.title}: detector", data)]


def _p(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def render_detector_defense(sec: dict[str, Any]) -> tuple[str, list]:
    d = sec["data"]
    det = d.get("detector") or {}
    parts = [f"Detector `{det.get('name')}` ({det.get('kind')}), threshold {d.get('threshold'):.6g}. On the "
             f"{d['n']} clean test inputs: classifier accuracy {_p(d['classifier_clean_accuracy'])}%, rejected "
             f"{_p(d['clean_rejection_rate'])}% (the test false-positive rate), accepted and correct "
             f"{_p(d['clean_accuracy'])}% (the clean accuracy; a rejection counts as an error). An adversarial "
             f"example counts for the attacker only when it is misclassified AND not detected."]
    rows = []
    for threat, t in d["threats"].items():
        for name, c in t["per_attack"].items():
            rows.append([threat, name, c["attacked"], c["fooled"], c["fooled_detected"], _p(c["detection_rate"]),
                         c["broke"]])
        rows.append([threat, "**all**", "", t["fooled"], t["fooled_detected"], _p(t["detection_rate"]),
                     f"robust acc. {_p(t['robust_accuracy'])}%"])
    if rows:
        parts.append(md_table(["threat", "attack", "examples attacked", "misclassified", "misclassified and "
                               "detected", "detection rate (%)", "broke (misclassified, undetected)"], rows))
    return "\n\n".join(parts), []


register_fold("guarded", fold_guarded, kinds=("guarded",))
register_renderer("detector_defense", render_detector_defense)


def card_summary(card: dict[str, Any]) -> dict[str, Any]:
    """The detector fields an entry's JSON carries (from the detector's card)."""
    extra = card.get("extra") or {}
    return {"kind": card["detector"], "name": card.get("name"), "sha256": card.get("sha256"),
            "fpr_target": card.get("fpr"), "threshold": card.get("threshold"),
            "calibration_n": extra.get("calibration_n"), "calibration_fpr": extra.get("calibration_fpr"),
            "fit": extra.get("fit"), "layers": (card.get("state") or {}).get("layers")}

"""``bastion detect``: EPS-AD (diffusion-score detection with a deep-kernel MMD) and the Mahalanobis
baseline against a list of attacks and radii, with the detector-aware adaptive attack beside each
oblivious one. Resumable: the classifier, the score model and the kernel are cached in OUT, and
the evaluation resumes by missing records."""

from __future__ import annotations

import argparse

from experiments.common import add_command, positive_float, positive_int
from experiments.execution import add_execution_args

DETECTOR_CHOICES = ("deep", "gaussian", "norm", "mahalanobis")  # detection.pipeline's (no torch import here)

HELP = """examples:
  bastion detect --out runs/detect-digits
  bastion detect --threats linf:4/255 linf:8/255 --adaptive-threats linf:8/255 --test-examples 200
  bastion detect --classifier runs/digits-std/model.safetensors --score-model runs/score-unet
  bastion run experiments/configs/detect_digits.toml

OUT/score_model is a local diffusers directory (unet/ + scheduler/); --score-model takes any such
directory (e.g. a converted pretrained UNet2DModel); nothing is downloaded. Needs
pip install "diffusers>=0.30" (the diffusion extra). Report: OUT/eval/report.html."""


def register(sub, common) -> None:
    p = add_command(sub, common, "detect", help="adversarial detection: EPS-AD and Mahalanobis, oblivious and "
                                                "adaptive attacks",
                    description="Train or load a classifier, a diffusion score model and the detectors (EPS-AD "
                                "deep-kernel MMD, Gaussian MMD, EPS-N, Mahalanobis); score natural test images "
                                "and attacked ones (oblivious and detector-aware adaptive PGD): AUROC, TPR at "
                                "1/5/10% FPR, detection-aware robust accuracy.", epilog=HELP)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits", help="data set name (default digits)")
    g.add_argument("--data-root", default=None, help="folder with the data set's files (mnist, cifar10, ...)")
    g.add_argument("--image-size", type=positive_int, default=None, help="resize images to SIZE x SIZE")
    g.add_argument("--test-examples", type=positive_int, default=None,
                   help="evaluate on this many evenly spaced test examples (default all)")
    g.add_argument("--score-pool", type=positive_int, default=800, help="training images for the score model")
    g.add_argument("--detector-pool", type=positive_int, default=400,
                   help="training images (not seen by the score model) for the kernel and reference set; the "
                        "rest of the training split calibrates the thresholds")
    m = p.add_argument_group("models")
    m.add_argument("--classifier", default=None, help="classifier checkpoint (default: train a small CNN)")
    m.add_argument("--classifier-epochs", type=positive_int, default=15)
    m.add_argument("--score-model", default=None, help="local diffusers directory (default: train one into OUT)")
    m.add_argument("--score-steps", type=positive_int, default=600, help="score-model training steps")
    m.add_argument("--score-batch", type=positive_int, default=128)
    m.add_argument("--score-lr", type=positive_float, default=1e-3)
    m.add_argument("--t-max", type=positive_int, default=100,
                   help="train the score model on timesteps < T-MAX only (1000: all; EPS queries t < levels)")
    m.add_argument("--unet-channels", type=positive_int, nargs="+", default=[16, 32])
    d = p.add_argument_group("detectors")
    d.add_argument("--detectors", nargs="+", choices=DETECTOR_CHOICES, default=list(DETECTOR_CHOICES))
    d.add_argument("--levels", type=positive_int, default=20, help="EPS noise levels K (default 20)")
    d.add_argument("--kernel-eps", default="8/255", help="FGSM / FGSM-l2 budget of the kernel's training sets")
    d.add_argument("--kernel-epochs", type=positive_int, default=200)
    d.add_argument("--kernel-batch", type=positive_int, default=200)
    d.add_argument("--kernel-lr", type=positive_float, default=2e-3)
    d.add_argument("--reference-size", type=positive_int, default=500)
    d.add_argument("--feature-only", action="store_true", help="the demo's feature-only kernel exp(-Dphi/s0)")
    d.add_argument("--mahalanobis-select", choices=["all", "success"], default="all")
    d.add_argument("--fpr", type=positive_float, default=0.05, help="operating point (default 0.05)")
    a = p.add_argument_group("attacks")
    a.add_argument("--attack", default="pgd", help="native attack (pgd, apgd-ce, fgsm; default pgd)")
    a.add_argument("--steps", type=positive_int, default=10, help="attack steps (default 10)")
    a.add_argument("--threats", nargs="+",
                   default=["linf:1/255", "linf:2/255", "linf:4/255", "linf:8/255", "linf:16/255"])
    a.add_argument("--adaptive-targets", nargs="*", default=["eps-deep-mmd", "mahalanobis"],
                   help="detectors the adaptive attack fights (one adaptive run per target and threat)")
    a.add_argument("--adaptive-threats", nargs="+", default=None,
                   help="threats of the adaptive attack (default: all; a subset of --threats)")
    a.add_argument("--adaptive-weight", type=positive_float, default=0.5)
    a.add_argument("--adaptive-modes", nargs="+", choices=["worst", "sum", "selective"], default=["worst"],
                   help="worst (default): APGD on (1-w) margin - w score, then APGD-selective on the examples "
                        "still robust, the worst case per example; sum: the --attack engine on (1-w) CE - w "
                        "score (the default before; much weaker); selective: the --attack engine, the margin "
                        "until misclassified, then the score only (Bryniarski et al. 2022); one adaptive run "
                        "per mode")
    a.add_argument("--adaptive-steps", type=positive_int, default=None,
                   help="steps of each adaptive attack (default: --steps)")
    add_execution_args(p, shard_size=128)
    p.add_argument("--batch-size", type=positive_int, default=128, help="examples per chunk (default 128)")
    p.add_argument("--out", default="runs/detect-digits", help="run directory (default runs/detect-digits)")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    from bastion.threat import parse_eps
    from detection.pipeline import DetectSettings

    return DetectSettings(
        dataset=args.dataset, data_root=args.data_root, image_size=args.image_size, seed=args.seed,
        classifier=args.classifier, classifier_epochs=args.classifier_epochs, score_model=args.score_model,
        score_steps=args.score_steps, score_batch=args.score_batch, score_lr=args.score_lr, t_max=args.t_max,
        unet_channels=tuple(args.unet_channels), levels=args.levels, score_pool=args.score_pool,
        detector_pool=args.detector_pool, kernel_eps=parse_eps(args.kernel_eps), kernel_epochs=args.kernel_epochs,
        kernel_batch=args.kernel_batch, kernel_lr=args.kernel_lr, reference_size=args.reference_size,
        feature_only=args.feature_only, detectors=tuple(args.detectors), attack=args.attack,
        attack_steps=args.steps, threats=tuple(args.threats), adaptive_targets=tuple(args.adaptive_targets),
        adaptive_threats=tuple(args.adaptive_threats) if args.adaptive_threats else None,
        adaptive_weight=args.adaptive_weight, adaptive_modes=tuple(args.adaptive_modes),
        adaptive_steps=args.adaptive_steps, fpr=args.fpr,
        test_examples=args.test_examples,
        mahalanobis_select=args.mahalanobis_select)


def run(args: argparse.Namespace) -> int:
    from detection.pipeline import run_detection
    from experiments.execution import run_options

    s = settings_from_args(args)
    device = str(args.device)
    opts = run_options(args, batch_size=args.batch_size, device=device)
    res = run_detection(s, args.out, device=device, quiet=args.quiet, opts=opts)
    if not args.quiet:
        d = next(sec["data"] for sec in res.doc["sections"] if sec["type"] == "detection")
        print(f"clean accuracy {100 * d['clean_accuracy']:.1f}% on {d['num_examples']} test examples; "
              f"natural-halves AUROC " + ", ".join(f"{k} {v:.3f}" for k, v in d["natural_halves_auroc"].items()))
        for r in d["rows"]:
            how = "" if r.get("adaptive_mode") in (None, "sum") else f",{r['adaptive_mode']}"
            mode = f"adaptive[{r['target']}{how}]" if r["adaptive"] else "oblivious"
            print(f"{r['attack']}@{r['threat']} {mode:28s} {r['detector']:17s} AUROC {r.get('auroc', float('nan')):.3f}"
                  f"  TPR@5% {(r.get('tpr') or {}).get('5%', float('nan')):.3f}"
                  f"  det.-aware rob. acc. {100 * r.get('detection_aware_robust_accuracy', 0):.1f}%")
        print(f"report: {res.out / 'eval' / 'report.html'}")
    return 0

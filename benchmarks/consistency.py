"""Per-noise-sample inference cost: rRCM base classifier vs diffusion denoised smoothing, side by side.

    python -m benchmarks.consistency [--device cuda] [--batch 1000] [--repeats 5] [--image-size 8]

Both base classifiers are built at the digits comparison's sizes (spec section 9 MLP encoder + linear
head; diffusers UNet2DModel (16, 32) eps-model + MLP classifier), fed the same batch on the same device,
timed in interleaved repeats (median), FLOPs from torch's FlopCounterMode. Weights do not change the
cost, so untrained models are used. Exits 1 when the denoised/rRCM wall-time ratio is below --min-ratio.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--min-ratio", type=float, default=10.0)
    a = p.parse_args(argv)
    from bastion.models import create_model
    from defenses.consistency import RRCMClassifier
    from defenses.consistency_compare import inference_costs
    from defenses.denoised import DenoisedClassifier
    from detection.diffusers_backend import build_scheduler, build_unet

    shape = (a.channels, a.image_size, a.image_size)
    torch.manual_seed(0)
    rrcm = RRCMClassifier({"kind": "mlp"}, shape, 10, a.sigma).to(a.device)
    dds = DenoisedClassifier(build_unet(a.channels, a.image_size, (16, 32)),
                             create_model("mlp", 10, a.channels, a.image_size),
                             build_scheduler().alphas_cumprod, a.sigma).to(a.device)
    c = inference_costs({"rrcm": rrcm, "denoised": dds}, shape, a.device, batch=a.batch, repeats=a.repeats)
    params = {"rrcm": sum(q.numel() for q in rrcm.parameters()), "denoised": sum(q.numel() for q in dds.parameters())}
    for k, v in c.items():
        print(f"{k:9s} {params[k] / 1e3:8.1f}k params  {v['flops'] / 1e6:8.3f} MFLOPs/sample  "
              f"{1e6 * v['wall_s_per_sample']:9.2f} us/sample")
    ratio = c["denoised"]["wall_s_per_sample"] / c["rrcm"]["wall_s_per_sample"]
    print(f"denoised / rRCM: {ratio:.1f}x wall, {c['denoised']['flops'] / c['rrcm']['flops']:.1f}x FLOPs "
          f"(device {a.device}, batch {a.batch}, threads {torch.get_num_threads()})")
    return 0 if ratio >= a.min_ratio else 1


if __name__ == "__main__":
    sys.exit(main())

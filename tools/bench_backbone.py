#!/usr/bin/env python
"""Forward throughput of a distill backbone against timm's same architecture, side by side in one run.

Both models get the same weights and inputs; rounds alternate between them so that machine noise hits both
alike, and the median over rounds is reported with the ratio.

    .venv/bin/python tools/bench_backbone.py                          # ViT-S/16, 224 px, fp32
    .venv/bin/python tools/bench_backbone.py --precision bf16 --batch-size 64
"""

import argparse
import platform
import statistics
import time

import torch

from distill.models import create_backbone, load_pretrained
from distill.precision import autocast


def images_per_second(model, x, iters: int, precision: str) -> float:
    with torch.inference_mode(), autocast(precision, x.device):
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        return iters * len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours", default="vit_small", help="distill registry name")
    parser.add_argument("--timm", default="vit_small_patch16_224", help="timm model name of the same architecture")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=3, help="forward passes per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    args = parser.parse_args()

    import timm

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reference = timm.create_model(args.timm, pretrained=False, num_classes=0, img_size=args.img_size).eval()
    ours = create_backbone(args.ours, img_size=args.img_size).eval()
    load_pretrained(ours, reference.state_dict())
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    with torch.inference_mode():
        difference = (ours(x) - reference(x)).abs().max().item()

    models = {"distill": ours, "timm": reference}
    for model in models.values():  # warm-up: allocator, kernels, caches
        images_per_second(model, x, 2, args.precision)
    results = {name: [] for name in models}
    for round_index in range(args.rounds):
        order = list(models) if round_index % 2 == 0 else list(reversed(models))
        for name in order:
            results[name].append(images_per_second(models[name], x, args.iters, args.precision))

    median = {name: statistics.median(values) for name, values in results.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, timm {timm.__version__}")
    print(f"forward {args.ours} vs timm {args.timm}, {args.img_size} px, batch {args.batch_size}, {args.precision}, "
          f"{args.rounds} alternating rounds of {args.iters} passes (max |output difference| {difference:.1e})")
    for name, values in results.items():
        spread = f"{min(values):.1f}-{max(values):.1f}"
        print(f"  {name:<8} {median[name]:8.1f} images/s (median; range {spread})")
    print(f"  ratio distill / timm: {median['distill'] / median['timm']:.3f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Dense features: `distill features`' extraction against timm's forward_intermediates, same architecture, weights
and precision.

Both sides take the same batch of normalised images and return the last block's normalised patch tokens as a grid
(ours: distill.dense.extract, what `distill features` runs per chunk of images, with the class token too; timm:
forward_intermediates(indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)). ViT-S/16 at 224 px.

    .venv/bin/python tools/bench_dense.py [--rounds 5] [--batch-size 32] [--precision auto]
"""

import argparse

import torch

import bench_common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=2, help="batches per round")
    parser.add_argument("--precision", default="auto", help="auto (bf16 where the CPU has it) | fp32 | bf16")
    args = parser.parse_args()

    import timm

    from distill.dense import extract
    from distill.models import create_backbone, load_pretrained
    from distill.precision import autocast, resolve_precision

    precision = resolve_precision(args.precision, torch.device("cpu"))
    torch.manual_seed(0)
    reference = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    ours = create_backbone("vit_small").eval()
    load_pretrained(ours, reference.state_dict())
    images = torch.randn(args.batch_size, 3, 224, 224)

    def ours_round() -> int:
        for _ in range(args.iters):
            extract(ours, images, layers=[-1], chunk=args.batch_size, precision=precision)
        return args.iters * len(images)

    def timm_round() -> int:
        with torch.inference_mode(), autocast(precision, torch.device("cpu")):
            for _ in range(args.iters):
                grid = reference.forward_intermediates(images, indices=1, norm=True, output_fmt="NCHW",
                                                       intermediates_only=True)[0]
                grid.permute(0, 2, 3, 1).float().cpu()  # [B, h, w, C] as ours
        return args.iters * len(images)

    same = extract(ours, images[:2], precision="fp32").patches
    with torch.inference_mode():
        theirs = reference.forward_intermediates(images[:2], indices=1, norm=True, output_fmt="NCHW",
                                                 intermediates_only=True)[0].permute(0, 2, 3, 1)
    difference = float((same - theirs).abs().max())
    ours_round(), timm_round()  # warm-up
    results = bench_common.alternate({"ours": lambda: bench_common.rate(ours_round),
                                      "timm": lambda: bench_common.rate(timm_round)}, args.rounds)
    figures = [bench_common.figure(
        f"dense patch features of ViT-S/16 at 224 px, last block, batch {args.batch_size}, {precision}: "
        "distill features' extract vs timm's forward_intermediates", results["ours"], results["timm"], "images/s",
        1.0, id="dense_features", fp32_max_difference=difference)]
    bench_common.write("dense", figures, [f"the two grids agree in fp32 to {difference:.1e} (same weights)"])


if __name__ == "__main__":
    main()

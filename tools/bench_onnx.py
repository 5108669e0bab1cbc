#!/usr/bin/env python
"""ONNX export: the graph `distill export --to onnx` writes, run by onnxruntime on the CPU, against the same
backbone in PyTorch eager mode, same weights, inputs and thread count.

Both sides compute the same outputs: the normalised class and patch tokens of forward_features (what the graph
returns), fp32, under torch.inference_mode for PyTorch. The export is checked against PyTorch first (its largest
difference goes into the notes). ViT-S/16 (dino_vits16, full depth, random weights) at 224 px.

    .venv/bin/python tools/bench_onnx.py [--rounds 5] [--batch-size 8] [--iters 2] [--threads 0]
"""

import argparse
import os
import tempfile
from pathlib import Path

import torch

import bench_common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dino_vits16", help="distill registry name")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=2, help="batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="threads of both sides (0: the machine's cores)")
    args = parser.parse_args()

    import onnxruntime

    from distill.export.onnx import export_onnx
    from distill.models import create_backbone

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_backbone(args.model).eval()
    size = (args.img_size, args.img_size)
    images = torch.randn(args.batch_size, 3, *size)

    with tempfile.TemporaryDirectory() as folder:
        report = export_onnx(model, Path(folder) / "model.onnx", image_size=size)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(report.path), options, providers=["CPUExecutionProvider"])
    feed = {"images": images.numpy()}

    def onnx_round() -> int:
        for _ in range(args.iters):
            session.run(None, feed)
        return args.iters * len(images)

    def torch_round() -> int:
        with torch.inference_mode():
            for _ in range(args.iters):
                model.forward_features(images)
        return args.iters * len(images)

    onnx_round(), torch_round()  # warm-up
    results = bench_common.alternate({"onnx": lambda: bench_common.rate(onnx_round),
                                      "torch": lambda: bench_common.rate(torch_round)}, args.rounds)
    figures = [bench_common.figure(
        f"{args.model} at {args.img_size} px, fp32, batch {args.batch_size}, {threads} threads: ONNX graph on "
        "onnxruntime (CPU) vs PyTorch eager", results["onnx"], results["torch"], "images/s",
        id="onnx_vs_eager", max_deviation=report.max_deviation, threads=threads,
        onnxruntime=onnxruntime.__version__)]
    bench_common.write("onnx", figures, [
        f"the graph matches PyTorch at {', '.join(f'{h}x{w}' for h, w in report.checked_sizes)} to "
        f"{report.max_deviation:.1e} (fp32, onnxruntime {onnxruntime.__version__})"])


if __name__ == "__main__":
    main()

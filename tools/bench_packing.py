#!/usr/bin/env python
"""DINOv2 training step with the student's crops packed into one backbone pass against one pass per crop size,
side by side in one run (alternating rounds, median per mode, and their ratio).

    .venv/bin/python tools/bench_packing.py                        # the CPU demo's model, and ViT-S/14 at 224/98 px
    .venv/bin/python tools/bench_packing.py --device cuda --precision bf16 --setting vits14 vitl14 --batch-size 64

A step is the objective's forward (teacher and student) and the student's backward, as in training; peak
memory is reported on CUDA.
"""

import argparse
import statistics
import time

import torch

from distill.engine.train_config import load_train_config
from distill.objectives import build_objective
from distill.objectives.base import StepInfo
from distill.precision import autocast

SETTINGS = {
    # name: (backbone overrides, global size, local size, locals, channels)
    "demo": ("vit_tiny", {"depth": 4, "embed_dim": 128, "num_heads": 4, "patch_size": 7, "img_size": 28,
                          "in_chans": 1}, 28, 14, 8, 1),
    "vits14": ("vit_small", {"patch_size": 14, "img_size": 224, "layerscale_init": 1e-5}, 224, 98, 8, 3),
    "vitl14": ("vit_large", {"patch_size": 14, "img_size": 224, "layerscale_init": 1e-5}, 224, 98, 8, 3),
}


HEADS = {  # the demo's small heads; 4096 prototypes for the ViTs (65536 would make the head the benchmark)
    "demo": ["objective.out_dim=1024", "objective.ibot_out_dim=1024", "objective.hidden_dim=512",
             "objective.bottleneck_dim=128", "objective.ibot_bottleneck_dim=128"],
    "vits14": ["objective.out_dim=4096", "objective.ibot_out_dim=4096"],
    "vitl14": ["objective.out_dim=4096", "objective.ibot_out_dim=4096"],
}


def build(setting: str, packed: bool, device: torch.device):
    backbone, overrides, global_size, local_size, n_local, channels = SETTINGS[setting]
    items = ", ".join(f"{k}: {v}" for k, v in overrides.items())
    config = load_train_config(None, [
        "objective.name=dinov2", f"model.backbone={backbone}", f"model.overrides={{{items}, drop_path_rate: 0.0}}",
        f"objective.views.global_crops_size={global_size}", f"objective.views.local_crops_size={local_size}",
        f"objective.views.local_crops_number={n_local}", f"objective.pack_crops={str(packed).lower()}",
        *HEADS[setting]])
    from distill.models import create_backbone

    make = lambda role: create_backbone(backbone, **overrides)  # noqa: E731
    objective = build_objective(config, make).to(device)
    return objective, global_size, local_size, n_local, channels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", nargs="+", default=["demo", "vits14"], choices=list(SETTINGS))
    parser.add_argument("--batch-size", type=int, default=0, help="0: 64 for demo, 4 for the ViTs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, precision {args.precision}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for setting in args.setting:
        batch = args.batch_size or (64 if setting == "demo" else 4)
        objectives = {packed: build(setting, packed, device) for packed in (False, True)}
        objectives[True][0].load_state_dict(objectives[False][0].state_dict())
        _, global_size, local_size, n_local, channels = objectives[False]
        crops = [torch.randn(batch, channels, global_size, global_size, device=device) for _ in range(2)]
        crops += [torch.randn(batch, channels, local_size, local_size, device=device) for _ in range(n_local)]
        times = {False: [], True: []}
        peaks = {}

        def step(objective, number):
            with autocast(args.precision, device):
                out = objective({"crops": crops}, StepInfo(number, 1000, 100))
            out["loss"].backward()
            objective.zero_grad(set_to_none=True)

        for packed in (False, True):  # warm-up, and peak memory of one step
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step(objectives[packed][0], 0)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks[packed] = torch.cuda.max_memory_allocated() / 2**30
        for round_ in range(args.rounds):
            for packed in ((False, True) if round_ % 2 == 0 else (True, False)):
                start = time.perf_counter()
                for number in range(args.steps):
                    step(objectives[packed][0], number + 1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[packed].append((time.perf_counter() - start) / args.steps)
        separate, packed = statistics.median(times[False]), statistics.median(times[True])
        images = batch
        print(f"{setting}: batch {batch}, 2 x {global_size} px + {n_local} x {local_size} px")
        print(f"  per crop size {separate * 1000:8.1f} ms/step  {images / separate:8.1f} img/s"
              + (f"  peak {peaks[False]:.2f} GiB" if peaks else ""))
        print(f"  packed        {packed * 1000:8.1f} ms/step  {images / packed:8.1f} img/s"
              + (f"  peak {peaks[True]:.2f} GiB" if peaks else ""))
        print(f"  packed / per crop size speed ratio: {separate / packed:.3f}")


if __name__ == "__main__":
    main()

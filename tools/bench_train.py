#!/usr/bin/env python
"""DINO training throughput of the demo recipe against lightly's DINO modules, and the hardware efficiency of a step.

Both sides train the same architecture (the demo's ViT: 4 blocks, width 128, patch 7, 28 px, one channel; a
3-layer head to 1024 prototypes) on Fashion-MNIST with the same batch and crops (2 x 28 px + 8 x 14 px).
lightly runs as its documentation shows: a timm ViT as backbone, DINOProjectionHead, DINOLoss, DINOTransform on PIL
images in a DataLoader, one forward per view, Adam, update_momentum. Ours is the trainer's own step and loader.

Figures (rounds alternate between the sides, medians):
  1. images/s, data loading included: ours at default settings (precision auto) vs lightly as documented (fp32);
     ours vs lightly at the same precision (fp32, and bf16 autocast);
  2. model FLOP/s of our step (fvcore: 3 x the student's forward + 1 x the teacher's) over the FLOP/s of a large
     matrix product at the same precision, measured in the same run; the same with train.compile=true; and on
     DINO's ViT-S/16 recipe (large matrices).

    .venv/bin/python tools/bench_train.py [--rounds 5] [--steps 20]
    .venv/bin/python tools/bench_train.py --profile      # where our step's time goes
"""

import argparse
import copy
import tempfile
import time
from typing import Callable, Dict

import torch
from torch import nn

import bench_common

DEMO = "configs/demo/dino_fashion_mnist.yaml"
VIT_S = "configs/dino/vit_small_16_100ep.yaml"
# DINO's ViT-S/16 recipe (2 x 224 + 8 x 96 px crops, 65536 prototypes) on Fashion-MNIST images, one channel
VIT_S_ON_FASHION = ["data.dataset.kind=fashion_mnist", "data.dataset.path=null", "model.overrides={in_chans: 1}",
                    "objective.views.mean=[0.286]", "objective.views.std=[0.353]"]
ARCH = dict(depth=4, embed_dim=128, num_heads=4, patch_size=7, img_size=28, in_chans=1)


def next_batch(side, loader):
    """The next batch of side._data, an iterator of the loader started again whenever it is None or runs out."""
    if side._data is None:
        side._data = iter(loader)
    try:
        return next(side._data)
    except StopIteration:
        side._data = iter(loader)
        return next(side._data)


# ----------------------------------------------------------------------------------------------- ours

class OurStep:
    """The trainer's set-up (model, optimizer, loader) and its train_step, at a given precision."""

    def __init__(self, precision: str, batch: int, workers: int, output: str, recipe: str = DEMO,
                 overrides=()) -> None:
        from distill.engine.train_config import load_train_config
        from distill.engine.trainer import Trainer

        config = load_train_config(recipe, [*overrides, 
            f"train.precision={precision}", f"data.batch_size={batch}", f"data.num_workers={workers}",
            f"train.output_dir={output}", "train.time_limit_minutes=0", "eval.knn=false", "eval.knn_at_start=false",
            "eval.raw_pixels=false", "eval.attention_images=0"])
        self.trainer = Trainer(config)
        self.trainer.setup()
        self.trainer.step = self.trainer.total_steps // 2  # past warm-ups and the frozen last layer
        self.trainer.objective.train()
        self.batch = batch
        self._data = None

    def next_batch(self):
        self.trainer.sampler.set_epoch(0)  # read when an iterator starts
        return next_batch(self, self.trainer.loader)

    def steps(self, count: int, batch=None) -> int:
        for _ in range(count):
            self.trainer.train_step([batch if batch is not None else self.next_batch()])
        self._data = None  # a fresh iterator each round: no worker prepares batches while the other side is timed
        return count * self.batch


# ----------------------------------------------------------------------------------------------- lightly

class LightlyDINO(nn.Module):
    """The model class of lightly's DINO example."""

    def __init__(self, backbone: nn.Module, input_dim: int) -> None:
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.student_backbone = backbone
        self.student_head = DINOProjectionHead(input_dim, 512, 128, 1024, freeze_last_layer=1)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = DINOProjectionHead(input_dim, 512, 128, 1024)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    def forward(self, x):
        return self.student_head(self.student_backbone(x).flatten(start_dim=1))

    def forward_teacher(self, x):
        return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1))


class LightlyStep:
    def __init__(self, precision: str, batch: int, workers: int) -> None:
        import timm
        from lightly.loss import DINOLoss
        from lightly.transforms.dino_transform import DINOTransform

        from distill.data.fashion_mnist import load_fashion_mnist

        backbone = timm.models.vision_transformer.VisionTransformer(
            num_classes=0, dynamic_img_size=True, **ARCH)
        self.model = LightlyDINO(backbone, ARCH["embed_dim"])
        self.criterion = DINOLoss(output_dim=1024, warmup_teacher_temp_epochs=0)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.001)
        transform = DINOTransform(global_crop_size=28, global_crop_scale=(0.4, 1.0), local_crop_size=14,
                                  local_crop_scale=(0.1, 0.4), n_local_views=8,
                                  normalize={"mean": [0.286], "std": [0.353]})
        images, _ = load_fashion_mnist("train")
        self.loader = torch.utils.data.DataLoader(bench_common.PILImages(images, transform), batch_size=batch, shuffle=True,
                                                  drop_last=True, num_workers=workers)
        self.precision, self.batch, self.epoch = precision, batch, 1
        self._data = None

    def next_batch(self):
        return next_batch(self, self.loader)

    def step(self, views) -> None:
        from lightly.models.utils import update_momentum

        from distill.precision import autocast

        model = self.model
        update_momentum(model.student_backbone, model.teacher_backbone, m=0.99)
        update_momentum(model.student_head, model.teacher_head, m=0.99)
        with autocast(self.precision, torch.device("cpu")):
            teacher_out = [model.forward_teacher(view) for view in views[:2]]
            student_out = [model.forward(view) for view in views]
            loss = self.criterion(teacher_out, student_out, epoch=self.epoch)
        loss.backward()
        model.student_head.cancel_last_layer_gradients(current_epoch=self.epoch)
        self.optimizer.step()
        self.optimizer.zero_grad()

    def steps(self, count: int, views=None) -> int:
        for _ in range(count):
            self.step(views if views is not None else self.next_batch()[0])
        self._data = None  # a fresh iterator each round: no worker prepares batches while the other side is timed
        return count * self.batch


# ----------------------------------------------------------------------------------------------- efficiency

def matmul_flops_per_second(precision: str, size=2048, repeats: int = 10) -> float:
    """FLOP/s (2 m k n per product) of a matrix product at this precision: square of side `size`, or of shape
    (m, k, n) for [m x k] @ [k x n]."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    m, k, n = (size, size, size) if isinstance(size, int) else size
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.perf_counter() - start)


def step_flops(ours: OurStep, batch) -> float:
    """Model FLOPs of one training step (2 per multiply-add): student forward x 3 (forward and backward) plus the
    teacher's forward, counted by fvcore on the step's own crops."""
    from distill.eval.flops import count_flops

    objective = ours.trainer.objective
    crops = batch["crops"]
    with torch.no_grad():
        student = count_flops(objective.student, (crops,))
        teacher = count_flops(objective.teacher, (crops[: objective.config.views.global_crops_number],))
    return 2.0 * (3 * student + teacher)


def profile(args) -> None:
    """Where a step of the demo recipe spends its time, at --precision (PyTorch's profiler, 10 steps)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from distill.precision import resolve_precision

    precision = resolve_precision(args.precision, torch.device("cpu"))
    ours = OurStep(precision, args.batch_size, 0, tempfile.mkdtemp())
    batch = ours.next_batch()
    ours.steps(5, batch)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        ours.steps(10, batch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))

    # the rate of the step's own matrix shapes, to tell slow products from time spent outside them
    backbone = ours.trainer.objective.student.backbone
    width, patch = backbone.embed_dim, backbone.patch_size
    rows = sum(len(c) * ((c.shape[-1] // patch) * (c.shape[-2] // patch) + 1) for c in batch["crops"])
    peak = matmul_flops_per_second(precision)
    for name, (m, k, n) in {"qkv": (rows, width, 3 * width), "projection": (rows, width, width),
                            "mlp in": (rows, width, 4 * width), "mlp out": (rows, 4 * width, width),
                            "weight gradient of mlp in": (width, rows, 4 * width)}.items():
        rate = matmul_flops_per_second(precision, size=(m, k, n), repeats=50)
        print(f"{name} [{m} x {k}] @ [{k} x {n}]: {rate / 1e9:.0f} GFLOP/s, {rate / peak:.2f} of the 2048^3 product's "
              f"{peak / 1e9:.0f}")


def run(args) -> None:
    from distill.precision import resolve_precision

    default = resolve_precision("auto", torch.device("cpu"))
    # bf16 is measured only where the CPU multiplies it natively: elsewhere it is emulated, meaningless and very slow
    precisions = ("fp32", "bf16") if default == "bf16" else ("fp32",)
    if default != "bf16":
        print(f"no native bf16 on this CPU ({bench_common.cpu_kind()}): fp32 figures only")
    output = tempfile.mkdtemp(prefix="bench_train_")
    ours = {p: OurStep(p, args.batch_size, args.workers, f"{output}/{p}") for p in precisions}
    theirs = {p: LightlyStep(p, args.batch_size, args.lightly_workers) for p in precisions}

    def timed(side, count) -> Callable[[], float]:
        return lambda: bench_common.rate(lambda: side.steps(count))

    for side in [*ours.values(), *theirs.values()]:  # warm-up: workers, allocator, kernels
        side.steps(3)
    pairs: Dict[str, Dict[str, Callable[[], float]]] = {
        "default": {"ours": timed(ours[default], args.steps), "lightly": timed(theirs["fp32"], args.steps)},
        **{p: {"ours": timed(ours[p], args.steps), "lightly": timed(theirs[p], args.steps)} for p in precisions},
    }
    if default == "fp32":
        del pairs["default"]  # the same pair as fp32
    figures = []
    labels = {"default": (f"DINO demo step with data, ours at default ({default}) vs lightly as documented (fp32)", 3.0),
              "fp32": ("DINO demo step with data, same precision fp32", 3.0),
              "bf16": ("DINO demo step with data, same precision bf16 autocast", 1.3)}
    for key, pair in pairs.items():
        results = bench_common.alternate(pair, args.rounds)
        name, target = labels[key]
        figures.append(bench_common.figure(name, results["ours"], results["lightly"], "images/s", target,
                                           id=f"train_{key}"))

    # the step alone, on one fixed batch each: how much of the gap is the model and how much the data
    for precision in precisions:
        our_batch, their_views = ours[precision].next_batch(), theirs[precision].next_batch()[0]
        results = bench_common.alternate({
            "ours": lambda: bench_common.rate(lambda: ours[precision].steps(args.steps, our_batch)),
            "lightly": lambda: bench_common.rate(lambda: theirs[precision].steps(args.steps, their_views)),
        }, args.rounds)
        figures.append(bench_common.figure(f"DINO demo step without data loading, {precision}", results["ours"],
                                           results["lightly"], "images/s", id=f"step_{precision}"))

    # hardware efficiency: the step's model FLOP/s over a large matrix product's, alternating
    batch = ours[default].next_batch()
    flops = step_flops(ours[default], batch)
    sides = {
        "step": lambda: bench_common.rate(lambda: ours[default].steps(args.steps, batch)) / args.batch_size * flops,
        "matmul": lambda: matmul_flops_per_second(default),
    }
    if args.compiled:  # the same step with train.compile=true (inductor's fused kernels), compiled before timing
        compiled = OurStep(default, args.batch_size, 0, f"{output}/compiled", overrides=["train.compile=true"])
        compiled.steps(3, batch)
        sides["compiled"] = lambda: bench_common.rate(lambda: compiled.steps(args.steps, batch)) / args.batch_size * flops
    results = bench_common.alternate(sides, args.rounds)
    figures.append(bench_common.figure(f"DINO demo step model FLOP/s over a 2048^3 matrix product's, {default}",
                                       results["step"], results["matmul"], "FLOP/s", 0.5, id="efficiency",
                                       step_gflop=flops / 1e9))
    if args.compiled:
        figures.append(bench_common.figure(
            f"DINO demo step compiled (train.compile=true) model FLOP/s over a 2048^3 matrix product's, {default}",
            results["compiled"], results["matmul"], "FLOP/s", id="efficiency_compiled", step_gflop=flops / 1e9))

    # the same on DINO's ViT-S/16 recipe, whose matrices are large enough to use the machine
    if args.vit_s_batch:
        big = OurStep(default, args.vit_s_batch, 0, f"{output}/vit_s", VIT_S, VIT_S_ON_FASHION)
        batch = big.next_batch()
        big.steps(2, batch)
        flops = step_flops(big, batch)
        results = bench_common.alternate({
            "step": lambda: bench_common.rate(lambda: big.steps(2, batch)) / args.vit_s_batch * flops,
            "matmul": lambda: matmul_flops_per_second(default),
        }, args.rounds)
        figures.append(bench_common.figure(
            f"DINO ViT-S/16 step (batch {args.vit_s_batch}, 2 x 224 + 8 x 96 px) model FLOP/s over a 2048^3 matrix "
            f"product's, {default}", results["step"], results["matmul"], "FLOP/s", 0.5, id="efficiency_vit_s",
            step_gflop=flops / 1e9))
    bench_common.write("train", figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0, help="our loader's workers (the demo recipe's: 0)")
    parser.add_argument("--lightly-workers", type=int, default=2, help="lightly's DataLoader workers")
    parser.add_argument("--vit-s-batch", type=int, default=8, help="images per ViT-S/16 step (0: skip that figure)")
    parser.add_argument("--compiled", type=int, default=1, help="also time the demo step compiled (1) or not (0)")
    parser.add_argument("--profile", action="store_true", help="only profile our step (where the time goes)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="--profile's precision")
    args = parser.parse_args()
    profile(args) if args.profile else run(args)


if __name__ == "__main__":
    main()

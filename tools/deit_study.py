#!/usr/bin/env python
"""DeiT's central claim at small scale, on Fashion-MNIST: a CNN teacher trained by the project's recipe, then
the same tiny ViT trained for the same number of epochs without distillation, with soft and with hard
distillation from that teacher. Every run is repeated over seeds; prints a table of validation top-1
(mean and spread) and draws it as a bar chart.

    .venv/bin/python tools/deit_study.py                       # seeds 0 1, runs under runs/deit_study
    .venv/bin/python tools/deit_study.py --seeds 0 1 2 --student-epochs 8

Runs that finished are read back, not repeated (delete a run's folder to redo it).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List

ROWS = [  # label, recipe, overrides
    ("teacher (CNN)", "configs/deit/teacher_fashion_mnist.yaml", []),
    ("student, no distillation", "configs/deit/deit_tiny_fashion_mnist.yaml", []),
    ("student, soft distillation", "configs/deit/deit_tiny_distilled_fashion_mnist.yaml",
     ["objective.distillation_type=soft"]),
    ("student, hard distillation", "configs/deit/deit_tiny_distilled_fashion_mnist.yaml",
     ["objective.distillation_type=hard"]),
]


def run_once(recipe: str, overrides: List[str], folder: Path) -> Dict:
    from distill.engine.train_config import load_train_config
    from distill.engine.trainer import Trainer

    results = folder / "results.json"
    if results.is_file():
        return json.loads(results.read_text())
    config = load_train_config(recipe, [*overrides, f"train.output_dir={folder}"])
    return Trainer(config).run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--output", default="runs/deit_study")
    parser.add_argument("--student-epochs", type=float, default=0, help="0: the recipe's")
    parser.add_argument("--teacher-epochs", type=float, default=0, help="0: the recipe's")
    args = parser.parse_args()
    out = Path(args.output)
    top1: Dict[str, List[float]] = {label: [] for label, _, _ in ROWS}
    extra: Dict[str, List[str]] = {}
    for seed in args.seeds:
        teacher_dir = out / f"teacher_seed{seed}"
        for label, recipe, overrides in ROWS:
            is_teacher = recipe.endswith("teacher_fashion_mnist.yaml")
            epochs = args.teacher_epochs if is_teacher else args.student_epochs
            runs = [*overrides, f"train.seed={seed}"] + ([f"train.epochs={epochs}"] if epochs else [])
            if not is_teacher:
                runs.append(f"objective.teacher.weights={args.output}/teacher_seed{seed}/classifier.pth")
            name = "teacher" if is_teacher else label.split(", ")[1].split()[0]
            folder = teacher_dir if is_teacher else out / f"{name}_seed{seed}"
            print(f"== {label}, seed {seed}: {folder}", file=sys.stderr, flush=True)
            results = run_once(recipe, runs, folder)
            top1[label].append(results["val"]["student"]["top1"])
            extra.setdefault(label, []).append(f"{results.get('train_minutes', 0):.1f} min")

    lines = ["| run | top-1 per seed | mean | train time per run |", "|---|---|---|---|"]
    for label, values in top1.items():
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        lines.append(f"| {label} | {', '.join(f'{v:.2f}' for v in values)} | {statistics.mean(values):.2f}{spread} "
                     f"| {', '.join(extra[label])} |")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    _chart(top1, out / "deit_study.png")
    print(f"chart: {out / 'deit_study.png'}")


def _chart(top1: Dict[str, List[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(top1)
    means = [statistics.mean(v) for v in top1.values()]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bars = ax.barh(labels[::-1], means[::-1], color=["#4c72b0", "#dd8452", "#55a868", "#8c8c8c"])
    for bar, values in zip(bars, list(top1.values())[::-1]):
        ax.scatter(values, [bar.get_y() + bar.get_height() / 2] * len(values), color="black", s=12, zorder=3)
        ax.text(max(values) + 0.6, bar.get_y() + bar.get_height() / 2, f"{statistics.mean(values):.2f}",
                va="center", fontsize=9)
    low = min(min(v) for v in top1.values())
    ax.set_xlim(max(0, low - 3), 100)
    ax.set_xlabel("Fashion-MNIST test top-1 (%), dots: seeds")
    ax.set_title("DeiT at small scale: distillation from a CNN teacher")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""The baseline study every later quality number is compared with.

Weighted kNN top-1 (cosine, T=0.07) on Fashion-MNIST test, with the 60,000 training images as memory bank,
from (a) raw pixels and (b) the class token of a randomly initialised ViT. A trained feature is only useful
if it beats both.
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from distill.config import save_config
from distill.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from distill.errors import InputError
from distill.eval.features import extract_features
from distill.eval.knn import knn_classify


@dataclass
class BaselineConfig:
    backbone: str = "vit_tiny"
    # A small ViT for 28 px grey images: 7x7 patches of 4 px, 6 blocks of width 192.
    backbone_overrides: Dict[str, Any] = field(
        default_factory=lambda: {"depth": 6, "patch_size": 4, "img_size": 28, "in_chans": 1}
    )
    ks: List[int] = field(default_factory=lambda: [10, 20, 100, 200])
    headline_k: int = 20
    temperature: float = 0.07
    seeds: List[int] = field(default_factory=lambda: [0])
    batch_size: int = 512
    precision: str = "auto"  # fp32, bf16, or auto: bf16 where the CPU/GPU runs it natively
    train_limit: int = 0  # use only the first N training images (0: all); for quick checks
    test_limit: int = 0
    data_dir: Optional[str] = None
    output_dir: str = "runs/baseline"

    def validate(self) -> None:
        if self.headline_k not in self.ks:
            raise InputError(f"headline_k={self.headline_k} must be one of ks={self.ks}")
        if self.temperature <= 0 or self.batch_size < 1 or not self.seeds:
            raise InputError("temperature and batch_size must be positive and seeds non-empty")


def grey_to_model_input(images: torch.Tensor, img_size: int, in_chans: int) -> torch.Tensor:
    """uint8 [B, H, W] -> normalised float [B, in_chans, img_size, img_size]."""
    x = (images.float().div_(255.0) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    x = x.unsqueeze(1)
    if x.shape[-1] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x.expand(-1, in_chans, -1, -1) if in_chans != 1 else x


def _subset(images: np.ndarray, labels: np.ndarray, limit: int):
    return (images[:limit], labels[:limit]) if limit else (images, labels)


def run_baseline(config: BaselineConfig) -> List[Dict[str, Any]]:
    from distill.models import create_backbone

    train_x, train_y = _subset(*load_fashion_mnist("train", config.data_dir), config.train_limit)
    test_x, test_y = _subset(*load_fashion_mnist("test", config.data_dir), config.test_limit)
    train_labels, test_labels = torch.from_numpy(train_y), torch.from_numpy(test_y)
    rows = []

    def evaluate(name: str, train_features: torch.Tensor, test_features: torch.Tensor, seconds: float, **extra):
        scores = knn_classify(train_features, train_labels, test_features, test_labels, config.ks, config.temperature)
        rows.append({"features": name, "dim": train_features.shape[1], "seconds": round(seconds, 1),
                     "knn": {str(k): v for k, v in scores.items()}, **extra})

    start = time.perf_counter()
    pixels = lambda a: torch.from_numpy(a.reshape(len(a), -1)).float() / 255.0  # noqa: E731
    evaluate("raw pixels", pixels(train_x), pixels(test_x), time.perf_counter() - start)

    for seed in config.seeds:
        torch.manual_seed(seed)
        model = create_backbone(config.backbone, **config.backbone_overrides).eval()
        size, chans = model.config["img_size"][0], model.config["in_chans"]
        preprocess = lambda b: grey_to_model_input(b, size, chans)  # noqa: E731
        start = time.perf_counter()
        extract = lambda images, desc: extract_features(  # noqa: E731
            model, images, preprocess, config.batch_size, config.precision, desc=f"{desc} seed {seed}"
        )
        train_features, test_features = extract(train_x, "train"), extract(test_x, "test")
        evaluate(f"random-init {config.backbone} (seed {seed})", train_features, test_features,
                 time.perf_counter() - start, seed=seed)
    return rows


def format_table(rows: List[Dict[str, Any]], config: BaselineConfig) -> str:
    ks = [str(k) for k in config.ks]
    head = f"{'features':<34} {'dim':>5} " + " ".join(f"{'k=' + k:>7}" for k in ks) + f" {'time':>7}"
    lines = [head, "-" * len(head)]
    for row in rows:
        accs = " ".join(f"{row['knn'][k]['top1']:7.2f}" for k in ks)
        lines.append(f"{row['features']:<34} {row['dim']:>5} {accs} {row['seconds']:6.1f}s")
    seeded = [row["knn"][str(config.headline_k)]["top1"] for row in rows if "seed" in row]
    if len(seeded) > 1:
        mean, std = float(np.mean(seeded)), float(np.std(seeded, ddof=1))
        lines.append(f"random-init, {len(seeded)} seeds: k={config.headline_k} top-1 {mean:.2f} +- {std:.2f}")
    return "\n".join(lines)


def plot_baseline(rows: List[Dict[str, Any]], config: BaselineConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = str(config.headline_k)
    names = [row["features"] for row in rows]
    values = [row["knn"][k]["top1"] for row in rows]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.2))
    bars = ax.barh(names, values, color=["#888888"] + ["#4c72b0"] * (len(rows) - 1))
    ax.bar_label(bars, fmt="%.1f%%", padding=3)
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.set_xlabel(f"Fashion-MNIST test top-1 (%), weighted {k}-NN, T={config.temperature}")
    ax.set_title("Baselines a trained feature must beat")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(config: BaselineConfig) -> List[Dict[str, Any]]:
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    save_config(config, output / "config.yaml")
    rows = run_baseline(config)
    (output / "results.json").write_text(json.dumps({"config": asdict(config), "rows": rows}, indent=2))
    plot_baseline(rows, config, output / "knn_baseline.png")
    print(f"Fashion-MNIST weighted kNN top-1 (%), cosine, T={config.temperature}: train -> test")
    print(format_table(rows, config))
    print(f"results, config and picture in {output}/")
    return rows

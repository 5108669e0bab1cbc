"""What every benchmark script shares: alternating timed rounds, the machine line, and a results file.

Each figure is the ratio of two things measured side by side in one run: rounds alternate between the two so
that machine noise hits both alike, and the median over rounds is reported with its range.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

RESULTS = Path(os.environ.get("BENCH_RESULTS", "runs/bench"))


class PILImages(torch.utils.data.Dataset):
    """Images as a torchvision dataset hands them to a per-image PIL pipeline: arrays through Image.fromarray,
    files opened and converted to RGB as ImageFolder does; each item is (transform(image), 0)."""

    def __init__(self, items, transform=None) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        from PIL import Image

        item = self.items[index]
        if isinstance(item, (str, Path)):
            with open(item, "rb") as handle:
                image = Image.open(handle).convert("RGB")
        else:
            image = Image.fromarray(item)
        return self.transform(image), 0


def alternate(candidates: Dict[str, Callable[[], float]], rounds: int) -> Dict[str, List[float]]:
    """Run each candidate once per round, in alternating order; each call returns a rate (items per second)."""
    results: Dict[str, List[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            results[name].append(candidates[name]())
    return results


def rate(work: Callable[[], int]) -> float:
    """Items per second of one call of work(), which returns how many items it processed."""
    start = time.perf_counter()
    items = work()
    return items / (time.perf_counter() - start)


def summary(values: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": len(values)}


KERNEL_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")  # the settings that make a newer CPU run AVX2 kernels


def _settings(names) -> List[str]:
    """NAME=value of each of `names` set in the environment."""
    return [f"{name}={os.environ[name]}" for name in names if name in os.environ]


def cpu_kind() -> str:
    """The kernels this process runs: PyTorch's CPU capability, whether bf16 is native (then `precision=auto` is
    bf16), and the settings that cap the kernels when they are set (an AVX2 machine reproduced on a newer one)."""
    from distill.precision import cpu_has_fast_bf16

    capability = torch.backends.cpu.get_cpu_capability()
    kind = f"{capability}, {'native bf16 (precision auto: bf16)' if cpu_has_fast_bf16() else 'no native bf16 (precision auto: fp32)'}"
    capped = _settings(KERNEL_CAPS)
    return kind + (f", kernels capped by {' '.join(capped)}" if capped else "")


def machine() -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu kind": cpu_kind(), "cores": str(os.cpu_count()), "threads": str(torch.get_num_threads()),
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for package in ("timm", "lightly", "fvcore", "faiss"):
        try:
            module = __import__(package)
            info[package] = getattr(module, "__version__", "?")
        except ImportError:
            pass
    return info


def command_line() -> str:
    """The command that reran this script, with the settings that capped its kernels or moved its results."""
    return " ".join(_settings(KERNEL_CAPS + ("BENCH_RESULTS",)) + [".venv/bin/python"] + sys.argv)


def write(name: str, figures: List[Dict], notes: List[str] = ()) -> Path:
    """Save one script's figures (each: name, ours, theirs, unit, ratio, target, ...) for the report."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"script": name, "command": command_line(), "machine": machine(),
                                "figures": figures, "notes": list(notes)}, indent=2))
    for figure in figures:
        target = f" (target >= {figure['target']})" if figure.get("target") else ""
        print(f"  {figure['name']}: {figure['ours']:.1f} vs {figure['theirs']:.1f} {figure['unit']} "
              f"-> ratio {figure['ratio']:.2f}{target}")
    print(f"results: {path}")
    return path


def figure(name: str, ours: List[float], theirs: List[float], unit: str, target: float = 0.0, **extra) -> Dict:
    a, b = summary(ours), summary(theirs)
    return {"name": name, "ours": a["median"], "theirs": b["median"], "ours_range": [a["min"], a["max"]],
            "theirs_range": [b["min"], b["max"]], "rounds": a["rounds"], "unit": unit,
            "ratio": a["median"] / b["median"], "target": target, **extra}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


SAMPLE_IMAGES = ("astronaut", "camera", "cat", "chelsea", "coffee", "coins", "colorwheel", "horse",
                 "hubble_deep_field", "immunohistochemistry", "moon", "rocket", "retina", "brick", "grass", "gravel",
                 "clock")


def photo_folder(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEG photos made from scikit-image's sample images: random crops resized to a short side of
    224-500 px, grey ones made RGB (as a folder of user photos would be)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    folder = Path(folder)
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bases = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in SAMPLE_IMAGES]
    for index in range(count):
        base = bases[index % len(bases)]
        width, height = base.size
        w, h = int(width * rng.uniform(0.6, 1.0)), int(height * rng.uniform(0.6, 1.0))
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        short = int(rng.integers(224, 501))
        scale = short / min(w, h)
        crop = base.crop((left, top, left + w, top + h)).resize((round(w * scale), round(h * scale)), Image.BICUBIC)
        crop.save(folder / f"{index:05d}.jpg", quality=90)
    return folder

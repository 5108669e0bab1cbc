"""Metrics as JSON lines (and TensorBoard when installed), and the loss curve as a picture."""

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from distill.errors import DistillError
from distill.files import atomic_write_text

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl; mirrors scalars to TensorBoard if present."""

    def __init__(self, folder: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.path = folder / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(folder / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tensorboard = None

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:
            raise DistillError(f"could not append to {self.path}: {error.strerror or error}; the last checkpoint is "
                               "intact: free space, then run the same command to resume") from None
        if self.tensorboard is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The records of a metrics file; a line that is not a whole JSON object (the torn last line of a killed run)
    is left out."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def repair_metrics(path: Path, step: int) -> None:
    """Before a resumed run appends: keep the whole records up to `step` (the checkpoint's), so that the rows a
    killed run wrote after its last checkpoint, which the resumed run writes again, are not there twice, and a
    torn last line is gone. Rewritten atomically; left alone when nothing is to be dropped."""
    if not path.is_file():
        return
    lines = path.read_text(errors="replace").splitlines()
    records = read_metrics(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) == len(lines):
        return
    logger.info("metrics.jsonl: kept the %d records up to step %d, left out %d (written after that checkpoint, or "
                "torn)", len(kept), step, len(lines) - len(kept))
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_loss_curve(records: List[Dict[str, Any]], path: Path, title: Optional[str] = None) -> Optional[Path]:
    """Loss (and the learning rate) against the step, from the metrics records."""
    points = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    if len(points) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*points)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, color="#4c72b0", linewidth=1.2, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lrs = [(r["step"], r["lr"]) for r in records if "lr" in r]
    if lrs:
        twin = ax.twinx()
        twin.plot(*zip(*lrs), color="#dd8452", linewidth=1.0, alpha=0.8, label="learning rate")
        twin.set_ylabel("learning rate", color="#dd8452")
    ax.set_title(title or "training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

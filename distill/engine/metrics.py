"""Metrics as JSON lines (and TensorBoard when installed), and the loss curve as a picture."""

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

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
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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

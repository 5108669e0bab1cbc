"""Checkpoints written atomically (a killed save never damages the previous file) and read back safely."""

import random
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from distill.errors import CheckpointError
from distill.files import atomic_write, remove_leftovers
from distill.models.checkpoint import TrainingCheckpoint, is_training_checkpoint, read_checkpoint

LATEST = "checkpoint.pth"


def save_atomic(obj: Any, path: Union[str, Path]) -> Path:
    """torch.save, atomically (distill/files.py): a killed save never damages the previous checkpoint."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def _floating_tensors(state: Any, prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    if isinstance(state, torch.Tensor):
        if state.is_floating_point():
            yield prefix, state
        return
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        yield from _floating_tensors(value, f"{prefix}.{key}" if prefix else str(key))


def non_finite_tensors(state: Any, prefix: str = "") -> List[str]:
    """Names of the floating-point tensors of a state (dicts and lists followed) that hold NaN or inf. The flags of
    a device's tensors come back in one transfer: on a GPU, one synchronisation per save, not one per tensor."""
    named = list(_floating_tensors(state, prefix))
    by_device: Dict[torch.device, List[int]] = {}
    for index, (_, tensor) in enumerate(named):
        by_device.setdefault(tensor.device, []).append(index)
    broken = set()
    for indices in by_device.values():
        flags = torch.stack([torch.isfinite(named[i][1]).all() for i in indices]).tolist()
        broken.update(i for i, finite in zip(indices, flags) if not finite)
    return [named[i][0] for i in sorted(broken)]


def remove_stale_temporaries(folder: Union[str, Path]) -> None:
    """Leftovers of saves that were killed mid-way (never read: the previous checkpoint is intact)."""
    remove_leftovers(folder, ".*.pth.*.tmp")


def rng_state() -> Dict[str, Any]:
    """Every random state a step consumes, in a form weights_only loading accepts."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "gauss": float(numpy_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_resume_checkpoint(output_dir: Union[str, Path], resume: str) -> Optional[Path]:
    """resume = auto (the folder's latest checkpoint if any), never, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        latest = Path(output_dir) / LATEST
        return latest if latest.is_file() else None
    return Path(resume)


def load_training_checkpoint(path: Union[str, Path]) -> TrainingCheckpoint:
    """A checkpoint to resume from; any other file is refused with the option it was probably meant for."""
    payload = read_checkpoint(path)
    if not is_training_checkpoint(payload):
        raise CheckpointError(f"{path} is not a distill training checkpoint; to start from weights, use "
                              "model.pretrained instead of train.resume")
    return TrainingCheckpoint(payload, str(path))

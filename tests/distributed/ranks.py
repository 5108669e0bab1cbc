"""Runs of `distill train` as 1 or N local gloo processes (the environment torchrun would set), for the DDP and
FSDP tests."""

import os
import socket
import subprocess
import sys
from typing import List, Sequence

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_folder(folder, count=96):
    """Files: their crops are drawn per image (not per batch), so they do not depend on how a batch is split."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, size=(20, 20), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def run_ranks(base: Sequence[str], output, images, batch: int, world: int, *extra: str) -> List[str]:
    """`distill train` on `world` processes (a plain single process when world is 1); each one's output."""
    port = str(free_port())
    overrides = list(base) + [f"data.batch_size={batch}", "data.dataset.kind=folder", f"data.dataset.path={images}",
                              f"train.output_dir={output}", *extra]
    processes = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        if world == 1:
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key)
        processes.append(subprocess.Popen([sys.executable, "-m", "distill.cli", "train", *overrides], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    failed = [rank for rank, p in enumerate(processes) if p.returncode != 0]
    assert not failed, "\n".join(f"--- rank {rank} exited with status {processes[rank].returncode}:\n"
                                  f"{outputs[rank][-3000:]}" for rank in range(world))
    return outputs

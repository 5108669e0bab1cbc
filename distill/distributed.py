"""The few torch.distributed facts and collectives the rest of the code needs, valid with or without a process
group (one process: each is the identity or the obvious constant)."""

from typing import Any, List, Tuple

import torch
import torch.distributed as dist


def is_sharded(tensor: Any) -> bool:
    """A tensor cut across ranks (a DTensor, as fully sharded training makes them)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor; a plain tensor as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def several() -> bool:
    """More than one rank in a process group."""
    return is_initialized() and world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (in place when distributed); the tensor itself on a single process."""
    if several():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over all ranks (in place when distributed); the tensor itself on a single process."""
    if several():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def _device() -> torch.device:
    """Where small tensors for collectives live: NCCL reduces only CUDA tensors."""
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if several():
        dist.barrier()


def init_from_env(device: torch.device) -> bool:
    """Join the process group the environment describes (torchrun's variables, or those `distill submit`
    exports from the SLURM job): RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK. False when the run is
    one process."""
    import os

    if is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        from distill.errors import InputError

        raise InputError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set: launch "
                         "with torchrun or `distill submit`, or unset WORLD_SIZE for one process")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def shutdown(meet: bool = False) -> None:
    """Leave the process group. meet=True (after a run that ended normally on every rank) first waits for every
    rank to get here: a rank that tears its connections down while rank 0 is still writing the last checkpoint
    can abort rank 0 ("terminate called without an active exception") as it leaves in turn."""
    if not is_initialized():
        return
    if meet:
        barrier()
    dist.destroy_process_group()


def broadcast_state(module: torch.nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers (they are built from per-rank seeds)."""
    if several():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def average_gradients(parameters) -> None:
    """Gradients averaged over ranks (what DistributedDataParallel computes), in one flattened all-reduce."""
    if not several():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def any_rank(flag: bool) -> bool:
    """True when the flag is true on any rank (so that every rank takes the same branch)."""
    if not several():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def agree(main_value: float, *flags: bool) -> Tuple[float, List[bool]]:
    """Rank 0's value of a non-negative number and, for each flag, whether it is true on any rank: one collective
    where a step would otherwise make one per fact (each forces a device sync with NCCL)."""
    if not several():
        return main_value, list(flags)
    values = [main_value if is_main_process() else 0.0] + [1.0 if f else 0.0 for f in flags]
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    out = tensor.tolist()
    return out[0], [v > 0 for v in out[1:]]


def rank_from_env() -> int:
    """This process's rank as the launcher set it (usable after the process group is gone)."""
    import os

    return int(os.environ.get("RANK", "0"))


def mean_over_ranks(values: dict) -> dict:
    """The mean over ranks of each number of a dict (the same keys in the same order on every rank)."""
    if not several() or not values:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return dict(zip(values, (tensor / world_size()).tolist()))


def gather_objects(value) -> list:
    """Every rank's value, in rank order, on every rank ([value] on one process)."""
    if not several():
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out

"""Fully sharded data parallelism (PyTorch's `fully_shard`) for the large ViTs.

Every rank holds 1/world of each trained network (parameters, gradients and optimizer state) and gathers a
block's weights only while that block runs. The student and its EMA twin (the teacher) are cut into the same
pieces, so the EMA update works shard by shard with no communication. Checkpoints hold full tensors in the layout
an unsharded run writes, so a run resumes sharded or not, on any number of ranks.
"""

import logging
import warnings
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn

from distill import distributed
from distill.distributed import is_sharded

logger = logging.getLogger(__name__)

# methods the objectives call on a backbone besides forward(): they gather the backbone's own weights too
BACKBONE_METHODS = ("forward_features", "forward_features_packed")


def _parameters(modules: Iterable[nn.Module]) -> set:
    return {id(p) for m in modules for p in m.parameters()}


def shard_units(objective: nn.Module) -> List[nn.Module]:
    """The pieces to shard, innermost first: each transformer block, each ViT (its embeddings and last norm),
    each other part of a trained network that holds parameters (the heads), and the network itself when some of
    its parameters are in none of those (a timm student). Frozen networks stay whole on every rank."""
    from distill.models.layers import Block
    from distill.models.vit import VisionTransformer

    frozen = set(getattr(objective, "frozen", ()))
    units: List[nn.Module] = []
    for name, network in objective.named_children():
        if name in frozen or not any(True for _ in network.parameters()):
            continue
        vits = [m for m in network.modules() if isinstance(m, VisionTransformer)]
        units += [m for m in network.modules() if isinstance(m, Block)] + vits
        in_vits = _parameters(vits)
        units += [part for part in network.children()
                  if part not in vits and _parameters([part]) and not _parameters([part]) & in_vits]
        if _parameters([network]) - _parameters(units):
            units.append(network)
    return units


def shard(objective: nn.Module, precision: str, device: torch.device) -> List[nn.Module]:
    """Shard the objective's trained networks in place over all ranks; returns the sharded units.

    bf16 gathers weights and runs in bf16 while gradients are reduced and kept in fp32
    (MixedPrecisionPolicy); fp32 runs in fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from distill.models.vit import VisionTransformer

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16" else MixedPrecisionPolicy())
    # the backbones return views (the class token of the token sequence); nothing here changes them in place, which
    # is what PyTorch warns about on every such output
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    units = shard_units(objective)
    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
        if isinstance(unit, VisionTransformer):
            for method in BACKBONE_METHODS:
                register_fsdp_forward_method(unit, method)
    logger.info("sharded %d pieces over %d ranks (FSDP, %s)", len(units), distributed.world_size(), precision)
    return units


def reshard(units: Iterable[nn.Module]) -> None:
    """Free gathered weights. A network's outermost piece keeps its weights gathered after forward (backward
    needs them again); a teacher, which has no backward, keeps them until told."""
    for unit in units:
        unit.reshard()


def sync_gradients(units: Iterable[nn.Module], enabled: bool) -> None:
    """Reduce gradients after this backward (the last micro-batch) or keep accumulating them locally."""
    for unit in units:
        unit.set_requires_gradient_sync(enabled, recurse=False)


def full_state(state: Dict[str, Any], keep: bool) -> Dict[str, Any]:
    """A state dict with every sharded tensor gathered whole, on the CPU. Collective: every rank calls it with the
    same keys in the same order; only ranks with keep=True get the tensors back."""
    out: Dict[str, Any] = {}
    for key, value in state.items():
        if is_sharded(value):
            value = value.full_tensor()
        if keep:
            out[key] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
    return out


def shard_like(full: Dict[str, Any], current: Dict[str, Any]) -> Dict[str, Any]:
    """Full tensors cut into this rank's shards wherever the current state is sharded (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    out = dict(full)
    for key, value in full.items():
        target = current.get(key)
        if is_sharded(target) and isinstance(value, torch.Tensor) and not is_sharded(value):
            out[key] = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements,
                                         src_data_rank=None)
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> Optional[Dict[str, Any]]:
    """optimizer.state_dict() with each sharded state tensor gathered whole (the layout of an unsharded run)."""
    state = optimizer.state_dict()
    gathered = {index: full_state(values, keep) for index, values in state["state"].items()}
    return {"state": gathered, "param_groups": state["param_groups"]} if keep else None


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Load a full (unsharded-layout) optimizer state into an optimizer over sharded parameters."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    cut: Dict[int, Dict[str, Any]] = {}
    for index, values in state["state"].items():
        param = params[int(index)]
        cut[index] = {
            key: distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                   src_data_rank=None)
            if is_sharded(param) and isinstance(value, torch.Tensor) and value.shape == param.shape else value
            for key, value in values.items()}
    optimizer.load_state_dict({"state": cut, "param_groups": state["param_groups"]})

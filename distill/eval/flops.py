"""Parameter and FLOP counts; FLOPs are fvcore's (one multiply-add = one FLOP), as the papers report them."""

import logging
import warnings
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn


def _sdpa_flop_handle(inputs: List[Any], outputs: List[Any]) -> int:
    """q @ k^T and attn @ v of scaled_dot_product_attention, which fvcore does not count by itself."""
    from fvcore.nn.jit_handles import get_shape

    q_shape, k_shape, v_shape = (get_shape(v) for v in inputs[:3])
    *batch, q_len, head_dim = q_shape
    kv_len, v_dim = k_shape[-2], v_shape[-1]
    batch_size = 1
    for size in batch:
        batch_size *= size
    return batch_size * q_len * kv_len * (head_dim + v_dim)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, inputs: Tuple[torch.Tensor, ...], by_module: bool = False):
    """fvcore FLOPs of model(*inputs): the total, or with by_module=True a dict of module name -> FLOPs."""
    with warnings.catch_warnings():  # fvcore uses TorchScript, which recent PyTorch marks deprecated
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    logging.getLogger("fvcore").setLevel(logging.ERROR)  # it warns about every elementwise op it skips
    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return analysis.by_module() if by_module else analysis.total()


def backbone_flops(name: str, img_size: Optional[Sequence[int]] = None, **overrides: Any) -> int:
    """FLOPs of one forward of a registered backbone at its default (or the given) resolution.

    All blocks of a ViT cost the same, so a one-block copy is traced and its block counted `depth` times:
    the same total as tracing the whole model, without building a billion parameters to count ViT-g.
    """
    from distill.models import backbone_kwargs, create_backbone, get_spec

    kwargs = backbone_kwargs(name, **overrides)
    if get_spec(name).family == "resnet":  # blocks differ from stage to stage: trace the whole network
        model = create_backbone(name, **overrides).eval()
        height, width = model.config["img_size"] if img_size is None else img_size
        with torch.no_grad():
            return count_flops(model, (torch.zeros(1, model.config["in_chans"], height, width),))
    depth = kwargs["depth"]
    model = create_backbone(name, **{**overrides, "depth": 1, "drop_path_rate": 0.0}).eval()
    height, width = (model.config["img_size"] if img_size is None else img_size)
    x = torch.zeros(1, model.config["in_chans"], height, width)
    with torch.no_grad():
        per_module = count_flops(model, (x,), by_module=True)
    return per_module[""] + (depth - 1) * per_module["blocks.0"]

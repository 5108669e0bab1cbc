"""Multi-head self-attention through PyTorch's scaled_dot_product_attention, or xformers on a GPU."""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import InputError

ATTENTION_BACKENDS = ("sdpa", "xformers")


@functools.lru_cache(maxsize=None)
def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # any import failure means the backend is unusable, not only ImportError
        return False
    return True


class Attention(nn.Module):
    """qkv projection, attention over all tokens, output projection; parameter names as in DINO/DeiT/DINOv2."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise InputError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        if backend not in ATTENTION_BACKENDS:
            raise InputError(f"unknown attention backend {backend!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
        if backend == "xformers" and not xformers_available():
            raise InputError("attention backend 'xformers' needs the xformers package: pip install 'distill[gpu]'")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, D] -> [B, N, D]."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        if self.backend == "xformers" and x.is_cuda:
            # xformers has no CPU kernels; on a CPU tensor the model quietly uses the PyTorch path below.
            from xformers.ops import memory_efficient_attention

            q, k, v = qkv.unbind(2)
            out = memory_efficient_attention(q, k, v)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.proj(out.reshape(B, N, D))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights [B, heads, N, N], computed explicitly (for attention maps, not training)."""
        B, N, D = x.shape
        q, k, _ = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return (q * self.head_dim**-0.5 @ k.transpose(-2, -1)).softmax(dim=-1)

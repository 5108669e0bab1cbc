"""Multi-head self-attention through PyTorch's scaled_dot_product_attention, or xformers on a GPU."""

import functools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import InputError

ATTENTION_BACKENDS = ("sdpa", "xformers")
# Up to this many tokens, explicit attention beats PyTorch's CPU flash kernel in bf16/fp16. Measured on a
# 2-core AVX-512 machine, forward + backward, bf16: 50 tokens 12 ms vs 70 ms, 197 tokens 25 ms vs 61 ms; at
# 577 tokens both take 100 ms (the [N, N] matrix in fp32 no longer fits in cache).
EXPLICIT_MAX_TOKENS = 256
# Without backward (teachers, evaluation, embedding) the kernel wins sooner: bf16, 2 cores, 128 x 4 heads x 32:
# 17 tokens 0.5 ms vs 0.9 ms, 37 tokens 2.6 ms both, 65 tokens 9.8 ms vs 4.7 ms; ViT-S at 197 tokens 91 vs 44 ms.
EXPLICIT_MAX_TOKENS_NO_GRAD = 40
# In fp32, with and without backward. Measured on a 2-core AVX2 machine (no AVX-512), heads of 32, explicit vs the
# kernel, forward + backward: 256 x 4 heads x 5 tokens 1.6 ms vs 7.0, 128 x 4 x 17 tokens 3.2 vs 8.4, 64 x 4 x 65
# tokens 8.5 vs 19.0, 100 tokens 19.3 vs 25.5, 145 tokens 40.9 vs 39.2, 257 tokens (32 x 4) 89 vs 46; forward
# alone: 17 tokens 0.9 vs 2.2, 100 tokens 6.3 vs 7.1, 145 tokens 12.6 vs 11.9, 257 tokens 47 vs 14.
EXPLICIT_MAX_TOKENS_FP32 = 100


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with the softmax in float32; q, k, v: [B, heads, N, d]."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v


class PackedLayout:
    """Several sequences packed one after another in each row: `lengths` tokens each, attending only within
    themselves. Consecutive sequences of one length form a run that attention treats as a batch of its own, so
    the packed pass does the attention work of separate passes, never that of a dense [N, N] mask."""

    def __init__(self, lengths: Sequence[int]) -> None:
        self.lengths = [int(n) for n in lengths]
        self.runs: List[Tuple[int, int, int]] = []  # (first token, number of sequences, length)
        start = 0
        for length in self.lengths:
            if self.runs and self.runs[-1][2] == length:
                first, count, _ = self.runs[-1]
                self.runs[-1] = (first, count + 1, length)
            else:
                self.runs.append((start, 1, length))
            start += length


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """Attention within each packed sequence; q, k, v: [B, heads, N, d] -> [B, heads, N, d]."""
    B, H, _, d = q.shape
    outputs = []
    for first, count, length in layout.runs:
        def part(t):
            t = t[:, :, first : first + count * length].reshape(B, H, count, length, d)
            return t.transpose(1, 2).reshape(B * count, H, length, d)

        out = attention(part(q), part(k), part(v))
        outputs.append(out.reshape(B, count, H, length, d).transpose(1, 2).reshape(B, H, count * length, d))
    return torch.cat(outputs, dim=2)


def prefers_explicit(q: torch.Tensor) -> bool:
    """q: [B, heads, N, d]; explicit attention for CPU tensors of up to EXPLICIT_MAX_TOKENS_FP32 tokens in fp32,
    and in 16 bits up to EXPLICIT_MAX_TOKENS when autograd records (training), EXPLICIT_MAX_TOKENS_NO_GRAD when it
    does not. Never while exporting (torch.export, the ONNX exporter): there the token count is symbolic, and
    comparing it would fix the graph to one side of the bound; the kernel serves every count."""
    if q.device.type != "cpu" or torch.compiler.is_exporting():
        return False
    if q.dtype == torch.float32:
        return q.shape[-2] <= EXPLICIT_MAX_TOKENS_FP32
    limit = EXPLICIT_MAX_TOKENS if torch.is_grad_enabled() else EXPLICIT_MAX_TOKENS_NO_GRAD
    return q.dtype in (torch.bfloat16, torch.float16) and q.shape[-2] <= limit


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The faster of explicit attention and PyTorch's kernels for these tensors."""
    return explicit_attention(q, k, v) if prefers_explicit(q) else F.scaled_dot_product_attention(q, k, v)


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

    def forward(self, x: torch.Tensor, packed: Optional[PackedLayout] = None) -> torch.Tensor:
        """x: [B, N, D] -> [B, N, D]; with `packed`, each row holds several sequences that attend only within
        themselves (xformers' block-diagonal kernel on a GPU, else attention per run of same-length sequences)."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        if self.backend == "xformers" and x.is_cuda:
            # xformers has no CPU kernels; on a CPU tensor the model quietly uses the PyTorch path below.
            from xformers.ops import fmha, memory_efficient_attention

            q, k, v = qkv.unbind(2)
            if packed is None:
                out = memory_efficient_attention(q, k, v)
            else:
                bias = fmha.BlockDiagonalMask.from_seqlens(packed.lengths * B)
                flat = lambda t: t.reshape(1, B * N, self.num_heads, self.head_dim)  # noqa: E731
                out = memory_efficient_attention(flat(q), flat(k), flat(v), attn_bias=bias).reshape(q.shape)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = attention(q, k, v) if packed is None else packed_attention(q, k, v, packed)
            out = out.transpose(1, 2)
        return self.proj(out.reshape(B, N, D))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights [B, heads, N, N], computed explicitly (for attention maps, not training)."""
        B, N, D = x.shape
        q, k, _ = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return (q * self.head_dim**-0.5 @ k.transpose(-2, -1)).softmax(dim=-1)

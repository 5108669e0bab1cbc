"""Numeric precision: one place that decides when bf16 autocast is used and whether it pays on this machine.
(PyTorch is imported where it is used: the config check reads PRECISIONS without it.)"""

import contextlib
from typing import TYPE_CHECKING, ContextManager

from distill.errors import InputError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16", "auto")


# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) below the first with native bf16 products (AVX512_CORE_BF16).
_ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def kernels_capped_below_bf16() -> bool:
    """True when the process is told to use kernels without native bf16 (ATEN_CPU_CAPABILITY below AVX-512, or
    ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16), as when a CPU without bf16 is reproduced on one that has it:
    bf16 would then be emulated, slower than fp32."""
    import os

    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if aten and aten != "avx512":
        return True
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in _ONEDNN_ISAS_WITHOUT_BF16


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX-512 BF16 or AMX), so autocast to bf16 is faster; False
    when the kernels are capped below that (kernels_capped_below_bf16)."""
    import torch

    if kernels_capped_below_bf16():
        return False
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    return False


def resolve_precision(precision: str, device: "torch.device") -> str:
    """'auto' -> bf16 on CUDA with bf16 support or a CPU with native bf16, else fp32."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: "torch.device") -> ContextManager:
    """Autocast context for 'bf16' / 'fp16', a no-op for 'fp32' (resolve 'auto' first)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)

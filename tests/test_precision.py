"""`precision=auto`: bf16 only where the CPU multiplies bf16 natively, and fp32 whenever the kernels are capped
below that (the settings that reproduce an AVX2 machine on a newer one), so such a run measures what it claims."""

import subprocess
import sys

import pytest
import torch

from distill import precision
from distill.errors import InputError


def _auto_in_fresh_process(env_update):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    env.update(env_update)
    code = ("import torch; from distill.precision import resolve_precision; "
            "print(resolve_precision('auto', torch.device('cpu')))")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("env", [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ATEN_CPU_CAPABILITY": "default"},
                                 {"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"ONEDNN_MAX_CPU_ISA": "avx512_core_vnni"},
                                 {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}])
def test_auto_is_fp32_when_the_kernels_are_capped_below_native_bf16(env):
    assert _auto_in_fresh_process(env) == "fp32"


def test_auto_follows_the_cpu_when_nothing_caps_the_kernels(monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    native = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert precision.resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    # capping to an ISA that still has bf16 leaves the choice to the CPU
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    assert precision.resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")


def test_explicit_precisions_are_kept_and_unknown_ones_refused(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert precision.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(InputError, match="unknown precision 'bf32'"):
        precision.resolve_precision("bf32", torch.device("cpu"))

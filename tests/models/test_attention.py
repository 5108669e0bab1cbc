"""Explicit attention, which the CPU path takes for few tokens, against PyTorch's kernel: values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from distill.models.layers import attention


@pytest.mark.parametrize("tokens", [5, 17, 100])
def test_explicit_attention_equals_the_kernel_in_values_and_gradients(tokens):
    generator = torch.Generator().manual_seed(tokens)
    # q, k, v as the model makes them: views of one qkv tensor, not contiguous
    qkv = torch.randn(6, tokens, 3, 4, 32, generator=generator).permute(2, 0, 3, 1, 4).requires_grad_(True)
    grad = torch.randn(6, 4, tokens, 32, generator=generator)
    results = []
    for function in (attention.explicit_attention, F.scaled_dot_product_attention):
        out = function(*qkv.unbind(0))
        (weights,) = torch.autograd.grad(out, qkv, grad)
        results.append((out, weights))
    (ours, our_grad), (kernel, kernel_grad) = results
    assert torch.allclose(ours, kernel, atol=1e-5) and torch.allclose(our_grad, kernel_grad, atol=1e-4)
    assert our_grad.abs().max() > 0.1


def test_the_cpu_path_takes_explicit_attention_for_few_tokens_only():
    few, many = torch.zeros(2, 4, attention.EXPLICIT_MAX_TOKENS_FP32, 32), torch.zeros(2, 4, 197, 32)
    assert attention.prefers_explicit(few) and not attention.prefers_explicit(many)
    with torch.no_grad():
        assert not attention.prefers_explicit(few.bfloat16())  # 16 bits without backward: the kernel from 41 tokens
        assert attention.prefers_explicit(few[:, :, :17].bfloat16())


def test_an_exported_vit_keeps_every_image_size():
    """torch.export of a small fp32 ViT, trainable, traced at 28 px (17 tokens): neither the attention's nor the patch
    embedding's choice by size may bind the program to images that small."""
    from distill.models import create_backbone

    model = create_backbone("vit_tiny", depth=1, embed_dim=32, num_heads=2, patch_size=7, img_size=28, in_chans=1)
    size = torch.export.Dim("size", min=1, max=40)
    program = torch.export.export(model, (torch.randn(2, 1, 28, 28),), dynamic_shapes=({2: 7 * size, 3: 7 * size},))
    for pixels in (28, 140):  # 17 and 401 tokens, either side of EXPLICIT_MAX_TOKENS_FP32
        images = torch.randn(2, 1, pixels, pixels)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(images), model(images), atol=1e-5, rtol=1e-5)

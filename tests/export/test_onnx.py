"""ONNX export: every kind of backbone and classifier run by onnxruntime and compared with PyTorch to 1e-4, at the
export size and at a non-square one (the position-embedding resize inside the graph), with batches of 1 and 3.

Small models with random weights (reduced depth); position embeddings and register tokens get unit-scale values
so that a wrong resize or token order shows far above the tolerance (their initial values are tiny).
"""

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from distill.errors import DistillError, InputError  # noqa: E402
from distill.export import onnx as onnx_export  # noqa: E402
from distill.export.onnx import export_onnx  # noqa: E402
from distill.models import create_backbone  # noqa: E402
from distill.models.classifiers import create_classifier  # noqa: E402
from distill.models.layers.mlp import SwiGLU  # noqa: E402

TOLERANCE = 1e-4  # max |onnxruntime - PyTorch|, float32
FP16_TOLERANCE = 1e-2  # fp16 graph vs the float32 model: relative to max(1, largest |value|)


def _run(path, images: torch.Tensor) -> dict:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"images": images.numpy()})))


def _unit_scale(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        model.pos_embed.normal_()
        if model.register_tokens is not None:
            model.register_tokens.normal_()
    return model.eval()


def _tokens(model, images: torch.Tensor) -> dict:
    with torch.no_grad():
        tokens = model.forward_features(images)
    return {"cls_token": tokens["x_norm_clstoken"], "patch_tokens": tokens["x_norm_patchtokens"],
            "register_tokens": tokens["x_norm_regtokens"]}


def _check(path, reference, sizes, expected_outputs, shapes) -> None:
    """onnxruntime at each (batch, height, width) gives the named outputs, of the shapes shapes(b, h, w) lists,
    within TOLERANCE of reference(images)."""
    for batch, height, width in sizes:
        images = torch.randn(batch, 3, height, width)
        got = _run(path, images)
        assert list(got) == expected_outputs
        want = reference(images)
        for name, shape in shapes(batch, height, width).items():
            assert got[name].shape == shape, (name, height, width)
            deviation = float(np.abs(got[name] - want[name].numpy()).max())
            assert deviation <= TOLERANCE, (name, height, width, deviation)


def test_dino_vits16_tokens_at_224_and_a_non_square_size(tmp_path):
    model = _unit_scale(create_backbone("dino_vits16", depth=2))  # DINO's +0.1-offset resize, no antialiasing
    report = export_onnx(model, tmp_path / "dino.onnx", image_size=(224, 224))
    assert report.path == tmp_path / "dino.onnx" and report.path.is_file() and not report.fp16
    assert report.outputs == ["cls_token", "patch_tokens"]
    assert report.checked_sizes == [(224, 224), (192, 256)] and report.max_deviation <= TOLERANCE
    # 224x288: one axis at the trained grid, the other resized (the offset convention resizes both then)
    _check(report.path, lambda x: _tokens(model, x), [(1, 224, 224), (3, 224, 288), (3, 160, 224)],
           report.outputs, lambda b, h, w: {"cls_token": (b, 384), "patch_tokens": (b, h // 16 * w // 16, 384)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dino.onnx"]


def test_deit_tiny_distilled_gives_the_mean_of_its_two_heads(tmp_path):
    model = _unit_scale(create_backbone("deit_tiny_distilled_patch16_224", depth=2))
    report = export_onnx(model, tmp_path / "deit.onnx", image_size=(224, 224))
    assert report.outputs == ["logits"] and len(report.checked_sizes) == 2

    def heads(images):
        with torch.no_grad():
            tokens = model.forward_features(images)
            cls_logits = model.head(tokens["x_norm_clstoken"])
            dist_logits = model.head_dist(tokens["x_norm_disttoken"])
        assert not torch.allclose(cls_logits, dist_logits, atol=1e-3)  # the mean is not either head alone
        return {"logits": (cls_logits + dist_logits) / 2}

    _check(report.path, heads, [(1, 224, 224), (3, 160, 256)], ["logits"], lambda b, h, w: {"logits": (b, 1000)})


def test_dinov2_with_registers_at_518_and_at_224(tmp_path):
    model = _unit_scale(create_backbone("dinov2_vits14_reg", depth=2))  # exact-size antialiased resize
    report = export_onnx(model, tmp_path / "dinov2.onnx", image_size=(518, 518))
    assert report.outputs == ["cls_token", "patch_tokens", "register_tokens"]
    assert report.checked_sizes == [(518, 518), (490, 546)]
    _check(report.path, lambda x: _tokens(model, x), [(1, 518, 518), (3, 224, 224), (1, 224, 308)], report.outputs,
           lambda b, h, w: {"cls_token": (b, 384), "patch_tokens": (b, h // 14 * w // 14, 384),
                            "register_tokens": (b, 4, 384)})


def test_swiglu_vit_at_224_and_a_non_square_size(tmp_path):
    # ViT-g/14's architecture (SwiGLU feed-forward, LayerScale), narrower and shallower
    model = _unit_scale(create_backbone("dinov2_vitg14", depth=2, embed_dim=128, num_heads=4, img_size=224))
    assert isinstance(model.blocks[0].mlp, SwiGLU)
    report = export_onnx(model, tmp_path / "swiglu.onnx", image_size=(224, 224))
    assert report.outputs == ["cls_token", "patch_tokens"]
    _check(report.path, lambda x: _tokens(model, x), [(1, 224, 224), (3, 196, 280)], report.outputs,
           lambda b, h, w: {"cls_token": (b, 128), "patch_tokens": (b, h // 14 * w // 14, 128)})


def test_resnet_features_and_feature_map(tmp_path):
    model = create_backbone("resnet18").eval()
    report = export_onnx(model, tmp_path / "resnet.onnx", image_size=(128, 128))
    assert report.outputs == ["features", "feature_map"]

    def reference(images):
        with torch.no_grad():
            return {"features": model(images), "feature_map": model.forward_feature_map(images)}

    _check(report.path, reference, [(1, 128, 128), (3, 96, 160)], report.outputs,
           lambda b, h, w: {"features": (b, 512), "feature_map": (b, 512, -(-h // 32), -(-w // 32))})


@pytest.mark.slow  # about 20 s: tracing timm's XCiT blocks takes most of it
def test_xcit_tokens_at_224_and_a_non_square_size(tmp_path):
    model = create_backbone("dino_xcit_small_12_p16", depth=1, cls_attn_layers=1).eval()
    report = export_onnx(model, tmp_path / "xcit.onnx", image_size=(224, 224))
    assert report.outputs == ["cls_token", "patch_tokens"] and len(report.checked_sizes) == 2

    def reference(images):
        tokens = _tokens(model, images)
        with torch.no_grad():
            assert torch.allclose(model(images), tokens["cls_token"], atol=1e-6)
        return tokens

    _check(report.path, reference, [(1, 224, 224), (3, 160, 256)], report.outputs,
           lambda b, h, w: {"cls_token": (b, 384), "patch_tokens": (b, h // 16 * w // 16, 384)})


def test_fp16_graph_is_close_to_the_float32_model(tmp_path):
    model = _unit_scale(create_backbone("dino_vits16", depth=2))
    report = export_onnx(model, tmp_path / "half.onnx", image_size=(224, 224), fp16=True)
    assert report.fp16 and len(report.checked_sizes) == 2
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is not converted
    for batch, height, width in [(1, 224, 224), (3, 160, 224)]:
        images = torch.randn(batch, 3, height, width)
        got = _run(report.path, images.half())
        want = _tokens(model, images)
        for name in report.outputs:
            assert got[name].dtype == np.float16
            reference = want[name].numpy()
            deviation = float(np.abs(got[name].astype(np.float32) - reference).max())
            assert deviation <= FP16_TOLERANCE * max(1.0, float(np.abs(reference).max())), (name, deviation)


def test_timm_vit_of_fixed_size_gives_a_graph_of_that_size(tmp_path):
    # timm's ViTs built without dynamic_img_size assert on the input size: the graph is fixed, checked at one size
    model = create_classifier("deit_tiny_distilled_patch16_224", num_classes=10, depth=1)
    report = export_onnx(model, tmp_path / "timm.onnx", image_size=(224, 224))
    assert report.outputs == ["logits"] and report.checked_sizes == [(224, 224)]
    images = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        want = model.eval()(images).numpy()
    assert float(np.abs(_run(report.path, images)["logits"] - want).max()) <= TOLERANCE


def test_failed_check_raises_and_leaves_nothing(tmp_path, monkeypatch):
    model = create_backbone("vit_tiny", depth=1, img_size=64)
    run = onnx_export._run_onnxruntime

    def wrong_patches(*args):
        cls_token, patch_tokens = run(*args)
        return [cls_token, patch_tokens + 1e-3]

    monkeypatch.setattr(onnx_export, "_run_onnxruntime", wrong_patches)
    with pytest.raises(DistillError, match=r"patch_tokens at 64x64 differs from PyTorch by 0\.001"):
        export_onnx(model, tmp_path / "out" / "model.onnx", image_size=(64, 64))
    assert list((tmp_path / "out").iterdir()) == []
    assert model.training  # left in the mode it came in


def test_missing_onnxruntime_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(InputError, match=r"onnxruntime is missing\): pip install 'distill\[export\]'"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "model.onnx", image_size=(224, 224))
    assert list(tmp_path.iterdir()) == []

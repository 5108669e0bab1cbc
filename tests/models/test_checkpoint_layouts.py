"""State dicts written in each official layout (the DINO, DeiT and DINOv2 releases, their training checkpoints, timm)
load strictly and give the source model's outputs."""

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distill.errors import CheckpointError
from distill.models import create_backbone, load_pretrained
from distill.models.diagnosis import guess_backbone_name

SMALL = {"depth": 2}


def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


def _head(prefix, dim=384, out=32):  # stand-in projection-head weights that loading must ignore
    return {f"{prefix}mlp.0.weight": torch.randn(64, dim), f"{prefix}last_layer.weight_g": torch.ones(out, 1)}


def _save(obj, tmp_path: Path, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_dino_released_backbone(tmp_path):
    source = create_backbone("dino_vits16", **SMALL)
    state = source.state_dict()
    assert "mask_token" not in state and state["pos_embed"].shape == (1, 197, 384)
    path = _save({**state, "version": 1}, tmp_path)  # a stray non-tensor entry beside the weights
    loaded = create_backbone("dino_vits16", pretrained=str(path), **SMALL)
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(_outputs(loaded, x), _outputs(source, x))


def test_dino_training_checkpoint_teacher_by_default_student_on_request(tmp_path):
    teacher, student = create_backbone("dino_vits16", **SMALL), create_backbone("dino_vits16", **SMALL)
    checkpoint = {
        "student": {**_prefixed(student.state_dict(), "module.backbone."), **_head("module.head.")},
        "teacher": {**_prefixed(teacher.state_dict(), "backbone."), **_head("head.")},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 7,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536),
        "dino_loss": {"center": torch.zeros(1, 32)},
        "fp16_scaler": None,
    }
    path = _save(checkpoint, tmp_path)
    x = torch.randn(2, 3, 224, 224)
    from_teacher = create_backbone("dino_vits16", pretrained=str(path), **SMALL)
    from_student = create_backbone("dino_vits16", pretrained=str(path), checkpoint_key="student", **SMALL)
    assert torch.equal(_outputs(from_teacher, x), _outputs(teacher, x))
    assert torch.equal(_outputs(from_student, x), _outputs(student, x))
    assert not torch.equal(_outputs(from_teacher, x), _outputs(from_student, x))


def test_deit_model_file_and_training_checkpoint(tmp_path):
    source = create_backbone("deit_tiny_distilled_patch16_224", **SMALL)
    ema = create_backbone("deit_tiny_distilled_patch16_224", **SMALL)
    state = source.state_dict()
    assert state["pos_embed"].shape == (1, 2 + 196, 192) and "head_dist.weight" in state
    released = _save({"model": state}, tmp_path, "deit.pth")
    training = _save({"model": state, "optimizer": {}, "lr_scheduler": {"last_epoch": 3}, "epoch": 3,
                      "model_ema": ema.state_dict(), "scaler": {"scale": 65536.0},
                      "args": argparse.Namespace(model="deit_tiny_distilled_patch16_224")}, tmp_path, "train.pth")
    x = torch.randn(2, 3, 224, 224)
    expected = _outputs(source, x)
    assert expected.shape == (2, 1000)
    for path in (released, training):
        loaded = create_backbone("deit_tiny_distilled_patch16_224", pretrained=str(path), **SMALL)
        assert torch.equal(_outputs(loaded, x), expected)
    loaded_ema = create_backbone("deit_tiny_distilled_patch16_224", pretrained=str(training),
                                 checkpoint_key="model_ema", **SMALL)
    assert torch.equal(_outputs(loaded_ema, x), _outputs(ema, x))


def test_deit_file_into_backbone_without_classes_drops_heads(tmp_path):
    source = create_backbone("deit_small_patch16_224", **SMALL)
    path = _save({"model": source.state_dict()}, tmp_path)
    backbone = create_backbone("deit_small_patch16_224", num_classes=0, pretrained=str(path), **SMALL).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(backbone(x), source.eval().forward_features(x)["x_norm_clstoken"])


@pytest.mark.parametrize("name,overrides", [
    ("dinov2_vits14_reg", {}),                                   # registers + LayerScale
    ("dinov2_vits14", {}),
    ("dinov2_vitg14", {"embed_dim": 96, "num_heads": 4}),         # SwiGLU w12 / w3, shrunk
])
def test_dinov2_hub_backbone(tmp_path, name, overrides):
    source = create_backbone(name, **SMALL, **overrides)
    state = source.state_dict()
    assert state["pos_embed"].shape[1] == 1370 and state["mask_token"].shape == (1, state["cls_token"].shape[-1])
    assert "blocks.0.ls1.gamma" in state
    if name.endswith("_reg"):
        assert state["register_tokens"].shape[:2] == (1, 4)
    if name == "dinov2_vitg14":
        assert "blocks.0.mlp.w12.weight" in state and "blocks.0.mlp.w3.weight" in state
    path = _save(state, tmp_path)
    loaded = create_backbone(name, pretrained=str(path), **SMALL, **overrides)
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(_outputs(loaded, x), _outputs(source, x))


def _chunked(state, depth, chunks):
    """DINOv2's block_chunks naming: blocks.{chunk}.{global index}.*"""
    per_chunk = depth // chunks
    out = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            rest = key.split(".", 2)[2]
            key = f"blocks.{index // per_chunk}.{index}.{rest}"
        out[key] = value
    return out


def test_dinov2_teacher_checkpoint_with_chunked_blocks(tmp_path):
    source = create_backbone("dinov2_vits14_reg", depth=4)
    chunked = _chunked(source.state_dict(), depth=4, chunks=2)
    assert "blocks.1.3.norm1.weight" in chunked
    checkpoint = {"teacher": {**_prefixed(chunked, "backbone."), **_head("dino_head."), **_head("ibot_head.")}}
    path = _save(checkpoint, tmp_path, "teacher_checkpoint.pth")
    loaded = create_backbone("dinov2_vits14_reg", depth=4, pretrained=str(path))
    x = torch.randn(2, 3, 112, 112)
    assert torch.equal(_outputs(loaded, x), _outputs(source, x))


def test_dinov2_training_model_dict_selects_teacher_or_student(tmp_path):
    teacher, student = create_backbone("dinov2_vits14", **SMALL), create_backbone("dinov2_vits14", **SMALL)
    model = {**_prefixed(teacher.state_dict(), "teacher.backbone."), **_head("teacher.dino_head."),
             **_prefixed(student.state_dict(), "student.backbone."), **_head("student.dino_head.")}
    path = _save({"model": model, "optimizer": {}, "iteration": 1250}, tmp_path, "model_0001249.rank_0.pth")
    x = torch.randn(2, 3, 98, 98)
    assert torch.equal(_outputs(create_backbone("dinov2_vits14", pretrained=str(path), **SMALL), x),
                       _outputs(teacher, x))
    from_student = create_backbone("dinov2_vits14", pretrained=str(path), checkpoint_key="student", **SMALL)
    assert torch.equal(_outputs(from_student, x), _outputs(student, x))


def test_wrapper_prefixes_and_safetensors(tmp_path):
    source = create_backbone("vit_tiny", **SMALL)
    wrapped = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    path = _save({"state_dict": wrapped}, tmp_path)
    st_path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(st_path))
    x = torch.randn(2, 3, 224, 224)
    for file in (path, st_path):
        assert torch.equal(_outputs(create_backbone("vit_tiny", pretrained=str(file), **SMALL), x), _outputs(source, x))


def test_position_embedding_resized_at_load_matches_on_the_fly_resizing(tmp_path):
    source = create_backbone("dinov2_vits14", **SMALL)  # trained grid 37x37 (518 px)
    path = _save(source.state_dict(), tmp_path)
    at_224 = create_backbone("dinov2_vits14", img_size=224, pretrained=str(path), **SMALL)
    assert at_224.pos_embed.shape == (1, 1 + 16 * 16, 384)
    x = torch.randn(2, 3, 224, 224)
    assert torch.allclose(_outputs(at_224, x), _outputs(source, x), atol=1e-6)


def test_rgb_file_into_grey_model_sums_the_patch_filters(tmp_path):
    source = create_backbone("vit_tiny", **SMALL)
    path = _save(source.state_dict(), tmp_path)
    grey = create_backbone("vit_tiny", in_chans=1, pretrained=str(path), **SMALL)
    x = torch.randn(2, 1, 224, 224)
    assert torch.allclose(_outputs(grey, x), _outputs(source, x.expand(-1, 3, -1, -1)), atol=1e-5)


# ----------------------------------------------------------------------------- refusals and mismatches


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = _save({"model": create_backbone("vit_tiny", **SMALL).state_dict(), "extra": _RunsCode(marker)}, tmp_path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*system.*could run code"):
        create_backbone("vit_tiny", pretrained=str(path), **SMALL)
    assert not marker.exists()


@pytest.mark.parametrize("content,message", [
    (b"not a checkpoint at all" * 20, "not a PyTorch checkpoint"),
    (None, "not a PyTorch checkpoint"),  # truncated zip
])
def test_damaged_files(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    if content is None:
        good = _save(create_backbone("vit_tiny", **SMALL).state_dict(), tmp_path, "good.pth")
        content = good.read_bytes()[: good.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        create_backbone("vit_tiny", pretrained=str(path), **SMALL)


def test_missing_file_and_wrong_contents(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        create_backbone("vit_tiny", pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match="holds a list"):
        create_backbone("vit_tiny", pretrained=str(_save([torch.zeros(1)], tmp_path, "list.pth")))
    with pytest.raises(CheckpointError, match="no network weights"):
        create_backbone("vit_tiny", pretrained=str(_save({"epoch": 3, "optimizer": {}}, tmp_path, "e.pth")))
    with pytest.raises(CheckpointError, match="checkpoint_key 'ema'"):
        create_backbone("vit_tiny", pretrained=str(_save({"model": {"a": torch.zeros(1)}}, tmp_path, "k.pth")),
                        checkpoint_key="ema")


def test_file_of_another_architecture_names_what_it_looks_like():
    with torch.device("meta"):  # shapes are all the diagnosis needs
        state = create_backbone("dinov2_vits14_reg").state_dict()
        model = create_backbone("dino_vits16")
    with pytest.raises(CheckpointError) as info:
        load_pretrained(model, state)
    message = str(info.value)
    assert "does not fit backbone 'dino_vits16'" in message
    assert "unexpected keys (26)" in message and "register_tokens" in message
    assert "blocks.*.ls1.gamma x12" in message
    assert "patch_embed.proj.weight file [384, 3, 14, 14] vs model [384, 3, 16, 16]" in message
    assert "looks like 'dinov2_vits14_reg'" in message


def test_distilled_file_into_plain_deit_names_the_distilled_model():
    with torch.device("meta"):
        state = create_backbone("deit_base_distilled_patch16_384").state_dict()
        model = create_backbone("deit_base_patch16_384")
    with pytest.raises(CheckpointError, match=r"(?s)dist_token.*head_dist.*looks like 'deit_base_distilled_patch16_384'"):
        load_pretrained(model, state)


def test_file_with_another_mlp_ratio_names_it():
    # a network with another MLP ratio than 4 (as the CPU demo's) loaded at the default 4: the message names the ratio
    arch = dict(depth=2, embed_dim=32, num_heads=2, patch_size=7, img_size=28, in_chans=1)
    with torch.device("meta"):
        state = create_backbone("vit_tiny", mlp_ratio=2.0, **arch).state_dict()
        model = create_backbone("vit_tiny", **arch)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(model, state)
    message = str(info.value)
    assert "blocks.*.mlp.fc1.weight file [64, 32] vs model [128, 32]" in message
    assert "embed_dim 32, depth 2, patch 7, mlp_ratio 2" in message
    # nor is a file of a registered name's shape but another MLP ratio taken for that name
    with torch.device("meta"):
        ratio_two = create_backbone("dino_vits16", mlp_ratio=2.0).state_dict()
        official = create_backbone("dino_vits16").state_dict()
    assert guess_backbone_name(official) == "dino_vits16"
    assert guess_backbone_name(ratio_two) is None

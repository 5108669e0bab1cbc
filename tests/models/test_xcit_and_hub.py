"""DINO's XCiT and ResNet-50 backbones against timm and torchvision on the same random weights, files in the
official layouts, and the torch.hub entry points of hubconf.py."""

import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from distill.cli import main
from distill.errors import CheckpointError, InputError
from distill.eval.attention import class_token_attention
from distill.eval.flops import count_parameters
from distill.models import create_backbone, list_backbones
from distill.models.diagnosis import guess_backbone_name, mismatch_report
from distill.models.xcit import from_timm_layout

REPO = str(Path(__file__).resolve().parents[2])
XCIT_NAMES = ["dino_xcit_small_12_p16", "dino_xcit_small_12_p8", "dino_xcit_medium_24_p16", "dino_xcit_medium_24_p8"]
TIMM_NAME = {  # the same architectures in timm's registry
    "dino_xcit_small_12_p16": "xcit_small_12_p16_224", "dino_xcit_small_12_p8": "xcit_small_12_p8_224",
    "dino_xcit_medium_24_p16": "xcit_medium_24_p16_224", "dino_xcit_medium_24_p8": "xcit_medium_24_p8_224",
}
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dino/dino_xcit_small_12_p16_pretrain/dino_xcit_small_12_p16_pretrain.pth"


def _timm_xcit(name: str, depth: int = 2) -> torch.nn.Module:
    """timm's XCiT of a registered name, reduced depth, random weights (BatchNorm statistics too), eval mode."""
    model = timm.create_model(TIMM_NAME[name], pretrained=False, num_classes=0, depth=depth)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # statistics away from (0, 1), so that they matter
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _official_layout(state):
    """timm's XCiT state dict renamed to facebookresearch/xcit's (the layout of DINO's released files):
    pos_embed.* -> pos_embeder.*, the class-attention q, k, v stacked into one qkv; no head."""
    out = {}
    for key, value in state.items():
        if key.startswith("head."):
            continue
        if key.startswith("pos_embed."):
            key = "pos_embeder." + key[len("pos_embed."):]
        out[key] = value
    blocks = sorted({k.split(".attn.")[0] for k in out if k.startswith("cls_attn_blocks.") and ".attn.q." in k})
    for block in blocks:
        for kind in ("weight", "bias"):
            out[f"{block}.attn.qkv.{kind}"] = torch.cat([out.pop(f"{block}.attn.{p}.{kind}") for p in "qkv"])
    return out


def _xcit_file(tmp_path: Path, name: str = "dino_xcit_small_12_p16", depth: int = 2):
    """(path of a file in DINO's XCiT layout, the timm model it was written from)."""
    reference = _timm_xcit(name, depth)
    path = tmp_path / f"{name}.pth"
    torch.save(_official_layout(reference.state_dict()), path)
    return path, reference


def _on_meta(name: str, **overrides) -> torch.nn.Module:
    with torch.device("meta"):  # shapes and keys only: nothing allocated
        return create_backbone(name, **overrides)


# ---------------------------------------------------------------------------------------------- XCiT


@pytest.mark.parametrize("name", XCIT_NAMES)
def test_official_xcit_file_loads_strictly_and_matches_timm(tmp_path, name):
    path, reference = _xcit_file(tmp_path, name, depth=1)
    keys = set(torch.load(path, weights_only=True))
    assert {"pos_embeder.token_projection.weight", "cls_attn_blocks.1.attn.qkv.weight"} <= keys
    model = create_backbone(name, pretrained=str(path), depth=1).eval()
    x = torch.randn(2, 3, 48, 80)  # not square: the patch order of the position encoding matters
    with torch.no_grad():
        expected = reference.forward_features(x)  # [B, 1 + N, D], normalised
        features = model.forward_features(x)
        embedding = model(x)
    grid = (48 // model.patch_size) * (80 // model.patch_size)
    assert features["x_norm_patchtokens"].shape == (2, grid, model.embed_dim)
    torch.testing.assert_close(features["x_norm_clstoken"], expected[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features["x_norm_patchtokens"], expected[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embedding, reference(x), rtol=1e-5, atol=1e-5)
    assert features["x_prenorm"].shape == (2, 1 + grid, model.embed_dim)


@pytest.mark.parametrize("name", XCIT_NAMES)
def test_xcit_sizes_equal_timm_and_the_papers(name):
    with torch.device("meta"):
        reference = timm.create_model(TIMM_NAME[name], pretrained=False, num_classes=0)
    model = _on_meta(name)
    assert count_parameters(model) == count_parameters(reference)
    assert model.embed_dim == reference.embed_dim and len(model.blocks) == len(reference.blocks)
    # XCiT paper, Table 1: S12 26M, M24 84M parameters (the classifier of 1000 classes included there)
    assert round(count_parameters(model) / 1e6) == (26 if "small" in name else 84)


def test_training_checkpoint_of_an_xcit_loads_the_teacher(tmp_path):
    path, reference = _xcit_file(tmp_path)
    state = _official_layout(reference.state_dict())
    head = {"head.mlp.0.weight": torch.randn(8, 384), "head.last_layer.weight_g": torch.ones(16, 1)}
    checkpoint = {"teacher": {**{f"backbone.{k}": v for k, v in state.items()}, **head},
                  "student": {f"module.backbone.{k}": torch.zeros_like(v) for k, v in state.items()}, "epoch": 3}
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    model = create_backbone("dino_xcit_small_12_p16", pretrained=str(tmp_path / "checkpoint.pth"), depth=2).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_timm_layout_converts_and_is_named_when_not_converted():
    reference = _timm_xcit("dino_xcit_small_12_p16")
    model = create_backbone("dino_xcit_small_12_p16", depth=2).eval()
    timm_state = reference.state_dict()
    report = mismatch_report(timm_state, model, "timm.pth")
    assert "the file holds an XCiT" in report and "from_timm_layout" in report
    converted, notes = from_timm_layout(timm_state)
    assert notes and model.adapt_state_dict(timm_state)[0].keys() == converted.keys()
    model.load_state_dict(converted, strict=True)
    assert mismatch_report(converted, model, "converted") is None
    assert from_timm_layout(converted) == (converted, [])  # the official layout comes back as it is
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_class_attention_maps_cover_the_patch_grid(tmp_path):
    path, reference = _xcit_file(tmp_path)
    model = create_backbone("dino_xcit_small_12_p16", pretrained=str(path), depth=2).eval()
    images = torch.randn(2, 3, 64, 96)
    probs = model.get_last_self_attention(images)
    assert probs.shape == (2, 8, 1, 1 + 4 * 6)  # the class token's row over (class token, patches)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 8, 1))
    attention = class_token_attention(model, images)
    assert attention.shape == (2, 8, 4, 6) and (attention >= 0).all()
    over_patches = attention.flatten(2).sum(-1)
    assert (over_patches <= 1 + 1e-6).all() and (over_patches < 1).any()  # the rest is on the class token
    # the same weights from timm's modules: the class token's query against every key of the last block
    with torch.no_grad():
        tokens = torch.cat([reference.cls_token.expand(2, -1, -1), _timm_patch_stage(reference, images)], dim=1)
        tokens = reference.cls_attn_blocks[0](tokens)
        last = reference.cls_attn_blocks[-1]
        normed = last.norm1(tokens)
        heads = lambda t: t.reshape(2, t.shape[1], 8, 48).transpose(1, 2)  # noqa: E731
        query, keys = heads(last.attn.q(normed[:, :1])), heads(last.attn.k(normed))
        expected = (query * last.attn.scale @ keys.transpose(-2, -1)).softmax(-1)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)


def _timm_patch_stage(reference, images):
    """timm's XCiT up to the class token: patch embedding, Fourier position encoding, the XCA blocks."""
    tokens, (height, width) = reference.patch_embed(images)
    position = reference.pos_embed(images.shape[0], height, width)
    tokens = tokens + position.reshape(images.shape[0], -1, tokens.shape[1]).permute(0, 2, 1)
    for block in reference.blocks:
        tokens = block(tokens, height, width)
    return tokens


def test_xcit_backbone_interface_and_refusals():
    model = create_backbone("dino_xcit_small_12_p8", depth=1, img_size=64).eval()
    assert (model.patch_size, model.num_prefix_tokens, model.embed_dim, model.num_features) == (8, 1, 384, 384)
    assert model.config["img_size"] == (64, 64) and model.config["in_chans"] == 3
    names = {name for name, _ in model.named_parameters()}
    assert model.no_weight_decay() <= names and "cls_token" in model.no_weight_decay()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    with torch.no_grad():
        outputs = model(crops)
        features = model.forward_features(crops)
    assert [o.shape for o in outputs] == [(2, 384), (2, 384)]
    assert features[1]["x_norm_patchtokens"].shape == (2, 4, 384) and features[1]["x_norm_regtokens"].shape[1] == 0
    with pytest.raises(InputError, match="no mask token"):
        model.forward_features(crops[0], masks=torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(InputError, match="not a multiple of the patch size 8"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(InputError, match="patch_size 14 unsupported"):
        create_backbone("dino_xcit_small_12_p16", patch_size=14, depth=1)


def _backbone_shapes(state) -> dict:
    """Keys and shapes of a ViT state dict without its classifier heads."""
    return {k: tuple(v.shape) for k, v in state.items() if not k.startswith(("head.", "head_dist."))}


def test_guesses_recognise_xcit_files_and_keep_the_vits():
    names = XCIT_NAMES + ["dinov2_vits14_reg", "deit_tiny_distilled_patch16_224", "dino_vits16", "deit_small_patch16_224"]
    for name in names:
        assert guess_backbone_name(_on_meta(name).state_dict()) == name
    # DINO's ViT-S/16 is DeiT-S's architecture block for block: the classifier head (or its absence) tells them apart
    vit_state = _on_meta("dino_vits16").state_dict()
    guess = guess_backbone_name(vit_state)
    assert _backbone_shapes(_on_meta(guess).state_dict()) == _backbone_shapes(vit_state)
    xcit_state = _on_meta("dino_xcit_medium_24_p8").state_dict()
    report = mismatch_report(xcit_state, _on_meta("dino_vits16"), "xcit.pth")
    assert "the file holds an XCiT with embed_dim 512, depth 24, patch 8, 8 heads" in report
    assert "it looks like 'dino_xcit_medium_24_p8'" in report
    report = mismatch_report(vit_state, _on_meta("dino_xcit_small_12_p16"), "vit.pth")
    assert "the file holds a ViT" in report and f"it looks like '{guess}'" in report
    reduced = mismatch_report(_on_meta("dino_xcit_small_12_p16", depth=2).state_dict(),
                              _on_meta("dino_xcit_small_12_p16"), "reduced.pth")
    assert "missing keys" in reduced and "no registered name matches" in reduced


def test_missing_xcit_file_is_one_line(tmp_path):
    missing = tmp_path / "dino_xcit_small_12_p16_pretrain.pth"
    with pytest.raises(CheckpointError) as error:
        create_backbone("dino_xcit_small_12_p16", pretrained=str(missing), depth=1)
    message = str(error.value)
    assert "\n" not in message and str(missing) in message and "check the path" in message


def test_attention_command_on_an_xcit_file(tmp_path, capsys):
    from PIL import Image

    path, _ = _xcit_file(tmp_path)
    images = []
    for i in range(2):
        images.append(tmp_path / f"{i}.png")
        Image.linear_gradient("L").resize((80, 60)).convert("RGB").rotate(90 * i).save(images[-1])
    figure = tmp_path / "attention.png"
    code = main(["attention", "--checkpoint", str(path), "--backbone", "dino_xcit_small_12_p16", "--set", "depth=2",
                 "--images", *map(str, images), "--image-size", "64", "--output", str(figure)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "attention maps of 2 image(s)" in printed and "64 px views" in printed
    assert figure.stat().st_size > 5000


# ---------------------------------------------------------------------------------------------- ResNet-50


def test_dino_resnet50_file_matches_torchvision(tmp_path):
    reference = torchvision.models.resnet50(weights=None)
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}  # DINO's release
    torch.save(state, tmp_path / "dino_resnet50_pretrain.pth")
    assert "dino_resnet50" in list_backbones()
    model = create_backbone("dino_resnet50", pretrained=str(tmp_path / "dino_resnet50_pretrain.pth")).eval()
    reference.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.eval()(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- torch.hub


def _vit_file(name: str, tmp_path: Path, wrap=None):
    source = create_backbone(name, depth=2).eval()
    state = source.state_dict()
    path = tmp_path / f"{name}.pth"
    torch.save({wrap: state} if wrap else state, path)
    return path, source


@pytest.mark.parametrize("name,wrap", [("dinov2_vits14_reg", None), ("dino_vits16", None),
                                       ("deit_tiny_distilled_patch16_224", "model")])
def test_hub_loads_vit_files(tmp_path, name, wrap):
    path, source = _vit_file(name, tmp_path, wrap)
    model = torch.hub.load(REPO, name, source="local", pretrained=str(path), depth=2).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_hub_loads_xcit_and_resnet_files(tmp_path):
    path, reference = _xcit_file(tmp_path)
    model = torch.hub.load(REPO, "dino_xcit_small_12_p16", source="local", pretrained=path, depth=2).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    resnet = torchvision.models.resnet50(weights=None).eval()
    torch.save({k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}, tmp_path / "r50.pth")
    model = torch.hub.load(REPO, "dino_resnet50", source="local", pretrained=str(tmp_path / "r50.pth")).eval()
    resnet.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.equal(model(x), resnet(x))


def test_hub_random_weights_and_missing_file(tmp_path):
    path, source = _vit_file("dino_vits16", tmp_path)
    random = torch.hub.load(REPO, "dino_vits16", source="local", pretrained=False, depth=2).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(random(x), source(x))
    with pytest.raises(CheckpointError, match="does not exist"):
        torch.hub.load(REPO, "dino_xcit_small_12_p16", source="local", pretrained=str(tmp_path / "no.pth"), depth=1)


def test_hub_pretrained_downloads_the_official_file_once(tmp_path, monkeypatch):
    path, reference = _xcit_file(tmp_path)
    served = {"file": path}  # what the fake server sends
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, Path(dst).name, hash_prefix))
        Path(dst).write_bytes(served["file"].read_bytes())

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    x = torch.randn(1, 3, 32, 32)
    for _ in range(2):
        model = torch.hub.load(REPO, "dino_xcit_small_12_p16", source="local", depth=2).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    assert calls == [(OFFICIAL_URL, "dino_xcit_small_12_p16_pretrain.pth", None)]
    assert (tmp_path / "hub" / "checkpoints" / "dino_xcit_small_12_p16_pretrain.pth").is_file()

    served["file"], _ = _vit_file("deit_tiny_distilled_patch16_224", tmp_path, wrap="model")
    torch.hub.load(REPO, "deit_tiny_distilled_patch16_224", source="local", depth=2)
    assert calls[-1][1:] == ("deit_tiny_distilled_patch16_224-b40b3cf7.pth", "b40b3cf7")  # DeiT's hash check

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError) as error:
        torch.hub.load(REPO, "dinov2_vits14", source="local", depth=1)
    message = str(error.value)
    assert "\n" not in message and "dinov2_vits14/dinov2_vits14_pretrain.pth" in message
    assert "pretrained=PATH" in message


def test_hubconf_has_an_entry_point_and_a_documented_address_per_official_name():
    import re

    import hubconf

    entry_points = {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")}
    official = set(XCIT_NAMES) | {"dino_resnet50"} | {f"dino_vit{s}{p}" for s in "sb" for p in (16, 8)}
    official |= {f"deit_{s}_{d}patch16_224" for s in ("tiny", "small", "base") for d in ("", "distilled_")}
    official |= {"deit_base_patch16_384", "deit_base_distilled_patch16_384"}
    official |= {f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")}
    assert entry_points == official and official <= set(list_backbones())
    table = dict(re.findall(r"^\| (\w+) \| (https://\S+) \|$", hubconf.__doc__, re.M))
    assert table == hubconf._WEIGHTS
    assert hubconf._WEIGHTS["dino_xcit_small_12_p16"] == OFFICIAL_URL
    assert {"torch", "timm"} <= set(hubconf.dependencies)

"""safetensors and timm exports of tiny random networks: what they hold, and that they load back (into `distill`
strictly, into timm through its own pretrained-weights path) with the same outputs."""

import json

import pytest
import timm
import torch
from safetensors import safe_open

from distill.errors import InputError
from distill.eval.loading import load_backbone, load_network
from distill.export.weights import Exportable, load_exportable, write_safetensors, write_timm
from distill.models import create_backbone, read_checkpoint
from distill.models.hf_layout import own_overrides


ATOL = 1e-5
SMALL = dict(embed_dim=64, num_heads=4, depth=2)


def _randomize(model):
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma"))
                        else 0.1 * noise)
    return model.eval()


def _exportable(name, overrides, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)):
    ours = _randomize(create_backbone(name, **overrides))
    return Exportable(ours, name, own_overrides(name, ours.config), list(mean), list(std),
                      tuple(ours.config["img_size"]), bool(ours.num_classes), "test")


def _close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=atol, rtol=0), (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("name,overrides", [
    ("dinov2_vits14_reg", dict(SMALL, img_size=56)),
    ("deit_tiny_distilled_patch16_224", dict(SMALL, img_size=32, num_classes=7)),
])
def test_safetensors_holds_the_official_layout_and_rebuilds_the_network(tmp_path, name, overrides):
    source = _randomize(create_backbone(name, **overrides))
    weights = tmp_path / "model.pth"
    torch.save({"model": source.state_dict()}, weights)  # an official-layout file of a non-default size
    item = load_exportable(str(weights), name, overrides)
    assert item.classifier == ("num_classes" in overrides)
    path = write_safetensors(item, tmp_path / "out.safetensors")

    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    assert header["architecture"] == name and header["exporter"] == "distill"
    assert json.loads(header["overrides"]) == own_overrides(name, source.config)
    assert json.loads(header["image_size"]) == list(source.config["img_size"])
    assert json.loads(header["mean"]) == [0.485, 0.456, 0.406]

    state = read_checkpoint(path)
    assert state.keys() == source.state_dict().keys()  # this package's names are the official ones
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())
    model, setup, classifies = load_network(str(path))  # no name given: the header names it
    assert setup.backbone == name and classifies == item.classifier
    x = torch.randn(2, 3, *source.config["img_size"])
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
        if not classifies:
            backbone, _ = load_backbone(str(path))
            assert torch.equal(backbone(x), source(x))


def test_safetensors_in_float16_and_at_another_size(tmp_path):
    source = _randomize(create_backbone("dino_vits16", **SMALL, img_size=32))
    weights = tmp_path / "teacher_backbone.pth"
    torch.save(source.state_dict(), weights)
    item = load_exportable(str(weights), "dino_vits16", dict(SMALL, img_size=32), image_size=(48, 64))
    path = write_safetensors(item, tmp_path / "half.safetensors", fp16=True)
    assert {v.dtype for v in read_checkpoint(path).values()} == {torch.float16}
    model, setup = load_backbone(str(path))
    assert model.config["img_size"] == (48, 64) and setup.image_size == 48
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():  # the position embedding was resized once, at export, as on the fly
        _close(model(x), source(x), atol=5e-3)  # float16 weights


# ---------------------------------------------------------------------------------------------- timm

TIMM_CASES = [  # registry name, overrides, timm name
    ("dino_vits16", dict(depth=2), "vit_small_patch16_224.dino"),
    ("deit_tiny_distilled_patch16_224", dict(depth=2, num_classes=7), "deit_tiny_distilled_patch16_224"),
    ("deit_tiny_patch16_224", dict(depth=2), "deit_tiny_patch16_224"),
    ("dinov2_vits14", dict(depth=2, img_size=224), "vit_small_patch14_dinov2"),
    ("dinov2_vits14_reg", dict(depth=2, img_size=224), "vit_small_patch14_reg4_dinov2"),
    ("dinov2_vitg14", dict(SMALL, img_size=70), "vit_giant_patch14_dinov2"),  # SwiGLU, shrunk
    ("vit_small", dict(depth=2, patch_size=8, img_size=32), "vit_small_patch16_224"),  # generic, another patch
]


@pytest.mark.parametrize("name,overrides,timm_name", TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_timm_round_trip(tmp_path, name, overrides, timm_name):
    item = _exportable(name, overrides)
    ours = item.model
    export = write_timm(item, tmp_path / "timm.safetensors")
    sidecar = json.loads((tmp_path / "timm.safetensors.json").read_text())
    assert export.model_name == sidecar["model_name"] == timm_name
    cfg = sidecar["pretrained_cfg"]
    side = ours.config["img_size"][0]
    assert cfg["mean"] == [0.4, 0.5, 0.6] and cfg["input_size"] == [3, side, side]
    assert cfg["num_classes"] == ours.num_classes and cfg["file"] == str((tmp_path / "timm.safetensors").resolve())

    # timm's own pretrained-weights path, strict: the sidecar's model kwargs and pretrained config
    theirs = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=cfg,
                               **sidecar["model_kwargs"]).eval()
    assert list(theirs.pretrained_cfg["mean"]) == cfg["mean"] and theirs.num_classes == ours.num_classes
    # the usage line of the report, as printed: the file alone, and the sizes (and the classes where timm's
    # default differs, as for its plain ViTs' 1000)
    assert eval(export.usage(), {"timm": timm}).num_classes == ours.num_classes
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        _close(theirs(x), ours(x))
        tokens = theirs.forward_features(x)
        features = ours.forward_features(x)
    _close(tokens[:, 0], features["x_norm_clstoken"])
    _close(tokens[:, ours.num_prefix_tokens:], features["x_norm_patchtokens"])

    # and back into ours, strictly
    back = create_backbone(name, **overrides, pretrained=str(tmp_path / "timm.safetensors")).eval()
    with torch.no_grad():
        _close(back(x), ours(x))
    mine, again = ours.state_dict(), back.state_dict()
    differ = {k for k in mine if not torch.equal(mine[k], again[k])}
    # timm's register models add no position embedding to the class token: it is folded into the class token;
    # timm holds no mask token (it only serves masked training)
    expected = {"cls_token", "pos_embed"} if "reg" in timm_name else set()
    assert differ - {"mask_token"} == expected


def test_timm_refuses_what_it_does_not_carry(tmp_path):
    generic = _exportable("vit_small", dict(SMALL, img_size=32, num_register_tokens=2))
    with pytest.raises(InputError, match=r"timm carries no vit_small: --to timm exports DINO's ViTs .* DeiT .* DINOv2"):
        write_timm(generic, tmp_path / "x.safetensors")
    eps = _exportable("dino_vits16", dict(SMALL, img_size=32, norm_eps=1e-12))
    with pytest.raises(InputError, match="--set norm_eps=1.0e-6"):
        write_timm(eps, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []

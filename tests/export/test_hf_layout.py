"""Hugging Face Transformers' layout both ways, checked against Transformers itself on tiny random models.

ours -> `distill export --to hf` folder -> Transformers' from_pretrained gives our tokens and logits; folders and
single files that Transformers' save_pretrained wrote load into ours (strictly, after conversion) and give
Transformers' outputs. All comparisons are to 1e-5 in float32 (the largest difference seen is below 1e-6, from
SwiGLU's packed vs split input matrices); at the native size, and for folders that Transformers wrote also at
another size, since the loader carries Transformers' way of resizing position embeddings.
"""

import json

import pytest
import torch
import transformers

from distill.errors import InputError
from distill.eval.loading import load_backbone, load_network
from distill.export.weights import Exportable, write_hf
from distill.models import create_backbone, get_spec
from distill.models.hf_layout import hf_class_for, own_overrides

ATOL = 1e-5
SMALL = dict(embed_dim=64, num_heads=4, depth=2)
LAYERS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def _randomize(model):
    """Every parameter random and of weight (LayerScale, biases and tokens start at zero or near it)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if name.endswith(("norm1.weight", "norm2.weight", "norm.weight",
                                                          "layernorm.weight", "layernorm_before.weight",
                                                          "layernorm_after.weight", "lambda1", "gamma"))
                        else 0.1 * noise)
    return model.eval()


def _close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=atol, rtol=0), (a - b).abs().max().item()


def _tokens(ours, x):
    """Our normalised tokens in Transformers' order: class, distillation, registers, patches."""
    f = ours.forward_features(x)
    parts = [f["x_norm_clstoken"][:, None]]
    if "x_norm_disttoken" in f:
        parts.append(f["x_norm_disttoken"][:, None])
    return torch.cat(parts + [f["x_norm_regtokens"], f["x_norm_patchtokens"]], dim=1)


def _exportable(name, overrides):
    ours = _randomize(create_backbone(name, **overrides))
    size = tuple(ours.config["img_size"])
    return Exportable(ours, name, own_overrides(name, ours.config), [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], size,
                      bool(ours.num_classes), "test")


CASES = [  # registry name, overrides, Transformers class, image side
    ("dinov2_vits14_reg", dict(SMALL, img_size=56), "Dinov2WithRegistersModel", 56),
    ("dinov2_vitg14", dict(SMALL, img_size=56), "Dinov2Model", 56),  # SwiGLU
    ("dino_vits16", dict(SMALL, img_size=32), "ViTModel", 32),
    ("deit_tiny_distilled_patch16_224", dict(SMALL, img_size=32, num_classes=5),
     "DeiTForImageClassificationWithTeacher", 32),
    ("deit_tiny_patch16_224", dict(SMALL, img_size=32, num_classes=5), "ViTForImageClassification", 32),
    ("deit_tiny_distilled_patch16_224", dict(SMALL, img_size=32, num_classes=0), "DeiTModel", 32),
]


@pytest.mark.parametrize("name,overrides,hf_class,side", CASES, ids=[c[2] for c in CASES])
def test_ours_to_transformers_and_back(tmp_path, name, overrides, hf_class, side):
    item = _exportable(name, overrides)
    export = write_hf(item, tmp_path / "hf")
    assert export.hf_class == hf_class and export.with_transformers
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert files == ["config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [hf_class] and config["layer_norm_eps"] == 1e-6
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.4, 0.5, 0.6] and processor["size"] == {"height": side, "width": side}

    kwargs = {"add_pooling_layer": False} if hf_class in ("ViTModel", "DeiTModel") else {}
    theirs = getattr(transformers, hf_class).from_pretrained(tmp_path / "hf", **kwargs).eval()
    x = torch.randn(2, 3, side, side)
    ours = item.model
    with torch.no_grad():
        out = theirs(pixel_values=x)
        if item.classifier:
            _close(out.logits, ours(x))  # DeiT with teacher: the mean of both heads, as ours in eval mode
        else:
            _close(out.last_hidden_state, _tokens(ours, x))
            if hf_class.startswith("Dinov2"):
                _close(out.pooler_output, ours(x))  # DINOv2's pooler is the normalised class token
        if not item.classifier:  # AutoModel picks the same class (ViT / DeiT add a fresh pooler, unused here)
            auto = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
            _close(auto(pixel_values=x).last_hidden_state, _tokens(ours, x))

    model, setup, classifies = load_network(str(tmp_path / "hf"))  # back: the registry name from config.json
    assert setup.backbone == name and classifies == item.classifier
    assert setup.mean == [0.4, 0.5, 0.6]
    back, expected = model.state_dict(), ours.state_dict()
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)


def _hf_model(kind, eps=1e-6):
    """A Transformers model of random weights: (model, registry name, overrides, image side)."""
    if kind == "dinov2_registers":
        config = transformers.Dinov2WithRegistersConfig(**LAYERS, image_size=56, patch_size=14, num_register_tokens=4)
        return transformers.Dinov2WithRegistersModel(config), "dinov2_vits14_reg", 56
    if kind == "dinov2_swiglu":
        config = transformers.Dinov2Config(**LAYERS, image_size=56, patch_size=14, use_swiglu_ffn=True)
        return transformers.Dinov2Model(config), "dinov2_vitg14", 56
    if kind == "dino":
        config = transformers.ViTConfig(**LAYERS, intermediate_size=256, image_size=32, patch_size=16,
                                        layer_norm_eps=eps)
        return transformers.ViTModel(config, add_pooling_layer=False), "dino_vits16", 32
    config = transformers.DeiTConfig(**LAYERS, intermediate_size=256, image_size=32, patch_size=16, num_labels=5,
                                     layer_norm_eps=eps)
    return transformers.DeiTForImageClassificationWithTeacher(config), "deit_tiny_distilled_patch16_224", 32


def _their_outputs(model, x, **kwargs):
    out = model(pixel_values=x, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _our_outputs(ours, x):
    return ours(x) if ours.num_classes else _tokens(ours, x)


@pytest.mark.parametrize("kind", ["dinov2_registers", "dinov2_swiglu", "dino", "deit_with_teacher"])
def test_transformers_files_load_into_ours(tmp_path, kind):
    theirs, name, side = _hf_model(kind)
    _randomize(theirs)
    theirs.save_pretrained(tmp_path)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        expected = _their_outputs(theirs, x)

        # the folder: config.json names the architecture and its sizes
        ours, setup = load_backbone(str(tmp_path))
        assert get_spec(setup.backbone).family == get_spec(name).family  # sizes are overrides of the closest name
        assert "Transformers layout" in setup.source
        _close(_our_outputs(ours, x), expected)

        # the single file: the registry name and sizes given
        overrides = dict(SMALL, img_size=side)
        if kind == "deit_with_teacher":
            overrides["num_classes"] = 5
        single, _ = load_backbone(str(tmp_path / "model.safetensors"), name, overrides)
        _close(_our_outputs(single, x), expected)


@pytest.mark.parametrize("kind", ["dinov2_registers", "dino"])
def test_transformers_folder_at_another_size_and_default_epsilon(tmp_path, kind):
    """Transformers' ViT keeps its default layer-norm epsilon (1e-12) and its resizing of position embeddings
    (exact grid, bicubic; antialiased for DINOv2 with registers): the loader carries both from the folder."""
    theirs, name, side = _hf_model(kind, eps=1e-12)
    _randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours, _ = load_backbone(str(tmp_path))
    if kind == "dino":
        assert ours.config["norm_eps"] == 1e-12
    x = torch.randn(2, 3, 2 * side, 2 * side - (14 if kind.startswith("dinov2") else 16))
    kwargs = {} if kind.startswith("dinov2") else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        _close(_our_outputs(ours, x), _their_outputs(theirs, x, **kwargs))


def test_folder_without_transformers_installed_has_the_same_config(tmp_path, monkeypatch):
    item = _exportable("dinov2_vits14_reg", dict(SMALL, img_size=56))
    with_library = write_hf(item, tmp_path / "with")
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers -> ImportError
    by_hand = write_hf(item, tmp_path / "by_hand")
    monkeypatch.undo()
    assert with_library.with_transformers and not by_hand.with_transformers
    written = json.loads((tmp_path / "with" / "config.json").read_text())
    hand = json.loads((tmp_path / "by_hand" / "config.json").read_text())
    assert {k: v for k, v in hand.items() if k in written} == {k: v for k, v in written.items() if k in hand}
    theirs = transformers.AutoModel.from_pretrained(tmp_path / "by_hand").eval()
    assert type(theirs).__name__ == "Dinov2WithRegistersModel"
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        _close(theirs(pixel_values=x).last_hidden_state, _tokens(item.model, x))


def test_networks_transformers_cannot_hold_are_refused():
    with torch.device("meta"):
        distilled_dinov2 = create_backbone("dinov2_vits14_reg", distilled=True).config
        dinov2_classifier = create_backbone("dinov2_vits14", num_classes=10).config
    with pytest.raises(InputError, match="distillation token and LayerScale"):
        hf_class_for(distilled_dinov2)
    with pytest.raises(InputError, match="--no-head"):
        hf_class_for(dinov2_classifier)

"""`distill export` end to end through distill.cli.main: a run's backbone and a distilled DeiT classifier to each
format, ONNX handed to distill.export.onnx, and bad input refused in one line with status 2, nothing written."""

import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import timm
import torch
import transformers

from distill.cli import main
from distill.eval.loading import load_backbone, load_network
from distill.models import create_backbone
from distill.models.checkpoint import TRAINING_FORMAT

DINO = dict(depth=2, embed_dim=64, num_heads=4, img_size=32)
DEIT = dict(depth=2, embed_dim=64, num_heads=4, img_size=32)
VIEW = {"size": 32, "mean": [0.3, 0.4, 0.5], "std": [0.2, 0.2, 0.2], "resize_ratio": 1.0}


def _randomize(model):
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _run(path: Path, name, overrides, network, prefix, extra=None):
    """A checkpoint as `distill train` writes it: the objective's weights, the evaluated network, view, config."""
    weights = {f"{prefix}{k}": v for k, v in network.state_dict().items()}
    weights.update(extra or {})
    torch.save({"format": TRAINING_FORMAT, "objective": weights, "eval_network": prefix, "eval_view": VIEW,
                "optimizer": {}, "step": 4, "config": {"model": {"backbone": name, "overrides": overrides}}}, path)
    return path


@pytest.fixture
def dino_run(tmp_path):
    teacher = _randomize(create_backbone("dino_vits16", **DINO))
    heads = {"teacher.head.mlp.0.weight": torch.randn(8, 64), "student.head.mlp.0.weight": torch.randn(8, 64)}
    return _run(tmp_path / "dino.pth", "dino_vits16", DINO, teacher, "teacher.backbone.", heads), teacher


@pytest.fixture
def deit_run(tmp_path):
    student = _randomize(create_backbone("deit_tiny_distilled_patch16_224", **DEIT, num_classes=10))
    return _run(tmp_path / "deit.pth", "deit_tiny_distilled_patch16_224", DEIT, student, "student."), student


def _export(capsys, *argv):
    capsys.readouterr()  # what came before (Transformers' progress bars) is not the command's
    code = main(["export", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_backbone_of_a_run_to_safetensors_timm_and_hf(tmp_path, capsys, dino_run):
    run, teacher = dino_run
    code, out, _ = _export(capsys, run, "--to", "safetensors", "--output", tmp_path / "x.safetensors")
    assert code == 0
    assert out.strip() == (f"{tmp_path / 'x.safetensors'}: safetensors (float32), dino_vits16 backbone "
                           "(depth=2, embed_dim=64, img_size=[32, 32], num_heads=4)")
    model, setup = load_backbone(str(tmp_path / "x.safetensors"))
    assert setup.mean == VIEW["mean"] and setup.image_size == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), teacher(x))

    code, out, _ = _export(capsys, run, "--to", "timm", "--output", tmp_path / "t.safetensors")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and "timm vit_small_patch16_224.dino" in lines[0]
    assert "timm.create_model('vit_small_patch16_224.dino', pretrained=True" in lines[1]
    assert json.loads((tmp_path / "t.safetensors.json").read_text())["model_kwargs"]["depth"] == 2

    code, out, _ = _export(capsys, run, "--to", "hf", "--output", tmp_path / "hf")
    assert code == 0 and out.startswith(f"{tmp_path / 'hf'}: Transformers ViTModel (float32), dino_vits16 backbone")
    back, _ = load_backbone(str(tmp_path / "hf"))
    with torch.no_grad():
        assert torch.equal(back(x), teacher(x))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging leftovers


def test_distilled_deit_classifier_of_a_run(tmp_path, capsys, deit_run):
    run, student = deit_run
    x = torch.randn(2, 3, 32, 32)
    code, out, _ = _export(capsys, run, "--to", "safetensors", "--output", tmp_path / "deit.safetensors")
    assert code == 0 and "deit_tiny_distilled_patch16_224 distilled classifier (" in out and "num_classes=10" in out
    model, setup, classifies = load_network(str(tmp_path / "deit.safetensors"))
    assert classifies and model.num_classes == 10
    with torch.no_grad():
        assert torch.equal(model(x), student(x))  # the mean of the two heads

    code, out, _ = _export(capsys, run, "--to", "hf", "--output", tmp_path / "hf")
    assert code == 0 and "Transformers DeiTForImageClassificationWithTeacher" in out
    theirs = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "DeiTForImageClassificationWithTeacher"
    with torch.no_grad():
        assert torch.allclose(theirs(pixel_values=x).logits, student(x), atol=1e-5, rtol=0)

    code, out, _ = _export(capsys, run, "--to", "safetensors", "--no-head", "--output", tmp_path / "b.safetensors")
    assert code == 0 and "deit_tiny_distilled_patch16_224 backbone (" in out and "num_classes=0" in out
    backbone, _ = load_backbone(str(tmp_path / "b.safetensors"))
    with torch.no_grad():
        assert torch.equal(backbone(x), student.forward_features(x)["x_norm_clstoken"])


# ---------------------------------------------------------------------------------------------- ONNX


@dataclass
class _Report:
    path: str
    outputs: list = field(default_factory=lambda: ["embedding"])
    max_deviation: float = 3e-6
    checked_sizes: list = field(default_factory=lambda: [(32, 32), (48, 64)])
    fp16: bool = False


def test_onnx_is_handed_to_export_onnx(tmp_path, capsys, monkeypatch, dino_run):
    run, _ = dino_run
    calls = []

    def fake_export_onnx(model, output, image_size, in_chans, fp16, check):
        calls.append(dict(image_size=image_size, in_chans=in_chans, fp16=fp16, check=check, training=model.training))
        Path(output).write_bytes(b"graph")
        Path(f"{output}.data").write_bytes(b"weights")  # external data, named after the graph
        return _Report(str(output), fp16=fp16)

    monkeypatch.setitem(sys.modules, "distill.export.onnx", types.SimpleNamespace(export_onnx=fake_export_onnx))
    output = tmp_path / "out" / "model.onnx"
    code, out, _ = _export(capsys, run, "--to", "onnx", "--output", output, "--fp16", "--image-size", "48", "64")
    assert code == 0
    assert calls == [dict(image_size=(48, 64), in_chans=3, fp16=True, check=True, training=False)]
    assert out.strip().endswith("outputs embedding; max deviation from PyTorch 3.00e-06 at 32x32, 48x64")
    assert out.startswith(f"{output}: onnx (float16), dino_vits16 backbone (")
    assert sorted(p.name for p in output.parent.iterdir()) == ["model.onnx", "model.onnx.data"]

    def failing_export_onnx(model, output, **kwargs):
        Path(output).write_bytes(b"half a graph")
        raise RuntimeError("exporter crashed")

    monkeypatch.setitem(sys.modules, "distill.export.onnx", types.SimpleNamespace(export_onnx=failing_export_onnx))
    with pytest.raises(RuntimeError, match="exporter crashed"):
        main(["export", str(run), "--to", "onnx", "--output", str(tmp_path / "failed.onnx")])
    assert not (tmp_path / "failed.onnx").exists() and not list(tmp_path.glob(".*staging"))


def test_real_onnx_export_of_a_tiny_run(tmp_path, capsys, dino_run):
    run, _ = dino_run
    code, out, err = _export(capsys, run, "--to", "onnx", "--output", tmp_path / "m.onnx")
    assert code == 0, err
    assert (tmp_path / "m.onnx").is_file() and "max deviation from PyTorch" in out


# ---------------------------------------------------------------------------------------------- refusals


def _one_line_refusal(capsys, tmp_path, argv, message):
    code, out, err = _export(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("distill export: error: "), err
    assert message in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("kind", ["text", "list", "timm_lacks_it"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, kind):
    output = tmp_path / "out" / "x.safetensors"
    if kind == "text":
        source = tmp_path / "notes.txt"
        source.write_text("not a model\n" * 20)
        argv, message = [source, "--to", "safetensors"], "not a PyTorch checkpoint"
    elif kind == "list":
        source = tmp_path / "list.pth"
        torch.save([torch.zeros(2)], source)
        argv, message = [source, "--to", "safetensors"], "the file holds a list, not a state dict"
    else:
        source = tmp_path / "vit.pth"
        torch.save(create_backbone("vit_small", depth=1, num_register_tokens=2).state_dict(), source)
        argv, message = [source, "--backbone", "vit_small", "--set", "depth=1", "num_register_tokens=2", "--to",
                         "timm"], \
            "timm carries no vit_small: --to timm exports DINO's ViTs"
    _one_line_refusal(capsys, tmp_path, [*argv, "--output", output], message)
    assert not output.parent.exists() or list(output.parent.iterdir()) == []


def test_unknown_target_is_one_argparse_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "x.pth"), "--to", "xyz", "--output", str(tmp_path / "y")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith("distill export: error: argument --to: invalid choice: 'xyz'") and "safetensors" in err[0]


def test_existing_output_refused_unless_force(tmp_path, capsys, dino_run):
    run, teacher = dino_run
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"keep me")
    _one_line_refusal(capsys, tmp_path, [run, "--to", "safetensors", "--output", target],
                      "exists: choose another --output, or pass --force to replace it")
    assert target.read_bytes() == b"keep me"
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    _one_line_refusal(capsys, tmp_path, [run, "--to", "hf", "--output", folder], "pass --force")
    assert [p.name for p in folder.iterdir()] == ["mine.txt"]

    assert _export(capsys, run, "--to", "safetensors", "--output", target, "--force")[0] == 0
    assert _export(capsys, run, "--to", "hf", "--output", folder, "--force")[0] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    model, _ = load_backbone(str(target))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), teacher(x))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_transformers_folder_to_timm_carries_or_replaces_its_epsilon(tmp_path, capsys):
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                                    image_size=32, patch_size=16)  # Transformers' default epsilon, 1e-12
    _randomize(transformers.ViTModel(config, add_pooling_layer=False)).save_pretrained(tmp_path / "hf")
    output = tmp_path / "t.safetensors"
    _one_line_refusal(capsys, tmp_path, [tmp_path / "hf", "--to", "timm", "--output", output],
                      "--set norm_eps=1.0e-6")
    assert not output.exists()
    code, out, _ = _export(capsys, tmp_path / "hf", "--to", "timm", "--set", "norm_eps=1.0e-6", "--output", output)
    assert code == 0 and "timm vit_base_patch16_224.dino" in out
    sidecar = json.loads((tmp_path / "t.safetensors.json").read_text())
    theirs = timm.create_model(sidecar["model_name"], pretrained=True, pretrained_cfg_overlay=sidecar["pretrained_cfg"],
                               **sidecar["model_kwargs"]).eval()
    ours, _ = load_backbone(str(tmp_path / "hf"), overrides={"norm_eps": 1e-6})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(theirs(x), ours(x), atol=1e-5, rtol=0)

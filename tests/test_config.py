from dataclasses import dataclass, field
from typing import List

import pytest

from distill.config import load_config, save_config
from distill.errors import InputError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class Recipe:
    name: str = "demo"
    epochs: int = 10
    optim: Optim = field(default_factory=Optim)

    def validate(self):
        if self.epochs < 1:
            raise InputError(f"epochs must be >= 1, got {self.epochs}")


def test_defaults_file_then_command_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("epochs: 20\noptim:\n  lr: 0.5\n")
    config = load_config(Recipe, path, ["optim.lr=0.25", "name=x"])
    assert (config.epochs, config.optim.lr, config.name, config.optim.betas) == (20, 0.25, "x", [0.9, 0.999])
    save_config(config, tmp_path / "out" / "config.yaml")
    assert load_config(Recipe, tmp_path / "out" / "config.yaml") == config


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path):
    with pytest.raises(InputError, match=r"unknown config key 'optim.learning_rate'.*allowed keys here: lr, betas"):
        load_config(Recipe, None, ["optim.learning_rate=1"])
    path = tmp_path / "r.yaml"
    path.write_text("epoch: 3\n")
    with pytest.raises(InputError, match=rf"unknown config key 'epoch' in {path} \(did you mean 'epochs'\?\); "
                                         "allowed keys here: name, epochs, optim"):
        load_config(Recipe, path)


def test_wrong_type_impossible_value_and_malformed_input(tmp_path):
    with pytest.raises(InputError, match="config key 'epochs'.*could not be converted"):
        load_config(Recipe, None, ["epochs=many"])
    with pytest.raises(InputError, match="epochs must be >= 1"):
        load_config(Recipe, None, ["epochs=0"])
    with pytest.raises(InputError, match="key=value"):
        load_config(Recipe, None, ["epochs"])
    with pytest.raises(InputError, match="does not exist"):
        load_config(Recipe, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("epochs: [1,\n")
    with pytest.raises(InputError, match="cannot parse"):
        load_config(Recipe, tmp_path / "bad.yaml")


def test_every_training_recipe_validates():
    import glob

    from distill.engine.train_config import load_train_config

    recipes = sorted(p for p in glob.glob("configs/*/*.yaml") if not p.endswith("baseline.yaml"))
    assert len(recipes) >= 30
    names = {load_train_config(path).objective.name for path in recipes}
    assert names == {"dino", "deit", "dinov2"}


def test_a_config_mistake_is_reported_before_pytorch_loads(tmp_path):
    """`distill train` checks the recipe, the overrides and the data paths with plain dataclasses first."""
    import subprocess
    import sys

    script = ("import sys\nfrom distill.cli import main\n"
              "codes = [main(['train', 'configs/demo/dino_fashion_mnist.yaml', 'objective.out_dimm=5']),\n"
              f"         main(['train', 'data.dataset.kind=folder', 'data.dataset.path={tmp_path / 'nowhere'}'])]\n"
              "print(codes, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[2, 2] False", done.stdout + done.stderr
    assert "did you mean 'out_dim'" in done.stderr and "data.dataset.path" in done.stderr


def test_a_recipe_switched_to_another_objective_says_where_its_settings_come_from(capsys):
    from distill.cli import main

    assert main(["train", "configs/demo/dino_fashion_mnist.yaml", "objective.name=dinov2"]) == 2
    err = capsys.readouterr().err
    assert "the recipe was written for dino, and objective.name=dinov2 keeps its objective section" in err

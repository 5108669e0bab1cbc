"""The import layering of .importlinter holds, and breaking it fails with the offending import named."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint(folder: Path) -> subprocess.CompletedProcess:
    """import-linter with the repository's contracts, on the packages under `folder`."""
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(ROOT / ".importlinter")], cwd=folder,
                          env={"PYTHONPATH": str(folder), "PATH": str(LINT_IMPORTS.parent)}, capture_output=True,
                          text=True, timeout=120)


def test_the_packages_keep_every_contract():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture
def copy(tmp_path):
    for package in ("distill", "data_curation"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _add_import(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


@pytest.mark.parametrize("module, line, named", [
    ("distill/losses/dino.py", "from distill.engine import trainer", "distill.losses.dino -> distill.engine.trainer"),
    ("distill/schedules.py", "import distill.models", "distill.schedules -> distill.models"),
    ("distill/models/vit.py", "from data_curation import embeddings", "distill.models.vit -> data_curation.embeddings"),
    ("data_curation/dedup.py", "from distill.engine import trainer", "data_curation.dedup -> distill.engine.trainer"),
    ("distill/models/registry.py", "from distill.models import factory", ".registry -> .factory"),
])
def test_an_import_against_the_layering_fails_and_is_named(copy, module, line, named):
    _add_import(copy / module, line)
    result = lint(copy)
    assert result.returncode != 0
    assert named in result.stdout, result.stdout

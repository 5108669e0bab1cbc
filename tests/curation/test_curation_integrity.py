"""What a store and the lists of `distill-curate` promise: rows and their names committed together (a crash between
the two writes changes nothing), a resume only with the settings that made the store, names carried byte for byte
(non-UTF-8, spaces, commas) into selections the trainer reads back, and damaged or mismatched files refused in one
line with status 2."""

import hashlib
import json
import logging
import os

import numpy as np
import pytest

from data_curation.cli import main
from data_curation.embeddings import EmbeddingStore, select
from distill.data.configs import DatasetConfig
from distill.data.datasets import build_image_source
from distill.data.filelists import read_paths, write_file_list


def _images(folder, names, size=32, seed=0):
    from PIL import Image

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)).save(
            os.path.join(os.fspath(folder), name), format="PNG")
    return folder


def _trainer_paths(listing):
    """The paths `distill train data.dataset.kind=filelist data.dataset.path=listing` trains on."""
    return build_image_source(DatasetConfig(kind="filelist", path=str(listing))).paths


def test_a_crash_between_the_shard_and_the_manifest_leaves_rows_and_names_together(tmp_path, monkeypatch):
    names = [f"img_{i:03d}.png" for i in range(10)]
    write_file_list(tmp_path / "names.txt", names)
    vectors = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    np.save(tmp_path / "v.npy", vectors)
    out = tmp_path / "emb"
    real, failed = EmbeddingStore._write_manifest, []

    def killed_once(self, manifest):
        if len(manifest["shards"]) == 3 and not failed:  # shard 2 and its names are on disk, the commit is not
            failed.append(1)
            raise KeyboardInterrupt
        return real(self, manifest)

    monkeypatch.setattr(EmbeddingStore, "_write_manifest", killed_once)
    command = ["embed", "--data", str(tmp_path / "names.txt"), "--npy", str(tmp_path / "v.npy"), "--output", str(out),
               "--shard-size", "3"]
    with pytest.raises(KeyboardInterrupt):
        main(command)
    assert len(EmbeddingStore(out)) == 6 and len(EmbeddingStore(out).paths()) == 6
    assert main(command) == 0  # resumes from what the manifest committed
    store = EmbeddingStore(out)
    assert [os.path.basename(p) for p in store.paths()] == names
    expected = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert np.abs(store.load() - expected).max() < 1e-2  # row i is still the vector of name i
    _, usable = select(out, 1.0)
    assert len(usable) == 10  # no row dropped as a "duplicate path"


def _checkpoint(path, seed):
    import torch

    from distill.models import create_backbone

    torch.manual_seed(seed)
    torch.save(create_backbone("vit_tiny").state_dict(), path)
    return str(path)


def test_a_resume_with_another_model_data_or_view_is_refused_and_overwrite_starts_again(tmp_path, capsys):
    images = _images(tmp_path / "images", [f"img{i}.png" for i in range(4)])
    others = _images(tmp_path / "others", [f"other{i}.png" for i in range(4)], seed=1)
    a, b = _checkpoint(tmp_path / "a.pth", 1), _checkpoint(tmp_path / "b.pth", 2)
    out = tmp_path / "emb"
    common = ["--backbone", "vit_tiny", "--shard-size", "2", "--batch-size", "4", "--output", str(out)]
    assert main(["embed", "--data", str(images), "--checkpoint", a] + common) == 0
    first = EmbeddingStore(out).load()
    (out / "notes.txt").write_text("mine")
    (out / "paths.txt").write_text("my file list\n")  # the first format's name, beside a store of a later one

    assert main(["embed", "--data", str(images), "--checkpoint", b] + common) == 2
    _one_line(capsys, "model", "b.pth", "--overwrite")
    assert main(["embed", "--data", str(others), "--checkpoint", a] + common) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["embed", "--data", str(images), "--checkpoint", a, "--flip-average"] + common) == 2
    assert "--flip-average" in capsys.readouterr().err
    store = EmbeddingStore(out)
    assert len(store) == 4 and (store.load() == first).all()  # the refused runs changed nothing

    assert main(["embed", "--data", str(images), "--checkpoint", a] + common) == 0  # the same settings: nothing to do
    _images(images, ["img4.png"], seed=2)
    assert main(["embed", "--data", str(images), "--checkpoint", a] + common) == 2
    _one_line(capsys, "images in --data 4, not 5")
    assert main(["embed", "--data", str(images), "--checkpoint", b, "--overwrite"] + common) == 0
    store = EmbeddingStore(out)
    assert len(store) == 5 and store.source["model"]["sha256"] == hashlib.sha256(open(b, "rb").read()).hexdigest()
    assert not np.allclose(store.load()[:4], first, atol=1e-2)
    assert (out / "notes.txt").read_text() == "mine"  # only the store's own files were removed
    assert (out / "paths.txt").read_text() == "my file list\n"


def test_an_npy_resume_with_another_file_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.normal(size=(4, 8)).astype(np.float32))
    np.save(tmp_path / "b.npy", rng.normal(size=(4, 8)).astype(np.float32))
    out = str(tmp_path / "emb")
    assert main(["embed", "--data", "", "--npy", str(tmp_path / "a.npy"), "--output", out]) == 0
    assert main(["embed", "--data", "", "--npy", str(tmp_path / "b.npy"), "--output", out]) == 2
    assert "--npy file" in capsys.readouterr().err
    assert main(["embed", "--data", "", "--npy", str(tmp_path / "b.npy"), "--output", out, "--overwrite"]) == 0
    b = np.load(tmp_path / "b.npy")
    assert np.abs(EmbeddingStore(out).load() - b / np.linalg.norm(b, axis=1, keepdims=True)).max() < 1e-2


def test_the_parts_of_a_job_array_made_with_other_settings_are_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.normal(size=(6, 8)).astype(np.float32))
    np.save(tmp_path / "b.npy", rng.normal(size=(6, 8)).astype(np.float32))
    write_file_list(tmp_path / "names.txt", [f"img{i}.png" for i in range(6)])
    out = tmp_path / "emb"

    def part(number, npy, *extra):
        return main(["embed", "--data", str(tmp_path / "names.txt"), "--npy", str(tmp_path / npy), "--output",
                     str(out), "--parts", "2", "--part", str(number), *extra])

    assert part(0, "a.npy") == 0
    assert part(1, "b.npy") == 2 and "part_0000" in capsys.readouterr().err
    assert part(1, "b.npy", "--overwrite") == 0  # written anyway: the folder of parts is refused when read
    assert main(["dedup", "--embeddings", str(out), "--output", str(tmp_path / "dd")]) == 2
    assert "other settings" in capsys.readouterr().err
    assert part(1, "a.npy", "--overwrite") == 0
    store = EmbeddingStore(out)
    assert len(store) == 6 and [os.path.basename(p) for p in store.paths()] == [f"img{i}.png" for i in range(6)]
    assert main(["dedup", "--embeddings", str(out), "--threshold", "1.0", "--output", str(tmp_path / "dd")]) == 0


def test_non_utf8_names_go_byte_for_byte_from_embedding_to_the_trainer(tmp_path):
    folder = tmp_path / "images"
    names = [os.fsdecode(b"caf\xe9 \xff,1.png"), "plain.png", os.fsdecode(b"\x80x.png")]
    _images(folder, names)
    bad = os.fsdecode(b"broken\xfe.png")
    (folder / bad).write_bytes(b"not a png")
    out = tmp_path / "emb"
    assert main(["embed", "--data", str(folder), "--backbone", "vit_tiny", "--output", str(out),
                 "--shard-size", "2"]) == 0
    expected = {os.path.join(str(folder), n) for n in names}
    assert set(EmbeddingStore(out).paths()) == expected
    assert read_paths(out / "unreadable.txt") == [os.path.join(str(folder), bad)]
    assert main(["dedup", "--embeddings", str(out), "--threshold", "1.0", "--output", str(tmp_path / "dd")]) == 0
    assert set(read_paths(tmp_path / "dd" / "kept.txt")) == expected
    assert sorted(_trainer_paths(tmp_path / "dd" / "kept.txt")) == sorted(expected)
    assert all(os.path.isfile(p) for p in expected)


def test_names_with_spaces_and_commas_in_selections_are_read_back_by_the_trainer(tmp_path, monkeypatch):
    names = ["a b.png", "c,d.png", "e f, 2.png", "plain.png"]
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "images", names)
    assert main(["embed", "--data", "images", "--backbone", "vit_tiny", "--output", "emb"]) == 0  # relative paths
    expected = sorted(str(tmp_path / "images" / n) for n in names)
    assert main(["dedup", "--embeddings", "emb", "--threshold", "1.0", "--output", "dd"]) == 0
    assert sorted(_trainer_paths(tmp_path / "dd" / "kept.txt")) == expected
    assert main(["cluster", "--embeddings", "emb", "--keep", "dd/kept.txt", "--levels", "2", "--output", "cl"]) == 0
    assert main(["sample", "--clusters", "cl", "--target", "4", "--output", "curated.txt"]) == 0
    assert sorted(_trainer_paths(tmp_path / "curated.txt")) == expected
    assert main(["retrieve", "--seed", "emb", "--pool", "emb", "--n", "1", "--output", "retrieved.txt"]) == 0
    assert sorted(_trainer_paths(tmp_path / "retrieved.txt")) == expected


def test_embed_reads_a_folder_with_a_link_loop_once(tmp_path):
    folder = _images(tmp_path / "images", ["img0.png", "img1.png", "img2.png"])
    os.symlink(".", folder / "loop")
    os.symlink("img0.png", folder / "same.png")
    assert main(["embed", "--data", str(folder), "--backbone", "vit_tiny", "--output", str(tmp_path / "emb")]) == 0
    paths = EmbeddingStore(tmp_path / "emb").paths()
    assert sorted(os.path.basename(p) for p in paths) == ["img0.png", "img1.png", "img2.png"]


def _npy_store(tmp_path, name, rows, dim, shard=4, seed=0):
    np.save(tmp_path / f"{name}.npy", np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32))
    assert main(["embed", "--data", "", "--npy", str(tmp_path / f"{name}.npy"), "--output", str(tmp_path / name),
                 "--shard-size", str(shard)]) == 0
    return tmp_path / name


def _one_line(capsys, *words):
    """The error is one line, the last one written (progress bars may come before it), naming `words`."""
    error = capsys.readouterr().err
    last = error.rstrip().splitlines()[-1]
    assert error.count("error:") == 1 and last.startswith("distill-curate ") and "error:" in last, error
    assert all(w in last for w in words), last


def test_damaged_or_mismatched_files_are_one_line_and_status_2(tmp_path, capsys, caplog):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object))
    assert main(["embed", "--data", "", "--npy", str(tmp_path / "objects.npy"), "--output", str(tmp_path / "o")]) == 2
    _one_line(capsys, "objects.npy", "object")
    np.save(tmp_path / "nan.npy", np.full((3, 4), np.nan, dtype=np.float32))
    assert main(["embed", "--data", "", "--npy", str(tmp_path / "nan.npy"), "--output", str(tmp_path / "n")]) == 2
    _one_line(capsys, "nan.npy", "NaN")
    assert not (tmp_path / "n").exists()
    some = np.ones((3, 4), dtype=np.float32)
    some[1] = np.nan
    np.save(tmp_path / "some.npy", some)
    with caplog.at_level(logging.WARNING):
        assert main(["embed", "--data", "", "--npy", str(tmp_path / "some.npy"), "--output", str(tmp_path / "s")]) == 0
    assert "1 of 3 rows hold NaN" in caplog.text

    truncated = _npy_store(tmp_path, "truncated", 8, 8)
    shard = truncated / "shard_00001.npy"
    shard.write_bytes(shard.read_bytes()[:150])
    assert main(["dedup", "--embeddings", str(truncated), "--output", str(tmp_path / "dd")]) == 2
    _one_line(capsys, "shard_00001.npy", "--overwrite")

    edited = _npy_store(tmp_path, "edited", 8, 8)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["shards"][0]["rows"] = 3
    (edited / "manifest.json").write_text(json.dumps(manifest))
    assert main(["dedup", "--embeddings", str(edited), "--output", str(tmp_path / "dd")]) == 2
    _one_line(capsys, "shard_00000.npy")
    (edited / "manifest.json").write_text("{not json")
    assert main(["dedup", "--embeddings", str(edited), "--output", str(tmp_path / "dd")]) == 2
    _one_line(capsys, "manifest.json")

    pool, seed = _npy_store(tmp_path, "pool", 8, 8), _npy_store(tmp_path, "seed", 3, 6, seed=1)
    assert main(["cluster", "--embeddings", str(pool), "--levels", "2", "--output", str(tmp_path / "cl")]) == 0
    assert main(["retrieve", "--seed", str(seed), "--clusters", str(tmp_path / "cl"), "--output",
                 str(tmp_path / "r.txt")]) == 2
    _one_line(capsys, "dimension 6", "dimension 8")
    assert main(["retrieve", "--seed", str(seed), "--pool", str(pool), "--output", str(tmp_path / "r.txt")]) == 2
    _one_line(capsys, "dimension")
    assert main(["dedup", "--embeddings", str(pool), "--against", str(seed), "--output", str(tmp_path / "dd")]) == 2
    _one_line(capsys, "dimension")
    write_file_list(tmp_path / "cl" / "paths.txt", ["only.png"])
    assert main(["sample", "--clusters", str(tmp_path / "cl"), "--target", "1", "--output",
                 str(tmp_path / "c.txt")]) == 2
    _one_line(capsys, "level1_assignment.npy", "paths.txt")
    assert not (tmp_path / "r.txt").exists() and not (tmp_path / "c.txt").exists()


def test_a_store_of_the_first_format_is_read_and_not_resumed(tmp_path, capsys):
    """A store written before the paths files: one raw path a line in paths.txt (spaces and commas are part of the
    name), possibly with lines of a shard that was never committed."""
    folder = tmp_path / "old"
    folder.mkdir()
    vectors = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float16)
    np.save(folder / "shard_00000.npy", vectors)
    (folder / "manifest.json").write_text(json.dumps({"dim": 4, "shards": [{"file": "shard_00000.npy", "rows": 3}],
                                                      "complete": True}))
    (folder / "paths.txt").write_text("/data/a b.png\n/data/c,d.png\n/data/e 3\n/data/uncommitted.png\n")
    assert EmbeddingStore(folder).paths() == ["/data/a b.png", "/data/c,d.png", "/data/e 3"]
    assert main(["dedup", "--embeddings", str(folder), "--threshold", "1.0", "--output", str(tmp_path / "dd")]) == 0
    assert read_paths(tmp_path / "dd" / "kept.txt") == ["/data/a b.png", "/data/c,d.png", "/data/e 3"]
    np.save(tmp_path / "v.npy", vectors.astype(np.float32))
    assert main(["embed", "--data", "", "--npy", str(tmp_path / "v.npy"), "--output", str(folder)]) == 2
    _one_line(capsys, "did not record the model and data", "--overwrite")
    assert main(["embed", "--data", "", "--npy", str(tmp_path / "v.npy"), "--output", str(folder), "--overwrite"]) == 0
    assert not (folder / "paths.txt").exists() and EmbeddingStore(folder).paths() == ["0", "1", "2"]


def test_a_clustering_into_a_used_folder_leaves_no_level_of_the_earlier_one(tmp_path, caplog):
    pool = _npy_store(tmp_path, "pool", 12, 8)
    out = tmp_path / "cl"
    assert main(["cluster", "--embeddings", str(pool), "--levels", "4", "2", "--output", str(out)]) == 0
    assert main(["cluster", "--embeddings", str(pool), "--levels", "3", "--output", str(out)]) == 0
    assert sorted(p.name for p in out.glob("level*")) == ["level1_assignment.npy", "level1_centroids.npy"]
    assert main(["sample", "--clusters", str(out), "--target", "3", "--output", str(tmp_path / "s.txt")]) == 0
    assert len(read_paths(tmp_path / "s.txt")) == 3
    write_file_list(tmp_path / "keep.txt", ["0", "1", "elsewhere.png"])
    with caplog.at_level(logging.WARNING):
        assert main(["cluster", "--embeddings", str(pool), "--keep", str(tmp_path / "keep.txt"), "--levels", "1",
                     "--output", str(tmp_path / "kept")]) == 0
    assert "1 of the 3 paths of --keep" in caplog.text

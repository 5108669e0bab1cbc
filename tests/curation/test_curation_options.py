"""`distill-curate` options that cannot mean anything (a batch of 0, k of 0, NaN memory, --n beside --clusters) are
usage errors naming the option, status 2, before anything runs; mistaken paths get a message that says what was
given and what to give; a step's outputs never overwrite its inputs or stand beside another run's."""

import json
import logging

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from data_curation.cli import main
from data_curation.embeddings import EmbeddingStore
from distill.data.filelists import read_paths, write_file_list

from tests.curation.test_curation_integrity import _npy_store, _one_line


@pytest.mark.parametrize("argv, option, words", [
    (["embed", "--data", "fashion_mnist", "--output", "o", "--batch-size", "0"], "--batch-size", "at least 1"),
    (["embed", "--data", "fashion_mnist", "--output", "o", "--workers", "-1"], "--workers", "at least 0"),
    (["embed", "--data", "fashion_mnist", "--output", "o", "--limit", "-3"], "--limit", "at least 0"),
    (["embed", "--data", "fashion_mnist", "--output", "o", "--parts", "0"], "--parts", "at least 1"),
    (["embed", "--data", "fashion_mnist", "--output", "o", "--scales", "1", "0"], "--scales", "above 0"),
    (["dedup", "--embeddings", "e", "--output", "o", "--k", "0"], "--k", "at least 1"),
    (["dedup", "--embeddings", "e", "--output", "o", "--memory-gb", "nan"], "--memory-gb", "finite"),
    (["dedup", "--embeddings", "e", "--output", "o", "--memory-gb", "0"], "--memory-gb", "above 0"),
    (["cluster", "--embeddings", "e", "--output", "o", "--levels", "4", "0"], "--levels", "at least 1"),
    (["cluster", "--embeddings", "e", "--output", "o", "--levels", "4", "--sample-per-centroid", "0"],
     "--sample-per-centroid", "at least 1"),
    (["cluster", "--embeddings", "e", "--output", "o", "--levels", "4", "--iterations", "two"], "--iterations",
     "an integer is needed"),
    (["retrieve", "--seed", "s", "--pool", "p", "--output", "o", "--per-cluster", "-1"], "--per-cluster",
     "at least 0"),
])
def test_meaningless_numbers_are_usage_errors_naming_the_option(argv, option, words, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {option}: " in last and words in last, last


@pytest.mark.parametrize("argv, words", [
    (["retrieve", "--seed", "s", "--pool", "p", "--clusters", "c", "--output", "o"], "not both"),
    (["retrieve", "--seed", "s", "--output", "o"], "one of them"),
    (["retrieve", "--seed", "s", "--clusters", "c", "--n", "3", "--output", "o"], "--n goes with --pool"),
    (["retrieve", "--seed", "s", "--pool", "p", "--per-cluster", "2", "--output", "o"],
     "--per-cluster goes with --clusters"),
])
def test_retrieve_options_of_the_other_mode_are_refused_not_ignored(argv, words, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and words in capsys.readouterr().err


def test_devices_and_gpu_faiss_that_are_not_there_are_one_line(tmp_path, capsys):
    common = ["embed", "--data", "fashion_mnist", "--backbone", "vit_tiny_patch7", "--limit", "4"]
    assert main(common + ["--device", "gpu", "--output", str(tmp_path / "e")]) == 2
    _one_line(capsys, "--device 'gpu' is not a device", "cuda:N")
    if not torch.cuda.is_available():
        assert main(common + ["--device", "cuda", "--output", str(tmp_path / "e")]) == 2
        _one_line(capsys, "sees no CUDA GPU", "--device cpu")
    assert not (tmp_path / "e").exists()
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:  # refused before the store is read
        assert main(["cluster", "--embeddings", str(tmp_path / "nowhere"), "--levels", "2", "--gpu", "--output",
                     str(tmp_path / "cl")]) == 2
        _one_line(capsys, "--gpu", "leave out --gpu")


def test_embed_says_what_a_mistaken_data_path_is(tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "one.jpg")
    np.save(tmp_path / "vectors.npy", np.ones((2, 4), np.float32))
    common = ["embed", "--backbone", "vit_tiny", "--output", str(tmp_path / "e")]
    assert main(common + ["--data", str(tmp_path / "one.jpg")]) == 2
    _one_line(capsys, "--data", "one.jpg is one image", "a folder")
    assert main(common + ["--data", str(tmp_path / "vectors.npy")]) == 2
    _one_line(capsys, "--data", "vectors.npy holds arrays", "--npy")
    assert main(common + ["--data", str(tmp_path / "missing")]) == 2
    _one_line(capsys, "--data", "missing does not exist")
    assert main(["embed", "--data", str(tmp_path), "--npy", str(tmp_path / "vectors.npy"), "--output",
                 str(tmp_path / "e")]) == 2
    _one_line(capsys, "with --npy, --data names the rows", "is not a file")
    assert not (tmp_path / "e").exists()


def test_random_weights_are_announced(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert main(["embed", "--data", "fashion_mnist", "--backbone", "vit_tiny_patch7", "--limit", "2",
                     "--output", str(tmp_path / "e")]) == 0
    assert "no --checkpoint: vit_tiny_patch7 has random weights" in caplog.text


def test_backbone_overrides_make_the_network_and_are_part_of_the_stores_record(tmp_path, capsys):
    common = ["embed", "--data", "fashion_mnist", "--backbone", "vit_tiny_patch7", "--limit", "4"]
    assert main(common + ["--set", "depth=2", "--output", str(tmp_path / "two")]) == 0
    assert main(common + ["--output", str(tmp_path / "full")]) == 0
    two = EmbeddingStore(tmp_path / "two")
    assert two.source["network"] == {"overrides": {"depth": 2}, "checkpoint_key": None}
    assert "network" not in EmbeddingStore(tmp_path / "full").source  # as stores were recorded before --set
    assert not np.allclose(two.load(), EmbeddingStore(tmp_path / "full").load(), atol=1e-2)
    capsys.readouterr()
    assert main(common + ["--set", "depth=3", "--output", str(tmp_path / "two")]) == 2
    _one_line(capsys, "network (--set, --checkpoint-key)", "--overwrite")
    assert main(["retrieve", "--seed", str(tmp_path / "two"), "--pool", str(tmp_path / "full"), "--output",
                 str(tmp_path / "r.txt")]) == 2
    _one_line(capsys, "different models")
    assert main(common + ["--set", "depth", "--output", str(tmp_path / "bad")]) == 2
    _one_line(capsys, "--set takes key=value")


def test_sample_keeps_its_list_apart_from_its_picture(tmp_path, capsys):
    store = _npy_store(tmp_path, "pool", 12, 4)
    assert main(["cluster", "--embeddings", str(store), "--levels", "3", "--output", str(tmp_path / "cl")]) == 0
    assert main(["sample", "--clusters", str(tmp_path / "cl"), "--target", "5", "--output",
                 str(tmp_path / "chosen.png")]) == 2
    _one_line(capsys, "chosen.png", "chosen.txt")
    assert not (tmp_path / "chosen.png").exists()
    assert main(["sample", "--clusters", str(tmp_path / "cl"), "--target", "5", "--output", str(tmp_path)]) == 2
    _one_line(capsys, "is a folder", "selected.txt")
    assert main(["sample", "--clusters", str(tmp_path / "cl"), "--target", "5", "--output",
                 str(tmp_path / "chosen.txt")]) == 0
    assert len(read_paths(tmp_path / "chosen.txt")) == 5 and (tmp_path / "chosen.png").is_file()


def test_keep_lists_that_select_nothing_say_why(tmp_path, capsys):
    store = _npy_store(tmp_path, "pool", 8, 4)
    cluster = ["cluster", "--embeddings", str(store), "--levels", "2", "--output", str(tmp_path / "cl"), "--keep"]
    write_file_list(tmp_path / "empty.txt", [])
    assert main(cluster + [str(tmp_path / "empty.txt")]) == 2
    _one_line(capsys, "--keep list is empty")
    write_file_list(tmp_path / "other.txt", ["/elsewhere/a.png", "/elsewhere/b.png"])
    assert main(cluster + [str(tmp_path / "other.txt")]) == 2
    _one_line(capsys, "none of the 2 paths of --keep", "8 usable embeddings")
    assert main(cluster + [str(tmp_path)]) == 2
    _one_line(capsys, "is a folder", "kept.txt")


def test_dedup_into_a_used_folder_leaves_nothing_of_the_earlier_run(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    vectors[1] = vectors[0] + 1e-3  # one pair of copies
    np.save(tmp_path / "v.npy", vectors)
    assert main(["embed", "--data", "", "--npy", str(tmp_path / "v.npy"), "--output", str(tmp_path / "e")]) == 0
    (tmp_path / "truth.tsv").write_text("0\t1\n")
    out = tmp_path / "dd"
    dedup = ["dedup", "--embeddings", str(tmp_path / "e"), "--output", str(out)]
    assert main(dedup + ["--truth", str(tmp_path / "truth.tsv")]) == 0
    assert (out / "duplicate_groups.png").is_file() and (out / "copy_detection.json").is_file()
    assert main(dedup + ["--threshold", "1.0"]) == 0  # no groups, no truth
    assert json.loads((out / "groups.json").read_text()) == [] and len(read_paths(out / "kept.txt")) == 6
    assert not (out / "duplicate_groups.png").exists() and not (out / "copy_detection.json").exists()


def test_huge_finite_vectors_are_normalised_not_zeroed(tmp_path):
    np.save(tmp_path / "big.npy", np.full((3, 4), 1e30, dtype=np.float32))
    assert main(["embed", "--data", "", "--npy", str(tmp_path / "big.npy"), "--output", str(tmp_path / "e")]) == 0
    assert np.allclose(EmbeddingStore(tmp_path / "e").load(), 0.5, atol=1e-3)


def test_a_resume_onto_a_damaged_shard_is_refused_at_once(tmp_path, capsys):
    store = _npy_store(tmp_path, "pool", 8, 4)
    shard = store / "shard_00001.npy"
    shard.write_bytes(shard.read_bytes()[:140])
    assert main(["embed", "--data", "", "--npy", str(tmp_path / "pool.npy"), "--output", str(store),
                 "--shard-size", "4"]) == 2
    _one_line(capsys, "shard_00001.npy", "--overwrite")
    manifest = json.loads((store / "manifest.json").read_text())
    manifest.update(dim=None, shards=[])
    (store / "manifest.json").write_text(json.dumps(manifest))
    assert main(["dedup", "--embeddings", str(store), "--output", str(tmp_path / "dd")]) == 2
    _one_line(capsys, "lists no shard yet")

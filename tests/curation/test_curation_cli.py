"""`distill-curate` end to end on a slice of Fashion-MNIST with a small random ViT: resumable embedding, then
dedup, cluster, sample and retrieve chained through their files; bad input as one line and status 2."""

import json

import numpy as np

from data_curation.cli import main
from data_curation.embeddings import EmbeddingStore


def test_embed_resumes_and_the_steps_chain(tmp_path, capsys):
    emb = tmp_path / "emb"
    common = ["embed", "--data", "fashion_mnist", "--backbone", "vit_tiny_patch7", "--output", str(emb),
              "--shard-size", "128", "--batch-size", "64"]
    assert main(common + ["--limit", "256"]) == 0
    first = (emb / "shard_00000.npy").stat().st_mtime_ns
    assert main(common + ["--limit", "300"]) == 0  # continues after the two whole shards
    store = EmbeddingStore(emb)
    assert len(store) == 300 and (emb / "shard_00000.npy").stat().st_mtime_ns == first
    vectors = store.load()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-2)
    assert store.paths()[299] == "fashion_mnist/train/299"

    assert main(["dedup", "--embeddings", str(emb), "--threshold", "0.999", "--output", str(tmp_path / "dd")]) == 0
    kept = (tmp_path / "dd" / "kept.txt").read_text().splitlines()
    groups = json.loads((tmp_path / "dd" / "groups.json").read_text())
    assert len(kept) + sum(len(g) - 1 for g in groups) == 300
    assert main(["cluster", "--embeddings", str(emb), "--keep", str(tmp_path / "dd" / "kept.txt"),
                 "--levels", "20", "5", "--output", str(tmp_path / "cl")]) == 0
    assert np.load(tmp_path / "cl" / "level2_assignment.npy").max() < 5
    assert main(["sample", "--clusters", str(tmp_path / "cl"), "--target", "50", "--output",
                 str(tmp_path / "curated.txt")]) == 0
    curated = (tmp_path / "curated.txt").read_text().splitlines()
    assert len(curated) == 50 and set(curated) <= set(kept)
    assert main(["retrieve", "--seed", str(emb), "--pool", str(emb), "--n", "2", "--output",
                 str(tmp_path / "retrieved.txt")]) == 0
    assert len((tmp_path / "retrieved.txt").read_text().splitlines()) == 300  # each image is its own nearest

    code = main(["cluster", "--embeddings", str(emb), "--levels", "5000", "--output", str(tmp_path / "bad")])
    assert code == 2 and "cannot make 5000 clusters" in capsys.readouterr().err
    code = main(["dedup", "--embeddings", str(tmp_path / "nowhere"), "--output", str(tmp_path / "bad")])
    assert code == 2 and "run `distill-curate embed` first" in capsys.readouterr().err


def test_nan_rows_and_repeated_paths_are_reported_and_left_out(tmp_path, capsys):
    store = EmbeddingStore(tmp_path / "emb")
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    x[2] = np.nan
    store.append(x, ["a", "b", "c", "d", "a", "f"])
    assert main(["dedup", "--embeddings", str(tmp_path / "emb"), "--threshold", "0.99",
                 "--output", str(tmp_path / "dd")]) == 0
    err = capsys.readouterr().err
    assert "left out 1 NaN / inf / zero" in err and "appears twice" in err
    assert (tmp_path / "dd" / "kept.txt").read_text().splitlines() == ["a", "b", "d", "f"]

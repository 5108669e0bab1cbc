"""`distill-curate` end to end on a slice of Fashion-MNIST with a small random ViT: resumable embedding, then
dedup, cluster, sample and retrieve chained through their files; bad input as one line and status 2."""

import json

import numpy as np

from data_curation.cli import main
from data_curation.embeddings import EmbeddingStore
from distill.data.filelists import read_paths


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
    kept = read_paths(tmp_path / "dd" / "kept.txt")
    groups = json.loads((tmp_path / "dd" / "groups.json").read_text())
    assert len(kept) + sum(len(g) - 1 for g in groups) == 300
    assert main(["cluster", "--embeddings", str(emb), "--keep", str(tmp_path / "dd" / "kept.txt"),
                 "--levels", "20", "5", "--output", str(tmp_path / "cl")]) == 0
    assert np.load(tmp_path / "cl" / "level2_assignment.npy").max() < 5
    assert main(["sample", "--clusters", str(tmp_path / "cl"), "--target", "50", "--output",
                 str(tmp_path / "curated.txt")]) == 0
    curated = read_paths(tmp_path / "curated.txt")
    assert len(curated) == 50 and set(curated) <= set(kept)
    assert main(["retrieve", "--seed", str(emb), "--pool", str(emb), "--n", "2", "--output",
                 str(tmp_path / "retrieved.txt")]) == 0
    assert len(read_paths(tmp_path / "retrieved.txt")) == 300  # each image is its own nearest

    code = main(["cluster", "--embeddings", str(emb), "--levels", "5000", "--output", str(tmp_path / "bad")])
    assert code == 2 and "cannot make 5000 clusters" in capsys.readouterr().err
    code = main(["dedup", "--embeddings", str(tmp_path / "nowhere"), "--output", str(tmp_path / "bad")])
    assert code == 2 and "run `distill-curate embed` first" in capsys.readouterr().err


def test_nan_rows_and_repeated_paths_are_reported_and_left_out(tmp_path, caplog):
    store = EmbeddingStore(tmp_path / "emb")
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    x[2] = np.nan
    store.append(x, ["a", "b", "c", "d", "a", "f"])
    assert main(["dedup", "--embeddings", str(tmp_path / "emb"), "--threshold", "0.99",
                 "--output", str(tmp_path / "dd")]) == 0
    assert "left out 1 NaN / inf / zero" in caplog.text and "appears twice" in caplog.text
    assert read_paths(tmp_path / "dd" / "kept.txt") == ["a", "b", "d", "f"]


def _folder_of_images(folder, count=6):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "img3.png").write_bytes(b"this is not a png")  # corrupt
    return folder


def test_a_corrupt_image_is_named_and_left_out_whether_found_before_or_during_embedding(tmp_path, monkeypatch):
    images = _folder_of_images(tmp_path / "images")
    common = ["embed", "--data", str(images), "--backbone", "vit_tiny", "--shard-size", "2", "--batch-size", "2"]
    assert main(common + ["--output", str(tmp_path / "checked")]) == 0  # found by the up-front check
    store = EmbeddingStore(tmp_path / "checked")
    assert len(store) == 5 and not any(p.endswith("img3.png") for p in store.paths())
    assert (tmp_path / "checked" / "unreadable.txt").read_text().strip().endswith("img3.png")

    import distill.data.datasets as datasets

    monkeypatch.setattr(datasets, "VERIFY_AUTO_LIMIT", 0)  # large pools are not checked up front
    assert main(common + ["--output", str(tmp_path / "met")]) == 0
    store = EmbeddingStore(tmp_path / "met")
    vectors, paths = store.load(), store.paths()
    assert len(store) == 6 and paths[3].endswith("img3.png")  # rows stay aligned with their paths
    assert not vectors[3].any() and np.abs(np.linalg.norm(vectors[[0, 1, 2, 4, 5]], axis=1) - 1).max() < 1e-2
    assert (tmp_path / "met" / "unreadable.txt").read_text().strip().endswith("img3.png")
    assert main(["dedup", "--embeddings", str(tmp_path / "met"), "--output", str(tmp_path / "dd")]) == 0
    kept = read_paths(tmp_path / "dd" / "kept.txt")
    grouped = {p for g in json.loads((tmp_path / "dd" / "groups.json").read_text()) for p in g}
    assert set(kept) | grouped == {p for p in paths if not p.endswith("img3.png")}


def test_an_interrupted_embedding_keeps_its_shards_and_resumes(tmp_path, monkeypatch):
    import data_curation.embed as embed

    real, calls = embed._embed_shard, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while embedding the second shard
        return real(*args, **kwargs)

    monkeypatch.setattr(embed, "_embed_shard", failing)
    common = ["embed", "--data", "fashion_mnist", "--backbone", "vit_tiny_patch7", "--limit", "96", "--shard-size",
              "32", "--output", str(tmp_path / "emb")]
    try:
        main(common)
    except KeyboardInterrupt:
        pass
    first = EmbeddingStore(tmp_path / "emb")
    assert len(first) == 32 and not first.manifest()["complete"]
    written = first.load()
    assert main(common) == 0
    done = EmbeddingStore(tmp_path / "emb")
    assert len(done) == 96 and done.manifest()["complete"] and (done.load()[:32] == written).all()


def test_a_fashion_mnist_selection_is_a_dataset_and_the_pictures_are_drawn(tmp_path):
    from PIL import Image

    from distill.data.configs import DatasetConfig

    from distill.data.datasets import build_image_source
    from distill.data.fashion_mnist import load_fashion_mnist

    emb = tmp_path / "emb"
    assert main(["embed", "--data", "fashion_mnist", "--split", "test", "--backbone", "vit_tiny_patch7", "--limit",
                 "400", "--output", str(emb), "--flip-average"]) == 0
    assert main(["dedup", "--embeddings", str(emb), "--threshold", "0.995", "--output", str(tmp_path / "dd")]) == 0
    groups = json.loads((tmp_path / "dd" / "groups.json").read_text())
    assert groups, "a random network puts some of 400 garments above 0.995"
    grid = Image.open(tmp_path / "dd" / "duplicate_groups.png")
    widest = min(8, max(len(g) for g in groups[:12]))
    assert grid.size == (widest * 70, min(12, len(groups)) * 70)
    assert main(["dedup", "--embeddings", str(emb), "--threshold", "0.995", "--against", str(emb), "--output",
                 str(tmp_path / "against")]) == 0
    assert read_paths(tmp_path / "against" / "kept.txt") == []  # every image is in the evaluation set itself
    assert main(["cluster", "--embeddings", str(emb), "--levels", "16", "4", "--output", str(tmp_path / "cl")]) == 0
    assert Image.open(tmp_path / "cl" / "cluster_sizes.png").size[0] > 300
    assert main(["sample", "--clusters", str(tmp_path / "cl"), "--target", "40", "--output",
                 str(tmp_path / "curated.txt")]) == 0
    assert (tmp_path / "curated.png").is_file()

    names = read_paths(tmp_path / "curated.txt")
    source = build_image_source(DatasetConfig(kind="auto", path=str(tmp_path / "curated.txt")))
    images, labels = load_fashion_mnist("test")
    index = [int(n.rsplit("/", 1)[1]) for n in names]
    assert len(source) == 40 and (source.images[:, 0].numpy() == images[index]).all()
    assert (source.labels.numpy() == labels[index]).all()

    assert main(["retrieve", "--seed", str(emb), "--clusters", str(tmp_path / "cl"), "--output",
                 str(tmp_path / "by_cluster.txt")]) == 0
    assert len(read_paths(tmp_path / "by_cluster.txt")) == 400  # every cluster holds a seed


def test_bad_embeddings_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    np.save(tmp_path / "empty.npy", np.zeros((0, 8), dtype=np.float32))
    np.save(tmp_path / "d8.npy", np.ones((4, 8), dtype=np.float32))
    np.save(tmp_path / "d6.npy", np.ones((4, 6), dtype=np.float32))
    out = str(tmp_path / "emb")
    assert main(["embed", "--data", "", "--npy", str(tmp_path / "empty.npy"), "--output", out]) == 2
    assert "holds no embeddings" in capsys.readouterr().err
    assert main(["embed", "--data", "", "--npy", str(tmp_path / "d8.npy"), "--output", out]) == 0
    assert main(["embed", "--data", "", "--npy", str(tmp_path / "d6.npy"), "--output", out]) == 2
    assert "dimension 6" in capsys.readouterr().err and EmbeddingStore(out).dim == 8
    (tmp_path / "blank").mkdir()
    assert main(["embed", "--data", str(tmp_path / "blank"), "--backbone", "vit_tiny", "--output",
                 str(tmp_path / "e2")]) == 2
    assert "no image files" in capsys.readouterr().err
    assert main(["cluster", "--embeddings", out, "--levels", "5", "--output", str(tmp_path / "cl")]) == 2
    assert "cannot make 5 clusters of 4 points" in capsys.readouterr().err and not (tmp_path / "cl").exists()

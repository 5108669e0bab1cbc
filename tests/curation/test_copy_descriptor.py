"""DINO's copy-detection descriptor: GeM and the PCA whitening against hand computations, the descriptor of a small
random ViT, and `distill-curate embed --descriptor copy` end to end on Fashion-MNIST (dimension, norm, whitening
files, the record that refuses a resume with other settings)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_curation.cli import main
from data_curation.embeddings import EmbeddingStore
from distill.errors import InputError
from distill.eval.descriptors import apply_whitening, copy_descriptor, gem, learn_whitening, load_whitening


def test_gem_by_hand():
    tokens = torch.tensor([[[1.0, -2.0], [3.0, 0.5], [2.0, 4.0]]])  # one image, three tokens, two channels
    # channel 0: ((1^4 + 3^4 + 2^4) / 3)^(1/4) = (98 / 3)^(1/4) = 2.390677...
    # channel 1: -2 is clamped to 1e-6: ((1e-24 + 0.5^4 + 4^4) / 3)^(1/4) = (256.0625 / 3)^(1/4) = 3.039553...
    assert torch.allclose(gem(tokens, 4), torch.tensor([[(98 / 3) ** 0.25, (256.0625 / 3) ** 0.25]]))
    clamped = tokens.clamp(min=1e-6)
    assert torch.allclose(gem(tokens, 1), clamped.mean(dim=1))  # p = 1: the mean
    assert torch.allclose(gem(tokens, 500), clamped.amax(dim=1), rtol=3e-3)  # large p: the maximum
    with pytest.raises(InputError, match="positive"):
        gem(tokens, 0)


def test_whitening_by_hand():
    # rows around (3, 5): ±(1, 0) and ±(0, 2). Centred covariance diag(2/4, 8/4) = diag(0.5, 2): the first
    # direction kept is y (eigenvalue 2), then x (0.5). Projection columns e_y / sqrt(2), e_x / sqrt(0.5);
    # (4, 7) - mean = (1, 2) -> (2 / sqrt(2), 1 / sqrt(0.5)) = (sqrt(2), sqrt(2)).
    rows = np.array([[4.0, 5.0], [2.0, 5.0], [3.0, 7.0], [3.0, 3.0]])
    whitening = learn_whitening(rows)
    assert np.allclose(whitening.mean, [3, 5]) and np.allclose(whitening.eigenvalues, [2.0, 0.5])
    assert np.allclose(whitening.projection, [[0, 1 / math.sqrt(0.5)], [1 / math.sqrt(2), 0]])
    assert np.allclose(apply_whitening(np.array([[4.0, 7.0], [3.0, 5.0]]), whitening),
                       [[math.sqrt(2), math.sqrt(2)], [0, 0]], atol=1e-6)
    assert np.allclose(learn_whitening(rows, dim=1).projection, [[0], [1 / math.sqrt(2)]])


def test_the_whitened_learning_set_has_identity_covariance_streamed_or_not():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(2000, 12)) @ rng.normal(size=(12, 12)) + rng.normal(size=12) * 5
    whitening = learn_whitening(rows)
    out = apply_whitening(rows, whitening).astype(np.float64)
    assert np.abs(out.mean(axis=0)).max() < 1e-4
    assert np.abs(np.cov(out.T, bias=True) - np.eye(12)).max() < 1e-4
    assert np.all(np.diff(whitening.eigenvalues) <= 0)
    streamed = learn_whitening(rows[i : i + 300] for i in range(0, len(rows), 300))
    assert np.allclose(streamed.projection, whitening.projection) and streamed.rows == 2000
    assert learn_whitening(rows[:5]).dim == 4  # five rows span four directions
    with pytest.raises(InputError, match="at least 2 rows"):
        learn_whitening(rows[:1])


def test_the_copy_descriptor_of_a_small_vit():
    from distill.models import create_backbone

    model = create_backbone("vit_tiny_patch7", in_chans=1, img_size=28).eval()
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        tokens = model.forward_features(images)
        by_hand = torch.cat([tokens["x_norm_clstoken"],
                             (tokens["x_norm_patchtokens"].clamp(min=1e-6) ** 4).mean(dim=1) ** 0.25], dim=1)
        described = copy_descriptor(model, images)
        two_scales = copy_descriptor(model, images, scales=(1.0, 0.5))
        half = copy_descriptor(model, images, scales=(0.5,))
    assert described.shape == (3, 2 * model.embed_dim)
    assert torch.allclose(described, F.normalize(by_hand, dim=1), atol=1e-5)
    assert torch.allclose(two_scales, F.normalize(described + half, dim=1), atol=1e-5)
    assert not torch.allclose(half, described, atol=1e-2)
    with pytest.raises(InputError, match="has none"):
        copy_descriptor(torch.nn.Identity(), images)


def _embed(tmp_path, output, *extra, limit=40):
    return main(["embed", "--data", "fashion_mnist", "--backbone", "vit_tiny_patch7", "--limit", str(limit),
                 "--shard-size", "16", "--batch-size", "16", "--precision", "fp32", "--output", str(tmp_path / output),
                 *extra])


def test_embed_copy_descriptors_whitened_three_ways_and_resumes_refused(tmp_path, capsys):
    assert _embed(tmp_path, "cls") == 0
    assert _embed(tmp_path, "raw", "--descriptor", "copy") == 0
    raw, cls = EmbeddingStore(tmp_path / "raw"), EmbeddingStore(tmp_path / "cls")
    vectors = raw.load()
    assert raw.dim == 2 * cls.dim == 384 and len(raw) == 40 and len(raw.manifest()["shards"]) == 3
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-2)
    assert raw.source["descriptor"] == {"kind": "copy", "gem_p": 4.0, "scales": [1.0]}
    assert "descriptor" not in cls.source  # the class token's stores are made and recorded as before
    head = vectors[:, :192] / np.linalg.norm(vectors[:, :192], axis=1, keepdims=True)
    assert np.abs(head - cls.load()).max() < 5e-3  # the first half is the class token

    capsys.readouterr()
    assert _embed(tmp_path, "raw", "--descriptor", "copy", "--gem-p", "3") == 2
    assert "made with descriptor" in capsys.readouterr().err
    assert _embed(tmp_path, "raw", "--descriptor", "copy", "--scales", "1", "0.707") == 2
    assert _embed(tmp_path, "raw") == 2  # the class token into a store of copy descriptors
    assert _embed(tmp_path, "raw", "--descriptor", "copy") == 0  # the same settings resume (nothing left to do)

    # learned on another store of unwhitened copy descriptors
    assert _embed(tmp_path, "white", "--descriptor", "copy", "--whiten-on", str(tmp_path / "raw"),
                  "--whiten-dim", "16") == 0
    white = EmbeddingStore(tmp_path / "white")
    whitening = load_whitening(tmp_path / "white" / "whitening.npz")
    assert white.dim == whitening.dim == 16 and whitening.mean.shape == (384,)
    assert whitening.projection.shape == (384, 16) and whitening.eigenvalues.shape == (16,)
    expected = apply_whitening(vectors, whitening)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.abs(white.load() - expected).max() < 5e-3 and white.source["descriptor"]["whitening"]["kept"] == 16
    assert _embed(tmp_path, "white", "--descriptor", "copy", "--whiten-on", str(tmp_path / "raw"),
                  "--whiten-dim", "8") == 2
    assert _embed(tmp_path, "mixed", "--descriptor", "copy", "--scales", "1", "0.5", "--whiten-on",
                  str(tmp_path / "raw")) == 2
    assert "same --gem-p, --scales and --flip-average" in capsys.readouterr().err

    # learned on the set itself, then the same whitening for queries from another split
    assert _embed(tmp_path, "self", "--descriptor", "copy", "--whiten-on", "self") == 0
    own = EmbeddingStore(tmp_path / "self")
    assert own.dim == 39 and np.allclose(np.linalg.norm(own.load(), axis=1), 1, atol=1e-2)  # 40 rows span 39
    assert (EmbeddingStore(tmp_path / "self" / "unwhitened").load() == vectors).all()
    learned = load_whitening(tmp_path / "self" / "whitening.npz")
    assert _embed(tmp_path, "self", "--descriptor", "copy", "--whiten-on", "self") == 0  # resumes, same whitening
    assert np.array_equal(load_whitening(tmp_path / "self" / "whitening.npz").projection, learned.projection)
    assert _embed(tmp_path, "queries", "--split", "test", "--descriptor", "copy", "--whiten-on",
                  str(tmp_path / "self" / "whitening.npz"), limit=8) == 0
    queries = EmbeddingStore(tmp_path / "queries")
    assert queries.dim == 39 and queries.source["descriptor"] == own.source["descriptor"]

    assert _embed(tmp_path, "bad", "--gem-p", "3") == 2
    assert "go with --descriptor copy" in capsys.readouterr().err
    assert _embed(tmp_path, "bad", "--descriptor", "copy", "--whiten-on", str(tmp_path / "nowhere")) == 2
    assert "neither a store" in capsys.readouterr().err


def test_copy_descriptors_of_a_resnet_are_refused_before_anything_is_written(tmp_path, capsys):
    """The check comes before the store is begun: no shard of zero rows with every image called unreadable."""
    code = main(["embed", "--data", "fashion_mnist", "--backbone", "resnet18", "--limit", "4", "--precision", "fp32",
                 "--descriptor", "copy", "--output", str(tmp_path / "copy")])
    assert code == 2
    err = capsys.readouterr().err
    assert "pools patch tokens: resnet18 has none" in err and "could not be read" not in err
    assert not (tmp_path / "copy" / "manifest.json").exists()

"""Correspondence against constructed descriptors and hand computations: best buddies, pair selection, dense flow,
SD-DINO's fusion, keypoint transfer PCK, both pair-list forms; Stable Diffusion features from a tiny random UNet and
VAE; `correspond` and `eval keypoints` end to end on a tiny random ViT; bad input stopped in one line."""

import argparse
import builtins
import json

import numpy as np
import pytest
import torch
from PIL import Image

from distill.cli.correspond import add_correspond_arguments, add_keypoints_arguments, cmd_correspond, cmd_eval_keypoints
from distill.dense.correspondence import (best_buddies, class_token_saliency, correspond, dense_flow, fuse,
                                          pairs_text, select_pairs)
from distill.dense.features import DenseFeatures
from distill.dense.images import DenseImages
from distill.dense.keypoints import evaluate_keypoints, pck, read_pairs, transfer_cells
from distill.dense.sources import FeatureSource, FusedSource, SourceFeatures, StableDiffusionSource, parse_source
from distill.errors import InputError
from distill.models import create_backbone

from tests.dense.conftest import TINY_VIT as TINY


# ---------------------------------------------------------------- best buddies, selection, flow, fusion


def test_best_buddies_recover_a_permutation_exactly():
    torch.manual_seed(0)
    a = torch.randn(30, 16)
    order = torch.randperm(30)
    b = a[order] * torch.rand(30, 1).add(0.5)  # scaled rows: cosine does not care
    pairs = best_buddies(a, b)
    assert pairs.shape == (30, 2) and pairs[:, 0].tolist() == list(range(30))
    assert torch.equal(order[pairs[:, 1]], pairs[:, 0])


def test_pairs_that_are_not_mutual_are_dropped():
    a = torch.tensor([[1.0, 0.0], [0.9, 0.1]])  # both nearest to b0; b0 chooses a0
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # b1's nearest is a1, but a1's is b0
    assert best_buddies(a, b).tolist() == [[0, 0]]


def test_dense_flow_recovers_a_horizontal_shift():
    torch.manual_seed(0)
    b = torch.randn(5, 8, 16)
    a = torch.randn(5, 8, 16)
    a[:, :6] = b[:, 2:]  # A is B moved two cells left: A's column x is B's column x + 2
    flow = dense_flow(a, b)
    assert flow.shape == (5, 8, 2)
    columns, rows = torch.meshgrid(torch.arange(6), torch.arange(5), indexing="xy")
    assert torch.equal(flow[:, :6, 0], columns + 2) and torch.equal(flow[:, :6, 1], rows)


def test_fusion_normalises_upsamples_and_weighs_as_by_hand():
    torch.manual_seed(0)
    coarse, fine = torch.randn(2, 2, 3), torch.randn(4, 4, 2)
    # bilinear 2 -> 4, align_corners=False: sample points -0.25, 0.25, 0.75, 1.25 (clamped at the border)
    up = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    unit = coarse / coarse.norm(dim=-1, keepdim=True)
    expected_coarse = torch.einsum("ik,jl,klc->ijc", up, up, unit)
    expected_fine = fine / fine.norm(dim=-1, keepdim=True)
    fused = fuse([coarse, fine], [0.3, 0.7])
    assert fused.shape == (4, 4, 5)
    assert torch.allclose(fused[..., :3], 0.3 * expected_coarse, atol=1e-6)
    assert torch.allclose(fused[..., 3:], 0.7 * expected_fine, atol=1e-6)
    assert torch.allclose(fuse([fine, coarse], [0.7, 0.3]), torch.cat([fused[..., 3:], fused[..., :3]], -1))
    batched = fuse([torch.stack([coarse, coarse]), torch.stack([fine, fine])], [0.3, 0.7])
    assert batched.shape == (2, 4, 4, 5) and torch.allclose(batched[1], fused)
    with pytest.raises(InputError, match="one weight per source"):
        fuse([coarse, fine], [1.0])


def test_selection_by_saliency_and_by_kmeans_clusters():
    torch.manual_seed(0)
    centres = torch.eye(3, 8) * 10
    a = torch.cat([centres[c] + 0.1 * torch.randn(4, 8) for c in range(3)])  # 3 clusters of 4 descriptors
    b = a + 0.01 * torch.randn_like(a)
    pairs = torch.stack([torch.arange(12), torch.arange(12)], dim=1)
    saliency_a = torch.tensor([0.95, 0.9, 0.3, 0.4, 0.5, 0.1, 0.6, 0.7, 0.04, 0.8, 0.2, 0.3])
    saliency_b = torch.full((12,), 0.5)
    # rank = mean saliency; pair 8 has an end below the threshold 0.05 and goes
    kept, rank = select_pairs(pairs, a, b, 3, saliency_a, saliency_b, method="saliency")
    assert kept[:, 0].tolist() == [0, 1, 9] and torch.allclose(rank, torch.tensor([0.725, 0.7, 0.65]))
    # k-means: one pair per cluster, the most salient of it ({0-3}: 0, {4-7}: 7, {8-11}: 9), best first
    kept, rank = select_pairs(pairs, a, b, 3, saliency_a, saliency_b, method="kmeans")
    assert kept[:, 0].tolist() == [0, 9, 7] and torch.allclose(rank, torch.tensor([0.725, 0.65, 0.6]))
    everything, _ = select_pairs(pairs, a, b, 0, saliency_a, saliency_b)
    assert len(everything) == 11
    by_similarity, rank = select_pairs(pairs, a, b, 2, method="saliency")  # no saliency: ranked by cosine
    assert len(by_similarity) == 2 and rank[0] >= rank[1]


def _vit(**extra):
    torch.manual_seed(0)
    return create_backbone("vit_tiny", depth=2, embed_dim=32, num_heads=2, patch_size=7, img_size=28, in_chans=1,
                           **extra).eval()


def test_saliency_is_the_class_token_attention_of_the_last_block():
    model = _vit(num_register_tokens=2)
    images = torch.randn(2, 1, 28, 35)
    saliency = class_token_saliency(model, images)
    with torch.no_grad():
        attention = model.get_last_self_attention(images)[:, :, 0, 3:].mean(1)
    low, high = attention.min(1, keepdim=True).values, attention.max(1, keepdim=True).values
    assert saliency.shape == (2, 4, 5)
    assert torch.allclose(saliency.flatten(1), (attention - low) / (high - low), atol=1e-6)
    assert torch.allclose(class_token_saliency(model, images, stride=7), saliency)
    strided = class_token_saliency(create_backbone("vit_tiny", depth=2, embed_dim=32, num_heads=2, patch_size=8,
                                                   img_size=32, in_chans=1).eval(), torch.randn(1, 1, 32, 32), 4)
    assert strided.shape == (1, 7, 7) and strided.min() == 0 and strided.max() == 1


def test_correspond_and_the_point_file():
    torch.manual_seed(0)
    grid = torch.randn(3, 4, 8)
    matches = correspond(grid, grid.flip(1), pairs=0)
    assert len(matches.buddies) == 12 and torch.allclose(matches.similarity, torch.ones(12))
    text = pairs_text(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.5]]), "json", {"kept": 1},
                      {"similarity": torch.tensor([0.5])})
    assert json.loads(text) == {"kept": 1, "pairs": [{"a": [1.0, 2.0], "b": [3.0, 4.5], "similarity": 0.5}]}
    csv = pairs_text(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.5]]), "csv")
    assert csv.splitlines() == ["x_a,y_a,x_b,y_b", "1.0,2.0,3.0,4.5"]


# ---------------------------------------------------------------- keypoint transfer and PCK


class ConstructedSource(FeatureSource):
    """Descriptors given per file: a 4 x 4 grid of 10-pixel patches over a 40-pixel resized image."""

    label = "constructed"

    def __init__(self, grids, sizes):
        self.grids, self.sizes = grids, sizes

    def describe(self, paths, saliency=False):
        patches = torch.stack([self.grids[str(p)] for p in paths])
        images = DenseImages(torch.zeros(len(paths), 1, 40, 40), [str(p) for p in paths],
                             [self.sizes[str(p)] for p in paths], [])
        return SourceFeatures(DenseFeatures(patches, None, 10, 10, (40, 40)), images)


def _png(path, size=(80, 80)):
    Image.fromarray(np.full(size, 128, np.uint8)).save(path)
    return str(path)


def test_pck_is_100_with_identical_descriptors(tmp_path):
    from distill.dense.keypoints import KeypointPair

    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    one_hot = torch.eye(16).reshape(4, 4, 16)
    source = ConstructedSource({a: one_hot, b: one_hot}, {a: (80, 80), b: (80, 80)})
    # resized cell centres 4.5 + 10 i -> original pixels x 2
    points = torch.tensor([[9.0, 9.0], [29.0, 49.0], [69.0, 69.0], [50.0, 12.0]])
    pair = KeypointPair(a, b, points, points.clone(), (0, 0, 40, 40))
    result = evaluate_keypoints([pair], source)
    # the last point is off-centre: its cell's centre (49, 9) is 3.16 px away, within 0.1 * 40 but not 0.05 * 40
    assert result.points == 4 and result.skipped_points == 0
    assert result.pck == {"0.05": 75.0, "0.1": 100.0, "0.15": 100.0}


def test_pck_thresholds_for_a_known_displacement(tmp_path):
    from distill.dense.keypoints import KeypointPair

    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    one_hot = torch.eye(16).reshape(4, 4, 16)
    moved = torch.roll(one_hot, shifts=1, dims=1)  # target cell (x + 1, y) looks like source cell (x, y)
    source = ConstructedSource({a: one_hot, b: moved}, {a: (80, 80), b: (80, 80)})
    points = torch.tensor([[9.0, 9.0], [29.0, 29.0], [49.0, 69.0], [-3.0, 10.0], [10.0, 81.0]])
    with_box = KeypointPair(a, b, points, points.clone(), (10, 10, 260, 110), "cat")  # reference 250
    result = evaluate_keypoints([with_box], source)
    # each prediction is one cell (20 original pixels) right: within 0.1 * 250 = 25, not 0.05 * 250 = 12.5
    assert result.points == 3 and result.skipped_points == 2  # two source points outside their image
    assert result.pck == {"0.05": 0.0, "0.1": 100.0, "0.15": 100.0}
    assert result.per_category == {"cat": result.pck}
    no_box = KeypointPair(a, b, points[:3], points[:3].clone())  # reference: the target's 80 x 80 -> 4, 8, 12
    assert evaluate_keypoints([no_box], source).pck == {"0.05": 0.0, "0.1": 0.0, "0.15": 0.0}
    assert pck(torch.tensor([0.5, 1.5]), torch.tensor([20.0, 20.0])) == {"0.05": 50.0, "0.1": 100.0, "0.15": 100.0}
    assert transfer_cells(one_hot, moved, torch.tensor([[3, 0]])).tolist() == [[0, 0]]  # wraps round


def test_unreadable_images_skip_their_pair(tmp_path):
    from distill.dense.keypoints import KeypointPair

    a, broken = _png(tmp_path / "a.png"), tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    source = ConstructedSource({a: torch.eye(16).reshape(4, 4, 16)}, {a: (80, 80)})
    points = torch.tensor([[9.0, 9.0]])
    result = evaluate_keypoints([KeypointPair(a, a, points, points), KeypointPair(a, str(broken), points, points)],
                                source)
    assert result.pairs == 1 and len(result.skipped_pairs) == 1 and "broken.png" in result.skipped_pairs[0]


def test_both_pair_list_forms_are_read(tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    _png(images / "x.png"), _png(images / "y.png")
    listing = tmp_path / "pairs.json"
    listing.write_text(json.dumps([{"source": "photos/x.png", "target": "photos/y.png",
                                    "source_points": [[1, 2], [3, 4]], "target_points": [[5, 6], [7, 8]],
                                    "target_bbox": [0, 0, 10, 20]},
                                   {"source": "photos/y.png", "target": "photos/x.png", "source_points": [],
                                    "target_points": []}]))
    first, second = read_pairs(listing)
    assert first.source == str(images / "x.png") and first.target_points.tolist() == [[5, 6], [7, 8]]
    assert first.target_bbox == (0, 0, 10, 20) and second.target_bbox is None and second.source_points.shape == (0, 2)
    assert read_pairs(tmp_path / "pairs.json", tmp_path)[0].source == str(images / "x.png")

    root = tmp_path / "SPair-71k"
    annotations = root / "PairAnnotation" / "test"
    annotations.mkdir(parents=True)
    (root / "JPEGImages" / "cat").mkdir(parents=True)
    _png(root / "JPEGImages" / "cat" / "1.jpg"), _png(root / "JPEGImages" / "cat" / "2.jpg")
    entry = {"src_imname": "1.jpg", "trg_imname": "2.jpg", "src_kps": [[10, 20], [30, 40]],
             "trg_kps": [[11, 21], [31, 41]], "trg_bndbox": [1, 2, 50, 60], "src_bndbox": [0, 0, 5, 5],
             "category": "cat", "mirror": 0}
    (annotations / "000001-1-2:cat.json").write_text(json.dumps(entry))
    (annotations / "000002-2-1:cat.json").write_text(json.dumps({**entry, "src_imname": "2.jpg",
                                                                  "trg_imname": "1.jpg"}))
    pairs = read_pairs(annotations)  # the root found above the folder
    assert [p.source for p in pairs] == [str(root / "JPEGImages" / "cat" / n) for n in ("1.jpg", "2.jpg")]
    assert pairs[0].category == "cat" and pairs[0].target_bbox == (1, 2, 50, 60)
    assert pairs[0].source_points.tolist() == [[10, 20], [30, 40]]
    assert len(read_pairs(annotations / "000001-1-2:cat.json", root)) == 1


@pytest.mark.parametrize("content, message", [
    ({"pairs": []}, "neither a pair list"),
    ([{"source": "x.png", "target": "x.png", "source_points": [[1, 2]]}], "lacks target_points"),
    ([{"source": "x.png", "target": "x.png", "source_points": [[1, 2]], "target_points": []}],
     "1 source points but 0 target points"),
    ([{"source": "x.png", "target": "gone.png", "source_points": [[1, 2]], "target_points": [[1, 2]]}],
     "not found: .*gone.png"),
    ([{"source": "x.png", "target": "x.png", "source_points": [[1, 2]], "target_points": [[1, 2]],
       "target_bbox": [5, 5, 5, 5]}], r"the box \[5, 5, 5, 5\] has no extent"),
    ([{"source": "x.png", "target": "x.png", "source_points": [[1, 2, 3]], "target_points": [[1, 2, 3]]}],
     r"pairs, got shape \(1, 3\)"),
])
def test_bad_pair_lists_are_one_clear_error(tmp_path, content, message):
    _png(tmp_path / "x.png")
    (tmp_path / "pairs.json").write_text(json.dumps(content))
    with pytest.raises(InputError, match=message):
        read_pairs(tmp_path / "pairs.json")


def test_a_folder_of_other_json_is_not_spair(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "a.json").write_text(json.dumps({"source": "x"}))
    with pytest.raises(InputError, match="not an SPair-71k pair annotation"):
        read_pairs(tmp_path)
    with pytest.raises(InputError, match="not found"):
        read_pairs(tmp_path / "nothing.json")


# ---------------------------------------------------------------- Stable Diffusion features


def _tiny_sd():
    import diffusers  # the sd extra, which make test installs
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
        layers_per_block=1)
    return unet, vae


def _pictures(folder, count=2):
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        canvas = np.zeros((40, 50), np.uint8)
        canvas[10:30, 5 + 10 * i:25 + 10 * i] = 200
        Image.fromarray(canvas).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return paths


def test_stable_diffusion_features_have_their_grid_and_repeat(tmp_path):
    unet, vae = _tiny_sd()
    paths = _pictures(tmp_path / "images")
    source = StableDiffusionSource(unet, vae, size=30, timestep=100, up_blocks=(0, 1))
    assert source.size == 32  # VAE x 2, UNet x 2: a multiple of 4
    described = source.describe(paths)
    # latent 16 x 16; up-block 0 ends upsampled to 16 x 16 (32 channels), block 1 at 16 x 16 (16 channels)
    assert described.features.patches.shape == (2, 16, 16, 48) and described.features.stride == 2
    assert described.centers_original(0)[0, 0].tolist() == pytest.approx([1.0 * 50 / 32 - 0.5, 1.0 * 40 / 32 - 0.5])
    again = source.describe(paths[1:])
    assert torch.allclose(described.features.patches[1], again.features.patches[0], atol=1e-5)
    only_second = StableDiffusionSource(unet, vae, size=32, up_blocks=(1,)).describe(paths[:1])
    assert torch.allclose(only_second.features.patches[0], described.features.patches[0, ..., 32:], atol=1e-5)
    noisier = StableDiffusionSource(unet, vae, size=32, timestep=900, up_blocks=(0, 1)).describe(paths[:1])
    assert not torch.allclose(noisier.features.patches[0], described.features.patches[0], atol=1e-3)
    with pytest.raises(InputError, match=r"up-block\(s\) \[2\] out of range: the UNet has 2"):
        StableDiffusionSource(unet, vae, up_blocks=(0, 2))

    folder = tmp_path / "sd"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    loaded = parse_source(f"sd:{folder}", sd_size=32, sd_blocks=(0, 1))
    assert torch.allclose(loaded.describe(paths).features.patches, described.features.patches, atol=1e-5)
    with pytest.raises(InputError, match="needs unet/ and vae/"):
        parse_source(f"sd:{tmp_path / 'images'}")


def test_a_text_encoder_in_the_folder_gives_the_empty_prompt(tmp_path):
    unet, vae = _tiny_sd()
    import transformers  # the sd extra, which make test installs
    folder = tmp_path / "sd"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    (folder / "tokenizer").mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "a": 3}
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"),
                                           str(folder / "tokenizer" / "merges.txt"), model_max_length=8)
    tokenizer.save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    encoder.save_pretrained(folder / "text_encoder")
    source = StableDiffusionSource.from_pretrained(str(folder), size=32, up_blocks=(0, 1))
    with torch.no_grad():
        expected = encoder(torch.tensor([[0] + [1] * 7]))[0]  # "": start, end, padded with end to 8 tokens
    assert source.text.shape == (1, 8, 16) and torch.allclose(source.text, expected, atol=1e-5)
    assert source.describe(_pictures(tmp_path / "images", 1)).features.patches.shape == (1, 16, 16, 48)


def test_asking_for_sd_without_diffusers_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def without_diffusers(name, *args, **kwargs):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ImportError("No module named 'diffusers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_diffusers)
    with pytest.raises(InputError, match=r"pip install 'distill\[sd\]'"):
        parse_source("sd:stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_fused_source_puts_both_on_the_finer_grid(tmp_path):
    unet, vae = _tiny_sd()
    paths = _pictures(tmp_path / "images")
    from distill.dense.sources import BackboneSource

    backbone = BackboneSource(_vit(), 28, [0.5], [0.5])
    sd = StableDiffusionSource(unet, vae, size=32, up_blocks=(1,))
    fused = FusedSource([backbone, sd], [0.5, 0.5]).describe(paths, saliency=True)
    assert fused.features.patches.shape == (2, 16, 16, 32 + 16) and fused.saliency.shape == (2, 16, 16)
    norms = fused.features.patches[..., 32:].norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, 0.5), atol=1e-5)  # SD's part: unit length times 0.5


# ---------------------------------------------------------------- the commands end to end


@pytest.fixture
def tiny(tmp_path, tiny_weights):
    weights = tiny_weights
    folder = tmp_path / "images"
    folder.mkdir()
    canvas = np.zeros((40, 50), np.uint8)
    canvas[8:30, 6:26] = 220
    canvas[12:20, 10:18] = 90
    Image.fromarray(canvas).save(folder / "a.png")
    Image.fromarray(np.roll(canvas, 14, axis=1)).save(folder / "b.png")  # the same, shifted right
    return folder, weights


def _args(add, argv):
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def test_correspond_writes_the_picture_and_the_pairs(tiny, tmp_path, capsys):
    folder, weights = tiny
    output = tmp_path / "out" / "matches.png"
    cmd_correspond(_args(add_correspond_arguments, [str(folder / "a.png"), str(folder / "b.png"), "--checkpoint",
                                                    str(weights), *TINY, "--size", "56", "--stride", "7",
                                                    "--pairs", "3", "--output", str(output)]))
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "matches.json").read_text())
    assert output.stat().st_size > 5000 and output.read_bytes()[:4] == b"\x89PNG"
    assert f"{written['buddies']} best buddies, {written['kept']} kept" in printed
    assert 1 <= written["kept"] <= 3 and len(written["pairs"]) == written["kept"] and written["grid"] == [8, 8]
    for pair in written["pairs"]:
        for x, y in (pair["a"], pair["b"]):
            assert 0 <= x <= 50 and 0 <= y <= 40  # the original images' pixels
        assert 0 < pair["saliency"] <= 1
    everything = tmp_path / "all.png"
    cmd_correspond(_args(add_correspond_arguments, [str(folder / "a.png"), str(folder / "b.png"), "--checkpoint",
                                                    str(weights), *TINY, "--pairs", "0", "--threshold", "0",
                                                    "--output", str(everything)]))
    assert json.loads((tmp_path / "all.json").read_text())["selection"] == "all"


def test_correspond_fused_with_stable_diffusion(tiny, tmp_path, capsys):
    unet, vae = _tiny_sd()
    folder, weights = tiny
    unet.save_pretrained(tmp_path / "sd" / "unet")
    vae.save_pretrained(tmp_path / "sd" / "vae")
    output = tmp_path / "fused.png"
    cmd_correspond(_args(add_correspond_arguments, [str(folder / "a.png"), str(folder / "b.png"), "--checkpoint",
                                                    str(weights), *TINY, "--with", f"sd:{tmp_path / 'sd'}",
                                                    "--sd-size", "32", "--sd-blocks", "0", "1", "--alpha", "0.4",
                                                    "--output", str(output)]))
    written = json.loads((tmp_path / "fused.json").read_text())
    assert written["grid"] == [16, 16] and "0.6 tiny.pth + 0.4 SD" in written["source"] and output.is_file()


def test_eval_keypoints_on_a_pair_list(tiny, tmp_path, capsys):
    folder, weights = tiny
    centres = [[x * 50 / 28, y * 40 / 28] for x, y in ((3.0, 3.0), (10.0, 17.0), (24.0, 24.0))]  # cell centres
    (tmp_path / "pairs.json").write_text(json.dumps([
        {"source": "images/a.png", "target": "images/a.png", "source_points": centres + [[-1, 5]],
         "target_points": centres + [[0, 5]]}]))
    results = tmp_path / "results.json"
    cmd_eval_keypoints(_args(add_keypoints_arguments, [str(tmp_path / "pairs.json"), "--checkpoint", str(weights),
                                                       *TINY, "--output", str(results)]))
    printed = capsys.readouterr().out
    written = json.loads(results.read_text())["keypoints"]
    # the same image on both sides: every cell finds itself
    assert written["pck"] == {"0.05": 100.0, "0.1": 100.0, "0.15": 100.0} and written["skipped_points"] == 1
    assert "PCK@0.1" in printed and "3 points of 1 pairs" in printed


def test_bad_requests_are_one_line_and_write_nothing(tiny, tmp_path, monkeypatch):
    folder, weights = tiny
    output = tmp_path / "never.png"
    base = [str(folder / "a.png"), str(folder / "b.png"), "--checkpoint", str(weights), *TINY, "--output",
            str(output)]
    cases = [
        ([str(folder / "gone.png"), *base[1:]], "image file.* not found: .*gone.png"),
        ([str(folder), *base[1:]], "images is a folder, not an image file: .*distill eval keypoints"),
        ([*base[:3], str(tmp_path / "gone.pth"), *base[4:]], "checkpoint .*gone.pth not found"),
        ([*base, "--facet", "keys"], "facet 'keys' unknown"),
        ([*base, "--layer", "5"], r"--layer \[5\] out of range: the model has 2 blocks"),
        ([*base, "--stride", "3"], "stride 3 must divide the patch size 7"),
        ([*base, "--with", "nothing_registered"], "neither a checkpoint file"),
        ([*base, "--with", "sd:"], "sd: needs a folder"),
        ([*base, "--alpha", "2"], "must lie in"),
        ([*base[:-1], str(tmp_path / "never.jpg")], "must be a .png"),
        ([*base, "--alpha", "0.9"], "--alpha only apply to a second source: give it with --with"),
        ([*base, "--sd-size", "512", "--sd-blocks", "1"], "--sd-size, --sd-blocks only apply to a second source"),
        ([*base, "--threshold", "2"], r"--threshold 2.0 must lie in \[0, 1\)"),
        ([*base, "--with", str(weights)], "cannot be told from its weights, and --backbone and --set describe "
                                          "--checkpoint: write it with its architecture first"),
    ]
    for argv, message in cases:
        with pytest.raises(InputError, match=message):
            cmd_correspond(_args(add_correspond_arguments, argv))
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("diffusers") else real_import(name, *a, **k))
    with pytest.raises(InputError, match=r"pip install 'distill\[sd\]'"):
        cmd_correspond(_args(add_correspond_arguments, [*base, "--with", f"sd:{tmp_path}"]))
    (tmp_path / "pairs.json").write_text(json.dumps([{"source": str(folder / "a.png"), "target": str(folder / "b.png"),
                                                      "source_points": [], "target_points": []}]))
    with pytest.raises(InputError, match="none of its 1 pair.s. has a point"):
        cmd_eval_keypoints(_args(add_keypoints_arguments, [str(tmp_path / "pairs.json"), "--checkpoint",
                                                           str(weights), *TINY, "--output", str(output)]))
    (tmp_path / "pairs.json").write_text(json.dumps({"what": 1}))
    with pytest.raises(InputError, match="neither a pair list"):
        cmd_eval_keypoints(_args(add_keypoints_arguments, [str(tmp_path / "pairs.json"), "--checkpoint",
                                                           str(weights), *TINY, "--output", str(output)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "pairs.json", "tiny.pth"]


def test_points_map_to_the_cell_of_the_nearest_patch_centre():
    features = DenseFeatures(torch.zeros(1, 3, 3, 1), None, 8, 4, (16, 16))
    images = DenseImages(torch.zeros(1, 1, 16, 16), ["x"], [(32, 64)], [])
    described = SourceFeatures(features, images)
    cells, inside = described.cells_of(0, torch.tensor([[0.0, 0.0], [28.0, 15.0], [70.0, 5.0], [63.0, 31.0]]))
    # resized (x / 4, y / 2); cell = round((p - 3.5) / 4)
    assert cells.tolist() == [[0, 0], [1, 1], [2, 0], [2, 2]] and inside.tolist() == [True, True, False, True]
    # the first patch covers resized pixels 0-7, original 0-31 in x and 0-15 in y: its centre is at 15.5, 7.5
    assert described.centers_original(0)[0, 0].tolist() == [15.5, 7.5]
    assert described.images.to_resized(0, described.centers_original(0)[0, 0][None]).tolist() == [[3.5, 3.5]]

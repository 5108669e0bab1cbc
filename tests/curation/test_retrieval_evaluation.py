"""`distill-curate evaluate-retrieval` and `dedup --truth` on tiny stores whose similarities are known: the printed
and written metrics equal distill.eval.retrieval's and the values worked out by hand; bad input is one line and
status 2."""

import json
import math

import numpy as np
import pytest

from data_curation.cli import main
from data_curation.embeddings import EmbeddingStore
from distill.eval.retrieval import retrieval_metrics

R = 1 / math.sqrt(2)


@pytest.fixture
def stores(tmp_path):
    gallery = EmbeddingStore(tmp_path / "gallery")
    gallery.append(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [R, R, 0]], np.float32),
                   [str(tmp_path / f"g{i}.jpg") for i in range(4)])
    queries = EmbeddingStore(tmp_path / "queries")
    queries.append(np.array([[1, 0, 0], [0, R, R], [0, 0, 1]], np.float32),
                   [str(tmp_path / f"q{i}.jpg") for i in range(3)])
    (tmp_path / "truth.tsv").write_text("# query\tgallery\nq0.jpg\tg0.jpg\n1\t2\n")  # a relative path; row numbers
    return tmp_path


def test_the_metrics_of_a_tiny_search_by_hand(stores, capsys):
    # cosines: q0 -> g0 1, g3 0.707, g1 0, g2 0            truth g0: rank 1, AP 1, hit at 1
    #          q1 -> g1 0.707, g2 0.707, g3 0.5, g0 0       truth g2: tied with g1, the run ends at rank 2: AP 1/2,
    #                                                       no hit at 1, a hit at 5 and 10
    #          q2 -> g2 1, then 0, 0, 0                     no truth: skipped
    # mAP = 0.75, recall@1 = 0.5, recall@5 = recall@10 = 1
    # µAP over the 12 pooled predictions: 1 (q0 g0 T), 1 (q2 g2 F): the run ends at rank 2 -> 1/2;
    #     0.707 x3 (q0 g3 F, q1 g1 F, q1 g2 T): ends at rank 5 with 2 hits -> 2/5; 2 pairs: (1/2 + 2/5) / 2 = 0.45
    code = main(["evaluate-retrieval", "--queries", str(stores / "queries"), "--gallery", str(stores / "gallery"),
                 "--truth", str(stores / "truth.tsv"), "--k", "10", "--output", str(stores / "results.json")])
    assert code == 0
    printed = capsys.readouterr().out
    written = json.loads((stores / "results.json").read_text())
    assert written["mAP"] == pytest.approx(0.75) and written["microAP"] == pytest.approx(0.45)
    assert written["recall@1"] == 0.5 and written["recall@5"] == written["recall@10"] == 1.0
    assert (written["k"], written["queries_without_truth"], written["truth_pairs"]) == (4, 1, 2)
    queries, gallery = EmbeddingStore(stores / "queries").load(), EmbeddingStore(stores / "gallery").load()
    sims = queries @ gallery.T
    module = retrieval_metrics(sims, np.tile(np.arange(4), (3, 1)), [{0}, {2}, set()])
    for key in ("mAP", "recall@1", "recall@5", "recall@10", "microAP"):
        assert written[key] == pytest.approx(module[key], abs=1e-6)
        assert f"{written[key]:.4f}" in printed
    assert "µAP        0.4500" in printed and "mAP        0.7500" in printed


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_bad_input_is_one_line_and_status_2(stores, capsys):
    common = ["evaluate-retrieval", "--queries", str(stores / "queries"), "--gallery", str(stores / "gallery")]
    (stores / "stranger.tsv").write_text("q0.jpg\tnot_in_the_gallery.jpg\n")
    err = _error(capsys, common + ["--truth", str(stores / "stranger.tsv")])
    assert "not_in_the_gallery.jpg, which is not among the usable embeddings" in err and "write the paths" in err
    (stores / "far.tsv").write_text("0\t99\n")  # a row number past the end
    assert "99, which is not among" in _error(capsys, common + ["--truth", str(stores / "far.tsv")])

    other = EmbeddingStore(stores / "wide")
    other.append(np.eye(5, dtype=np.float32), [f"w{i}" for i in range(5)])
    err = _error(capsys, ["evaluate-retrieval", "--queries", str(stores / "queries"), "--gallery", str(stores / "wide"),
                          "--truth", str(stores / "truth.tsv")])
    assert "dimension 3" in err and "dimension 5" in err and "same --descriptor" in err
    (stores / "empty").mkdir()
    err = _error(capsys, common[:3] + ["--gallery", str(stores / "empty"), "--truth", str(stores / "truth.tsv")])
    assert "no embeddings in" in err and "run `distill-curate embed` first" in err
    assert "--k is the number" in _error(capsys, common + ["--truth", str(stores / "truth.tsv"), "--k", "0"])


def test_dedup_measures_known_copies_on_its_graph(tmp_path, capsys):
    # p0, p1 = p0 tilted (cos 0.995); p2, p3 = p2 tilted (cos 0.894); p4 with p3 cos 0.447, with p2 0.
    # threshold 0.4: edges (0,1) 0.995, (2,3) 0.894, (3,4) 0.447; groups {0, 1} and {2, 3, 4}.
    # truth (0,1) and (4,2): edges ranked (0,1) T, (2,3) F, (3,4) F -> µAP = (1/1) / 2 = 0.5;
    # one of the two pairs is an edge (recall 0.5), both end in one group (1.0).
    vectors = np.array([[1, 0, 0], [1, 0.1, 0], [0, 1, 0], [0, 1, 0.5], [0, 0, 1]], np.float32)
    store = EmbeddingStore(tmp_path / "emb")
    store.append(vectors, [str(tmp_path / f"p{i}.png") for i in range(5)])
    (tmp_path / "copies.tsv").write_text(f"{tmp_path / 'p0.png'}\tp1.png\n4\t2\n")
    assert main(["dedup", "--embeddings", str(tmp_path / "emb"), "--threshold", "0.4", "--k", "4", "--truth",
                 str(tmp_path / "copies.tsv"), "--no-grid", "--output", str(tmp_path / "dd")]) == 0
    found = json.loads((tmp_path / "dd" / "copy_detection.json").read_text())
    assert found["microAP"] == pytest.approx(0.5) and found["pair_recall"] == 0.5 and found["group_recall"] == 1.0
    assert (found["edges"], found["correct_edges"], found["truth_pairs"]) == (3, 1, 2)
    assert "µAP 0.5000" in capsys.readouterr().out
    (tmp_path / "self.tsv").write_text("p0.png\tp0.png\n")
    err = _error(capsys, ["dedup", "--embeddings", str(tmp_path / "emb"), "--truth", str(tmp_path / "self.tsv"),
                          "--output", str(tmp_path / "dd2")])
    assert "pairs an image with itself" in err

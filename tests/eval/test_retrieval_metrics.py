"""mAP, recall@k and µAP against values worked out by hand from their definitions (distill.eval.retrieval), ties
and queries without a relevant item included; and the ground-truth file's form."""

import math

import numpy as np
import pytest

from distill.errors import InputError
from distill.eval.retrieval import (average_precision, format_metrics, micro_average_precision, read_truth,
                                    retrieval_metrics)


def test_average_precision_of_a_ranking_without_ties():
    # ranks 1..5, relevant at ranks 1, 3 and 5: precisions 1/1, 2/3, 3/5; three relevant in all
    # AP = (1 + 2/3 + 3/5) / 3 = 0.755555...
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    relevant = [True, False, True, False, True]
    assert average_precision(scores, relevant) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # two more relevant items exist but were not retrieved: they add nothing, the sum is divided by 5
    assert average_precision(scores, relevant, 5) == pytest.approx((1 + 2 / 3 + 3 / 5) / 5)
    # the order the items are given in does not matter, only their scores
    order = [4, 2, 0, 3, 1]
    assert average_precision(np.array(scores)[order], np.array(relevant)[order]) == pytest.approx(0.7555555555)


def test_a_tie_is_one_threshold_and_never_helps():
    # scores 0.9 | 0.8 0.8 0.8 | 0.1, relevant: the second of the tied run and the last item.
    # The tied run ends at rank 4 with 1 relevant item: precision 1/4. The last item: rank 5, 2 hits: 2/5.
    # AP = (1/4 + 2/5) / 2 = 0.325, whichever of the tied items a sort puts first.
    scores = np.array([0.9, 0.8, 0.8, 0.8, 0.1])
    for relevant in ([False, True, False, False, True], [False, False, False, True, True],
                     [False, False, True, False, True]):
        assert average_precision(scores, relevant) == pytest.approx(0.325)
    # all scores equal: precision * recall, here (2 relevant of 4) 2/4 for both, AP = 0.5
    assert average_precision([0.3] * 4, [True, False, True, False]) == pytest.approx(0.5)


def test_micro_average_precision_pools_every_prediction():
    # predictions (score, correct): 0.9 T, 0.8 F, 0.7 T, 0.6 F, 0.4 T ; 4 ground-truth pairs (one never predicted)
    # precisions at the correct ones: 1/1, 2/3, 3/5 ; µAP = (1 + 2/3 + 3/5) / 4 = 0.566666...
    scores = np.array([0.7, 0.9, 0.4, 0.8, 0.6])
    correct = np.array([True, True, True, False, False])
    assert micro_average_precision(scores, correct, 4) == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    with pytest.raises(InputError, match="at least one ground-truth pair"):
        micro_average_precision(scores, correct, 0)
    with pytest.raises(InputError, match="only 2 relevant"):
        average_precision(scores, correct, 2)


def test_retrieval_metrics_by_hand_with_ties_and_a_query_without_truth():
    # query 0: items 3 (0.9), 1 (0.5), 0 (0.2); relevant {1}: rank 2, AP 1/2; hit at 5 and 10, not at 1
    # query 1: items 0 (0.8), 2 (0.8), 1 (0.3); relevant {2, 4}: the tie 0/2 ends at rank 2 with 1 hit -> 1/2,
    #          item 4 not retrieved; AP = (1/2) / 2 = 0.25; rank of its best relevant item 2: hit at 5, 10
    # query 2: relevant {}: skipped, counted
    # query 3: items 2 (0.95), 0 (0.1), -1 (no item); relevant {2}: rank 1, AP 1; hit at 1, 5, 10
    # mAP = (0.5 + 0.25 + 1) / 3 = 0.583333; recall@1 = 1/3; recall@5 = recall@10 = 1
    # µAP: pooled (score, correct), 11 predictions: 0.95 T | 0.9 F | 0.8 F, 0.8 T (the run ends at rank 4 with 2
    #      hits) | 0.5 T (rank 5, 3 hits) | 0.4 F | 0.3 F, 0.3 F | 0.2 F | 0.1 F, 0.1 F (id -1 is no prediction)
    #      precisions at the correct ones: 1/1, 2/4, 3/5 ; 1 + 2 + 0 + 1 = 4 ground-truth pairs
    #      µAP = (1 + 0.5 + 0.6) / 4 = 0.525
    scores = np.array([[0.9, 0.5, 0.2], [0.8, 0.8, 0.3], [0.4, 0.3, 0.1], [0.95, 0.1, 0.0]])
    ids = np.array([[3, 1, 0], [0, 2, 1], [5, 6, 7], [2, 0, -1]])
    truth = [{1}, {2, 4}, set(), {2}]
    results = retrieval_metrics(scores, ids, truth)
    assert results["mAP"] == pytest.approx((0.5 + 0.25 + 1) / 3)
    assert results["recall@1"] == pytest.approx(1 / 3)
    assert results["recall@5"] == results["recall@10"] == 1.0
    assert results["microAP"] == pytest.approx(0.525)
    assert (results["queries"], results["queries_evaluated"], results["queries_without_truth"]) == (4, 3, 1)
    assert (results["truth_pairs"], results["predictions"]) == (4, 11)
    block = format_metrics(results, "test")
    assert "0.5833" in block and "0.5250" in block and "1 without, skipped" in block


def test_no_query_with_truth_gives_no_numbers_rather_than_zeros():
    results = retrieval_metrics(np.array([[0.5]]), np.array([[0]]), [set()])
    assert math.isnan(results["mAP"]) and math.isnan(results["recall@1"]) and math.isnan(results["microAP"])
    with pytest.raises(InputError, match="do not match"):
        retrieval_metrics(np.zeros((2, 3)), np.zeros((2, 3), dtype=int), [set()])


def test_the_truth_file(tmp_path):
    good = tmp_path / "truth.tsv"
    good.write_text("# query\tgallery\nq/a.jpg\tg/b.jpg\n\n3,7\r\n a b.png\tc.png \n")
    assert read_truth(good) == [("q/a.jpg", "g/b.jpg"), ("3", "7"), ("a b.png", "c.png")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("q.jpg\tg.jpg\nonly-one-field\n")
    with pytest.raises(InputError, match="line 2 is 'only-one-field'"):
        read_truth(bad)
    empty = tmp_path / "empty.tsv"
    empty.write_text("# nothing\n")
    with pytest.raises(InputError, match="holds no pairs"):
        read_truth(empty)
    with pytest.raises(InputError, match="does not exist"):
        read_truth(tmp_path / "nowhere.tsv")


def test_recall_breaks_ties_against_the_method_but_a_tie_of_relevant_items_still_counts_at_rank_one():
    # query 0: two relevant items tied at the top: one of them is at rank 1 whatever the order -> recall@1 = 1
    # query 1: a relevant and an irrelevant item tied at the top: the irrelevant one first -> rank 2, recall@1 = 0
    scores = np.array([[0.9, 0.9, 0.1], [0.9, 0.9, 0.1]])
    ids = np.array([[0, 1, 2], [0, 1, 2]])
    results = retrieval_metrics(scores, ids, [{0, 1}, {1}])
    assert results["recall@1"] == 0.5 and results["recall@5"] == 1.0
    # AP: query 0: the run ends at rank 2 with 2 hits -> (2/2 + 2/2) / 2 = 1; query 1: 1 hit at rank 2 -> 1/2
    assert results["mAP"] == pytest.approx((1.0 + 0.5) / 2)

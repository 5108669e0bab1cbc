"""Weighted kNN against DINO's definition: cosine similarity, top-k, votes weighted exp(sim / T)."""

import pytest
import torch
import torch.nn.functional as F

from distill.errors import InputError
from distill.eval.knn import knn_classify


def _reference(train, train_labels, test, test_labels, k, temperature, num_classes):
    """Straight from the definition, one query at a time."""
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    top1 = top5 = 0
    for query, label in zip(test, test_labels):
        sims = train @ query
        order = sims.argsort(descending=True)[:k]
        votes = torch.zeros(num_classes, dtype=torch.float64)
        for index in order:
            votes[train_labels[index]] += torch.exp(sims[index].double() / temperature)
        ranked = votes.argsort(descending=True)
        top1 += int(ranked[0] == label)
        top5 += int(label in ranked[: min(5, k)] and votes[label] > 0)  # unvoted classes are no prediction
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


def test_matches_the_definition_with_chunking():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(7, 16, generator=generator)
    train_labels = torch.randint(0, 7, (300,), generator=generator)
    test_labels = torch.randint(0, 7, (90,), generator=generator)
    train = centers[train_labels] + 1.2 * torch.randn(300, 16, generator=generator)
    test = centers[test_labels] + 1.2 * torch.randn(90, 16, generator=generator)
    results = knn_classify(train, train_labels, test, test_labels, ks=(1, 3, 10, 20), temperature=0.07,
                           query_chunk=7, bank_chunk=13)  # chunk sizes that do not divide anything
    for k in (1, 3, 10, 20):
        top1, top5 = _reference(train, train_labels, test, test_labels, k, 0.07, 7)
        assert results[k]["top1"] == pytest.approx(top1)
        assert results[k]["top5"] == pytest.approx(top5)
    assert 40 < results[20]["top1"] < 100  # the clusters are learnable but not trivial


def test_temperature_decides_between_one_close_and_two_farther_neighbours():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    query, target = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    # T = 0.07: exp(1/T) > exp(0.8/T) + exp(0.6/T) -> class 0; T = 1: e^1 < e^0.8 + e^0.6 -> class 1
    assert knn_classify(bank, labels, query, target, ks=(3,), temperature=0.07)[3]["top1"] == 100.0
    assert knn_classify(bank, labels, query, target, ks=(3,), temperature=1.0)[3]["top1"] == 0.0


def test_features_are_compared_by_cosine_not_length():
    bank = torch.tensor([[10.0, 0.0], [0.1, 0.1]])
    labels = torch.tensor([0, 1])
    query = torch.tensor([[1.0, 1.1]])
    assert knn_classify(bank, labels, query, torch.tensor([1]), ks=(1,))[1]["top1"] == 100.0


def test_bad_input():
    good, labels = torch.randn(10, 4), torch.arange(10) % 2
    with pytest.raises(InputError, match="NaN or inf"):
        knn_classify(good, labels, torch.full((2, 4), float("nan")), labels[:2], ks=(3,))
    with pytest.raises(InputError, match="k must be between 1 and the 10"):
        knn_classify(good, labels, good, labels, ks=(20,))
    with pytest.raises(InputError, match="same D"):
        knn_classify(good, labels, torch.randn(2, 5), labels[:2], ks=(1,))

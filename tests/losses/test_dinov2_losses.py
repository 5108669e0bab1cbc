"""DINOv2's loss terms against their definitions (Oquab et al. 2023; facebookresearch/dinov2 dinov2/loss/), on
fixed tensors: iBOT (also with unmasked images), KoLeo (also a batch of one), Sinkhorn-Knopp, and the DINO term's
normalisation with local crops."""

import math

import pytest
import torch

from distill.data.masking import mask_weights
from distill.errors import InputError
from distill.losses.dino import DINOLoss
from distill.losses.ibot import IBOTPatchLoss
from distill.losses.koleo import KoLeoLoss
from distill.losses.sinkhorn import sinkhorn_knopp


def _log_softmax(row, tau):
    values = [v / tau for v in row]
    top = max(values)
    norm = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - norm for v in values]


def _softmax(row, tau):
    return [math.exp(v) for v in _log_softmax(row, tau)]


def test_ibot_weights_each_image_by_its_masked_count_and_divides_by_all_images():
    # 3 images of 4 tokens: image 0 has 2 masked tokens, image 1 one, image 2 none.
    masks = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    weights = mask_weights(masks)
    assert weights.tolist() == [0.5, 0.5, 1.0]
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [2.0, -1.0, 0.0]])
    teacher = torch.tensor([[0.2, 0.1, 0.0], [0.0, 0.3, 0.1], [0.1, 0.1, 0.4]])
    loss = IBOTPatchLoss(3, student_temp=0.1)
    value = loss(student, teacher, weights, n_images=3, teacher_temp=0.05)
    expected = 0.0
    for s, t, w in zip(student.tolist(), teacher.tolist(), weights.tolist()):
        q, log_p = _softmax(t, 0.05), _log_softmax(s, 0.1)
        expected -= w * sum(a * b for a, b in zip(q, log_p))
    assert value.item() == pytest.approx(expected / 3, rel=1e-5)
    # the center moved towards the mean teacher output of the masked tokens
    assert torch.allclose(loss.center, 0.1 * teacher.mean(dim=0, keepdim=True), atol=1e-7)


def test_ibot_without_any_masked_token_is_zero_not_nan():
    loss = IBOTPatchLoss(3)
    student = torch.zeros(0, 3, requires_grad=True)
    value = loss(student, torch.zeros(0, 3), torch.zeros(0), n_images=4, teacher_temp=0.04)
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(loss.center, torch.zeros(1, 3))


def test_koleo_is_minus_mean_log_nearest_neighbour_distance():
    features = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.1]])
    normed = [[v / math.hypot(*row) for v in row] for row in features.tolist()]
    total = 0.0
    for i, x in enumerate(normed):
        others = [j for j in range(4) if j != i]
        j = max(others, key=lambda k: sum(a * b for a, b in zip(x, normed[k])))
        total += math.log(math.dist(x, normed[j]) + 1e-8)
    assert KoLeoLoss()(features).item() == pytest.approx(-total / 4, rel=1e-5)


def test_koleo_of_one_image_is_a_clear_error_and_duplicates_stay_finite():
    with pytest.raises(InputError, match="at least 2"):
        KoLeoLoss()(torch.randn(1, 8))
    duplicates = KoLeoLoss()(torch.ones(3, 4))  # distance 0: log(eps), large but finite
    assert torch.isfinite(duplicates) and duplicates.item() > 10


def test_sinkhorn_rows_and_columns_sum_as_stated():
    torch.manual_seed(0)
    teacher = torch.randn(6, 5) * 0.1
    q = sinkhorn_knopp(teacher, teacher_temp=0.1, iterations=3)
    assert torch.allclose(q.sum(dim=1), torch.ones(6), atol=1e-5)  # each sample: a distribution
    # the last step normalised the samples; the prototypes are close to equal mass B/K after 3 iterations
    assert torch.allclose(q.sum(dim=0), torch.full((5,), 6 / 5), rtol=0.05)
    peaked = torch.randn(6, 5) * 3  # far from balanced: more iterations bring the prototypes closer to B/K
    spread = [float((sinkhorn_knopp(peaked, 0.1, n).sum(dim=0) - 1.2).abs().max()) for n in (1, 3, 30)]
    assert spread[0] > spread[1] > spread[2]
    # one iteration by hand
    Q = torch.exp(teacher / 0.1).t()
    Q /= Q.sum()
    Q /= Q.sum(dim=1, keepdim=True)
    Q /= 5
    Q /= Q.sum(dim=0, keepdim=True)
    Q /= 6
    assert torch.allclose(sinkhorn_knopp(teacher, 0.1, iterations=1), (Q * 6).t(), atol=1e-6)


def test_dino_term_averages_over_pairs_of_different_views_with_local_crops():
    """2 globals + 3 locals: 2 * 5 - 2 = 8 pairs, each a batch mean of the cross-entropy."""
    torch.manual_seed(1)
    batch, k = 2, 4
    student = torch.randn(5 * batch, k)
    teacher = torch.randn(2 * batch, k)
    loss = DINOLoss(k, num_global=2, student_temp=0.1, centering="center")
    value = loss(student, teacher, teacher_temp=0.04).item()
    total = 0.0
    for t in range(2):
        for s in range(5):
            if s == t:
                continue
            for b in range(batch):
                q = _softmax(teacher[t * batch + b].tolist(), 0.04)
                log_p = _log_softmax(student[s * batch + b].tolist(), 0.1)
                total -= sum(x * y for x, y in zip(q, log_p)) / batch
    assert value == pytest.approx(total / 8, rel=1e-5)


def _sinkhorn_float64(teacher, tau, iterations):
    """The definition in float64, where these logits neither overflow nor underflow."""
    Q = torch.exp(teacher.double() / tau).t()
    Q /= Q.sum()
    K, B = Q.shape
    for _ in range(iterations):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    return (Q * B).t()


@pytest.mark.parametrize("std, tau", [(3.0, 0.04), (10.0, 0.04), (3.0, 0.01)])
def test_sinkhorn_stays_finite_and_exact_on_extreme_logits(std, tau):
    """Heads with norm_last_layer=false grow logits like these; in float32 exp underflows to 0 for whole
    prototypes, and the plain computation divided by their zero sums (every target NaN)."""
    torch.manual_seed(0)
    teacher = torch.randn(32, 64) * std
    q = sinkhorn_knopp(teacher, tau, iterations=3)
    assert torch.isfinite(q).all()
    assert torch.allclose(q.sum(dim=1), torch.ones(32), atol=1e-5)
    if std * 6 / tau < 700:  # the float64 reference itself overflows beyond this
        assert torch.allclose(q.double(), _sinkhorn_float64(teacher, tau, 3), atol=1e-5)

"""Each loss against values computed by hand from its definition."""

import math

import pytest
import torch

from candle_dist.errors import UserInputError
from candle_dist.model.losses import build_loss

LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]], dtype=torch.float64)
TARGETS = torch.tensor([0, 2])
COUNTS = [3, 1, 0]


def _ce(row, target, adjust=(0.0, 0.0, 0.0)):
    z = [x + a for x, a in zip(row, adjust, strict=True)]
    return math.log(sum(math.exp(v) for v in z)) - z[target]


def test_cla_by_hand():
    # pi = (n + 1) / sum(n + 1) = (4, 2, 1) / 7
    adjust = [math.log(4 / 7), math.log(2 / 7), math.log(1 / 7)]
    expected = (_ce([2, 0, -1], 0, adjust) + _ce([0.5, 1.5, 0], 2, adjust)) / 2
    got = build_loss("cla", COUNTS)(LOGITS, TARGETS)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    tau = build_loss("cla", COUNTS, tau=0.5)(LOGITS, TARGETS)
    half = [a / 2 for a in adjust]
    expected = (_ce([2, 0, -1], 0, half) + _ce([0.5, 1.5, 0], 2, half)) / 2
    assert tau.item() == pytest.approx(expected, rel=1e-12)


def test_cross_entropy_by_hand():
    expected = (_ce([2, 0, -1], 0) + _ce([0.5, 1.5, 0], 2)) / 2
    assert build_loss("cross_entropy", COUNTS)(LOGITS, TARGETS).item() == pytest.approx(expected)


def test_logit_adjusted_excludes_classes_without_images():
    # pi over base classes (3, 1) / 4; class 2 has no prior: its column and its rows drop out
    loss = build_loss("logit_adjusted", COUNTS)
    targets = torch.tensor([0, 1])
    adjust = [math.log(3 / 4), math.log(1 / 4), -math.inf]
    expected = (_ce([2, 0, -1], 0, adjust) + _ce([0.5, 1.5, 0], 1, adjust)) / 2
    assert loss(LOGITS, targets).item() == pytest.approx(expected, rel=1e-12)
    only_first = loss(LOGITS, TARGETS)  # the second row targets class 2: excluded
    assert only_first.item() == pytest.approx(_ce([2, 0, -1], 0, adjust), rel=1e-12)
    logits = LOGITS.clone().requires_grad_(True)
    loss(logits, TARGETS).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[1].abs().sum() == 0


def test_balanced_softmax_by_hand():
    adjust = [math.log(3), 0.0, -math.inf]
    expected = _ce([0.5, 1.5, 0], 1, adjust)
    got = build_loss("balanced_softmax", COUNTS)(LOGITS[1:], torch.tensor([1]))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_focal_by_hand():
    ce = [_ce([2, 0, -1], 0), _ce([0.5, 1.5, 0], 2)]
    expected = sum((1 - math.exp(-c)) ** 2 * c for c in ce) / 2
    assert build_loss("focal", COUNTS)(LOGITS, TARGETS).item() == pytest.approx(expected)


def test_class_balanced_by_hand():
    beta = 0.9
    raw = [(1 - beta) / (1 - beta ** (n + 1)) for n in COUNTS]
    weights = [w / (sum(raw) / 3) for w in raw]
    ce = [_ce([2, 0, -1], 0), _ce([0.5, 1.5, 0], 2)]
    expected = (weights[0] * ce[0] + weights[2] * ce[1]) / (weights[0] + weights[2])
    got = build_loss("class_balanced", COUNTS, beta=beta)(LOGITS, TARGETS)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_bad_loss_input():
    with pytest.raises(UserInputError, match="unknown loss"):
        build_loss("hinge", COUNTS)
    with pytest.raises(UserInputError, match="non-negative"):
        build_loss("cla", [3, -1])
    with pytest.raises(UserInputError, match="columns"):
        build_loss("cla", COUNTS)(torch.zeros(2, 5), TARGETS)

"""Each loss against values computed by hand from its definition, and the long-tail baselines
(LDAM, LADE, GRW, class-balanced) against the published formulas written out plainly in float64
(`published_loss`, also the reference of the chunked, class-parallel and bf16 tests)."""

import math

import pytest
import torch
import torch.nn.functional as F

from candle_dist.errors import UserInputError
from candle_dist.model.losses import build_loss, loss_options

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
    got = build_loss("class_balanced", COUNTS, beta=beta, count_offset=1)(LOGITS, TARGETS)
    assert got.item() == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------- published long-tail baselines
def published_loss(name, logits, targets, counts, **options):
    """The published definition of `name`, plainly: dense float64 logits, positive counts."""
    counts = torch.as_tensor(counts, dtype=torch.float64) + options.pop("count_offset", 0.0)
    num_classes = len(counts)
    if name == "ldam":
        max_m, s = options.get("max_margin", 0.5), options.get("margin_scale", 30.0)
        m_list = 1.0 / torch.sqrt(torch.sqrt(counts))
        m_list = m_list * (max_m / torch.max(m_list))
        index = F.one_hot(targets, num_classes).bool()
        batch_m = (m_list[None, :] @ index.double().t()).view(-1, 1)
        output = torch.where(index, logits - batch_m * s, logits)
        return F.cross_entropy(output, targets)
    if name == "lade":
        remine_lambda = options.get("remine_lambda", 0.1)
        weight = options.get("estim_loss_weight", 0.1)
        prior = counts / counts.sum()
        balanced = torch.tensor(1.0 / num_classes)
        ce = F.cross_entropy(logits + torch.log(prior)[None, :], targets)
        is_target = targets == torch.arange(num_classes)[:, None]  # C x N
        x_p = logits.t() * is_target
        x_q = (logits - torch.log(prior + 1e-9) + torch.log(balanced + 1e-9)).t()
        first = x_p.sum(-1) / (is_target.sum(-1).double() + 1e-8)
        second = torch.logsumexp(x_q, -1) - math.log(x_p.shape[-1])
        estimate = first - second - remine_lambda * second**2
        return ce + weight * -(estimate * prior).sum()
    if name == "grw":
        ratio = counts / counts.sum()
        weights = 1.0 / ratio ** options.get("exp_scale", 1.0)
        return F.cross_entropy(logits, targets, weight=weights / weights.mean())
    if name == "class_balanced":
        beta = options.get("beta", 0.9999)
        weights = (1.0 - beta) / (1.0 - beta**counts)
        return F.cross_entropy(logits, targets, weight=weights / weights.mean())
    raise ValueError(name)


PUBLISHED = {
    "ldam": [{}, {"max_margin": 0.3, "margin_scale": 10.0}],
    "lade": [{}, {"remine_lambda": 0.5, "estim_loss_weight": 1.0}],
    "grw": [{}, {"exp_scale": 0.5}],
    "class_balanced": [{}, {"beta": 0.9}],
}
CASES = [(name, options) for name, variants in PUBLISHED.items() for options in variants]
CASES += [(name, {"count_offset": 1.0}) for name in PUBLISHED]
POSITIVE = [40, 17, 9, 4, 2, 1]


def _batch(seed=0, rows=14):
    """Logits at CLIP's scale; class 5 is no row's target (LADE's empty-class convention)."""
    g = torch.Generator().manual_seed(seed)
    logits = 8.0 * torch.randn(rows, len(POSITIVE), generator=g, dtype=torch.float64)
    targets = torch.randint(0, 5, (rows,), generator=g)
    return logits, targets


@pytest.mark.parametrize(("name", "options"), CASES, ids=str)
def test_published_definitions(name, options):
    logits, targets = _batch()
    want = published_loss(name, logits, targets, POSITIVE, **options)
    leaf = logits.clone().requires_grad_(True)
    got = build_loss(name, POSITIVE, **options)(leaf, targets)
    assert abs(got.item() - want.item()) <= 1e-6 * max(1.0, abs(want.item()))
    ref = logits.clone().requires_grad_(True)
    published_loss(name, ref, targets, POSITIVE, **options).backward()
    got.backward()
    assert (leaf.grad - ref.grad).abs().max() <= 1e-6 * ref.grad.abs().max()


def test_ldam_margin_hits_the_target_logit_only():
    logits, targets = _batch()
    loss = build_loss("ldam", POSITIVE, max_margin=0.5, margin_scale=2.0)
    margins = torch.tensor(POSITIVE, dtype=torch.float64) ** -0.25
    shifted = logits.clone()
    shifted[torch.arange(len(targets)), targets] -= 2.0 * 0.5 * margins[targets] / margins.max()
    assert torch.allclose(loss(logits, targets), F.cross_entropy(shifted, targets), rtol=1e-12)


def test_lade_class_without_rows_keeps_only_its_second_term():
    """A class no row targets: its first term is 0 (sum over no rows / (0 + 1e-8)), and it still
    contributes -pi_c (-T2_c - lambda T2_c^2); moving logits in its column changes only T2_c."""
    logits, targets = _batch()
    assert not (targets == 5).any()
    loss = build_loss("lade", POSITIVE, estim_loss_weight=1.0, remine_lambda=0.0)
    prior = torch.tensor(POSITIVE, dtype=torch.float64) / sum(POSITIVE)
    moved = logits.clone()
    moved[:, 5] += 1.0  # T2_5 grows by 1 exactly; CE of z + log pi changes too
    ce = [F.cross_entropy(x + torch.log(prior), targets) for x in (logits, moved)]
    change = (loss(moved, targets) - ce[1]) - (loss(logits, targets) - ce[0])
    assert change.item() == pytest.approx(prior[5].item(), rel=1e-9)


@pytest.mark.parametrize("name", ["ldam", "lade", "grw", "class_balanced"])
def test_classes_without_images_are_refused_with_the_fix(name):
    counts = [5, 3] + [0] * 9
    with pytest.raises(UserInputError) as error:
        build_loss(name, counts)
    message = str(error.value)
    assert "\n" not in message
    assert "9 classes have 0 training images (ids 2, 3, 4, 5, 6, ...)" in message
    assert "count_offset=1" in message and "cla" in message
    loss = build_loss(name, counts, count_offset=1)  # each class's prototype row counted
    logits, targets = torch.randn(4, 11, dtype=torch.float64), torch.tensor([0, 1, 7, 10])
    assert torch.isfinite(loss(logits, targets))
    with pytest.raises(UserInputError, match="count_offset"):
        build_loss(name, counts, count_offset=-1)


def test_count_offset_is_added_before_the_formula():
    logits, targets = _batch()
    shifted = [n + 2.5 for n in POSITIVE]
    for name in ("ldam", "lade", "grw", "class_balanced", "logit_adjusted", "balanced_softmax"):
        got = build_loss(name, POSITIVE, count_offset=2.5)(logits, targets)
        want = build_loss(name, shifted)(logits, targets)
        assert torch.allclose(got, want, rtol=1e-12), name


def test_options_and_defaults():
    assert loss_options("ldam") == {"max_margin": 0.5, "margin_scale": 30.0, "count_offset": 0.0}
    assert loss_options("lade") == {
        "remine_lambda": 0.1,
        "estim_loss_weight": 0.1,
        "count_offset": 0.0,
    }
    assert loss_options("grw") == {"exp_scale": 1.0, "count_offset": 0.0}
    assert loss_options("class_balanced") == {"beta": 0.9999, "count_offset": 0.0}
    with pytest.raises(UserInputError, match="its options are max_margin, margin_scale"):
        build_loss("ldam", POSITIVE, tau=1.0)


def test_bad_loss_input():
    with pytest.raises(UserInputError, match="unknown loss"):
        build_loss("hinge", COUNTS)
    with pytest.raises(UserInputError, match="non-negative"):
        build_loss("cla", [3, -1])
    with pytest.raises(UserInputError, match="columns"):
        build_loss("cla", COUNTS)(torch.zeros(2, 5), TARGETS)

"""Sampled mode: a step over a class subset equals the exact step of a head built on that subset."""

import numpy as np
import torch

from candle_dist.model.head import CandleHead
from candle_dist.model.losses import AdjustedCrossEntropy, CompensatingLogitAdjustedLoss
from candle_dist.train.trainer import sample_classes

C, C_BASE, D, B = 13, 9, 16, 5


def _head(text, protos, **kw):
    return CandleHead(
        text_features=text,
        visual_prototypes=protos,
        logit_scale=2.0,
        num_heads=4,
        attn_dropout=0.0,
        **kw,
    ).double()


def test_subset_step_equals_exact_step_on_the_subset():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(C, D, generator=g, dtype=torch.float64)
    protos = torch.randn(C_BASE, D, generator=g, dtype=torch.float64)
    feats = torch.randn(B, D, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 7, 2])
    counts = torch.tensor([40, 30, 20, 10, 8, 6, 4, 2, 1] + [0] * (C - C_BASE))
    subset = torch.tensor([0, 2, 3, 5, 7, 8, 10, 12])  # batch classes + some others, new ones too
    full = _head(text, protos)
    full_loss = CompensatingLogitAdjustedLoss(counts).double()
    loss, _ = full.loss(feats, labels, full_loss, subset)
    loss.backward()

    # the same step written as an exact head over the subset, with the full prior's entries
    base = subset[subset < C_BASE]
    small = _head(text[subset], protos[base])
    small.load_state_dict(
        {
            **full.state_dict(),
            "text_features": text[subset],
            "visual_prototypes": protos[base],
            "virtual_prototypes": full.virtual_prototypes.detach()[
                subset[subset >= C_BASE] - C_BASE
            ],
        }
    )
    small_loss = AdjustedCrossEntropy(len(subset), full_loss.logit_adjustment[subset])
    remap = {int(c): i for i, c in enumerate(subset)}
    ref, _ = small.loss(feats, torch.tensor([remap[int(y)] for y in labels]), small_loss)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-10)
    assert torch.allclose(full.proj_image.grad, small.proj_image.grad, rtol=1e-9, atol=1e-12)
    new_rows = subset[subset >= C_BASE] - C_BASE
    assert torch.allclose(full.virtual_prototypes.grad[new_rows], small.virtual_prototypes.grad)
    untouched = torch.ones(C - C_BASE, dtype=torch.bool)
    untouched[new_rows] = False
    assert full.virtual_prototypes.grad[untouched].abs().sum() == 0


def test_full_fraction_equals_exact_mode():
    g = torch.Generator().manual_seed(1)
    text = torch.randn(C, D, generator=g, dtype=torch.float64)
    protos = torch.randn(C_BASE, D, generator=g, dtype=torch.float64)
    feats = torch.randn(B, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C_BASE, (B,), generator=g)
    criterion = CompensatingLogitAdjustedLoss([5] * C_BASE + [0] * (C - C_BASE)).double()
    head = _head(text, protos)
    every = sample_classes(0, 0, labels.numpy(), 1.0, C, (0, C))
    assert torch.equal(every, torch.arange(C))
    exact, _ = head.loss(feats, labels, criterion)
    sampled, _ = head.loss(feats, labels, criterion, every)
    assert torch.allclose(exact, sampled, rtol=1e-12)


def test_sampled_classes_cover_the_batch_and_do_not_depend_on_rank_count():
    labels = np.array([3, 3, 17, 40])
    whole = sample_classes(5, 9, labels, 0.1, 50, (0, 50))
    assert set(labels) <= set(whole.tolist())
    assert 4 <= len(whole) <= 20
    for ranges in ([(0, 17), (17, 34), (34, 50)], [(0, 25), (25, 50)]):
        parts = [sample_classes(5, 9, labels, 0.1, 50, r) for r in ranges]
        assert torch.equal(torch.cat(parts), whole)

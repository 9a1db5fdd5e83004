"""CandleHead against the dense oracle (docs/method.md): logits, loss, gradients, SGD steps."""

import itertools

import pytest
import torch

from candle_dist.errors import UserInputError
from candle_dist.model import attention as attention_module
from candle_dist.model.head import CandleHead
from candle_dist.model.losses import CompensatingLogitAdjustedLoss
from tests.oracle import DenseCandleHead, dense_cla

MASKS = ["none", "in_visual", "in_text", "between_visual_text"]
INITS = ["text", "visual"]
C, C_BASE, D, B, HEADS = 11, 7, 16, 6, 4


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(C, D, generator=g, dtype=torch.float64)
    protos = torch.randn(C_BASE, D, generator=g, dtype=torch.float64) + 0.5
    feats = torch.randn(B, D, generator=g, dtype=torch.float64) + 0.5
    labels = torch.randint(0, C_BASE, (B,), generator=g)
    counts = torch.tensor([50, 20, 9, 5, 3, 2, 1] + [0] * (C - C_BASE))
    return text, protos, feats, labels, counts


def _pair(mask, init, tie=True, scale=0.7):
    text, protos, feats, labels, counts = _problem()
    torch.manual_seed(1)
    head = CandleHead(
        text_features=text,
        visual_prototypes=protos,
        logit_scale=2.0,
        visual_scale=scale,
        mask=mask,
        virtual_init=init,
        tie_virtual_to_text=tie,
        num_heads=HEADS,
        attn_dropout=0.0,
    ).double()
    torch.nn.init.normal_(head.fusion.attn.in_proj_bias, std=0.1)
    torch.nn.init.normal_(head.fusion.attn.out_proj.bias, std=0.1)
    oracle = DenseCandleHead(text, protos, 2.0, scale, mask, init, tie, HEADS).double()
    oracle.load_from(head)
    return head, oracle, feats, labels, counts


def _close(a, b, tol=1e-6):
    assert a.shape == b.shape
    err = (a - b).abs().max() / b.abs().max().clamp(min=1e-12)
    assert err <= tol, f"relative error {err:.3g}"


def _oracle_params(oracle):
    return {
        "virtual_prototypes": oracle.virtual_prototypes,
        "proj_image": oracle.proj_image,
        "proj_text": oracle.proj_text,
        "fusion.ratio": oracle.ratio,
        "fusion.norm.weight": oracle.norm.weight,
        "fusion.norm.bias": oracle.norm.bias,
        "fusion.attn.in_proj_weight": oracle.attn.in_proj_weight,
        "fusion.attn.in_proj_bias": oracle.attn.in_proj_bias,
        "fusion.attn.out_proj.weight": oracle.attn.out_proj.weight,
        "fusion.attn.out_proj.bias": oracle.attn.out_proj.bias,
    }


@pytest.mark.parametrize(("mask", "init"), list(itertools.product(MASKS, INITS)))
@pytest.mark.parametrize("chunk_elements", [attention_module.CHUNK_ELEMENTS, 50])
def test_head_matches_dense_oracle(mask, init, chunk_elements, monkeypatch):
    monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(attention_module, "MIN_CHUNK_ROWS", 1)
    head, oracle, feats, labels, counts = _pair(mask, init)
    criterion = CompensatingLogitAdjustedLoss(counts).double()
    targets = torch.cat([labels, torch.arange(C)])
    head_params = dict(head.named_parameters())
    opt_head = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    opt_oracle = torch.optim.SGD(
        _oracle_params(oracle).values(), lr=0.5, momentum=0.9, weight_decay=5e-4
    )
    for _step in range(3):
        for phase in ("train", "test"):
            for mine, ref in zip(head(feats, phase), oracle(feats, phase), strict=True):
                _close(mine, ref)
        loss, _ = head.loss(feats, labels, criterion)
        ref_loss = sum(dense_cla(logits, targets, counts) for logits in oracle(feats))
        _close(loss, ref_loss)
        # the dense logits through the same criterion give the same loss
        _close(sum(criterion(logits, targets) for logits in head(feats)), ref_loss)
        opt_head.zero_grad()
        opt_oracle.zero_grad()
        loss.backward()
        ref_loss.backward()
        for name, ref_param in _oracle_params(oracle).items():
            _close(head_params[name].grad, ref_param.grad)
        opt_head.step()
        opt_oracle.step()
        for name, ref_param in _oracle_params(oracle).items():
            _close(head_params[name].detach(), ref_param.detach())
    # the tie: new classes' text features follow the virtual prototypes
    new_text = head.state_dict()["text_features"][C_BASE:]
    if init == "text":
        _close(new_text, oracle.text_storage[C_BASE:])
        assert not torch.allclose(new_text, _problem()[0][C_BASE:])


def test_untied_text_features_stay_fixed():
    head, _, feats, labels, counts = _pair("none", "text", tie=False)
    criterion = CompensatingLogitAdjustedLoss(counts).double()
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    loss, _ = head.loss(feats, labels, criterion)
    loss.backward()
    opt.step()
    assert torch.equal(head.state_dict()["text_features"], _problem()[0])
    assert not torch.allclose(head.virtual_prototypes, _problem()[0][C_BASE:])


def test_state_dict_names_match_the_published_head():
    head, *_ = _pair("none", "text")
    assert set(head.state_dict()) == {
        "text_features",
        "visual_prototypes",
        "virtual_prototypes",
        "proj_image",
        "proj_text",
        "fusion.ratio",
        "fusion.norm.weight",
        "fusion.norm.bias",
        "fusion.attn.in_proj_weight",
        "fusion.attn.in_proj_bias",
        "fusion.attn.out_proj.weight",
        "fusion.attn.out_proj.bias",
    }
    fresh, *_ = _pair("none", "text")
    fresh.load_state_dict(head.state_dict())


def test_attention_dropout_is_active_in_training_only():
    text, protos, feats, _, _ = _problem()
    head = CandleHead(
        text_features=text,
        visual_prototypes=protos,
        logit_scale=2.0,
        num_heads=HEADS,
        attn_dropout=0.5,
    ).double()
    torch.manual_seed(0)
    first = head(feats)[1]
    second = head(feats)[1]
    assert not torch.allclose(first, second)
    head.eval()
    assert torch.equal(head(feats)[1], head(feats)[1])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(visual_prototypes=torch.randn(3, 8)), "dimension"),
        (dict(mask="diagonal"), "mask"),
        (dict(virtual_init="random"), "virtual_init"),
        (dict(text_features=torch.full((5, 16), float("nan"))), "NaN"),
        (dict(visual_prototypes=torch.randn(6, 16)), "every class"),
    ],
)
def test_bad_construction_is_a_clear_error(change, message):
    args = dict(
        text_features=torch.randn(5, 16),
        visual_prototypes=torch.randn(3, 16),
        logit_scale=1.0,
        num_heads=4,
    )
    args.update(change)
    with pytest.raises(UserInputError, match=message):
        CandleHead(**args)


def test_wrong_feature_dimension_and_loss_size_are_clear_errors():
    head = CandleHead(
        text_features=torch.randn(5, 16),
        visual_prototypes=torch.randn(3, 16),
        logit_scale=1.0,
        num_heads=4,
    )
    with pytest.raises(UserInputError, match="dimension"):
        head(torch.randn(2, 8))
    with pytest.raises(UserInputError, match="classes"):
        head.loss(torch.randn(2, 16), torch.tensor([0, 1]), CompensatingLogitAdjustedLoss([1, 2]))

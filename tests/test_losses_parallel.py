"""LDAM, LADE, GRW and class-balanced losses with the classes split over P = 2, 3 gloo ranks give
the one-process result: the target offset and column statistics of the chunked cross-entropy
(against dense), then `CandleHead.loss` (value and every gradient, float64, <= 1e-9 relative),
exact and sampled mode, with batches split unevenly as the trainer splits them."""

import pytest
import torch

from candle_dist.model.head import CandleHead
from candle_dist.model.losses import build_loss
from candle_dist.parallel.comm import ClassGroup
from candle_dist.parallel.partition import Partition
from candle_dist.train.optimizer import sum_replicated_gradients
from candle_dist.train.trainer import sample_classes
from tests.dist_utils import run_in_processes
from tests.test_chunked_loss import (
    column_statistics_case,
    dense_column_statistics,
    dense_target_offset,
    target_offset_case,
)

C, C_BASE, D, HEADS = 11, 7, 16, 4
COUNTS = torch.tensor([50, 20, 9, 5, 3, 2, 1] + [0] * (C - C_BASE))
# (loss, options, batch, sampled); batch 2 leaves a rank without images when P = 3
CASES = [
    ("ldam", {"count_offset": 1.0}, 7, False),
    ("lade", {"count_offset": 1.0}, 7, False),
    ("lade", {"count_offset": 1.0, "remine_lambda": 0.5, "estim_loss_weight": 1.0}, 2, False),
    ("grw", {"count_offset": 1.0, "exp_scale": 0.5}, 7, False),
    ("class_balanced", {"count_offset": 1.0, "beta": 0.9}, 7, False),
    ("ldam", {"count_offset": 1.0}, 7, True),
    ("lade", {"count_offset": 1.0}, 7, True),
]
CHUNKS = [1, 4, 64]


def _head_case(comm: ClassGroup, case: tuple) -> dict:
    """One loss evaluation and backward on this rank's share of the batch."""
    name, options, batch, sampled = case
    g = torch.Generator().manual_seed(0)
    text = torch.randn(C, D, generator=g, dtype=torch.float64)
    protos = torch.randn(C_BASE, D, generator=g, dtype=torch.float64) + 0.5
    feats = torch.randn(batch, D, generator=g, dtype=torch.float64) + 0.5
    labels = torch.randint(0, C_BASE, (batch,), generator=g)
    torch.manual_seed(1)
    head = CandleHead(
        text_features=text,
        visual_prototypes=protos,
        logit_scale=2.0,
        visual_scale=0.7,
        mask="in_visual",
        num_heads=HEADS,
        attn_dropout=0.0,
        comm=comm,
        chunk_rows=5,
    )
    with torch.no_grad():
        for bias in (head.fusion.attn.in_proj_bias, head.fusion.attn.out_proj.bias):
            bias.normal_(std=0.1)
    classes = None
    if sampled:
        span = (head.class_start, head.class_stop)
        classes = sample_classes(0, 0, labels.numpy(), 0.5, C, span)
    lo, hi = Partition(batch, comm.world_size).range(comm.rank)
    criterion = build_loss(name, COUNTS, **options).double()
    loss, _ = head.loss(feats[lo:hi], labels[lo:hi], criterion, classes)
    loss.backward()
    sum_replicated_gradients(head)
    return {
        "loss": loss.detach(),
        "grads": {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None},
        "classes": (head.class_start, head.class_stop),
    }


def _results(comm: ClassGroup) -> dict:
    return {
        "offset": {chunk: target_offset_case(comm, chunk) for chunk in CHUNKS},
        "columns": {chunk: column_statistics_case(comm, chunk) for chunk in CHUNKS},
        "head": [_head_case(comm, case) for case in CASES],
    }


def _worker(rank: int, world_size: int) -> dict:
    return _results(ClassGroup())


@pytest.fixture(scope="module")
def one_rank() -> dict:
    return _results(ClassGroup(distributed=False))


@pytest.fixture(scope="module", params=[2, 3], ids=lambda p: f"P{p}")
def ranks(request) -> list[dict]:
    return run_in_processes(_worker, request.param)


def _close(mine: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    assert mine.shape == ref.shape, f"{what}: shape {tuple(mine.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    err = float((mine - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def test_target_offset_and_column_statistics_match_dense(ranks):
    world_size = len(ranks)
    for kind, dense in (("offset", dense_target_offset), ("columns", dense_column_statistics)):
        ref_value, ref_rows, ref_cols = dense()
        for chunk in CHUNKS:
            grad_rows = torch.zeros_like(ref_rows)
            for rank, result in enumerate(ranks):
                value, rank_rows, rank_cols = result[kind][chunk]
                start, stop = Partition(ref_cols.shape[0], world_size).range(rank)
                what = f"P={world_size} rank {rank} {kind} chunk {chunk}"
                if kind == "offset":  # every rank holds the full per-row loss
                    _close(value, ref_value, 1e-12, f"{what} value")
                else:  # each rank its own columns' statistics
                    _close(value, ref_value[:, start:stop], 1e-12, f"{what} value")
                _close(rank_cols, ref_cols[start:stop], 1e-12, f"{what} grad cols")
                grad_rows += rank_rows
            _close(grad_rows, ref_rows, 1e-12, f"P={world_size} {kind} chunk {chunk} grad rows")


IDS = [f"{name}-{batch}-{'sampled' if sampled else 'exact'}" for name, _, batch, sampled in CASES]


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_head_loss_matches_one_rank(ranks, one_rank, index):
    ref = one_rank["head"][index]
    for rank, result in enumerate(ranks):
        mine = result["head"][index]
        start, stop = mine["classes"]
        where = f"P={len(ranks)} rank {rank}"
        _close(mine["loss"], ref["loss"], 1e-9, f"{where} loss")
        assert mine["grads"].keys() == ref["grads"].keys()
        for name, full in ref["grads"].items():
            if name == "virtual_prototypes":
                full = full[max(start, C_BASE) - C_BASE : max(stop, C_BASE) - C_BASE]
            _close(mine["grads"][name], full, 1e-9, f"{where} grad {name}")

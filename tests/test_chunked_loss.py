"""The chunked, class-parallel cross-entropy against F.cross_entropy on the full dense logits.

Values and gradients (rows, columns) with a per-row upstream gradient, in one process and with
the columns split over P = 2, 3 gloo ranks; every rank owns some target classes, and the columns
of classes without a prior carry a -inf bias (rows targeting them are excluded, as
`LogitAdjustedLoss` does), one rank owning only such columns when P = 3. Also: a per-row target
offset (LDAM's margin), the column statistics (LADE's), and the new losses inside
`CandleHead.loss` against their published definitions on the dense oracle's logits.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from candle_dist.model.losses import build_loss
from candle_dist.parallel.comm import ClassGroup
from candle_dist.parallel.cross_entropy import (
    class_parallel_column_statistics,
    class_parallel_cross_entropy,
    sum_over_ranks,
)
from candle_dist.parallel.partition import Partition
from tests.dist_utils import run_in_processes
from tests.test_head import _oracle_params, _pair
from tests.test_losses import published_loss

R, C, D, SCALE = 13, 11, 8, 7.5
EXCLUDED = range(7, C)  # -inf bias: with P = 3 the last rank (classes 8..10) owns only these


def _problem(excluded: bool):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(R, D, generator=g, dtype=torch.float64)
    cols = torch.randn(C, D, generator=g, dtype=torch.float64)
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    targets = torch.arange(R) % C  # every class is a target, so every rank owns some
    upstream = torch.rand(R, generator=g, dtype=torch.float64) + 0.5
    keep = torch.ones(R, dtype=torch.bool)
    if excluded:
        bias[list(EXCLUDED)] = -torch.inf
        keep = bias[targets].isfinite()
    return rows, cols, bias, targets, upstream, keep


def _dense(excluded: bool):
    """Per-row loss of the kept rows and d(sum upstream * loss)/d(rows, cols), all dense."""
    rows, cols, bias, targets, upstream, keep = _problem(excluded)
    rows.requires_grad_(True)
    cols.requires_grad_(True)
    logits = SCALE * rows @ cols.t() + bias
    loss = F.cross_entropy(logits[keep], targets[keep], reduction="none")
    (upstream[keep] * loss).sum().backward()
    return loss.detach(), rows.grad, cols.grad


def _chunked(comm: ClassGroup, excluded: bool, chunk_rows: int):
    """The same through class_parallel_cross_entropy, holding this rank's columns only."""
    rows, cols, bias, targets, upstream, keep = _problem(excluded)
    start, stop = Partition(C, comm.world_size).range(comm.rank)
    rows.requires_grad_(True)
    local_cols = cols[start:stop].clone().requires_grad_(True)
    per_row = class_parallel_cross_entropy(
        rows,
        local_cols,
        SCALE,
        bias[start:stop],
        targets,
        col_start=start,
        comm=comm,
        chunk_rows=chunk_rows,
    )
    (upstream[keep] * per_row[keep]).sum().backward()
    return per_row.detach()[keep], rows.grad, local_cols.grad


def _close(mine, ref, tol=1e-12):
    assert mine.shape == ref.shape
    assert torch.isfinite(mine).all()
    err = (mine - ref).abs().max() / ref.abs().max()
    assert err <= tol, f"relative error {err:.3g}"


CASES = [(excluded, chunk) for excluded in (False, True) for chunk in (1, 4, R, 64)]


@pytest.mark.parametrize(("excluded", "chunk_rows"), CASES)
def test_single_process_matches_dense(excluded, chunk_rows):
    loss, grad_rows, grad_cols = _chunked(ClassGroup(distributed=False), excluded, chunk_rows)
    ref_loss, ref_rows, ref_cols = _dense(excluded)
    _close(loss, ref_loss)
    _close(grad_rows, ref_rows)
    _close(grad_cols, ref_cols)


def test_float32_matches_dense():
    rows, cols, bias, targets, _, _ = _problem(False)
    per_row = class_parallel_cross_entropy(
        rows.float(), cols.float(), SCALE, bias.float(), targets, chunk_rows=4
    )
    ref = F.cross_entropy(SCALE * rows @ cols.t() + bias, targets, reduction="none")
    _close(per_row.double(), ref, 1e-5)


def _ranks_worker(rank: int, world_size: int) -> dict:
    comm = ClassGroup()
    assert (comm.rank, comm.world_size, comm.distributed) == (rank, world_size, True)
    return {case: _chunked(comm, *case) for case in CASES}


@pytest.mark.parametrize("world_size", [2, 3])
def test_class_parallel_matches_dense(world_size):
    results = run_in_processes(_ranks_worker, world_size)
    for excluded, chunk_rows in CASES:
        ref_loss, ref_rows, ref_cols = _dense(excluded)
        grad_rows = torch.zeros_like(ref_rows)
        for rank, result in enumerate(results):
            loss, rank_grad_rows, grad_cols = result[(excluded, chunk_rows)]
            _close(loss, ref_loss)  # every rank holds the full per-row loss
            start, stop = Partition(C, world_size).range(rank)
            if excluded and start >= EXCLUDED.start:  # only -inf columns: no gradient
                assert torch.equal(grad_cols, torch.zeros_like(grad_cols))
            else:
                _close(grad_cols, ref_cols[start:stop])
            grad_rows += rank_grad_rows  # each rank's share: its own columns' contribution
        _close(grad_rows, ref_rows)


def test_tiny_probabilities_are_flushed_not_denormal():
    """At CLIP's scale s = 100 most softmax terms fall below float32's smallest normal; they are
    flushed to 0 (denormals would make exp ~10x slower): loss and gradients stay those of the
    dense fp64 computation, and columns with a -inf bias get exactly zero gradient."""
    g = torch.Generator().manual_seed(0)
    rows = F.normalize(torch.randn(64, 32, generator=g, dtype=torch.float64), dim=-1)
    cols = F.normalize(torch.randn(500, 32, generator=g, dtype=torch.float64), dim=-1)
    bias = torch.zeros(500, dtype=torch.float64)
    bias[450:] = -torch.inf
    targets = torch.randint(0, 450, (64,), generator=g)
    dense_rows, dense_cols = rows.clone().requires_grad_(True), cols.clone().requires_grad_(True)
    dense = F.cross_entropy(100.0 * dense_rows @ dense_cols.t() + bias, targets, reduction="sum")
    dense.backward()
    mine_rows, mine_cols = rows.float().requires_grad_(True), cols.float().requires_grad_(True)
    loss = class_parallel_cross_entropy(
        mine_rows, mine_cols, 100.0, bias.float(), targets, chunk_rows=16
    ).sum()
    loss.backward()
    assert abs(loss.item() - dense.item()) <= 1e-5 * dense.item()
    for mine, want in ((mine_rows.grad, dense_rows.grad), (mine_cols.grad, dense_cols.grad)):
        assert (mine.double() - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(mine_cols.grad[450:], torch.zeros(50, 32))


class _RecordOps(TorchDispatchMode):
    """The names of the ops that run while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_no_host_sync():
    """No op whose output size or value the host must wait for (nonzero, item): on a GPU each
    would stall the stream once per chunk."""
    rows, cols, bias, targets, upstream, _ = _problem(False)
    rows.requires_grad_(True)
    cols.requires_grad_(True)
    with _RecordOps() as recorded:
        loss = class_parallel_cross_entropy(rows, cols, SCALE, bias, targets, chunk_rows=4)
        (upstream * loss).sum().backward()
    assert "addmm" in recorded.ops  # the mode sees the Function's ops
    assert not recorded.ops & {"nonzero", "item", "_local_scalar_dense", "masked_select"}


# ------------------------------------------------------ target offsets and column statistics
def target_offset_case(comm: ClassGroup, chunk_rows: int):
    """class_parallel_cross_entropy with a per-row target offset, on this rank's columns."""
    rows, cols, bias, targets, upstream, _ = _problem(False)
    offset = -3.0 * torch.rand(R, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    start, stop = Partition(C, comm.world_size).range(comm.rank)
    rows.requires_grad_(True)
    local_cols = cols[start:stop].clone().requires_grad_(True)
    per_row = class_parallel_cross_entropy(
        rows,
        local_cols,
        SCALE,
        bias[start:stop],
        targets,
        col_start=start,
        comm=comm,
        chunk_rows=chunk_rows,
        target_offset=offset,
    )
    (upstream * per_row).sum().backward()
    return per_row.detach(), rows.grad, local_cols.grad


def dense_target_offset():
    rows, cols, bias, targets, upstream, _ = _problem(False)
    offset = -3.0 * torch.rand(R, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows.requires_grad_(True)
    cols.requires_grad_(True)
    logits = SCALE * rows @ cols.t() + bias
    logits = logits + F.one_hot(targets, C) * offset[:, None]
    loss = F.cross_entropy(logits, targets, reduction="none")
    (upstream * loss).sum().backward()
    return loss.detach(), rows.grad, cols.grad


def column_statistics_case(comm: ClassGroup, chunk_rows: int):
    """class_parallel_column_statistics of this rank's columns, and the gradients of a weighted
    sum of them (each rank's share summed over ranks)."""
    rows, cols, _, targets, _, _ = _problem(False)
    g = torch.Generator().manual_seed(2)
    weights = torch.rand(2, C, generator=g, dtype=torch.float64) - 0.5
    start, stop = Partition(C, comm.world_size).range(comm.rank)
    rows.requires_grad_(True)
    local_cols = cols[start:stop].clone().requires_grad_(True)
    lse, sums = class_parallel_column_statistics(
        rows, local_cols, SCALE, targets, col_start=start, chunk_rows=chunk_rows
    )
    share = (weights[0, start:stop] * lse + weights[1, start:stop] * sums).sum()
    sum_over_ranks(share, comm).backward()
    return torch.stack([lse, sums]).detach(), rows.grad, local_cols.grad


def dense_column_statistics():
    rows, cols, _, targets, _, _ = _problem(False)
    g = torch.Generator().manual_seed(2)
    weights = torch.rand(2, C, generator=g, dtype=torch.float64) - 0.5
    rows.requires_grad_(True)
    cols.requires_grad_(True)
    logits = SCALE * rows @ cols.t()
    lse = torch.logsumexp(logits, dim=0)
    sums = (logits * F.one_hot(targets, C)).sum(0)
    (weights[0] * lse + weights[1] * sums).sum().backward()
    return torch.stack([lse, sums]).detach(), rows.grad, cols.grad


@pytest.mark.parametrize("chunk_rows", [1, 4, 64])
def test_target_offset_matches_dense(chunk_rows):
    mine = target_offset_case(ClassGroup(distributed=False), chunk_rows)
    for got, want in zip(mine, dense_target_offset(), strict=True):
        _close(got, want)
    assert mine[0].min() >= 0


@pytest.mark.parametrize("chunk_rows", [1, 4, 64])
def test_column_statistics_match_dense(chunk_rows):
    mine = column_statistics_case(ClassGroup(distributed=False), chunk_rows)
    for got, want in zip(mine, dense_column_statistics(), strict=True):
        _close(got, want)


# --------------------------------------------------- the new losses inside CandleHead.loss
HEAD_LOSSES = [
    ("ldam", {}),
    ("ldam", {"max_margin": 0.3, "margin_scale": 10.0}),
    ("lade", {}),
    ("lade", {"remine_lambda": 0.5, "estim_loss_weight": 1.0}),
    ("grw", {}),
    ("class_balanced", {"beta": 0.9}),
]


@pytest.mark.parametrize(("name", "options"), HEAD_LOSSES, ids=str)
def test_head_loss_equals_published_on_dense_logits(name, options):
    """CandleHead.loss (chunks of 5 rows) with each new loss equals the published formula on
    the dense oracle's three logit sets, value and gradients, float64."""
    head, oracle, feats, labels, counts = _pair("in_visual", "text")
    head.chunk_rows = 5
    counts = counts + 1  # all positive, where the published definitions hold
    criterion = build_loss(name, counts, **options).double()
    targets = torch.cat([labels, torch.arange(len(counts))])
    loss, parts = head.loss(feats, labels, criterion)
    ref = sum(published_loss(name, z, targets, counts, **options) for z in oracle(feats))
    dense = sum(criterion(z, targets) for z in head(feats))
    assert abs(loss.item() - ref.item()) <= 1e-6 * abs(ref.item())
    assert abs(dense.item() - ref.item()) <= 1e-6 * abs(ref.item())
    assert sum(parts.values()).item() == pytest.approx(loss.item(), rel=1e-12)
    loss.backward()
    ref.backward()
    params = dict(head.named_parameters())
    for param_name, ref_param in _oracle_params(oracle).items():
        got, want = params[param_name].grad, ref_param.grad
        assert (got - want).abs().max() <= 1e-6 * want.abs().max().clamp(min=1e-12), param_name


def test_target_offset_and_column_statistics_do_not_sync_the_host():
    rows, cols, bias, targets, upstream, _ = _problem(False)
    rows.requires_grad_(True)
    cols.requires_grad_(True)
    with _RecordOps() as recorded:
        per_row = class_parallel_cross_entropy(
            rows, cols, SCALE, bias, targets, chunk_rows=4, target_offset=-upstream
        )
        lse, sums = class_parallel_column_statistics(rows, cols, SCALE, targets, chunk_rows=4)
        (upstream * per_row).sum().add(lse.sum()).add(sums.sum()).backward()
    assert {"scatter_add_", "index_add_"} <= recorded.ops  # the mode sees the new paths' ops
    assert not recorded.ops & {"nonzero", "item", "_local_scalar_dense", "masked_select"}

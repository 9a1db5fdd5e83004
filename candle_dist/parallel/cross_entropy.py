"""Cross-entropy of `scale * rows @ cols^T + bias` without ever holding the full logits.

Rows (all of them, replicated on every rank) are scored against this rank's class columns one
chunk of rows at a time; the log-sum-exp over the class dimension is combined across ranks with
an all-reduce MAX and SUM (as in Megatron's vocab-parallel cross-entropy); the target logit comes
from the rank that owns the target class. Backward recomputes each chunk's logits, so memory is
O(chunk x C_local + (R + C_local) x D) instead of O(R x C).
"""

from __future__ import annotations

import math

import torch

from candle_dist.parallel.comm import ClassGroup


def class_parallel_cross_entropy(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    col_start: int = 0,
    comm: ClassGroup | None = None,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """Per-row cross-entropy [R] over all classes; identical on every rank of `comm`.

    rows [R, D] (all rows), cols [C_local, D] (this rank's classes, global ids starting at
    `col_start`), bias [C_local] added to the logits (a logit adjustment; no gradient),
    targets [R] global class ids.
    """
    comm = comm or ClassGroup(distributed=False)
    if bias is None:
        bias = cols.new_zeros(cols.shape[0])
    return _ChunkedCrossEntropy.apply(
        rows, cols, float(scale), bias.to(cols.dtype), targets, col_start, comm, chunk_rows
    )


def _local_target_positions(targets: torch.Tensor, col_start: int, num_local: int):
    local = targets - col_start
    owned = (local >= 0) & (local < num_local)
    return owned, local.clamp(0, max(num_local - 1, 0))


def _flushed_exp_(x: torch.Tensor) -> torch.Tensor:
    """exp in place, flushing results below e^(log(smallest normal) + 1) to 0: on CPUs denormal
    results make exp ~10x slower, and with s ~ 100 most of a row's probabilities are that
    small. -inf logits still give exactly 0."""
    if x.dtype not in (torch.float32, torch.float64):
        return x.exp_()
    floor = math.log(torch.finfo(x.dtype).tiny) + 1.0
    return torch.threshold_(x.clamp_(min=floor).exp_(), math.exp(floor), 0.0)


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp of [rows, cols], overwriting `logits` (see `_flushed_exp_`)."""
    row_max = logits.amax(dim=1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return (row_max + _flushed_exp_(logits.sub_(row_max)).sum(1, keepdim=True).log()).squeeze(1)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, cols, scale, bias, targets, col_start, comm, chunk_rows):
        num_rows, num_local = rows.shape[0], cols.shape[0]
        owned, local_target = _local_target_positions(targets, col_start, num_local)
        local_lse = rows.new_empty(num_rows)
        for start in range(0, num_rows, chunk_rows):
            logits = torch.addmm(bias, rows[start : start + chunk_rows], cols.t(), alpha=scale)
            local_lse[start : start + chunk_rows] = _logsumexp_(logits)
        target_logit = scale * (rows * cols[local_target]).sum(1) + bias[local_target]
        target_logit = torch.where(owned, target_logit, torch.zeros_like(target_logit))

        row_max = comm.all_reduce(local_lse.clone(), "max")
        sum_exp = comm.all_reduce(torch.exp(local_lse - row_max), "sum")
        lse = row_max + torch.log(sum_exp)
        comm.all_reduce(target_logit, "sum")

        ctx.save_for_backward(rows, cols, bias, lse, owned, local_target)
        ctx.scale, ctx.chunk_rows = scale, chunk_rows
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        rows, cols, bias, lse, owned, local_target = ctx.saved_tensors
        scale, chunk_rows = ctx.scale, ctx.chunk_rows
        grad_rows = torch.zeros_like(rows) if ctx.needs_input_grad[0] else None
        grad_cols = torch.zeros_like(cols) if ctx.needs_input_grad[1] else None
        for start in range(0, rows.shape[0], chunk_rows):
            stop = min(start + chunk_rows, rows.shape[0])
            chunk = rows[start:stop]
            logits = torch.addmm(bias, chunk, cols.t(), alpha=scale)
            # d loss / d logits = (softmax - onehot) * grad, softmax over all ranks' columns.
            grad_logits = _flushed_exp_(logits.sub_(lse[start:stop, None]))
            grad_logits.mul_(grad_loss[start:stop, None])
            mine = owned[start:stop].nonzero().squeeze(1)
            grad_logits[mine, local_target[start:stop][mine]] -= grad_loss[start:stop][mine]
            if grad_rows is not None:
                torch.mm(grad_logits, cols, out=grad_rows[start:stop]).mul_(scale)
            if grad_cols is not None:
                grad_cols.addmm_(grad_logits.t(), chunk, alpha=scale)
        return grad_rows, grad_cols, None, None, None, None, None, None

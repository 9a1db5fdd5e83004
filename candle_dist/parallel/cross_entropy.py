"""Cross-entropy of `scale * rows @ cols^T + bias` without ever holding the full logits.

Rows (all of them, replicated on every rank) are scored against this rank's class columns one
chunk of rows at a time; the log-sum-exp over the class dimension is combined across ranks with
an all-reduce MAX and SUM (as in Megatron's vocab-parallel cross-entropy); the target logit comes
from the rank that owns the target class, which also applies a per-row target-logit offset (LDAM's
margin) before the log-sum-exp. Backward recomputes each chunk's logits, so memory is
O(chunk x C_local + (R + C_local) x D) instead of O(R x C).

`class_parallel_column_statistics` gives the column-wise counterparts (LADE's): per local class,
the log-sum-exp of its logit column over all rows and the sum of its logits over the rows that
target it. Rows are replicated, so each column's statistics stay on the rank that owns it; a
loss built from them adds the ranks' shares with `sum_over_ranks`.

Precision, the rule of every custom autograd Function of the head (`matmul_dtype`, `matmul`;
the chunked attention imports them): the Function runs with autocast off and picks each op's
dtype itself. Matmuls take their operands in the dtype autocast would give them (bf16 under
bf16 autocast) and their products are widened to float32 at once; scale, bias, log-sum-exp,
softmax and gradient accumulation run in float32 (float64 for float64 inputs). Forward and
backward compute a chunk's logits by the same ops, so backward's softmax is normalized by the
log-sum-exp of exactly those logits, and the target logit is read from them too: a row's loss
`lse - target` is never negative.
"""

from __future__ import annotations

import contextlib
import functools
import math
from contextlib import AbstractContextManager

import torch

from candle_dist.parallel.comm import ClassGroup


def matmul_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a custom autograd Function runs its matmuls over `tensors` in: the autocast
    dtype when autocast is on for their device (autocast leaves float64 alone), else their
    promoted dtype."""
    promoted = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    device = tensors[0].device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    if promoted != torch.float64 and autocast:
        return torch.get_autocast_dtype(device)
    return promoted


def autocast_off(device: torch.device) -> AbstractContextManager:
    """Autocast disabled on `device`, for the ops whose dtype a Function picks itself (nothing
    to disable on devices without autocast, such as meta)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def accumulate_dtype(matmul_dtype: torch.dtype) -> torch.dtype:
    """The dtype of everything but the matmul products: the matmul dtype, at least float32."""
    return torch.promote_types(matmul_dtype, torch.float32)


def matmul(
    a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """a @ b (2-D, or batched 3-D) with the product in `dtype` (the matmul dtype), widened to
    `accumulate_dtype(dtype)` (written to `out` if given). Operands already in `dtype` when
    that is the accumulation dtype."""
    product = torch.mm if a.ndim == 2 else torch.bmm
    if dtype == accumulate_dtype(dtype):
        return product(a, b, out=out)
    result = product(a.to(dtype), b.to(dtype))
    return result.to(accumulate_dtype(dtype)) if out is None else out.copy_(result)


def matmul_add_(
    out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, alpha: float = 1.0
) -> None:
    """out += alpha * a @ b (2-D, or batched 3-D), the product in `dtype` (see `matmul`)."""
    if dtype == accumulate_dtype(dtype):
        (out.addmm_ if out.ndim == 2 else out.baddbmm_)(a, b, alpha=alpha)
    else:
        out.add_(matmul(a, b, dtype), alpha=alpha)


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
    target_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row cross-entropy [R] over all classes; identical on every rank of `comm`.

    rows [R, D] (all rows), cols [C_local, D] (this rank's classes, global ids starting at
    `col_start`), bias [C_local] added to the logits (a logit adjustment; no gradient),
    targets [R] global class ids, target_offset [R] added to each row's target logit only (no
    gradient). The loss is float32 (float64 for float64 inputs), also under autocast.
    """
    comm = comm or ClassGroup(distributed=False)
    dtype = matmul_dtype(rows, cols)
    bias = cols.new_zeros(cols.shape[0]) if bias is None else bias
    if target_offset is not None:
        target_offset = target_offset.to(accumulate_dtype(dtype))
    return _ChunkedCrossEntropy.apply(
        rows, cols, float(scale), bias.to(accumulate_dtype(dtype)), targets, col_start, comm,
        chunk_rows, dtype, target_offset,
    )  # fmt: skip


def class_parallel_column_statistics(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: float,
    targets: torch.Tensor,
    *,
    col_start: int = 0,
    chunk_rows: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(column_lse, target_sums), each [C_local], of the logits `scale * rows @ cols^T`.

    column_lse[c] is the log-sum-exp over all R rows of column c; target_sums[c] the sum of
    column c over the rows whose target is c. rows [R, D] (all rows), cols [C_local, D] (global
    ids from `col_start`), targets [R] global class ids. Local to this rank: no collective.
    Precision as `class_parallel_cross_entropy`.
    """
    dtype = matmul_dtype(rows, cols)
    return _ChunkedColumnStatistics.apply(
        rows, cols, float(scale), targets, col_start, chunk_rows, dtype
    )


def sum_over_ranks(local: torch.Tensor, comm: ClassGroup) -> torch.Tensor:
    """The sum over ranks of each rank's share of a replicated loss. Backward passes the
    (replicated) upstream gradient to every rank's share unchanged: each rank then computes
    its own classes' part of the gradient, as the cross-entropy's backward does."""
    return _SumOverRanks.apply(local, comm)


def _local_target_positions(targets: torch.Tensor, col_start: int, num_local: int):
    local = targets - col_start
    owned = (local >= 0) & (local < num_local)
    return owned, local.clamp(0, max(num_local - 1, 0))


def _chunk_logits(
    chunk: torch.Tensor, cols: torch.Tensor, bias: torch.Tensor, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """`scale * chunk @ cols^T + bias` in bias's dtype, the product in `dtype`."""
    if dtype == bias.dtype:
        return torch.addmm(bias, chunk, cols.t(), alpha=scale)
    return matmul(chunk, cols.t(), dtype).mul_(scale).add_(bias)


def _offset_targets_(
    logits: torch.Tensor, local_target: torch.Tensor, offset: torch.Tensor | None
) -> torch.Tensor:
    """`logits` with `offset` (0 on rows whose target another rank owns) added in place at each
    row's target column; the same in forward and backward, so both see the same logits."""
    if offset is not None:
        logits.scatter_add_(1, local_target[:, None], offset[:, None])
    return logits


def _flushed_exp_(x: torch.Tensor) -> torch.Tensor:
    """exp in place (float32 or float64), flushing results below e^(log(smallest normal) + 1)
    to 0: on CPUs denormal results make exp ~10x slower, and with s ~ 100 most of a row's
    probabilities are that small. -inf logits still give exactly 0."""
    floor = math.log(torch.finfo(x.dtype).tiny) + 1.0
    return torch.threshold_(x.clamp_(min=floor).exp_(), math.exp(floor), 0.0)


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp of [rows, cols], overwriting `logits` (see `_flushed_exp_`)."""
    row_max = logits.amax(dim=1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return (row_max + _flushed_exp_(logits.sub_(row_max)).sum(1, keepdim=True).log()).squeeze(1)


def _gradient_buffers(ctx, rows: torch.Tensor, cols: torch.Tensor, wide: torch.dtype):
    """The rows' and columns' gradients to fill, in the accumulation dtype (None where autograd
    needs none); the rows' are written chunk by chunk, the columns' accumulated."""
    grad_rows = rows.new_empty(rows.shape, dtype=wide) if ctx.needs_input_grad[0] else None
    grad_cols = cols.new_zeros(cols.shape, dtype=wide) if ctx.needs_input_grad[1] else None
    return grad_rows, grad_cols


def _chain_chunk(grad_logits, chunk, cols_mm, grad_rows, grad_cols, piece, scale, dtype) -> None:
    """d loss / d logits of one chunk of rows (logits = scale * chunk @ cols^T) into the rows'
    gradient (its slice `piece`) and the columns' (accumulated)."""
    if grad_rows is not None:
        matmul(grad_logits, cols_mm, dtype, out=grad_rows[piece]).mul_(scale)
    if grad_cols is not None:
        matmul_add_(grad_cols, grad_logits.t(), chunk, dtype, alpha=scale)


def _in_input_dtypes(grad_rows, grad_cols, rows: torch.Tensor, cols: torch.Tensor) -> tuple:
    return (
        None if grad_rows is None else grad_rows.to(rows.dtype),
        None if grad_cols is None else grad_cols.to(cols.dtype),
    )


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, cols, scale, bias, targets, col_start, comm, chunk_rows, dtype, offset):
        with autocast_off(rows.device):
            num_rows, num_local = rows.shape[0], cols.shape[0]
            owned, local_target = _local_target_positions(targets, col_start, num_local)
            if offset is not None:
                offset = torch.where(owned, offset, torch.zeros_like(offset))
            cols_mm = cols.to(dtype)
            local_lse = bias.new_empty(num_rows)
            target_logit = bias.new_empty(num_rows)
            for start in range(0, num_rows, chunk_rows):
                piece = slice(start, start + chunk_rows)
                logits = _chunk_logits(rows[piece].to(dtype), cols_mm, bias, scale, dtype)
                piece_offset = None if offset is None else offset[piece]
                _offset_targets_(logits, local_target[piece], piece_offset)
                target_logit[piece] = logits.gather(1, local_target[piece, None]).squeeze(1)
                local_lse[piece] = _logsumexp_(logits)
            target_logit = torch.where(owned, target_logit, torch.zeros_like(target_logit))

            row_max = comm.all_reduce(local_lse.clone(), "max")
            sum_exp = comm.all_reduce(torch.exp(local_lse - row_max), "sum")
            lse = row_max + torch.log(sum_exp)
            comm.all_reduce(target_logit, "sum")

        ctx.save_for_backward(rows, cols, bias, lse, owned, local_target, offset)
        ctx.scale, ctx.chunk_rows, ctx.dtype = scale, chunk_rows, dtype
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        rows, cols, bias, lse, owned, local_target, offset = ctx.saved_tensors
        scale, chunk_rows, dtype = ctx.scale, ctx.chunk_rows, ctx.dtype
        with autocast_off(rows.device):
            cols_mm = cols.to(dtype)
            grad_rows, grad_cols = _gradient_buffers(ctx, rows, cols, bias.dtype)
            # minus the upstream gradient at each row's target column (0 where another rank owns
            # the target): a scatter, not an index of the owned rows, which would sync the host
            at_target = torch.where(owned, -grad_loss, torch.zeros_like(grad_loss))[:, None]
            for start in range(0, rows.shape[0], chunk_rows):
                piece = slice(start, start + chunk_rows)
                chunk = rows[piece].to(dtype)
                logits = _chunk_logits(chunk, cols_mm, bias, scale, dtype)
                piece_offset = None if offset is None else offset[piece]
                _offset_targets_(logits, local_target[piece], piece_offset)
                # d loss / d logits = (softmax - onehot) * grad, softmax over all ranks' columns.
                grad_logits = _flushed_exp_(logits.sub_(lse[piece, None]))
                grad_logits.mul_(grad_loss[piece, None])
                grad_logits.scatter_add_(1, local_target[piece, None], at_target[piece])
                _chain_chunk(grad_logits, chunk, cols_mm, grad_rows, grad_cols, piece, scale, dtype)
        return (
            *_in_input_dtypes(grad_rows, grad_cols, rows, cols),
            *[None] * 8,
        )


class _ChunkedColumnStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, cols, scale, targets, col_start, chunk_rows, dtype):
        with autocast_off(rows.device):
            num_local, wide = cols.shape[0], accumulate_dtype(dtype)
            owned, local_target = _local_target_positions(targets, col_start, num_local)
            cols_mm = cols.to(dtype)
            zero_bias = cols.new_zeros(num_local, dtype=wide)
            # an online log-sum-exp down the columns: running max and sum of exp below it
            col_max = cols.new_full((num_local,), -torch.inf, dtype=wide)
            col_sum = cols.new_zeros(num_local, dtype=wide)
            target_sums = cols.new_zeros(num_local, dtype=wide)
            for start in range(0, rows.shape[0], chunk_rows):
                piece = slice(start, start + chunk_rows)
                logits = _chunk_logits(rows[piece].to(dtype), cols_mm, zero_bias, scale, dtype)
                at_target = logits.gather(1, local_target[piece, None]).squeeze(1)
                at_target = torch.where(owned[piece], at_target, torch.zeros_like(at_target))
                target_sums.index_add_(0, local_target[piece], at_target)
                new_max = torch.maximum(col_max, logits.amax(dim=0))
                col_sum.mul_(torch.exp(col_max - new_max))
                col_sum.add_(_flushed_exp_(logits.sub_(new_max)).sum(0))
                col_max = new_max
            column_lse = col_max + torch.log(col_sum)
        ctx.save_for_backward(rows, cols, column_lse, owned, local_target)
        ctx.scale, ctx.chunk_rows, ctx.dtype = scale, chunk_rows, dtype
        return column_lse, target_sums

    @staticmethod
    def backward(ctx, grad_lse, grad_sums):
        rows, cols, column_lse, owned, local_target = ctx.saved_tensors
        scale, chunk_rows, dtype = ctx.scale, ctx.chunk_rows, ctx.dtype
        with autocast_off(rows.device):
            cols_mm = cols.to(dtype)
            zero_bias = column_lse.new_zeros(cols.shape[0])
            grad_rows, grad_cols = _gradient_buffers(ctx, rows, cols, column_lse.dtype)
            grad_lse, grad_sums = grad_lse.to(column_lse.dtype), grad_sums.to(column_lse.dtype)
            # each row's target column gets its class's upstream gradient of target_sums
            at_target = torch.where(
                owned, grad_sums[local_target], torch.zeros_like(owned, dtype=grad_sums.dtype)
            )
            for start in range(0, rows.shape[0], chunk_rows):
                piece = slice(start, start + chunk_rows)
                chunk = rows[piece].to(dtype)
                logits = _chunk_logits(chunk, cols_mm, zero_bias, scale, dtype)
                # d column_lse / d logits: the softmax down each column
                grad_logits = _flushed_exp_(logits.sub_(column_lse)).mul_(grad_lse)
                grad_logits.scatter_add_(1, local_target[piece, None], at_target[piece, None])
                _chain_chunk(grad_logits, chunk, cols_mm, grad_rows, grad_cols, piece, scale, dtype)
        return (
            *_in_input_dtypes(grad_rows, grad_cols, rows, cols),
            *[None] * 5,
        )


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, comm):
        return comm.all_reduce(local.clone(), "sum")

    @staticmethod
    def backward(ctx, grad):
        return grad, None

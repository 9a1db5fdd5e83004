"""Exact multi-head attention that never materializes the full query x key weight matrix.

Two kernels:
- `F.scaled_dot_product_attention` (fused flash / memory-efficient kernels, which take
  [batch, heads, tokens, head_dim] inputs) whenever it can run without a mask and without
  materializing weights: always on CUDA, on CPU when no dropout is applied (the CPU flash kernel
  has no dropout; its fallback is the dense math path);
- otherwise `_ChunkedAttention`: flash-style, one chunk of queries at a time, scores by BLAS into
  a reused buffer, softmax + dropout in place (softmax_dropout.py), recomputed in backward from
  the saved log-sum-exp, so at most one chunk's [heads, chunk, keys] weights exist. It also
  handles the "self key" of the `in_visual` mask: each query additionally attends to its own
  token.

Precision of `_ChunkedAttention` (the head's rule, see parallel/cross_entropy.py): it runs with
autocast off and decides every op's dtype. The matmuls (q k^T and weights v; in backward also
dO v^T, weights^T dO, dS^T q and dS k) take their operands in the dtype autocast would give
them (bf16 under bf16 autocast) and their products are widened to float32 at once. Scores, the
own-token score, log-sum-exp, softmax + dropout (the compiled kernel on CPU, as in fp32) and the
gradients accumulated over chunks are float32 (float64 for float64 inputs); backward recomputes
the scores by the same ops as forward. The output has the matmul dtype, as the fused kernel's
has; the Function keeps its float32 version for the backward's row sums dO . O.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from candle_dist.model.softmax_dropout import (
    DropoutKeys,
    softmax_dropout_,
    softmax_dropout_backward_,
)
from candle_dist.parallel.cross_entropy import (
    accumulate_dtype,
    autocast_off,
    matmul,
    matmul_add_,
    matmul_dtype,
)

# Scores of one chunk (heads x chunk x keys): 128 MB in fp32; backward holds two. Measured at
# L = 8,128 tokens on 2 CPU cores: 2^18 elements take 4x as long per step, 2^24 7 % longer, 2^26
# the same (smaller chunks make the score matmuls thinner and slower).
CHUNK_ELEMENTS = 2**25
# ... but at least this many queries: the score matmuls run at ~95 GFLOP/s with 104 rows against
# 40k keys and ~140 with 256+ (same CPU); costs 0.8 GB per buffer at 100k keys.
MIN_CHUNK_ROWS = 256


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    self_k: torch.Tensor | None = None,
    self_v: torch.Tensor | None = None,
    query_ids: torch.Tensor | None = None,
    key_offset: int = 0,
    id_stride: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head; q [H, Lq, d], k and v [H, Lk, d] -> [H, Lq, d].

    With `self_k`/`self_v` ([H, Lq, d]) query i also attends to key self_k[:, i] (its own token).
    Attention dropout (`dropout_p`) is applied to the weights, as torch.nn.MultiheadAttention does.
    The dropout mask is keyed by token ids: `query_ids` [Lq] (default 0..Lq-1), keys
    `key_offset`..`key_offset`+Lk-1, a query's own key has its query id; ids below `id_stride`.
    """
    if q.shape[1] == 0:
        return q.new_zeros(q.shape[0], 0, v.shape[-1])
    if k.shape[1] == 0 and self_k is None:
        raise ValueError("attention over zero keys: every query needs at least one key")
    if self_k is None and (dropout_p == 0.0 or q.is_cuda):
        return F.scaled_dot_product_attention(q[None], k[None], v[None], dropout_p=dropout_p)[0]
    if query_ids is None:
        query_ids = torch.arange(q.shape[1], device=q.device)
    stride = id_stride or max(q.shape[1], key_offset + k.shape[1])
    keys = DropoutKeys.draw(dropout_p, stride)
    dtype = matmul_dtype(q, k, v, *([] if self_k is None else [self_k, self_v]))
    return _ChunkedAttention.apply(
        q, k, v, self_k, self_v, query_ids.to(torch.int64).contiguous(), key_offset, keys, dtype
    )


def _chunk_rows(heads: int, num_keys: int) -> int:
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // (heads * (num_keys + 1)))


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, self_k, self_v, query_ids, key_offset, keys, dtype):
        heads, num_queries, _ = q.shape
        wide = accumulate_dtype(dtype)
        ctx.input_dtypes = [None if t is None else t.dtype for t in (q, k, v, self_k, self_v)]
        with autocast_off(q.device):
            # saved scaled, and wide: the own-token scores are taken from it
            q = q.to(wide) * (1.0 / math.sqrt(q.shape[-1]))
            k_mm, v_mm = k.to(dtype), v.to(dtype)
            chunk = _chunk_rows(heads, k.shape[1])
            buffer = q.new_empty(heads * min(chunk, num_queries) * k.shape[1])
            out = q.new_empty(heads, num_queries, v.shape[-1])
            lse = []
            for start in range(0, num_queries, chunk):
                piece = slice(start, start + chunk)
                q_piece = q[:, piece]
                scores = _view(buffer, q_piece, k)
                matmul(q_piece, k_mm.transpose(1, 2), dtype, out=scores)
                own = None if self_k is None else (q_piece * self_k[:, piece].to(wide)).sum(-1)
                lse.append(softmax_dropout_(scores, own, query_ids[piece], key_offset, keys))
                if own is None:
                    out[:, piece] = matmul(scores, v_mm, dtype)
                else:
                    own_out = own[..., None] * self_v[:, piece].to(wide)
                    out[:, piece] = own_out.add_(matmul(scores, v_mm, dtype))
        ctx.save_for_backward(q, k, v, self_k, self_v, query_ids, out, torch.cat(lse, dim=1))
        ctx.key_offset, ctx.keys, ctx.dtype = key_offset, keys, dtype
        return out.to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, self_k, self_v, query_ids, out, lse = ctx.saved_tensors
        key_offset, keys, dtype = ctx.key_offset, ctx.keys, ctx.dtype
        heads, num_queries, _ = q.shape
        wide = q.dtype
        with autocast_off(q.device):
            grad_out = grad_out.to(wide).contiguous()
            delta = (grad_out * out).sum(-1)
            k_mm, v_mm = k.to(dtype), v.to(dtype)
            grad_q = torch.empty_like(q)
            grad_k = k.new_zeros(k.shape, dtype=wide) if ctx.needs_input_grad[1] else None
            grad_v = v.new_zeros(v.shape, dtype=wide) if ctx.needs_input_grad[2] else None
            own_k = q.new_empty(self_k.shape) if self_k is not None else None
            own_v = q.new_empty(self_v.shape) if self_v is not None else None
            chunk = _chunk_rows(heads, k.shape[1])
            size = heads * min(chunk, num_queries) * k.shape[1]
            buffers = q.new_empty(size), q.new_empty(size)
            for start in range(0, num_queries, chunk):
                piece = slice(start, start + chunk)
                q_piece, grad_piece = q[:, piece], grad_out[:, piece]
                scores, grad = (_view(buffer, q_piece, k) for buffer in buffers)
                matmul(q_piece, k_mm.transpose(1, 2), dtype, out=scores)
                matmul(grad_piece, v_mm.transpose(1, 2), dtype, out=grad)
                own = own_grad = None
                if self_k is not None:
                    own = (q_piece * self_k[:, piece].to(wide)).sum(-1)
                    own_grad = (grad_piece * self_v[:, piece].to(wide)).sum(-1)
                softmax_dropout_backward_(
                    scores, grad, own, own_grad, lse[:, piece].contiguous(),
                    delta[:, piece].contiguous(), query_ids[piece], key_offset, keys,
                )  # fmt: skip
                if grad_v is not None:
                    matmul_add_(grad_v, scores.transpose(1, 2), grad_piece, dtype)
                if grad_k is not None:
                    matmul_add_(grad_k, grad.transpose(1, 2), q_piece, dtype)
                grad_q[:, piece] = matmul(grad, k_mm, dtype)
                if own is not None:
                    grad_q[:, piece] += own_grad[..., None] * self_k[:, piece].to(wide)
                    own_k[:, piece] = own_grad[..., None] * q_piece
                    own_v[:, piece] = own[..., None] * grad_piece
            grad_q.mul_(1.0 / math.sqrt(q.shape[-1]))  # q was saved scaled: k's gradients are final
        grads = [grad_q, grad_k, grad_v, own_k, own_v]
        return (
            *[None if g is None else g.to(t) for g, t in zip(grads, ctx.input_dtypes, strict=True)],
            *[None] * 4,
        )


def _view(buffer: torch.Tensor, q_piece: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The first heads x rows x keys elements of `buffer`, contiguous."""
    shape = (q_piece.shape[0], q_piece.shape[1], k.shape[1])
    return buffer[: math.prod(shape)].view(shape)

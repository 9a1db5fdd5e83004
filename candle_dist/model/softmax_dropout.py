"""Softmax of a chunk of attention scores with attention dropout, and its backward, in place.

The keep mask is a counter-based hash of (seed, head, query id, key id), not a draw from a
stateful generator, so that
- backward regenerates it instead of storing or replaying it;
- ids are global token positions, so P class-parallel ranks drop exactly the weights one process
  drops, and training with dropout is rank-count independent like the rest of the head.

Element (h, q, k) is kept iff mix32(row_key(h, q) + col_key(k)) >= round(p * 2^32), and kept
weights are scaled by 2^32 / (2^32 - round(p * 2^32)) (= 1 / (1 - p) up to 2^-32). The compiled
kernel (softmax_dropout.c via native.py) and the torch code here compute the same thing; the
torch code serves other devices, and machines without a C compiler.

Scores, log-sum-exp and gradients here are float32 or float64, also under autocast: the chunked
attention widens its bf16 matmul products before they get here (attention.py, "Precision").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from candle_dist.model import native

MASK32 = 0xFFFFFFFF
TWO32 = 2**32


@dataclass(frozen=True)
class DropoutKeys:
    """What the keep mask of one attention call depends on besides the token ids."""

    seed: int  # 32 bits, drawn per call from torch's default generator
    threshold: int  # round(p * 2^32); 0 keeps everything
    stride: int  # row ids are head * stride + query id (any bound on the token ids)

    @classmethod
    def draw(cls, dropout_p: float, stride: int) -> DropoutKeys:
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"attention dropout must be in [0, 1), got {dropout_p}")
        seed = int(torch.randint(0, TWO32, (), dtype=torch.int64)) if dropout_p > 0 else 0
        return cls(seed=seed, threshold=round(dropout_p * TWO32), stride=stride)

    @property
    def keep_scale(self) -> float:
        return TWO32 / (TWO32 - self.threshold)


def keep_mask(
    keys: DropoutKeys, heads: int, query_ids: torch.Tensor, key_ids: torch.Tensor
) -> torch.Tensor:
    """[heads, queries, keys] bool: which attention weights survive dropout.

    `key_ids` is [keys] (shared by all queries) or [queries, keys] (per query).
    """
    device = query_ids.device
    head = torch.arange(heads, device=device, dtype=torch.int64)[:, None]
    seed = _mix32_(_as_uint32_bits(torch.tensor([keys.seed], device=device)))
    rows = _mix32_(seed ^ _as_uint32_bits(head * keys.stride + query_ids.to(torch.int64)))
    cols = _mix32_(_as_uint32_bits(key_ids.to(torch.int64) + 0x632BE5AB))
    cols = cols if cols.ndim == 2 else cols[None]
    bits = _mix32_(rows[:, :, None] + cols[None])
    # unsigned comparison as signed: flip the sign bit of both sides
    return bits.bitwise_xor_(-(2**31)) >= keys.threshold - 2**31


def _as_uint32_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 -> int32 holding its low 32 bits (the uint32 the C code computes with)."""
    low = x & MASK32
    return (low - ((low >> 31) << 32)).to(torch.int32)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """softmax_dropout.c's `mix32`, in place on int32 lanes holding uint32 bits: multiplies
    wrap like uint32 ones, right shifts are made logical by masking. In place on int32 rather
    than on int64 temporaries: 6x faster on the CPU for a chunk's [heads, rows, keys] bits."""
    scratch = torch.empty_like(x)
    for shift, multiplier in ((16, 0x21F0AAAD), (15, 0x735A2D97), (15, None)):
        torch.bitwise_right_shift(x, shift, out=scratch)
        x.bitwise_xor_(scratch.bitwise_and_((1 << (32 - shift)) - 1))
        if multiplier is not None:
            x.mul_(multiplier)
    return x


def softmax_dropout_(
    scores: torch.Tensor,
    own: torch.Tensor | None,
    query_ids: torch.Tensor,
    key_offset: int,
    keys: DropoutKeys,
) -> torch.Tensor:
    """scores [H, n, K] (keys key_offset..key_offset+K-1) and `own` [H, n] (each query's own
    token, key id = its query id), float32 or float64, become the dropped-out softmax weights;
    returns the log-sum-exp [H, n] for the backward."""
    kernel = _native(scores, own)
    if kernel is not None:
        lse = torch.empty(scores.shape[:2], dtype=scores.dtype)
        kernel[0](
            scores.data_ptr(), own.data_ptr() if own is not None else None, lse.data_ptr(),
            *scores.shape, query_ids.data_ptr(), key_offset, keys.stride, keys.seed,
            keys.threshold, keys.keep_scale, torch.get_num_threads(),
        )  # fmt: skip
        return lse
    full = _with_own(scores, own)
    lse = torch.logsumexp(full, dim=-1)
    weights = torch.exp(full - lse[..., None])
    if keys.threshold:
        weights = weights * _keep(keys, scores, own, query_ids, key_offset) * keys.keep_scale
    _split_into(weights, scores, own)
    return lse


def softmax_dropout_backward_(
    scores: torch.Tensor,
    grad: torch.Tensor,
    own: torch.Tensor | None,
    own_grad: torch.Tensor | None,
    lse: torch.Tensor,
    delta: torch.Tensor,
    query_ids: torch.Tensor,
    key_offset: int,
    keys: DropoutKeys,
) -> None:
    """From the recomputed scores, `grad` = d loss / d (dropped-out weights) and `delta` = the
    row sums of weights * grad (= d out . out): scores become the dropped-out weights again and
    grad becomes d loss / d scores; likewise `own` and `own_grad`."""
    kernel = _native(scores, own)
    if kernel is not None:
        kernel[1](
            scores.data_ptr(), grad.data_ptr(), own.data_ptr() if own is not None else None,
            own_grad.data_ptr() if own_grad is not None else None, lse.data_ptr(),
            delta.data_ptr(), *scores.shape, query_ids.data_ptr(), key_offset, keys.stride,
            keys.seed, keys.threshold, keys.keep_scale, torch.get_num_threads(),
        )  # fmt: skip
        return
    weights = torch.exp(_with_own(scores, own) - lse[..., None])
    upstream = _with_own(grad, own_grad)
    if keys.threshold:
        kept = _keep(keys, scores, own, query_ids, key_offset).to(weights.dtype) * keys.keep_scale
        upstream = upstream * kept
        dropped = weights * kept
    else:
        dropped = weights
    _split_into(weights * (upstream - delta[..., None]), grad, own_grad)
    _split_into(dropped, scores, own)


def _native(scores: torch.Tensor, own: torch.Tensor | None):
    if scores.device.type != "cpu" or not scores.is_contiguous():
        return None
    if own is not None and not own.is_contiguous():
        return None
    return native.kernels().get(scores.dtype)


def _with_own(scores: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
    return scores if own is None else torch.cat([own[..., None], scores], dim=-1)


def _split_into(full: torch.Tensor, scores: torch.Tensor, own: torch.Tensor | None) -> None:
    if own is None:
        scores.copy_(full)
    else:
        own.copy_(full[..., 0])
        scores.copy_(full[..., 1:])


def _keep(keys, scores, own, query_ids, key_offset) -> torch.Tensor:
    heads, _, num_keys = scores.shape
    key_ids = torch.arange(key_offset, key_offset + num_keys, device=scores.device)
    if own is not None:
        key_ids = torch.cat([query_ids[:, None], key_ids.expand(len(query_ids), -1)], dim=1)
    return keep_mask(keys, heads, query_ids, key_ids)

"""Softmax of a chunk of attention scores with attention dropout, and its backward, in place.

The keep mask is a counter-based hash of (seed, head, query id, key id), not a draw from a
stateful generator, so that
- backward regenerates it instead of storing or replaying it;
- ids are global token positions, so P class-parallel ranks drop exactly the weights one process
  drops, and training with dropout is rank-count independent like the rest of the head.

Element (h, q, k) is kept iff mix32(row_key(h, q) + col_key(k)) >= round(p * 2^32), and kept
weights are scaled by 2^32 / (2^32 - round(p * 2^32)) (= 1 / (1 - p) up to 2^-32). The compiled
kernel (softmax_dropout.c via native.py) and the torch code here compute the same thing; the
torch code serves other dtypes and devices, and machines without a C compiler.
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


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit integer hash of softmax_dropout.c on int64 tensors holding uint32 values
    (constants below 2^31, so no product leaves int64)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK32
    return x ^ (x >> 15)


def keep_mask(
    keys: DropoutKeys, heads: int, query_ids: torch.Tensor, key_ids: torch.Tensor
) -> torch.Tensor:
    """[heads, queries, keys] bool: which attention weights survive dropout.

    `key_ids` is [keys] (shared by all queries) or [queries, keys] (per query). The per-weight
    hash runs in place on int32 lanes holding the uint32 bits (wrapping multiplies, logical
    shifts by masking): 6x faster than int64 temporaries on the CPU.
    """
    device = query_ids.device
    head = torch.arange(heads, device=device, dtype=torch.int64)[:, None]
    seed = mix32(torch.tensor(keys.seed, dtype=torch.int64, device=device))
    rows = mix32(seed ^ ((head * keys.stride + query_ids.to(torch.int64)) & MASK32))
    cols = mix32((key_ids.to(torch.int64) + 0x632BE5AB) & MASK32)
    cols = cols if cols.ndim == 2 else cols[None]
    bits = _as_int32(rows)[:, :, None] + _as_int32(cols)[None]
    shifted = torch.empty_like(bits)
    for multiplier in (0x21F0AAAD, 0x735A2D97):
        _xor_shift_right_(bits, 16 if multiplier == 0x21F0AAAD else 15, shifted)
        bits.mul_(multiplier)
    _xor_shift_right_(bits, 15, shifted)
    # unsigned comparison as signed: flip the sign bit of both sides
    return bits.bitwise_xor_(-(2**31)) >= keys.threshold - 2**31


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 values -> int32 with the same bits."""
    return (x - ((x >> 31) << 32)).to(torch.int32)


def _xor_shift_right_(x: torch.Tensor, shift: int, scratch: torch.Tensor) -> None:
    """x ^= x >> shift with a logical (unsigned) shift, in place."""
    torch.bitwise_right_shift(x, shift, out=scratch)
    x.bitwise_xor_(scratch.bitwise_and_((1 << (32 - shift)) - 1))


def softmax_dropout_(
    scores: torch.Tensor,
    own: torch.Tensor | None,
    query_ids: torch.Tensor,
    key_offset: int,
    keys: DropoutKeys,
) -> torch.Tensor:
    """scores [H, n, K] (keys key_offset..key_offset+K-1) and `own` [H, n] (each query's own
    token, key id = its query id) become the dropped-out softmax weights; returns the
    log-sum-exp [H, n] (float32 or wider) for the backward."""
    kernel = _native(scores, own)
    if kernel is not None:
        lse = torch.empty(scores.shape[:2], dtype=scores.dtype)
        kernel[0](
            scores.data_ptr(), own.data_ptr() if own is not None else None, lse.data_ptr(),
            *scores.shape, query_ids.data_ptr(), key_offset, keys.stride, keys.seed,
            keys.threshold, keys.keep_scale, torch.get_num_threads(),
        )  # fmt: skip
        return lse
    full = _widened(_with_own(scores, own))
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
    weights = torch.exp(_widened(_with_own(scores, own)) - lse[..., None])
    upstream = _widened(_with_own(grad, own_grad))
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


def _widened(x: torch.Tensor) -> torch.Tensor:
    """Half-precision scores get their softmax in float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


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

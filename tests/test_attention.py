"""The chunked attention with dropout against the dense formula, its mask, and the native kernel.

The dense reference here materializes softmax(q k^T / sqrt(d)) and multiplies it by the keep
mask `keep_mask` draws for the same seed and token ids; both implementations of the chunk
softmax (the compiled kernel and the torch code) must give it, in every chunking.
"""

import math
import shutil

import pytest
import torch

from candle_dist.model import attention as attention_module
from candle_dist.model import native, softmax_dropout
from candle_dist.model.softmax_dropout import DropoutKeys, keep_mask

HEADS, QUERIES, KEYS, DIM = 3, 37, 29, 8
KEY_OFFSET, STRIDE = 40, 100
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6}


@pytest.fixture(params=["native", "torch"])
def implementation(request, monkeypatch):
    """Run with the compiled kernel, then with the torch code (as without a C compiler)."""
    monkeypatch.setenv("CANDLE_DIST_NATIVE", "1" if request.param == "native" else "0")
    native.kernels.cache_clear()
    if request.param == "native" and not native.kernels():
        pytest.skip("no working C compiler here")
    yield request.param
    native.kernels.cache_clear()


def dense_attention(q, k, v, self_k, self_v, keys, query_ids, key_offset):
    """The formula, every weight materialized: softmax over [own key,] keys, dropped, times v."""
    scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    key_ids = torch.arange(key_offset, key_offset + k.shape[1])
    if self_k is not None:
        own = (q * self_k).sum(-1, keepdim=True) / math.sqrt(q.shape[-1])
        scores = torch.cat([own, scores], -1)
        key_ids = torch.cat([query_ids[:, None], key_ids.expand(len(query_ids), -1)], 1)
    weights = torch.softmax(scores, -1)
    if keys.threshold:
        weights = weights * keep_mask(keys, q.shape[0], query_ids, key_ids) * keys.keep_scale
    if self_k is None:
        return weights @ v
    return weights[..., :1] * self_v + weights[..., 1:] @ v


def _inputs(dtype, with_self, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(HEADS, QUERIES, DIM, generator=g, dtype=dtype) * 2
    k, v = (torch.randn(HEADS, KEYS, DIM, generator=g, dtype=dtype) for _ in range(2))
    own = [torch.randn(HEADS, QUERIES, DIM, generator=g, dtype=dtype) for _ in range(2)]
    tensors = [q, k, v, *(own if with_self else [None, None])]
    for t in tensors:
        if t is not None:
            t.requires_grad_(True)
    query_ids = torch.randperm(STRIDE, generator=g)[:QUERIES]
    return tensors, query_ids


def _close(a, b, tol):
    err = float((a - b).detach().abs().max() / b.detach().abs().max())
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("with_self", [False, True], ids=["keys", "keys+own"])
@pytest.mark.parametrize("chunk_elements", [attention_module.CHUNK_ELEMENTS, 50])
@pytest.mark.parametrize("dropout", [0.3, 0.0])
def test_chunked_attention_matches_dense_formula(
    implementation, dtype, with_self, chunk_elements, dropout, monkeypatch
):
    monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(attention_module, "MIN_CHUNK_ROWS", 1)
    (q, k, v, self_k, self_v), query_ids = _inputs(dtype, with_self)
    if not with_self and dropout == 0.0:
        pytest.skip("served by F.scaled_dot_product_attention")
    torch.manual_seed(7)
    out = attention_module.attention(
        q, k, v, dropout_p=dropout, self_k=self_k, self_v=self_v,
        query_ids=query_ids, key_offset=KEY_OFFSET, id_stride=STRIDE,
    )  # fmt: skip
    torch.manual_seed(7)  # the same seed draw
    keys = DropoutKeys.draw(dropout, STRIDE)
    ref = dense_attention(q, k, v, self_k, self_v, keys, query_ids, KEY_OFFSET)
    _close(out, ref, TOLERANCE[dtype])
    inputs = [t for t in (q, k, v, self_k, self_v) if t is not None]
    upstream = torch.randn_like(out)
    mine = torch.autograd.grad(out, inputs, upstream)
    want = torch.autograd.grad(ref, inputs, upstream)
    for got, expected in zip(mine, want, strict=True):
        _close(got, expected, TOLERANCE[dtype])


def test_a_subset_of_queries_gets_the_rows_of_the_full_attention(implementation):
    """What makes P class-parallel ranks equal one process: the mask of a query depends on its
    id, not on which other queries are computed with it."""
    (q, k, v, *_), query_ids = _inputs(torch.float64, False)
    torch.manual_seed(3)
    full = attention_module.attention(q, k, v, dropout_p=0.5, query_ids=query_ids, id_stride=100)
    part = slice(10, 23)
    torch.manual_seed(3)
    some = attention_module.attention(
        q[:, part], k, v, dropout_p=0.5, query_ids=query_ids[part], id_stride=100
    )
    _close(some, full[:, part], 1e-14)


def test_zero_keys_is_an_error_not_a_read_past_the_buffer():
    q = torch.randn(2, 3, 4)
    empty = torch.randn(2, 0, 4)
    with pytest.raises(ValueError, match="zero keys"):
        attention_module.attention(q, empty, empty, dropout_p=0.1)


def test_keep_mask_is_a_fair_coin_per_weight():
    torch.manual_seed(0)
    keys = DropoutKeys.draw(0.1, 10**6)
    mask = keep_mask(keys, 8, torch.arange(300), torch.arange(1000)).double()
    assert abs(mask.mean().item() - 0.9) < 0.002
    # rows and columns all near 0.9 (binomial std over 1000 resp. 2400 draws: 0.009, 0.006)
    assert mask.mean(-1).sub(0.9).abs().max() < 0.05
    assert mask.mean((0, 1)).sub(0.9).abs().max() < 0.035
    # no correlation between neighbouring weights, rows or heads
    centred = mask - mask.mean()
    for a, b in [
        (centred[..., 1:], centred[..., :-1]),
        (centred[:, 1:], centred[:, :-1]),
        (centred[1:], centred[:-1]),
    ]:
        corr = (a * b).mean() / centred.pow(2).mean()
        assert abs(corr) < 0.01
    other = keep_mask(DropoutKeys.draw(0.1, 10**6), 8, torch.arange(300), torch.arange(1000))
    assert (other.double() != mask).double().mean() > 0.15  # a new seed, a new mask


def test_dropout_is_unbiased():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 64, 8, generator=g) for _ in range(3))
    plain = attention_module.attention(q, k, v, dropout_p=0.0, self_k=k, self_v=v)
    draws = [attention_module.attention(q, k, v, dropout_p=0.1, self_k=k, self_v=v)
             for _ in range(300)]  # fmt: skip
    assert (sum(draws) / 300 - plain).abs().mean() < 0.1 * plain.abs().mean()


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_native_kernel_builds_here(tmp_path, monkeypatch):
    """The fast path is really in use where a compiler exists (a silent fallback would only
    show as a slower benchmark)."""
    monkeypatch.setenv("CANDLE_DIST_CACHE", str(tmp_path))
    monkeypatch.delenv("CANDLE_DIST_NATIVE", raising=False)
    native.kernels.cache_clear()
    try:
        assert set(native.kernels()) == {torch.float32, torch.float64}
        assert len(list((tmp_path / "kernels").glob("softmax_dropout-*.so"))) == 1
    finally:
        native.kernels.cache_clear()


def test_a_broken_compiler_falls_back_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("CANDLE_DIST_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exists, always fails
    monkeypatch.delenv("CANDLE_DIST_NATIVE", raising=False)
    native.kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not build the native softmax-dropout kernel"):
            assert native.kernels() == {}
        (q, k, v, *_), query_ids = _inputs(torch.float32, False)
        out = attention_module.attention(q, k, v, dropout_p=0.2, query_ids=query_ids)
        assert torch.isfinite(out).all()
    finally:
        native.kernels.cache_clear()


def test_bf16_autocast_softmax_runs_in_the_native_float32_kernel(monkeypatch, request):
    """Under CPU bf16 autocast the chunk softmax gets float32 scores, so the compiled kernel
    serves it as it serves fp32 training (not the slower torch code, and not in bf16)."""
    monkeypatch.delenv("CANDLE_DIST_NATIVE", raising=False)
    native.kernels.cache_clear()
    request.addfinalizer(native.kernels.cache_clear)
    if not native.kernels():
        pytest.skip("no working C compiler here")
    calls = []
    select = softmax_dropout._native

    def spied(scores, own):
        kernel = select(scores, own)
        calls.append((scores.dtype, kernel is not None))
        return kernel

    monkeypatch.setattr(softmax_dropout, "_native", spied)
    (q, k, v, self_k, self_v), query_ids = _inputs(torch.bfloat16, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention_module.attention(
            q, k, v, dropout_p=0.1, self_k=self_k, self_v=self_v, query_ids=query_ids,
            key_offset=KEY_OFFSET, id_stride=STRIDE,
        )  # fmt: skip
    out.float().sum().backward()
    assert calls and set(calls) == {(torch.float32, True)}  # forward and backward

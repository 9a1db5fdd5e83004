"""The head's custom autograd Functions and its loss under bf16 autocast, against float64.

Under `torch.autocast(..., dtype=torch.bfloat16)` a plain dense torch implementation rounds its
matmuls to bf16; ours must not do worse than that by more than 2x (relative L2 error of outputs
and gradients against the float64 result), and must stay self-consistent: forward and backward
in the same precision, so a row's cross-entropy is never negative. Autocast here is the CPU's
(the CUDA one differs in which ops it widens, not in what the Functions must guarantee).
Also: the fused attention kernels get the 4-D inputs they need, and no training step allocates
a heads x L x L tensor.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from candle_dist.model import attention as attention_module
from candle_dist.model import head as head_module
from candle_dist.model import native
from candle_dist.model.head import CandleHead
from candle_dist.model.losses import CompensatingLogitAdjustedLoss, build_loss
from candle_dist.model.softmax_dropout import DropoutKeys
from candle_dist.parallel.cross_entropy import class_parallel_cross_entropy
from tests.oracle import DenseCandleHead, dense_cla
from tests.test_attention import dense_attention
from tests.test_head import _oracle_params

MASKS = ["none", "in_visual", "in_text", "between_visual_text"]
CLIP_LOGIT_SCALE = math.log(100.0)  # s = 100: bf16 logits are coarse, inconsistencies show
RATIO = 2.0  # ours may err at most this much more than the dense implementation
NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[NO_GPU, pytest.mark.cuda])]


@pytest.fixture
def one_thread():
    """Tiny tensors (hundreds of one-query chunks): extra threads only cost time on a busy
    machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _error(mine: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error (robust, unlike the max of a few cancelling sums)."""
    assert mine.shape == ref.shape
    return float((mine.detach().double() - ref).norm() / ref.norm())


def _assert_no_worse(mine: dict, dense: dict, ref: dict) -> None:
    for name in ref:
        ours, theirs = _error(mine[name], ref[name]), _error(dense[name], ref[name])
        assert ours <= RATIO * theirs, f"{name}: error {ours:.3g} vs dense {theirs:.3g}"


# ------------------------------------------------------------------------- cross-entropy
def _ce_problem():
    g = torch.Generator().manual_seed(0)
    rows = F.normalize(torch.randn(256, 64, generator=g, dtype=torch.float64), dim=-1)
    cols = F.normalize(torch.randn(192, 64, generator=g, dtype=torch.float64), dim=-1)
    bias = torch.log(torch.rand(192, generator=g, dtype=torch.float64) + 0.01)
    bias[180:] = -torch.inf  # classes without a prior (never targets)
    targets = torch.randint(0, 180, (256,), generator=g)
    upstream = torch.rand(256, generator=g, dtype=torch.float64) + 0.5
    return rows, cols, bias, targets, upstream


def _ce(impl, dtype: torch.dtype, autocast: bool, chunk_rows: int = 64) -> dict:
    rows, cols, bias, targets, upstream = _ce_problem()
    rows, cols = rows.to(dtype).requires_grad_(), cols.to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if impl == "dense":
            logits = 100.0 * rows @ cols.t() + bias.to(dtype)
            loss = F.cross_entropy(logits, targets, reduction="none")
        else:
            loss = class_parallel_cross_entropy(
                rows, cols, 100.0, bias.to(dtype), targets, chunk_rows=chunk_rows
            )
    (loss * upstream.to(loss.dtype)).sum().backward()
    return {"loss": loss, "grad rows": rows.grad, "grad cols": cols.grad}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("chunk_rows", [64, 1024])
def test_cross_entropy_under_bf16_autocast(chunk_rows):
    ref = {name: t.detach() for name, t in _ce("dense", torch.float64, False).items()}
    dense = _ce("dense", torch.float32, True)
    mine = _ce("ours", torch.float32, True, chunk_rows)
    assert mine["loss"].dtype == torch.float32
    assert mine["loss"].min() >= 0
    _assert_no_worse(mine, dense, ref)
    assert torch.equal(mine["grad cols"][180:], torch.zeros(12, 64))


# ----------------------------------------------------------------------------- attention
def _attention(impl, dtype, autocast, with_self, dropout):
    """Inputs as the fusion's projections give them under autocast (bf16); many chunks."""
    g = torch.Generator().manual_seed(0)
    heads, queries, keys, dim = 2, 800, 100, 16
    shapes = [(queries, 2.0), (keys, 1.0), (keys, 1.0), (queries, 1.0), (queries, 1.0)]
    inputs = [torch.randn(heads, n, dim, generator=g, dtype=torch.float64) * s for n, s in shapes]
    upstream = torch.randn(heads, queries, dim, generator=g, dtype=torch.float64)
    inputs = [t.to(dtype).requires_grad_() for t in inputs[: 5 if with_self else 3]]
    q, k, v, self_k, self_v = inputs + [None] * (5 - len(inputs))
    query_ids = torch.arange(queries)
    torch.manual_seed(3)
    drop = DropoutKeys.draw(dropout, queries + keys)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if impl == "dense":
            out = dense_attention(q, k, v, self_k, self_v, drop, query_ids, queries)
        else:
            torch.manual_seed(3)  # the same seed draw
            out = attention_module.attention(
                q, k, v, dropout_p=dropout, self_k=self_k, self_v=self_v,
                query_ids=query_ids, key_offset=queries, id_stride=queries + keys,
            )  # fmt: skip
    (out * upstream.to(out.dtype)).sum().backward()
    names = ["q", "k", "v", "self_k", "self_v"]
    return {"out": out, **{f"grad {n}": t.grad for n, t in zip(names, inputs, strict=False)}}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("native_kernel", [True, False], ids=["native", "torch-softmax"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("with_self", [False, True], ids=["keys", "keys+own"])
def test_attention_under_bf16_autocast(with_self, dropout, native_kernel, monkeypatch, request):
    """Through `_ChunkedAttention` (with own keys, or with dropout) or the fused kernel; the
    chunk softmax by the compiled kernel or by the torch code (as without a C compiler, and on
    GPUs). One query per chunk: 800 chunks add up the k and v gradients, as a long sequence's
    hundreds of chunks do."""
    monkeypatch.setenv("CANDLE_DIST_NATIVE", "1" if native_kernel else "0")
    native.kernels.cache_clear()
    request.addfinalizer(native.kernels.cache_clear)
    monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(attention_module, "MIN_CHUNK_ROWS", 1)
    ref = _attention("dense", torch.float64, False, with_self, dropout)
    ref = {name: t.detach() for name, t in ref.items()}
    dense = _attention("dense", torch.bfloat16, True, with_self, dropout)
    mine = _attention("ours", torch.bfloat16, True, with_self, dropout)
    assert mine["out"].dtype == torch.bfloat16  # as the fused kernel's, under autocast
    _assert_no_worse(mine, dense, ref)


@pytest.mark.usefixtures("one_thread")
def test_fused_attention_gets_4d_inputs(monkeypatch):
    """The flash / memory-efficient CUDA kernels take [batch, heads, tokens, head_dim] only;
    with 3-D inputs torch falls back to the math path, which forms heads x L x L weights."""
    fused = F.scaled_dot_product_attention
    shapes = []

    def checked(q, k, v, *args, **kwargs):
        shapes.append((q.ndim, k.ndim, v.ndim))
        return fused(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", checked)
    q, k, v = (torch.randn(2, 5, 4, requires_grad=True) for _ in range(3))
    out = attention_module.attention(q, k, v)
    assert out.shape == (2, 5, 4)
    out.sum().backward()
    for mask in MASKS:
        head, _, feats, labels, counts = _head_pair(mask)
        head.loss(feats.float(), labels, CompensatingLogitAdjustedLoss(counts))[0].backward()
    assert shapes
    assert set(shapes) == {(4, 4, 4)}


# ---------------------------------------------------------------------------------- head
def _head_pair(mask: str, seed: int = 0):
    """A float32 CandleHead (attention dropout 0) and the oracle with its weights, in float64
    and float32."""
    num_classes, num_base, dim, batch = 192, 128, 64, 64
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    protos = torch.randn(num_base, dim, generator=g, dtype=torch.float64) + 0.5
    feats = torch.randn(batch, dim, generator=g, dtype=torch.float64) + 0.5
    labels = torch.randint(0, num_base, (batch,), generator=g)
    tail = torch.logspace(3, 0, num_base).round().long()
    counts = torch.cat([tail, torch.zeros(num_classes - num_base, dtype=torch.long)])
    torch.manual_seed(1)
    head = CandleHead(
        text_features=text.float(),
        visual_prototypes=protos.float(),
        logit_scale=CLIP_LOGIT_SCALE,
        visual_scale=0.7,
        mask=mask,
        num_heads=8,
        attn_dropout=0.0,
    )
    torch.nn.init.normal_(head.fusion.attn.in_proj_bias, std=0.1)
    torch.nn.init.normal_(head.fusion.attn.out_proj.bias, std=0.1)
    oracles = {}
    for dtype in (torch.float64, torch.float32):
        oracle = DenseCandleHead(
            text.to(dtype), protos.to(dtype), CLIP_LOGIT_SCALE, 0.7, mask, "text", True, 8
        ).to(dtype)
        oracle.load_from(copy.deepcopy(head).to(dtype))
        oracles[dtype] = oracle
    return head, oracles, feats, labels, counts


def _oracle_step(oracle, feats, labels, counts, autocast: bool) -> dict:
    """Per-row losses of the three logit sets and the parameter gradients, dense."""
    targets = torch.cat([labels, torch.arange(oracle.text_storage.shape[0])])
    prior = torch.log((counts.double() + 1) / (counts.double() + 1).sum())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = oracle(feats)
        loss = sum(dense_cla(part, targets, counts) for part in logits)
        rows = [F.cross_entropy(part + prior.to(part.dtype), targets, reduction="none")
                for part in logits]  # fmt: skip
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in _oracle_params(oracle).values()])
    return {"per-row loss": torch.cat(rows), "gradient": grads}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mask", MASKS)
def test_head_loss_under_bf16_autocast(mask, monkeypatch):
    head, oracles, feats, labels, counts = _head_pair(mask)
    ref = _oracle_step(oracles[torch.float64], feats, labels, counts, autocast=False)
    ref = {name: t.detach() for name, t in ref.items()}
    dense = _oracle_step(oracles[torch.float32], feats.float(), labels, counts, autocast=True)

    per_row = []

    def recorded(*args, **kwargs):
        per_row.append(class_parallel_cross_entropy(*args, **kwargs))
        return per_row[-1]

    monkeypatch.setattr(head_module, "class_parallel_cross_entropy", recorded)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = head.loss(feats.float(), labels, CompensatingLogitAdjustedLoss(counts))
    loss.backward()
    params, oracle = dict(head.named_parameters()), oracles[torch.float64]
    mine = {
        "per-row loss": torch.cat(per_row),
        "gradient": torch.cat([params[name].grad.flatten() for name in _oracle_params(oracle)]),
    }
    assert min(float(rows.detach().min()) for rows in per_row) >= 0.0
    _assert_no_worse(mine, dense, ref)


# ---------------------------------------------------------------------------- memory
class _LargestAllocation(TorchDispatchMode):
    """The largest storage any op returns while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, tuple | list) else [out]
        for result in results:
            if isinstance(result, torch.Tensor) and result.untyped_storage().nbytes() > self.nbytes:
                self.nbytes, self.op = result.untyped_storage().nbytes(), func
        return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_no_step_allocates_heads_by_tokens_squared(device, precision, dropout, monkeypatch):
    """Mask `none`, L = B + 2C = 2,048 tokens: forward + backward of the loss never holds a
    [heads, L, L] tensor (the fused kernel, or the chunked path: here 8 chunks of 256 queries,
    a budget scaled down with L so that chunking is visible)."""
    monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", 2**22)
    monkeypatch.setattr(attention_module, "MIN_CHUNK_ROWS", 256)
    num_classes, batch, dim, heads = 960, 128, 64, 8
    g = torch.Generator().manual_seed(0)
    text = torch.randn(num_classes, dim, generator=g)
    feats = torch.randn(batch, dim, generator=g).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    head = CandleHead(
        text_features=text,
        visual_prototypes=text + 0.1,
        logit_scale=CLIP_LOGIT_SCALE,
        num_heads=heads,
        attn_dropout=dropout,
    ).to(device)
    criterion = CompensatingLogitAdjustedLoss(torch.ones(num_classes)).to(device)
    tokens = batch + 2 * num_classes
    element = 2 if precision == "bf16" else 4
    with _LargestAllocation() as largest:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = head.loss(feats, labels, criterion)
        loss.backward()
    assert torch.isfinite(loss)
    assert largest.nbytes < heads * tokens * tokens * element, f"{largest.op}: {largest.nbytes}"


# ------------------------------------------------------------------ long-tail baselines
def _dense_columns(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """LADE's column statistics of dense logits: log-sum-exp down each column, target sums."""
    sums = logits.new_zeros(logits.shape[1]).index_add_(
        0, targets, logits.gather(1, targets[:, None]).squeeze(1)
    )
    return torch.cat([torch.logsumexp(logits, dim=0), sums])


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["ldam", "lade", "grw", "class_balanced"])
def test_new_losses_in_head_under_bf16_autocast(name, monkeypatch):
    """Each loss through CandleHead.loss under bf16 autocast errs (per-row cross-entropy,
    LADE's column statistics, gradient; vs float64) at most 2x what its dense definition errs
    on the dense oracle's logits. A scalar loss is a sum whose rounding errors cancel by luck,
    so it is not compared."""
    head, oracles, feats, labels, counts = _head_pair("none")
    counts = counts + 1  # all positive, where the published definitions hold
    criterion = build_loss(name, counts)
    targets = torch.cat([labels, torch.arange(len(counts))])

    def dense(oracle, feats, autocast: bool) -> dict:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = oracle(feats)
            loss = sum(criterion(part, targets) for part in logits)
            rows = torch.cat([criterion.per_row(part, targets) for part in logits])
            columns = torch.cat([_dense_columns(part, targets) for part in logits])
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in _oracle_params(oracle).values()])
        return {"per-row loss": rows, "columns": columns, "gradient": grads}

    ref = {k: t.detach() for k, t in dense(oracles[torch.float64], feats, False).items()}
    theirs = dense(oracles[torch.float32], feats.float(), autocast=True)
    recorded = {"per-row loss": [], "columns": []}

    def recording(what: str, function):
        def wrapped(*args, **kwargs):
            recorded[what].append(function(*args, **kwargs))
            return recorded[what][-1]

        return wrapped

    monkeypatch.setattr(
        head_module,
        "class_parallel_cross_entropy",
        recording("per-row loss", head_module.class_parallel_cross_entropy),
    )
    monkeypatch.setattr(
        head_module,
        "class_parallel_column_statistics",
        recording("columns", head_module.class_parallel_column_statistics),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = head.loss(feats.float(), labels, criterion)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert min(float(rows.detach().min()) for rows in recorded["per-row loss"]) >= 0.0
    params = dict(head.named_parameters())
    mine = {
        "per-row loss": torch.cat(recorded["per-row loss"]),
        "gradient": torch.cat(
            [params[n].grad.flatten() for n in _oracle_params(oracles[torch.float64])]
        ),
    }
    if criterion.column_statistics:
        mine["columns"] = torch.cat([torch.cat(pair) for pair in recorded["columns"]])
    else:
        del ref["columns"]
    _assert_no_worse(mine, theirs, ref)

"""Loss and gradient error of the Candle head under bf16 autocast, against the dense oracle's.

    python benchmarks/bench_bf16.py [--seeds 3] [--baseline REV]

Per mask mode, one training step's per-row losses (the three logit sets) and parameter
gradients under CPU `torch.autocast(dtype=torch.bfloat16)`, as relative L2 errors against the
float64 dense oracle (tests/oracle.py), for ours and for the oracle itself in float32 under the
same autocast: ours should err at most 2x as much. Then the same for the two custom autograd
Functions alone against plain dense torch code. `--baseline REV` adds ours as of git revision
REV (its cross_entropy.py, softmax_dropout.py and attention.py, loaded from git).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import subprocess
import sys
import types
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import write_section
from candle_dist.model import attention as attention_module
from candle_dist.model import fusion as fusion_module
from candle_dist.model import head as head_module
from candle_dist.model.fusion import MASK_MODES
from candle_dist.model.head import CandleHead
from candle_dist.model.losses import CompensatingLogitAdjustedLoss
from candle_dist.parallel.cross_entropy import class_parallel_cross_entropy
from tests.oracle import DenseCandleHead, dense_cla

ROOT = Path(__file__).resolve().parent.parent
CLASSES, BASE, DIM, BATCH, HEADS = 192, 128, 64, 64, 8
LOGIT_SCALE, VISUAL_SCALE = math.log(100.0), 0.7
# CandleHead parameter -> the oracle's attribute path
PARAMETERS = {
    "virtual_prototypes": "virtual_prototypes",
    "proj_image": "proj_image",
    "proj_text": "proj_text",
    "fusion.ratio": "ratio",
    "fusion.norm.weight": "norm.weight",
    "fusion.norm.bias": "norm.bias",
    "fusion.attn.in_proj_weight": "attn.in_proj_weight",
    "fusion.attn.in_proj_bias": "attn.in_proj_bias",
    "fusion.attn.out_proj.weight": "attn.out_proj.weight",
    "fusion.attn.out_proj.bias": "attn.out_proj.bias",
}
# the modules of the head's custom autograd Functions, in import order
BASELINE_MODULES = (
    "candle_dist.model.softmax_dropout",
    "candle_dist.parallel.cross_entropy",
    "candle_dist.model.attention",
)


def problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(CLASSES, DIM, generator=g, dtype=torch.float64)
    protos = torch.randn(BASE, DIM, generator=g, dtype=torch.float64) + 0.5
    feats = torch.randn(BATCH, DIM, generator=g, dtype=torch.float64) + 0.5
    labels = torch.randint(0, BASE, (BATCH,), generator=g)
    tail = torch.logspace(3, 0, BASE).round().long()
    counts = torch.cat([tail, torch.zeros(CLASSES - BASE, dtype=torch.long)])
    return text, protos, feats, labels, counts


def bf16(enabled: bool = True):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def dense_step(oracle, feats, labels, counts, autocast: bool):
    """(per-row losses of the three logit sets, all parameter gradients) of the oracle."""
    targets = torch.cat([labels, torch.arange(CLASSES)])
    prior = torch.log((counts.double() + 1) / (counts.double() + 1).sum())
    with bf16(autocast):
        logits = oracle(feats)
        loss = sum(dense_cla(part, targets, counts) for part in logits)
        rows = [F.cross_entropy(part + prior.to(part.dtype), targets, reduction="none")
                for part in logits]  # fmt: skip
    loss.backward()
    grads = [oracle.get_parameter(path).grad.flatten() for path in PARAMETERS.values()]
    return torch.cat(rows).detach().double(), torch.cat(grads).double()


def our_step(head, feats, labels, counts):
    """The same for CandleHead under bf16 autocast (per-row losses as the head computes them)."""
    per_row = []
    chunked = head_module.class_parallel_cross_entropy

    def recorded(*args, **kwargs):
        per_row.append(chunked(*args, **kwargs))
        return per_row[-1]

    with mock.patch.object(head_module, "class_parallel_cross_entropy", recorded):
        with bf16():
            loss, _ = head.loss(feats, labels, CompensatingLogitAdjustedLoss(counts))
        loss.backward()
    grads = [head.get_parameter(name).grad.flatten() for name in PARAMETERS]
    return torch.cat(per_row).detach().double(), torch.cat(grads).double()


def errors(mask: str, seed: int, baseline: dict | None) -> dict[str, tuple[float, float, float]]:
    """{implementation: (per-row loss error, gradient error, smallest per-row loss)}."""
    text, protos, feats, labels, counts = problem(seed)
    torch.manual_seed(1)
    head = CandleHead(
        text_features=text.float(),
        visual_prototypes=protos.float(),
        logit_scale=LOGIT_SCALE,
        visual_scale=VISUAL_SCALE,
        mask=mask,
        num_heads=HEADS,
        attn_dropout=0.0,
    )
    torch.nn.init.normal_(head.fusion.attn.in_proj_bias, std=0.1)
    torch.nn.init.normal_(head.fusion.attn.out_proj.bias, std=0.1)

    def oracle(dtype):
        dense = DenseCandleHead(
            text.to(dtype), protos.to(dtype), LOGIT_SCALE, VISUAL_SCALE, mask, "text", True, HEADS
        ).to(dtype)
        dense.load_from(copy.deepcopy(head).to(dtype))
        return dense

    ref_rows, ref_grads = dense_step(oracle(torch.float64), feats, labels, counts, False)
    results = {"dense": dense_step(oracle(torch.float32), feats.float(), labels, counts, True)}
    if baseline is not None:
        with patched(baseline):
            results["before"] = our_step(copy.deepcopy(head), feats.float(), labels, counts)
    results["ours"] = our_step(head, feats.float(), labels, counts)
    return {
        name: (
            float((rows - ref_rows).norm() / ref_rows.norm()),
            float((grads - ref_grads).norm() / ref_grads.norm()),
            float(rows.min()),
        )
        for name, (rows, grads) in results.items()
    }


def load_baseline(revision: str) -> dict[str, types.ModuleType]:
    """The Functions' modules as of `revision`, importing each other, not today's."""
    loaded = {}
    for name in BASELINE_MODULES:
        path = name.replace(".", "/") + ".py"
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{revision}:{path}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for other in loaded:
            source = source.replace(other, f"baseline_{other.rsplit('.', 1)[1]}")
        module = types.ModuleType(f"baseline_{name.rsplit('.', 1)[1]}")
        sys.modules[module.__name__] = module  # dataclasses look their module up
        exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
        loaded[name] = module
    return loaded


def cross_entropy_step(impl, autocast: bool) -> list[torch.Tensor]:
    """Per-row loss and gradients (rows, columns) at s = 100; `impl` None: dense torch."""
    g = torch.Generator().manual_seed(0)
    rows = F.normalize(torch.randn(256, DIM, generator=g, dtype=torch.float64), dim=-1)
    cols = F.normalize(torch.randn(CLASSES, DIM, generator=g, dtype=torch.float64), dim=-1)
    bias = torch.log(torch.rand(CLASSES, generator=g, dtype=torch.float64) + 0.01)
    targets = torch.randint(0, CLASSES, (256,), generator=g)
    upstream = torch.rand(256, generator=g, dtype=torch.float64) + 0.5
    dtype = torch.float32 if autocast else torch.float64
    rows, cols = rows.to(dtype).requires_grad_(), cols.to(dtype).requires_grad_()
    with bf16(autocast):
        if impl is None:
            logits = 100.0 * rows @ cols.t() + bias.to(dtype)
            loss = F.cross_entropy(logits, targets, reduction="none")
        else:
            loss = impl(rows, cols, 100.0, bias.to(dtype), targets, chunk_rows=64)
    (loss * upstream.to(loss.dtype)).sum().backward()
    return [loss.detach().double(), rows.grad.double(), cols.grad.double()]


def attention_step(module, autocast: bool) -> list[torch.Tensor]:
    """Output and input gradients of attention with own keys over 100 keys, 800 queries of
    bf16 inputs (as the fusion's projections give them), one query per chunk; `module` None:
    dense torch."""
    g = torch.Generator().manual_seed(0)
    heads, queries, keys, dim = 2, 800, 100, 16
    sizes, scales = (queries, keys, keys, queries, queries), (2.0, 1.0, 1.0, 1.0, 1.0)
    inputs = [torch.randn(heads, n, dim, generator=g, dtype=torch.float64) * scale
              for n, scale in zip(sizes, scales, strict=True)]  # fmt: skip
    upstream = torch.randn(heads, queries, dim, generator=g, dtype=torch.float64)
    dtype = torch.bfloat16 if autocast else torch.float64
    q, k, v, self_k, self_v = inputs = [t.to(dtype).requires_grad_() for t in inputs]
    chunking = contextlib.nullcontext()
    if module is not None:  # forward and backward
        chunking = mock.patch.multiple(module, CHUNK_ELEMENTS=1, MIN_CHUNK_ROWS=1)
    with chunking:
        with bf16(autocast):
            if module is None:
                own = (q * self_k).sum(-1, keepdim=True)
                weights = torch.softmax(torch.cat([own, q @ k.transpose(1, 2)], -1) / dim**0.5, -1)
                out = weights[..., :1] * self_v + weights[..., 1:] @ v
            else:
                out = module.attention(q, k, v, self_k=self_k, self_v=self_v)
        (out * upstream.to(out.dtype)).sum().backward()
    return [out.detach().double()] + [t.grad.double() for t in inputs]


def function_table(baseline: dict | None) -> list[str]:
    """Worst relative L2 error over a Function's output and input gradients, per
    implementation."""
    old_cross_entropy = old_attention = None
    if baseline is not None:
        old_cross_entropy = baseline["candle_dist.parallel.cross_entropy"]
        old_cross_entropy = old_cross_entropy.class_parallel_cross_entropy
        old_attention = baseline["candle_dist.model.attention"]
    cases = {
        f"class_parallel_cross_entropy (s = 100, 256 rows, {CLASSES} classes)": (
            cross_entropy_step,
            class_parallel_cross_entropy,
            old_cross_entropy,
        ),
        "attention with own keys (800 one-query chunks, 100 keys)": (
            attention_step,
            attention_module,
            old_attention,
        ),
    }
    lines = [
        "| Function | ours | before | dense | ours / dense | before / dense |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for case, (step, ours, before) in cases.items():
        ref = step(None, False)

        def worst(result: list[torch.Tensor], ref=ref) -> float:
            return max(float((a - b).norm() / b.norm()) for a, b in zip(result, ref, strict=True))

        dense, mine = worst(step(None, True)), worst(step(ours, True))
        old = ("-", "-")
        if before is not None:
            error = worst(step(before, True))
            old = (f"{error:.2e}", f"{error / dense:.2f}")
        lines.append(
            f"| {case} | {mine:.2e} | {old[0]} | {dense:.2e} | {mine / dense:.2f} | {old[1]} |"
        )
        print(lines[-1], flush=True)
    return lines


@contextlib.contextmanager
def patched(baseline: dict[str, types.ModuleType]):
    with (
        mock.patch.object(
            head_module,
            "class_parallel_cross_entropy",
            baseline["candle_dist.parallel.cross_entropy"].class_parallel_cross_entropy,
        ),
        mock.patch.object(
            fusion_module, "attention", baseline["candle_dist.model.attention"].attention
        ),
    ):
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--baseline", metavar="REV", help="also measure ours as of this revision")
    args = parser.parse_args()
    torch.set_num_threads(2)
    baseline = load_baseline(args.baseline) if args.baseline else None
    names = {"ours": "ours", "before": f"ours at {args.baseline} (before)", "dense": "dense"}
    lines = [
        "| mask | implementation | per-row loss error | / dense (worst seed) | gradient error "
        "| / dense (worst seed) | smallest per-row loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mask in MASK_MODES:
        runs = [errors(mask, seed, baseline) for seed in range(args.seeds)]
        for impl in [name for name in names if name in runs[0]]:
            loss_err = statistics.mean(run[impl][0] for run in runs)
            grad_err = statistics.mean(run[impl][1] for run in runs)
            loss_ratio = max(run[impl][0] / run["dense"][0] for run in runs)
            grad_ratio = max(run[impl][1] / run["dense"][1] for run in runs)
            smallest = min(run[impl][2] for run in runs) + 0.0  # no "-0"
            ratios = ("-", "-") if impl == "dense" else (f"{loss_ratio:.2f}", f"{grad_ratio:.2f}")
            lines.append(
                f"| {mask} | {names[impl]} | {loss_err:.2e} | {ratios[0]} | {grad_err:.2e} "
                f"| {ratios[1]} | {smallest:.3g} |"
            )
            print(lines[-1], flush=True)
    body = f"""
One training step of the head (C = {CLASSES}, {BASE} of them base classes, D = {DIM}, B = {BATCH},
{HEADS} heads, s = 100 as CLIP's, visual scale {VISUAL_SCALE}, attention dropout 0, CLA loss)
under CPU `torch.autocast(dtype=torch.bfloat16)`, parameters float32. Errors are relative L2
against the float64 dense oracle (tests/oracle.py) on the same weights: of the per-row
cross-entropies of the three logit sets (R = B + C rows each), and of all parameter gradients
as one vector; means over {args.seeds} seeds, ratios the worst seed's. "dense" is the oracle in
float32 under the same autocast (bf16 logits; torch's MultiheadAttention); "before" is ours as
of the `--baseline` revision. Target: ours at most 2x dense. A negative smallest per-row loss
is a cross-entropy below its minimum, 0.

{chr(10).join(lines)}

The head's two custom autograd Functions alone under the same autocast: the worst relative L2
error over output and input gradients against float64, for ours and for plain dense torch code
(bf16 logits; scores, softmax and weights in bf16: CPU autocast leaves softmax in bf16).

{chr(10).join(function_table(baseline))}
"""
    write_section("bf16", "bf16 autocast: loss and gradient error against float64", body)


if __name__ == "__main__":
    main()

"""On a CUDA device: the head against the dense oracle (fp32, bf16), training resume, extraction.

Marked `cuda` and skipped without a CUDA device. CANDLE_DIST_CUDA_TESTS_ON_CPU=1 runs them on
the CPU instead, only to check the tests themselves (`benchmarks/gpu_check.sh` in its hidden
CPU mode sets it); on the CPU they prove nothing about CUDA.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from candle_dist import cli
from candle_dist.data.synthetic_features import make_synthetic_features
from candle_dist.features.store import FeatureStore
from candle_dist.model import attention as attention_module
from candle_dist.model.head import CandleHead
from candle_dist.model.losses import CompensatingLogitAdjustedLoss
from tests.data_helpers import shard_spec, store_rows, write_jpeg_shards
from tests.oracle import DenseCandleHead, dense_cla
from tests.test_head import _oracle_params

ON_CPU = os.environ.get("CANDLE_DIST_CUDA_TESTS_ON_CPU") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE.type != "cuda" and not ON_CPU,
        reason="no CUDA device (torch.cuda.is_available() is False)",
    ),
]

ROOT = Path(__file__).resolve().parent.parent
MASKS = ["none", "in_visual", "in_text", "between_visual_text"]
C, C_BASE, D, B, HEADS = 64, 48, 64, 32, 4
FP32_TOL = 1e-5  # relative RMS error against float64
# bf16 errors are pooled over problems: on one problem a scalar's error (the loss, the fusion
# ratio's gradient) is luck, and either implementation's can be 5x the other's.
BF16_PROBLEMS = 8
BF16_FLOOR = 2**-10  # the least oracle error a head's is held to


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(C, D, generator=g, dtype=torch.float64)
    protos = torch.randn(C_BASE, D, generator=g, dtype=torch.float64) + 0.5
    feats = torch.randn(B, D, generator=g, dtype=torch.float64) + 0.5
    labels = torch.randint(0, C_BASE, (B,), generator=g)
    counts = torch.cat([torch.randint(1, 60, (C_BASE,), generator=g), torch.zeros(C - C_BASE)])
    return text, protos, feats, labels, counts.long()


def _setup(mask: str, chunked: bool, monkeypatch, seed: int = 0):
    """(float64 head on the CPU, its float64 oracle, the problem); chunked: many small chunks."""
    if chunked:
        monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", 10_000)
        monkeypatch.setattr(attention_module, "MIN_CHUNK_ROWS", 1)
    problem = text, protos, *_ = _problem(seed)
    torch.manual_seed(1)
    head = CandleHead(
        text_features=text,
        visual_prototypes=protos,
        logit_scale=2.0,
        visual_scale=0.7,
        mask=mask,
        num_heads=HEADS,
        attn_dropout=0.0,
        chunk_rows=16 if chunked else 1024,
    ).double()
    torch.nn.init.normal_(head.fusion.attn.in_proj_bias, std=0.1)
    torch.nn.init.normal_(head.fusion.attn.out_proj.bias, std=0.1)
    oracle = DenseCandleHead(text, protos, 2.0, 0.7, mask, "text", True, HEADS).double()
    oracle.load_from(head)
    return head, oracle, problem


def _device_oracle(head: CandleHead, mask: str, text, protos) -> DenseCandleHead:
    """The oracle in fp32 on DEVICE, built there so its text/virtual-prototype tie survives."""
    with torch.device(DEVICE):
        oracle = DenseCandleHead(
            text.float().to(DEVICE), protos.float().to(DEVICE), 2.0, 0.7, mask, "text", True, HEADS
        )
    oracle.load_from(head)
    return oracle


def _head_quantities(head, feats, labels, criterion, autocast) -> dict[str, torch.Tensor]:
    """Both phases' logits, the loss and the parameter gradients, as float64 on the CPU."""
    head.zero_grad(set_to_none=True)
    with autocast:
        out = {
            f"{phase} logits {i}": logits
            for phase in ("train", "test")
            for i, logits in enumerate(head(feats, phase))
        }
        loss, _ = head.loss(feats, labels, criterion)
    loss.backward()
    out["loss"] = loss
    out.update({f"grad {name}": p.grad for name, p in head.named_parameters()})
    return {name: value.detach().double().cpu() for name, value in out.items()}


def _oracle_quantities(oracle, feats, labels, counts, autocast) -> dict[str, torch.Tensor]:
    """The same quantities from the oracle, computed on the device of its parameters."""
    params = _oracle_params(oracle)
    device = params["proj_image"].device
    for param in params.values():
        param.grad = None
    feats, labels, counts = feats.to(device), labels.to(device), counts.to(device)
    with torch.device(device), autocast:  # dense_mask builds its mask on the default device
        out = {
            f"{phase} logits {i}": logits
            for phase in ("train", "test")
            for i, logits in enumerate(oracle(feats, phase))
        }
        targets = torch.cat([labels, torch.arange(C, device=device)])
        loss = sum(dense_cla(logits, targets, counts) for logits in oracle(feats))
    loss.backward()
    out["loss"] = loss
    out.update({f"grad {name}": p.grad for name, p in params.items()})
    return {name: value.detach().double().cpu() for name, value in out.items()}


def _error(value: torch.Tensor, truth: torch.Tensor) -> float:
    """Relative RMS error: stable over many elements, unlike the largest one."""
    assert value.shape == truth.shape
    return float((value - truth).norm() / truth.norm().clamp(min=1e-30))


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("mask", MASKS)
def test_head_fp32_on_device_matches_float64_oracle(mask, chunked, monkeypatch):
    head64, oracle, (_, _, feats, labels, counts) = _setup(mask, chunked, monkeypatch)
    head = copy.deepcopy(head64).float().to(DEVICE)
    criterion = CompensatingLogitAdjustedLoss(counts).to(DEVICE)
    feats_dev, labels_dev = feats.float().to(DEVICE), labels.to(DEVICE)
    opt_head = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    opt_oracle = torch.optim.SGD(
        _oracle_params(oracle).values(), lr=0.5, momentum=0.9, weight_decay=5e-4
    )
    no_autocast = contextlib.nullcontext()
    for step in range(2):
        mine = _head_quantities(head, feats_dev, labels_dev, criterion, no_autocast)
        truth = _oracle_quantities(oracle, feats, labels, counts, no_autocast)
        for name, value in truth.items():
            assert _error(mine[name], value) <= FP32_TOL, (step, name, _error(mine[name], value))
        opt_head.step()
        opt_oracle.step()
    params = dict(head.named_parameters())
    for name, value in _oracle_params(oracle).items():
        assert _error(params[name].detach().double().cpu(), value.detach()) <= FP32_TOL, name


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("mask", MASKS)
def test_head_bf16_error_at_most_twice_the_oracles(mask, chunked, monkeypatch):
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    squares: dict[str, list[float]] = {}  # errors (head, oracle) and truth, summed over problems
    for seed in range(BF16_PROBLEMS):
        head64, oracle64, problem = _setup(mask, chunked, monkeypatch, seed)
        text, protos, feats, labels, counts = problem
        truth = _oracle_quantities(oracle64, feats, labels, counts, contextlib.nullcontext())
        head = copy.deepcopy(head64).float().to(DEVICE)
        criterion = CompensatingLogitAdjustedLoss(counts).to(DEVICE)
        mine = _head_quantities(
            head, feats.float().to(DEVICE), labels.to(DEVICE), criterion, autocast
        )
        oracle = _device_oracle(head64, mask, text, protos)
        reference = _oracle_quantities(oracle, feats.float(), labels, counts, autocast)
        for name, value in truth.items():
            sums = squares.setdefault(name, [0.0, 0.0, 0.0])
            sums[0] += float((mine[name] - value).square().sum())
            sums[1] += float((reference[name] - value).square().sum())
            sums[2] += float(value.square().sum())
    for name, (ours, theirs, norm) in squares.items():
        ours, theirs = (ours / norm) ** 0.5, (theirs / norm) ** 0.5
        assert ours <= 2 * max(theirs, BF16_FLOOR), f"{name}: head {ours:.3g}, oracle {theirs:.3g}"


# A subprocess per run (one Accelerator each); it prints how much CUDA memory it used.
TRAIN_PROBE = """
import sys, torch
from candle_dist.cli import main
code = main(sys.argv[1:])
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print("cuda_peak_bytes", peak, flush=True)
sys.exit(code)
"""
STOP_AT = 5  # the interrupted run stops here, mid-epoch (968 images in batches of 64: 16 steps)


@pytest.fixture(scope="module")
def feature_store(tmp_path_factory) -> Path:
    """A synthetic long-tailed store: 60 classes (10 new), 968 training images."""
    s = make_synthetic_features(60, 64, imbalance_ratio=20, max_count=60, num_new=10, seed=3)
    path = tmp_path_factory.mktemp("cuda-train") / "train"
    FeatureStore.from_arrays(
        path,
        s.train_features.numpy(),
        s.train_labels.numpy(),
        None,
        text_features=s.text_features.numpy(),
        classnames=s.classnames,
        counts=None,
        num_base_classes=s.num_base_classes,
    )
    return path


def _train(store: Path, output: Path, *flags: str) -> int:
    """`candle-dist train` on `store` into `output`; returns its peak CUDA memory in bytes."""
    overrides = [
        f"data.train={store}",
        f"train.output={output}",
        "optim.epochs=1",
        "optim.batch_size=64",
        "optim.lr=0.01",
        "head.num_heads=4",
        "train.checkpoint_every=1000",
    ]
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_PROBE, "train", *flags, *overrides],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return int(re.search(r"cuda_peak_bytes (\d+)", done.stdout).group(1))


def _max_relative_difference(a: dict, b: dict) -> float:
    return max(
        float((a[name] - b[name]).abs().max() / b[name].abs().max().clamp(min=1e-30)) for name in b
    )


def test_training_resumed_on_device_equals_uninterrupted(feature_store, tmp_path):
    peaks = [_train(feature_store, tmp_path / name) for name in ("straight", "again")]
    peaks.append(_train(feature_store, tmp_path / "resumed", "--max-steps", str(STOP_AT)))
    assert not (tmp_path / "resumed" / "final").exists()
    peaks.append(_train(feature_store, tmp_path / "resumed", "--resume"))
    if DEVICE.type == "cuda":
        assert min(peaks) > 0, f"a run allocated no CUDA memory: {peaks}"
    final = {
        name: torch.load(tmp_path / name / "final" / "head.pt", weights_only=True)
        for name in ("straight", "again", "resumed")
    }
    for name, value in final["resumed"].items():
        assert torch.isfinite(value).all(), name
    # float atomics can make two uninterrupted GPU runs differ: that is the bar for the resume
    rerun = _max_relative_difference(final["again"], final["straight"])
    resumed = _max_relative_difference(final["resumed"], final["straight"])
    assert resumed <= max(1e-5, 4 * rerun), (resumed, rerun)


@pytest.mark.parametrize("model", ["tiny-clip", "ViT-B-16"])
def test_extraction_on_device_matches_cpu(model, tmp_path):
    write_jpeg_shards(tmp_path / "shards", 3, 4, num_classes=4)
    spec = shard_spec(tmp_path / "shards", 3)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for device in sorted({"cpu", DEVICE.type}):
        argv = ["extract", "--shards", spec, "--output", str(tmp_path / device), "--model", model]
        argv += ["--pretrained", "none", "--device", device, "--batch-size", "4", "--workers", "0"]
        assert cli.main(argv) == 0
    if DEVICE.type == "cuda":
        assert torch.cuda.max_memory_allocated() > 0
    reference, rows = store_rows(tmp_path / "cpu"), store_rows(tmp_path / DEVICE.type)
    assert sorted(rows) == sorted(reference) and len(rows) == 12
    for key, (label, feature) in reference.items():
        assert rows[key][0] == label
        mine = rows[key][1]
        cosine = np.dot(mine, feature) / np.linalg.norm(mine) / np.linalg.norm(feature)
        assert cosine >= 0.99, (key, cosine)  # bf16 autocast on CUDA against fp32 on the CPU

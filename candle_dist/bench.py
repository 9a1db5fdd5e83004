"""Time full training steps of the Candle head on synthetic inputs, to size a job before running it.

Example:
  candle-dist bench head --classes 8142 --batch 256 --dim 512 --steps 3 --json
  torchrun --nproc_per_node 4 -m candle_dist.cli bench head --classes 20000 --batch 256 --json

One step is what the trainer does per batch: forward, the three CLA losses, backward, SGD. The
inputs are random (text features, prototypes near them, long-tailed counts and labels), which
changes nothing in the cost. Prints one JSON line (`--json`) with `step_s_median`,
`step_s_all`, `peak_mem_mb` (increase of peak RSS over the process's RSS before the head was
built on CPU; `torch.cuda.max_memory_allocated` on CUDA) and `step_gflop` (arithmetic of one
step, see `step_flops`). `--sampled F` times sampled mode: per step the batch's classes plus a
fraction F of the others, as `train.class_sample_fraction` does. Under `torchrun
--nproc_per_node P` or `accelerate launch --num_processes P` it times the class-parallel head
over P ranks (gloo on CPU, NCCL on CUDA); a step's time is then the slowest rank's, and rank 0
prints the line with per-rank figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from tqdm import tqdm

from candle_dist.config import OptimConfig
from candle_dist.data.synthetic_features import CLIP_LOGIT_SCALE, exponential_counts
from candle_dist.errors import UserInputError
from candle_dist.model.fusion import MASK_MODES
from candle_dist.model.head import CandleHead
from candle_dist.model.losses import build_loss
from candle_dist.parallel.comm import ClassGroup
from candle_dist.parallel.partition import Partition
from candle_dist.train.optimizer import HeadSGD
from candle_dist.train.trainer import sample_classes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DENSE_HEAD_FILE = Path(__file__).resolve().parent.parent / "benchmarks" / "dense_head.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=["head"], help="what to time (the Candle head)")
    parser.add_argument("--classes", type=int, required=True, help="number of classes C")
    parser.add_argument("--batch", type=int, default=128, help="global batch of images B")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension D")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--mask", choices=MASK_MODES, default="none", help="fusion mask mode")
    parser.add_argument("--attn-dropout", type=float, default=0.1, help="attention dropout")
    parser.add_argument("--num-heads", type=int, default=8, help="attention heads")
    parser.add_argument(
        "--sampled", type=float, default=None, metavar="F",
        help="sampled mode: per step the batch's classes plus this fraction of the others",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32",
        help="fp32, or bf16 autocast (parameters stay fp32)",
    )  # fmt: skip
    parser.add_argument(
        "--dense", action="store_true",
        help="time the dense reference-style head (benchmarks/dense_head.py) instead",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    parser.add_argument("--json", action="store_true", help="print one JSON line")


def main(args: argparse.Namespace) -> int:
    _check_arguments(args)
    comm, device = _setup_distributed()
    if args.dense and comm.distributed:
        raise UserInputError("--dense runs in one process only: launch it without torchrun")
    baseline_rss = psutil.Process().memory_info().rss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    step, step_classes = _build_step(args, comm, device)
    times, first_loss = [], None
    for index in tqdm(range(args.warmup + args.steps), desc="bench", disable=comm.rank != 0):
        torch.manual_seed(args.seed * 1_000_003 + index * 101 + comm.rank)  # dropout
        _synchronize(device)
        started = time.perf_counter()
        loss = step(index)
        _synchronize(device)
        if index == 0:
            first_loss = float(loss)  # before any update: compares implementations and P
        if index >= args.warmup:
            times.append(time.perf_counter() - started)
    peak_mb = _peak_memory_mb(device, baseline_rss)

    result = _summarize(args, comm, device, times, peak_mb, step_classes)
    result["first_loss"] = first_loss
    if comm.rank == 0:
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            for key, value in result.items():
                print(f"{key}: {value}")
    if comm.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def step_flops(classes: int, batch: int, dim: int, mask: str = "none") -> float:
    """Floating-point operations of one exact training step (forward + backward), counted.

    Matmuls only (2 FLOP per multiply-add), backward = 2x forward: the three projections of
    the B + 2C tokens ([D, D] each) and the attention's in/out projections (4 D^2 per token);
    QK^T and AV over the query/key pairs the mask allows (4 D per pair over all heads); the
    three R x C logit matrices (R = B + C rows, 2 R C D each). Recomputation (checkpointed
    attention, chunked logits) is not counted: this is the arithmetic floor, not our cost.
    """
    tokens, visual = batch + 2 * classes, batch + classes  # visual = image + prototype rows
    pairs = {
        "none": tokens * tokens,
        "in_visual": visual * (classes + 1) + classes * tokens,
        "in_text": visual * tokens + classes * visual,
        "between_visual_text": visual * visual + classes * classes,
    }[mask]
    forward = 2.0 * tokens * dim * dim + 8.0 * tokens * dim * dim + 4.0 * pairs * dim
    forward += 3 * 2.0 * visual * classes * dim
    return 3 * forward


def _check_arguments(args: argparse.Namespace) -> None:
    if args.sampled is not None and not 0.0 < args.sampled <= 1.0:
        raise UserInputError(f"--sampled {args.sampled}: the fraction must be in (0, 1]")
    if args.sampled is not None and args.dense:
        raise UserInputError("--sampled times the memory-efficient head only: drop --dense")
    for name, low in (
        ("classes", 1), ("batch", 1), ("dim", 1), ("steps", 1), ("warmup", 0), ("num_heads", 1),
        ("seed", 0),
    ):  # fmt: skip
        if getattr(args, name) < low:
            option = "--" + name.replace("_", "-")
            raise UserInputError(f"{option} must be at least {low}, got {getattr(args, name)}")
    if args.dim % args.num_heads:
        raise UserInputError(
            f"--dim {args.dim} is not divisible by --num-heads {args.num_heads}: pick a multiple"
        )
    if not 0.0 <= args.attn_dropout < 1.0:
        raise UserInputError(f"--attn-dropout must be in [0, 1), got {args.attn_dropout}")
    if args.dense and not DENSE_HEAD_FILE.exists():
        raise UserInputError(
            f"--dense needs {DENSE_HEAD_FILE} (a source checkout of candle_dist): run it from one"
        )


def _setup_distributed() -> tuple[ClassGroup, torch.device]:
    """The class-parallel group under torchrun / accelerate launch, else one process."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return ClassGroup(), device


def _build_step(
    args: argparse.Namespace, comm: ClassGroup, device: torch.device
) -> tuple[Callable[[int], torch.Tensor], int]:
    """A closure running training step `index` and returning its loss, and the number of classes
    a step uses (all of them, or in sampled mode the first step's draw). Every rank builds the
    same synthetic inputs and initial weights and keeps its share."""
    generator = torch.Generator().manual_seed(args.seed)
    num_classes, dim = args.classes, args.dim
    text = torch.randn(num_classes, dim, generator=generator)
    text.div_(text.norm(dim=-1, keepdim=True))
    protos = torch.randn(num_classes, dim, generator=generator).mul_(0.5).add_(text, alpha=2.0)
    counts = exponential_counts(num_classes, max_count=1000, imbalance_ratio=500.0)
    labels = torch.multinomial(counts.double(), args.batch, replacement=True, generator=generator)
    features = protos[labels] + 0.5 * torch.randn(args.batch, dim, generator=generator)
    start, stop = Partition(args.batch, comm.world_size).range(comm.rank)
    local_features, local_labels = features[start:stop].to(device), labels[start:stop].to(device)
    criterion = build_loss("cla", counts).to(device)
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
    options = dict(mask=args.mask, num_heads=args.num_heads, attn_dropout=args.attn_dropout)
    recipe = OptimConfig()
    torch.manual_seed(args.seed)  # the attention's random init: equal on every rank and impl

    if args.dense:
        head = (
            _load_dense_head_module()
            .DenseCandleHead(
                text_features=text,
                visual_prototypes=protos,
                logit_scale=CLIP_LOGIT_SCALE,
                **options,
            )
            .to(device)
        )
        optimizer = torch.optim.SGD(
            head.parameters(),
            lr=recipe.lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
        )
        log_prior = criterion.logit_adjustment.float()

        def step(index: int) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = head.loss(local_features, local_labels, log_prior)
            loss.backward()
            optimizer.step()
            return loss.detach()

        return step, num_classes

    head = CandleHead(
        text_features=text,
        visual_prototypes=protos,
        logit_scale=CLIP_LOGIT_SCALE,
        comm=comm,
        **options,
    ).to(device)
    head_optimizer = HeadSGD(head, recipe)
    batch_labels = labels.numpy()

    def classes_of(index: int, class_range: tuple[int, int]) -> torch.Tensor | None:
        if args.sampled is None:
            return None
        return sample_classes(
            args.seed, index, batch_labels, args.sampled, num_classes, class_range
        ).to(device)

    def step(index: int) -> torch.Tensor:  # what the trainer does for one batch
        classes = classes_of(index, (head.class_start, head.class_stop))
        with autocast:
            loss, _ = head.loss(local_features, local_labels, criterion, classes)
        head_optimizer.backward_and_step(loss)
        return loss.detach()

    head.train()
    sampled = classes_of(0, (0, num_classes))
    return step, num_classes if sampled is None else int(sampled.numel())


def _load_dense_head_module():
    spec = importlib.util.spec_from_file_location("dense_head", DENSE_HEAD_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device, baseline_rss: int) -> dict[str, float]:
    """Peak memory of this process: increase over the baseline RSS, absolute RSS, CUDA peak."""
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    figures = {
        "peak_rss_increase_mb": (peak_rss - baseline_rss) / 2**20,
        "peak_rss_mb": peak_rss / 2**20,
    }
    if device.type == "cuda":
        figures["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return figures


def _summarize(args, comm: ClassGroup, device, times, peak_mb, step_classes: int) -> dict:
    per_rank = [(times, peak_mb)]
    if comm.distributed:
        per_rank = [None] * comm.world_size
        dist.all_gather_object(per_rank, (times, peak_mb))
    step_times = [max(rank_times[i] for rank_times, _ in per_rank) for i in range(len(times))]
    memory_key = "peak_cuda_mb" if device.type == "cuda" else "peak_rss_increase_mb"
    median = statistics.median(step_times)
    gflop = step_flops(step_classes, args.batch, args.dim, args.mask) / 1e9
    result = {
        "target": args.target,
        "impl": "dense" if args.dense else "candle",
        "classes": args.classes,
        "batch": args.batch,
        "dim": args.dim,
        "mask": args.mask,
        "attn_dropout": args.attn_dropout,
        "dtype": args.dtype,
        "sampled": args.sampled,
        "step_classes": step_classes,
        "world_size": comm.world_size,
        "device": _device_name(device),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "step_s_median": round(median, 4),
        "step_s_all": [round(t, 4) for t in step_times],
        "peak_mem_mb": round(max(mem[memory_key] for _, mem in per_rank), 1),
        "peak_rss_mb": round(max(mem["peak_rss_mb"] for _, mem in per_rank), 1),
        "step_gflop": round(gflop, 2),
        "gflops": round(gflop / median, 2),
    }
    if comm.distributed:
        result["per_rank_step_s_median"] = [round(statistics.median(t), 4) for t, _ in per_rank]
        result["per_rank_peak_mem_mb"] = [round(mem[memory_key], 1) for _, mem in per_rank]
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"

"""The head's optimizer: SGD with replicated gradients summed by hand, or DeepSpeed ZeRO-1/2.

Each rank's loss is the global loss, so a replicated parameter's gradient on a rank holds only
the contributions of that rank's rows and classes: they must be summed over ranks (not averaged
as DDP and DeepSpeed do). Class-sharded parameters (virtual prototypes) are complete locally.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from candle_dist.config import Config, OptimConfig
from candle_dist.errors import UserInputError
from candle_dist.model.head import CandleHead
from candle_dist.train import checkpoint as ckpt


def sum_replicated_gradients(head: CandleHead) -> None:
    """All-reduce (sum) the gradients of parameters every rank holds in full, in one bucket."""
    if not head.comm.distributed:
        return
    sharded = head.class_sharded_ranges()
    grads = [p.grad for n, p in head.named_parameters() if n not in sharded and p.grad is not None]
    if not grads:  # a second stage that trains class-sharded parameters only
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    head.comm.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _sgd(params, optim: OptimConfig) -> torch.optim.SGD:
    """SGD of the trainable ones of `params` (a second stage freezes the representation)."""
    return torch.optim.SGD(
        [p for p in params if p.requires_grad],
        lr=optim.lr,
        momentum=optim.momentum,
        weight_decay=optim.weight_decay,
    )


class HeadSGD:
    """The reference SGD over every head parameter in this process; replicated gradients summed
    across ranks by hand (`sum_replicated_gradients`)."""

    def __init__(self, head: CandleHead, optim: OptimConfig) -> None:
        self.head = head
        self.local = _sgd(head.parameters(), optim)

    def set_lr(self, lr: float) -> None:
        for group in self.local.param_groups:
            group["lr"] = lr

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.local.zero_grad(set_to_none=True)
        loss.backward()
        sum_replicated_gradients(self.head)
        self.local.step()

    def momentum(self) -> dict[str, torch.Tensor]:
        """Full momentum tensors by parameter name (collective)."""
        return ckpt.momentum_by_name(self.head, self.local)

    def load_momentum(self, state: dict[str, torch.Tensor]) -> None:
        ckpt.load_momentum(self.head, self.local, state)


class ReplicatedParameters(nn.Module):
    """The head's replicated parameters (projections, fusion) as one module for DeepSpeed: the
    same Parameter objects, so the head computes with the values DeepSpeed updates (ZeRO-1/2
    re-points their storage into its flat buffers; the objects stay)."""

    def __init__(self, head: CandleHead) -> None:
        super().__init__()
        sharded = head.class_sharded_ranges()
        for name, param in head.named_parameters(recurse=False):
            if name not in sharded:
                self.register_parameter(name, param)
        for name, child in head.named_children():
            self.add_module(name, child)


class ZeroHeadSGD(HeadSGD):
    """The same SGD with DeepSpeed ZeRO-1/2 (through Accelerate) for the replicated parameters.

    Build it once the head holds its starting values: DeepSpeed copies the replicated parameters
    into its fp32 master partitions here and steps those.

    DeepSpeed averages gradients over ranks where the head needs their sum, so the loss is
    scaled by P before backward and the class-sharded gradients (complete on their rank) divided
    by P after. A step is the engine's backward and step (what `accelerator.backward` runs, called
    on this engine because an Accelerator keeps its first one), then a local SGD step of the
    class-sharded parameters.
    """

    def __init__(self, head: CandleHead, optim: OptimConfig, accelerator) -> None:
        sharded = head.class_sharded_ranges()
        self.head = head
        self.local = _sgd([p for n, p in head.named_parameters() if n in sharded], optim)
        replicated = ReplicatedParameters(head)
        self.replicated = dict(replicated.named_parameters())
        self.engine, self.zero = accelerator.prepare(
            replicated, _sgd(replicated.parameters(), optim)
        )

    def set_lr(self, lr: float) -> None:
        super().set_lr(lr)
        for group in self.zero.param_groups:
            group["lr"] = lr

    def backward_and_step(self, loss: torch.Tensor) -> None:
        world = self.head.comm.world_size
        self.local.zero_grad(set_to_none=True)
        self.engine.backward(loss * world)
        self.engine.step()
        for group in self.local.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.div_(world)
        self.local.step()

    def momentum(self) -> dict[str, torch.Tensor]:
        state = super().momentum()
        state.update(ckpt.zero_momentum_by_name(self.replicated))
        return state

    def load_momentum(self, state: dict[str, torch.Tensor]) -> None:
        super().load_momentum(state)
        ckpt.load_zero_momentum(self.zero.optimizer, self.replicated, state)


def configure_deepspeed(accelerator, batch_size: int, world_size: int) -> bool:
    """Fit the DeepSpeed config of `accelerate launch` to this trainer; True if bf16 is asked.

    The trainer owns the recipe: SGD, its schedule, one step per batch, no clipping, and bf16
    as autocast with fp32 parameters (as without DeepSpeed). "auto" entries are filled so;
    entries that would change the result are refused.
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "the DeepSpeed config"
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2):
        raise UserInputError(
            f"{source}: zero_optimization.stage={stage}; the trainer supports ZeRO stages 1 and "
            "2 (stage 3 partitions the parameters the head computes with; for no ZeRO launch "
            "with launch/single_node.yaml)"
        )
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise UserInputError(
                f"{source}: remove the {key!r} section; the trainer's SGD and learning-rate "
                "schedule come from the optim section of the training config"
            )
    if config.get("fp16", {}).get("enabled") is True:
        raise UserInputError(f"{source}: set fp16.enabled to false (use train.precision=bf16)")
    fixed = {"gradient_accumulation_steps": 1, "gradient_clipping": 0.0}
    for key, value in fixed.items():
        current = config.get(key, "auto")
        if current != "auto" and float(current) != value:
            raise UserInputError(
                f"{source}: {key}={current}; the trainer takes one unclipped step per batch: "
                f'set it to {value:g} or "auto"'
            )
        config[key] = value
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = max(1, math.ceil(batch_size / world_size))
    if config.get("train_batch_size") == "auto":
        config["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * world_size
    bf16 = accelerator.mixed_precision == "bf16"
    config["bf16"] = {"enabled": False}
    config["fp16"] = {"enabled": False}
    return bf16


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed on CPU compiles a shared-memory all-reduce op (minutes of C++ on first use) when
    it sets up its process group; only tensor-parallel inference uses it, so mark it unavailable."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_optimizer(
    head: CandleHead, cfg: Config, accelerator
) -> tuple[HeadSGD, Callable[[], AbstractContextManager]]:
    """The head's optimizer and the autocast context of a step, with or without DeepSpeed."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return HeadSGD(head, cfg.optim), accelerator.autocast
    bf16 = configure_deepspeed(accelerator, cfg.optim.batch_size, head.comm.world_size)
    device_type = accelerator.device.type
    autocast = lambda: torch.autocast(device_type, torch.bfloat16, enabled=bf16)  # noqa: E731
    sharded = head.class_sharded_ranges()
    if not any(p.requires_grad for n, p in head.named_parameters() if n not in sharded):
        # nothing for ZeRO to shard when only class-sharded parameters train (lws, marc)
        return HeadSGD(head, cfg.optim), autocast
    optimizer = ZeroHeadSGD(head, cfg.optim, accelerator)
    if head.comm.rank == 0:
        stage = optimizer.engine.zero_optimization_stage()
        print(f"DeepSpeed ZeRO stage {stage} over {head.comm.world_size} rank(s)", flush=True)
    return optimizer, autocast

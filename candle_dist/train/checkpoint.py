"""Atomic, rank-count-independent training checkpoints.

A checkpoint is a directory `checkpoints/step_0000123/` holding
- `head.pt`: the consolidated one-process head state dict (the single-file export),
- `optimizer.pt`: SGD momentum buffers by parameter name, full size: class-sharded ones and,
  under DeepSpeed ZeRO-1/2, the replicated ones' partitions gathered (so they resume with any
  rank count, with or without DeepSpeed),
- `shard-RRR-of-PPP.pt`: each rank's own class shard of the head (for inspection and for
  restarts at the same rank count without a gather),
- `trainer.json`: step, epoch, world size, config.
It is written under a temporary name and renamed when complete; `latest` names the newest.
Everything loads with `torch.load(weights_only=True)`. Resuming with another rank count slices
the consolidated tensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from candle_dist.errors import UserInputError
from candle_dist.model.head import CandleHead

KEEP_LAST = 2


def _barrier(head: CandleHead) -> None:
    if head.comm.distributed:
        torch.distributed.barrier(group=head.comm.group)


def momentum_by_name(head: CandleHead, optimizer: torch.optim.Optimizer) -> dict:
    """SGD momentum buffers of `optimizer` keyed by head parameter name, class-sharded ones
    gathered to full size (collective)."""
    names = {id(p): n for n, p in head.named_parameters()}
    sharded = head.class_sharded_ranges()
    state = {}
    for param, values in optimizer.state.items():
        name = names[id(param)]
        buffer = values.get("momentum_buffer")
        if buffer is None:
            continue
        if name in sharded:
            buffer = head.gather_full(name, buffer)
        state[name] = buffer.detach().cpu()
    return state


def load_momentum(head: CandleHead, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Set the momentum of the head parameters `optimizer` steps from full tensors by name."""
    mine = {id(p) for group in optimizer.param_groups for p in group["params"]}
    sharded = head.class_sharded_ranges()
    for name, param in head.named_parameters():
        if name not in state or id(param) not in mine:
            continue
        buffer = state[name]
        if name in sharded:
            buffer = head.slice_full(name, buffer)
        optimizer.state[param]["momentum_buffer"] = buffer.to(param.device, param.dtype).clone()


def zero_momentum_by_name(params: dict[str, torch.nn.Parameter]) -> dict:
    """Full SGD momentum of parameters DeepSpeed ZeRO-1/2 steps, gathered from every rank's
    partition (collective; after the first step)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    return {
        name: safe_get_full_optimizer_state(param, "momentum_buffer").detach().cpu()
        for name, param in params.items()
    }


def load_zero_momentum(zero_optimizer, params: dict[str, torch.nn.Parameter], state: dict) -> None:
    """Scatter full momentum tensors into DeepSpeed ZeRO-1/2's partitioned SGD state.

    DeepSpeed steps a torch SGD on each rank's flat partition and links every parameter to its
    fragment of that partition's state only after the first step; a resumed run sets the state
    before it, so the buffers are created (zero momentum equals none for SGD without dampening)
    and linked here, then filled through DeepSpeed's public setter.
    """
    from deepspeed.utils import safe_set_full_optimizer_state

    if not any(name in state for name in params):
        return
    base = zero_optimizer.optimizer
    for param in params.values():
        mapping = param._hp_mapping
        if mapping is None:  # no element of it in this rank's partition
            continue
        flat = base.param_groups[mapping.param_group_index]["params"][0]
        buffers = base.state[flat]
        if "momentum_buffer" not in buffers:
            buffers["momentum_buffer"] = torch.zeros_like(flat)
        mapping.set_optim_state_fragment(flat, buffers)
    for name, param in params.items():
        if name in state:
            value = state[name].to(param.device, torch.float32)
            safe_set_full_optimizer_state(param, value, "momentum_buffer")


def save_checkpoint(
    directory: Path, head: CandleHead, momentum: dict[str, torch.Tensor], trainer_state: dict
) -> Path:
    """Write checkpoint `step_{step}` (collective: every rank calls it) with `momentum`, the
    full momentum tensors by parameter name."""
    directory = Path(directory)
    final = directory / f"step_{trainer_state['step']:09d}"
    staging = directory / f".{final.name}.tmp"
    full_state = head.full_state_dict()
    rank, world = head.comm.rank, head.comm.world_size
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier(head)
    shard = {name: value.detach().cpu() for name, value in head.state_dict().items()}
    torch.save(shard, staging / f"shard-{rank:03d}-of-{world:03d}.pt")
    if rank == 0:
        torch.save(full_state, staging / "head.pt")
        torch.save(momentum, staging / "optimizer.pt")
        (staging / "trainer.json").write_text(json.dumps(trainer_state, indent=2))
    _barrier(head)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        pointer = directory / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, directory / "latest")
        for old in sorted(directory.glob("step_*"))[:-KEEP_LAST]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(head)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = Path(directory) / "latest"
    if not pointer.exists():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, head: CandleHead) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore the head from a checkpoint written with any rank count; returns the trainer state
    and the full momentum tensors by parameter name (both empty for a bare head.pt)."""
    path = Path(path)
    head_file = path / "head.pt" if path.is_dir() else path
    if not head_file.exists():
        raise UserInputError(f"{head_file} does not exist: pass a checkpoint directory or head.pt")
    try:
        state = torch.load(head_file, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign file
        raise UserInputError(f"{head_file} is not a candle_dist head checkpoint ({err})") from None
    missing = {"proj_image", "virtual_prototypes", "fusion.ratio"} - set(state)
    if missing:
        raise UserInputError(
            f"{head_file} lacks {', '.join(sorted(missing))}: not a Candle head state dict"
        )
    head.load_full_state_dict(state)
    trainer_state: dict[str, Any] = {}
    if path.is_dir() and (path / "trainer.json").exists():
        trainer_state = json.loads((path / "trainer.json").read_text())
    momentum: dict[str, torch.Tensor] = {}
    if path.is_dir() and (path / "optimizer.pt").exists():
        momentum = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    return trainer_state, momentum

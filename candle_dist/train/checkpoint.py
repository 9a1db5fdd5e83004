"""Atomic, rank-count-independent training checkpoints.

A checkpoint is a directory `checkpoints/step_0000123/` holding
- `head.pt`: the consolidated one-process head state dict (the single-file export),
- `optimizer.pt`: SGD momentum buffers by parameter name, class-sharded ones consolidated,
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


def optimizer_state_by_name(head: CandleHead, optimizer: torch.optim.Optimizer) -> dict:
    """Momentum buffers keyed by parameter name, class-sharded ones gathered to full size."""
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


def load_optimizer_state(head: CandleHead, optimizer: torch.optim.Optimizer, state: dict) -> None:
    sharded = head.class_sharded_ranges()
    for name, param in head.named_parameters():
        if name not in state:
            continue
        buffer = state[name]
        if name in sharded:
            buffer = head.slice_full(name, buffer)
        optimizer.state[param]["momentum_buffer"] = buffer.to(param.device, param.dtype).clone()


def save_checkpoint(
    directory: Path, head: CandleHead, optimizer: torch.optim.Optimizer, trainer_state: dict
) -> Path:
    """Write checkpoint `step_{step}` (collective: every rank calls it)."""
    directory = Path(directory)
    final = directory / f"step_{trainer_state['step']:09d}"
    staging = directory / f".{final.name}.tmp"
    full_state = head.full_state_dict()
    momentum = optimizer_state_by_name(head, optimizer)
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


def load_checkpoint(
    path: Path, head: CandleHead, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore head (and optimizer) from a checkpoint written with any rank count."""
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
    if optimizer is not None and path.is_dir() and (path / "optimizer.pt").exists():
        momentum = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        load_optimizer_state(head, optimizer, momentum)
    return trainer_state

"""Atomic, rank-count-independent training checkpoints.

A checkpoint is a directory `checkpoints/step_0000123/` holding
- `head.pt`: the consolidated one-process head state dict (the single-file export),
- `optimizer.pt`: SGD momentum buffers by parameter name, full size: class-sharded ones and,
  under DeepSpeed ZeRO-1/2, the replicated ones' partitions gathered (so they resume with any
  rank count, with or without DeepSpeed),
- `shard-RRR-of-PPP.pt`: each rank's own class shard of the head (for inspection and for
  restarts at the same rank count without a gather),
- `trainer.json`: step, epoch, world size, config, the training data's provenance, and the
  size and sha256 of every other file.
It is written under a temporary name and renamed when complete; `latest` names the newest.
Everything loads with `torch.load(weights_only=True)`. Resuming with another rank count slices
the consolidated tensors. A resume verifies every file before use, and falls back to the newest
complete checkpoint when `latest` is missing or damaged (a disk full, a copy cut short).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
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
    full momentum tensors by parameter name; trainer.json records every other file's size and
    sha256, so that a resume can tell a complete checkpoint from a damaged one."""
    directory = Path(directory)
    step = int(trainer_state["step"])
    final = directory / f"step_{step:09d}"
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
    _barrier(head)
    if rank == 0:
        files = {file.name: _file_record(file) for file in sorted(staging.iterdir())}
        state = {**trainer_state, "files": files}
        (staging / "trainer.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        pointer = directory / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, directory / "latest")
        _prune(directory, step)
    _barrier(head)
    return final


def _file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder in `directory`, oldest first."""
    found = []
    for path in Path(directory).glob("step_*"):
        match = re.fullmatch(r"step_(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _prune(directory: Path, step: int) -> None:
    """Keep the KEEP_LAST newest checkpoints up to `step`. Later ones are left from before a
    resume that fell back past them (damaged), and would outrank the new ones."""
    checkpoints = step_dirs(directory)
    kept = [path for s, path in checkpoints if s <= step][-KEEP_LAST:]
    for _, path in checkpoints:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


class DamagedCheckpoint(Exception):
    """A checkpoint folder with a file missing, truncated or changed since it was written."""


@dataclass
class Checkpoint:
    """A checkpoint read into memory: everything a resume needs, verified."""

    path: Path
    trainer_state: dict[str, Any]
    head_state: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"])


def read_checkpoint(path: Path) -> Checkpoint:
    """Checkpoint folder `path`, each file checked against the size and sha256 trainer.json
    recorded (checkpoints written before they were recorded: against torch.load alone);
    DamagedCheckpoint saying which file is wrong otherwise."""
    path = Path(path)
    try:
        trainer_state = json.loads((path / "trainer.json").read_text())
    except FileNotFoundError:
        raise DamagedCheckpoint("trainer.json is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedCheckpoint(f"trainer.json is unreadable or truncated ({err})") from None
    if not isinstance(trainer_state, dict) or not isinstance(trainer_state.get("step"), int):
        raise DamagedCheckpoint("trainer.json holds no step")
    files = trainer_state.get("files", {})
    if not isinstance(files, dict) or not all(
        isinstance(record, dict) and {"bytes", "sha256"} <= set(record) for record in files.values()
    ):
        raise DamagedCheckpoint("trainer.json's list of files is malformed")
    for name, record in files.items():
        file = path / name
        if not file.is_file():
            raise DamagedCheckpoint(f"{name} is missing")
        size = file.stat().st_size
        if size != record["bytes"]:
            raise DamagedCheckpoint(
                f"{name} has {size} bytes but {record['bytes']} were written (truncated?)"
            )
        if _sha256(file) != record["sha256"]:
            raise DamagedCheckpoint(f"{name} differs from what was written (sha256)")
    head_state = _load(path / "head.pt")
    missing = {"proj_image", "virtual_prototypes", "fusion.ratio"} - set(head_state)
    if missing:
        raise DamagedCheckpoint(f"head.pt lacks {', '.join(sorted(missing))}")
    return Checkpoint(path, trainer_state, head_state, _load(path / "optimizer.pt"))


def _load(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise DamagedCheckpoint(f"{file.name} is missing")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign: torch raises many types
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DamagedCheckpoint(f"{file.name} cannot be loaded ({reason})") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"{file.name} holds no state dict")
    return state


def find_resumable(directory: Path, say: Callable[[str], None]) -> Checkpoint | None:
    """The checkpoint to resume from: the one `latest` names if it is complete, else the
    newest complete one (`say` is told why). None when there is no checkpoint at all; a
    UserInputError when there are some but none is complete."""
    directory = Path(directory)
    candidates = [path for _, path in reversed(step_dirs(directory))]
    pointer = directory / "latest"
    problems = []
    if pointer.is_file():
        named = pointer.read_text().strip()
        if named in [path.name for path in candidates]:
            candidates.sort(key=lambda path: path.name != named)
        else:
            problems.append(f"latest names {named!r}, which does not exist")
    elif candidates:
        problems.append("latest is missing")
    if not candidates and not problems:
        return None
    for path in candidates:
        try:
            checkpoint = read_checkpoint(path)
        except DamagedCheckpoint as err:
            problems.append(f"{path.name}: {err}")
            continue
        if problems:
            say(
                f"{directory}: {'; '.join(problems)}; resuming from the newest complete "
                f"checkpoint, {path.name}"
            )
        return checkpoint
    raise UserInputError(
        f"--resume: no usable checkpoint in {directory} ({'; '.join(problems)}): restore the "
        f"damaged files, or delete {directory} to start the run over"
    )


def load_checkpoint(checkpoint: Checkpoint, head: CandleHead) -> None:
    """Restore the head from a checkpoint written with any rank count."""
    try:
        head.load_full_state_dict(checkpoint.head_state)
    except RuntimeError as err:
        raise UserInputError(
            f"{checkpoint.path} does not fit this run's head ({str(err).splitlines()[0]}): "
            "resume with the config and data.train the run was started with"
        ) from None

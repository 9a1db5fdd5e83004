"""Run a function in P local CPU processes joined by a gloo process group, and collect results.

    results = run_in_processes(fn, 3, job)  # fn(rank, 3, job) on ranks 0, 1, 2

Workers are forked, not spawned: a fresh interpreter importing torch takes seconds per process
on a busy 2-core machine, a fork milliseconds. Every worker gets the environment `torchrun` /
`accelerate launch` would give it (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, OMP_NUM_THREADS=1), so code that lets Accelerate create the group
(`init_group=False`) runs as it would under a launcher. Results come back through one file per
rank; a worker's exception fails the call with its traceback, and a hang (a collective one rank
never reaches) fails it after `timeout_s`.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_in_processes(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    init_group: bool = True,
    timeout_s: float = 120.0,
) -> list[Any]:
    """`fn(rank, world_size, *args)` in `world_size` forked processes; each rank's return value.

    With `init_group` the worker creates the gloo default group itself; otherwise `fn` must
    (e.g. through `accelerate.Accelerator(cpu=True)`).
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="dist-results-") as results:
        context = mp.start_processes(
            _worker,
            args=(world_size, port, results, init_group, timeout_s, fn, args),
            nprocs=world_size,
            join=False,
            start_method="fork",
        )
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{world_size} gloo workers still running after {timeout_s} s")
        return [
            torch.load(Path(results) / f"rank-{rank}.pt", weights_only=False)
            for rank in range(world_size)
        ]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    results: str,
    init_group: bool,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",  # also stops Accelerate from choosing a thread count itself
    )
    torch.set_num_threads(1)
    if "accelerate.state" in sys.modules:  # a forked worker must not inherit the parent's state
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    if init_group:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(results) / f"rank-{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

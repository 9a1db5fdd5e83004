"""Submit feature extraction and then training to SLURM with submitit (or run both here: --local).

Examples:
  candle-dist submit --config configs/inat2018.yaml --nodes 2 --gpus-per-node 8 \\
      --partition gpu --extract-tasks 32 optim.lr=1e-3
  candle-dist submit --config configs/demo.yaml --local --local-ranks 2

Extraction is one job array per split (data.train_shards, data.val_shards): task i of T
encodes shards i, i+T, i+2T, ... into the split's feature store, one GPU each; the last task to
finish writes manifest.json, and a store that already has one is not extracted again.
Training is one job of nodes x GPUs tasks, one trainer process per GPU meeting at the first
node (torch.distributed environment variables, read by Accelerate), submitted with an afterok
dependency on the arrays. Preemption and time limit: SLURM signals the tasks (submitit's
USR2, --signal-delay seconds before the end); each task stops its command with SIGUSR1 and is
requeued by submitit. The trainer writes a checkpoint on SIGUSR1, exits with 75 and continues
with --resume after the requeue; an extraction task redoes only its unfinished shards.
--local runs the same jobs on this machine with submitit's LocalExecutor, one after the other,
and waits for them. Logs go to --folder (default: TRAIN.OUTPUT/submitit).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from candle_dist.config import Config, load_config
from candle_dist.errors import UserInputError

RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _cli(subcommand: str) -> list[str]:
    return [sys.executable, "-m", "candle_dist.cli", subcommand]


def extract_argv(cfg: Config, split: str) -> list[str]:
    """`candle-dist extract` for one split ("train" or "eval") of the config."""
    shards, store = (
        (cfg.data.train_shards, cfg.data.train)
        if split == "train"
        else (cfg.data.val_shards, cfg.data.val)
    )
    clip = cfg.clip
    argv = [*_cli("extract"), "--shards", shards]
    argv += ["--output", store, "--model", clip.name, "--pretrained", clip.pretrained]
    argv += ["--precision", clip.precision]
    argv += ["--batch-size", str(clip.batch_size), "--workers", str(clip.workers)]
    argv += ["--split", split, "--templates", *clip.templates]
    if clip.model_config:
        argv += ["--model-config", clip.model_config]
    if cfg.data.classnames:
        argv += ["--classnames", cfg.data.classnames]
    if cfg.clip.class_info:
        argv += ["--class-info", cfg.clip.class_info]
    if split == "train" and clip.views:
        argv += ["--views", str(clip.views)]
    return argv


def train_argv(config: str, overrides: list[str]) -> list[str]:
    """`candle-dist train`, always with --resume: a requeued job continues where it stopped."""
    return [*_cli("train"), "--config", config, "--resume", *overrides]


def _submitit_signal() -> signal.Signals:
    import submitit

    return getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}")


def _ignore_submitit_signal() -> None:
    """In the command's process (before exec): SLURM sends submitit's signal to every process of
    the job, and its default action would kill the command before it could checkpoint."""
    signal.signal(_submitit_signal(), signal.SIG_IGN)


@dataclasses.dataclass
class Task:
    """A command line run as one submitit task; on preemption it is stopped and requeued.

    submitit calls `checkpoint` (on the task of global rank 0) when SLURM's signal arrives:
    the command gets SIGUSR1 and `grace_s` seconds to exit, then the same task is requeued.
    """

    argv: list[str]
    grace_s: float = 90.0

    def environment(self) -> dict[str, str]:
        return {}

    def __call__(self) -> str:
        env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}
        env.update(self.environment())
        print(f"running: {shlex.join(self.argv)}", flush=True)
        self._process = subprocess.Popen(self.argv, env=env, preexec_fn=_ignore_submitit_signal)
        self._status: int | None = None
        while self._poll() is None:
            time.sleep(0.5)
        if self._status == 0:
            return "done"
        from candle_dist.train.trainer import PREEMPTED_EXIT_CODE

        if self._status == PREEMPTED_EXIT_CODE:
            return self._preempted()
        raise RuntimeError(f"{shlex.join(self.argv)} exited with status {self._status}")

    def _poll(self) -> int | None:
        """The command's exit status, or None while it runs (safe inside a signal handler)."""
        if self._status is None:
            try:
                pid, status = os.waitpid(self._process.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by the poll this handler interrupted
                self._status = -1
                return self._status
            if pid:
                self._status = os.waitstatus_to_exitcode(status)
        return self._status

    def _preempted(self) -> str:
        """The command stopped itself on a signal (e.g. SIGTERM from SLURM) after checkpointing:
        rank 0 asks submitit to requeue the job as its own signal would; other ranks just end."""
        import submitit

        if submitit.JobEnvironment().global_rank != 0:
            return "preempted"
        sig = _submitit_signal()
        if not callable(signal.getsignal(sig)):
            raise RuntimeError("the command was preempted outside a submitit job; rerun it")
        signal.raise_signal(sig)  # submitit's handler: checkpoint(), requeue, exit
        return "preempted"

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption hook: stop the command, then resubmit this same task."""
        import submitit

        process = getattr(self, "_process", None)
        if process is not None and self._poll() is None:
            process.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + self.grace_s
            while self._poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if self._poll() is None:
                process.kill()
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self))


@dataclasses.dataclass
class ExtractTask(Task):
    """Task `index` of `count` of an extraction array: its share of the shards, file-coordinated
    (no process group), on GPU `index` modulo the GPUs it sees."""

    index: int = 0
    count: int = 1

    def environment(self) -> dict[str, str]:
        rank = {"RANK": self.index, "WORLD_SIZE": self.count, "LOCAL_RANK": self.index}
        return {k: str(v) for k, v in rank.items()} | {"LOCAL_WORLD_SIZE": "1"}


@dataclasses.dataclass
class TrainTask(Task):
    """One trainer rank: torch.distributed rendezvous at the job's first host.

    LOCAL_RANK is the index of the rank's GPU among those the task sees, which Accelerate and
    DeepSpeed select by it: the local rank where every task sees all of the node's GPUs, 0 where
    SLURM binds one GPU per task (the local rank itself would be an invalid device ordinal).
    The port, 15000 + job id % 15000, lies below Linux's ephemeral range (32768-60999), from
    which outgoing connections on the host may already hold any port.
    """

    def environment(self) -> dict[str, str]:
        import submitit

        job = submitit.JobEnvironment()
        digits = re.sub(r"\D", "", job.job_id) or "0"
        gpus = _local_gpus()
        return {
            "MASTER_ADDR": job.hostnames[0],
            "MASTER_PORT": str(15000 + int(digits) % 15000),
            "RANK": str(job.global_rank),
            "WORLD_SIZE": str(job.num_tasks),
            "LOCAL_RANK": str(job.local_rank % gpus if gpus else job.local_rank),
            "LOCAL_WORLD_SIZE": str(job.num_tasks // job.num_nodes),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),  # as torchrun sets it
        }


def _executor(args: argparse.Namespace, folder: Path, **parameters):
    import submitit

    cluster = "local" if args.local else "slurm"
    executor = submitit.AutoExecutor(folder, cluster=cluster, slurm_max_num_timeout=100)
    slurm_extra = dict(item.split("=", 1) for item in args.slurm_arg)
    slurm_extra.update(parameters.pop("slurm_additional_parameters", {}))
    executor.update_parameters(
        slurm_partition=args.partition,
        slurm_account=args.account,
        slurm_signal_delay_s=args.signal_delay,
        slurm_additional_parameters=slurm_extra,
        **parameters,
    )
    return executor


def _array_id(job) -> str:
    return str(job.job_id).split("_")[0]


def submit(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    for item in args.slurm_arg:
        if "=" not in item:
            raise UserInputError(f"--slurm-arg {item!r}: give KEY=VALUE, e.g. constraint=a100")
    minimum = {
        "--extract-tasks": (args.extract_tasks, 1),
        "--nodes": (args.nodes, 1),
        "--gpus-per-node": (args.gpus_per_node, 1),
        "--local-ranks": (args.local_ranks, 1),
        "--cpus-per-gpu": (args.cpus_per_gpu, 1),
        "--extract-time": (args.extract_time, 1),
        "--train-time": (args.train_time, 1),
        "--signal-delay": (args.signal_delay, 0),
    }
    for option, (value, least) in minimum.items():
        if value < least:
            raise UserInputError(f"{option} {value}: give a whole number >= {least}")
    if not args.local and not (shutil.which("sbatch") and shutil.which("srun")):
        raise UserInputError("sbatch/srun not found: not a SLURM login node; run with --local")
    from candle_dist.data.shards import expand_urls

    folder = Path(args.folder or Path(cfg.train.output) / "submitit")
    grace = max(10.0, args.signal_delay - 30.0)
    local_gpus = _local_gpus() if args.local else 0
    if 0 < local_gpus < args.local_ranks:
        raise UserInputError(
            f"--local-ranks {args.local_ranks}: this machine has {local_gpus} GPU(s), one per rank"
        )
    extract_jobs = []
    for split, shards, store in (
        ("train", cfg.data.train_shards, cfg.data.train),
        ("eval", cfg.data.val_shards, cfg.data.val),
    ):
        if not shards or not store:
            continue
        if (Path(store) / "manifest.json").is_file():
            print(f"{store}: complete (manifest.json), not extracted again")
            continue
        count = min(args.extract_tasks, len(expand_urls(shards)))
        executor = _executor(
            args,
            folder,
            name=f"candle-extract-{split}",
            timeout_min=args.extract_time,
            nodes=1,
            tasks_per_node=1,
            gpus_per_node=local_gpus if args.local else 1,
            cpus_per_task=args.cpus_per_gpu,
            slurm_array_parallelism=count,
        )
        argv = extract_argv(cfg, split)
        with executor.batch():
            jobs = [
                executor.submit(ExtractTask(argv, grace, index=i, count=count))
                for i in range(count)
            ]
        print(f"extract {split}: {count} task(s), job {_array_id(jobs[0])}, logs in {folder}")
        extract_jobs += jobs
    if args.local:
        for job in extract_jobs:
            job.result()  # raises with the task's log if it failed
        extract_jobs = []
    ranks = args.local_ranks if args.local else args.gpus_per_node
    after = ":".join(dict.fromkeys(_array_id(job) for job in extract_jobs))
    executor = _executor(
        args,
        folder,
        name="candle-train",
        timeout_min=args.train_time,
        nodes=1 if args.local else args.nodes,
        tasks_per_node=ranks,
        gpus_per_node=min(local_gpus, ranks) if args.local else args.gpus_per_node,
        cpus_per_task=args.cpus_per_gpu,
        slurm_additional_parameters={"dependency": f"afterok:{after}"} if after else {},
    )
    job = executor.submit(TrainTask(train_argv(args.config, args.overrides), grace))
    world = ranks if args.local else args.nodes * ranks
    print(f"train: job {job.job_id}, {world} rank(s), output {cfg.train.output}, logs in {folder}")
    if args.local:
        job.results()
        print(f"done: {Path(cfg.train.output) / 'final'}, metrics in {cfg.train.output}")
    return 0


def _local_gpus() -> int:
    """The GPUs this process sees (counted without opening a CUDA context)."""
    import torch

    return torch.cuda.device_count()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    parser.add_argument("--local", action="store_true", help="run here (submitit LocalExecutor)")
    parser.add_argument("--local-ranks", type=int, default=1, help="trainer ranks with --local")
    parser.add_argument("--nodes", type=int, default=1, help="training nodes")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (= ranks) per node")
    parser.add_argument("--cpus-per-gpu", type=int, default=8, help="CPU cores per task")
    parser.add_argument("--extract-tasks", type=int, default=8, help="array tasks per split")
    parser.add_argument("--extract-time", type=int, default=360, help="minutes per array task")
    parser.add_argument("--train-time", type=int, default=1440, help="training job minutes")
    parser.add_argument(
        "--signal-delay", type=int, default=120, help="seconds between the signal and the kill"
    )
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument(
        "--slurm-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra #SBATCH option, e.g. constraint=a100 (repeatable)",
    )
    parser.add_argument("--folder", help="submitit logs (default: TRAIN.OUTPUT/submitit)")


def main(args: argparse.Namespace) -> int:
    return submit(args)

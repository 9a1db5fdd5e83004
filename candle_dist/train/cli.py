"""Fit the Candle head on a feature store (class-parallel over every launched rank).

Example:
  candle-dist train --config configs/demo.yaml train.output=runs/demo optim.epochs=5
  accelerate launch --multi_gpu --num_processes 8 -m candle_dist.cli train \\
      --config configs/inat2018.yaml --resume
  accelerate launch --config_file launch/deepspeed_zero2.yaml --num_processes 8 \\
      -m candle_dist.cli train --config configs/inat2018.yaml --resume

Overrides are dotted `section.key=value` pairs (see configs/*.yaml for the sections). With
--resume the run continues from the newest complete checkpoint in train.output (if any), with
any number of ranks; without it, train.output must not hold another run. On SIGUSR1, SIGTERM or
Ctrl-C a checkpoint is written and the process exits with status 75.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from candle_dist.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="train N seeds (train.seed, +1, ...), each in OUTPUT/seed-<s>, and report mean ± "
        "std in OUTPUT/seeds.json (default: train.seeds, or one run)",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")


def main(args: argparse.Namespace) -> int:
    from candle_dist.errors import UserInputError
    from candle_dist.train.data import eval_data_from_store, training_data_from_store
    from candle_dist.train.seeds import seed_config, table, write_summary
    from candle_dist.train.trainer import PREEMPTED_EXIT_CODE, Preempted, fit

    cfg = load_config(args.config, args.overrides)
    if args.max_steps is not None and args.max_steps < 1:
        raise UserInputError(
            f"--max-steps {args.max_steps}: give 1 or more steps (or leave it out)"
        )
    if not cfg.data.train:
        raise UserInputError("data.train is empty: set it to a feature store directory")
    if args.seeds is not None:
        if args.seeds < 1:
            raise UserInputError(f"--seeds {args.seeds}: give 1 or more seeds")
        cfg.train.seeds = list(range(cfg.train.seed, cfg.train.seed + args.seeds))
    if len(set(cfg.train.seeds)) != len(cfg.train.seeds):
        raise UserInputError(f"train.seeds={cfg.train.seeds}: each seed once")
    train = training_data_from_store(cfg.data.train)
    val = eval_data_from_store(cfg.data.val) if cfg.data.val else None
    runs = [seed_config(cfg, seed) for seed in cfg.train.seeds] or [cfg]
    evaluations = {}
    for run in runs:
        try:
            results = fit(run, train, val, resume=args.resume, max_steps=args.max_steps)
        except Preempted as stop:
            print(f"candle-dist train: {stop}", file=sys.stderr)
            exit_if_distributed(PREEMPTED_EXIT_CODE)
            return PREEMPTED_EXIT_CODE
        if results.get("rank", 0) == 0:
            print(summary(results))
        if "eval" in results:
            evaluations[run.train.seed] = results["eval"]
    rank = results.get("rank", 0)
    if cfg.train.seeds and len(evaluations) == len(runs) and rank == 0:
        content = write_summary(cfg.train.output, evaluations)
        print(table(content, ("top1", "base", "new", "hm", "many", "medium", "few")))
        print(f"wrote {Path(cfg.train.output) / 'seeds.json'}")
    exit_if_distributed(0)
    return 0


def summary(results: dict) -> str:
    """The run's last lines: its evaluation (`-` where a group has no class) and where the
    result went, or how far it got when --max-steps stopped it."""
    lines = []
    if "eval" in results:
        m = results["eval"]
        keys = ("top1", "base", "new", "hm", "many", "medium", "few")
        lines.append("  ".join(f"{k} {'-' if m[k] is None else f'{m[k]:.4f}'}" for k in keys))
    if "final" in results:
        final = Path(results["final"])
        files = ", ".join(sorted(path.name for path in final.iterdir())) if final.is_dir() else ""
        lines.append(f"wrote {final} ({files})")
        metrics = [final.parent / "metrics.jsonl"]
        if "eval" in results:
            metrics.insert(0, final.parent / "eval.json")
        lines.append("metrics in " + " and ".join(str(path) for path in metrics))
    else:
        lines.append(
            f"stopped at step {results['steps']} of {results['total_steps']} (--max-steps); "
            "continue with --resume"
        )
    return "\n".join(lines)


def exit_if_distributed(code: int) -> None:
    """In a multi-process run: wait for every rank, flush, and end the process without
    interpreter teardown.

    Called only where all ranks arrive together (the end of training, an agreed preemption stop),
    after every file is written. Tearing down the communication backend's C++ objects at exit
    occasionally aborted a rank ("terminate called without an active exception", status -6)
    in CI, in both the plain and the DeepSpeed launch.
    """
    import logging
    import os

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

"""The whole product on one machine, offline: shards -> tiny CLIP features -> Candle -> metrics.

Example:
  candle-dist demo --output runs/demo

Draws a synthetic long-tailed image set (shape x colour x texture classes, imbalance ratio 100,
the last classes known by name only), encodes it with the offline tiny CLIP (built on first
use, ~3 minutes, then cached; see `candle-dist pretrain-tiny`), and compares (as `candle-dist
compare` does, into OUTPUT/<method>/seed-<s>/) text zero-shot, a text-initialized linear probe
trained with cross-entropy, Candle trained with cross-entropy and Candle trained with the
compensating logit-adjusted loss. Prints a table and writes metrics.json and PNG plots
(per-class accuracy vs training count, group bars, loss curves) beside compare.json/.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from candle_dist.compare import compare
from candle_dist.errors import UserInputError
from candle_dist.eval.metrics import to_json
from candle_dist.eval.plots import plot_loss_curve, plot_per_class_accuracy, plot_shot_groups
from candle_dist.outputs import check_output_dir
from candle_dist.train.data import eval_data_from_store, training_data_from_store

COLUMNS = ("base", "new", "hm", "many", "medium", "few", "top1")
METHODS = ("zero_shot", "linear_ce", "candle_ce", "candle_cla")  # configs/methods/NAME.yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", help="output directory")
    parser.add_argument("--classes", type=int, default=100, help="number of classes")
    parser.add_argument("--new-classes", type=int, default=20, help="classes without images")
    parser.add_argument("--max-per-class", type=int, default=300, help="largest class's images")
    parser.add_argument("--imbalance-ratio", type=float, default=0.01, help="smallest/largest")
    parser.add_argument("--val-per-class", type=int, default=20, help="validation images per class")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of each head")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the runs")
    parser.add_argument("--cache-dir", help="where the tiny CLIP is cached (default: user cache)")
    parser.add_argument("--clip-steps", type=int, default=None, help="tiny CLIP training steps")


def check_arguments(args: argparse.Namespace) -> Path:
    """Every number and path, before the tiny CLIP is built or any folder is made; returns the
    output folder."""
    for option, value, low in (
        ("--classes", args.classes, 2),
        ("--max-per-class", args.max_per_class, 1),
        ("--val-per-class", args.val_per_class, 1),
        ("--epochs", args.epochs, 1),
        ("--new-classes", args.new_classes, 0),
        ("--seed", args.seed, 0),
    ):
        if value < low:
            raise UserInputError(f"{option} {value}: give a whole number >= {low}")
    if args.clip_steps is not None and args.clip_steps < 1:
        raise UserInputError(f"--clip-steps {args.clip_steps}: give a whole number >= 1")
    if args.new_classes >= args.classes:
        raise UserInputError(
            f"--new-classes {args.new_classes}: leave base classes (fewer than --classes "
            f"{args.classes})"
        )
    if not 0 < args.imbalance_ratio <= 1:
        raise UserInputError(
            f"--imbalance-ratio {args.imbalance_ratio}: give smallest/largest class, in (0, 1]"
        )
    if args.cache_dir:
        check_output_dir(args.cache_dir, "--cache-dir")
    return check_output_dir(args.output, "--output")


def prepare_features(
    args: argparse.Namespace, output: Path, tokens: bool = False
) -> tuple[Path, Path]:
    """Shards and tiny-CLIP feature stores (each step resumes if interrupted); `tokens` also
    stores the image tokens (for decoder heads; benchmarks/bench_compare.py)."""
    from candle_dist.data import make_shards
    from candle_dist.demo.tiny_clip import ensure_tiny_clip
    from candle_dist.features.extract import extract

    clip = ensure_tiny_clip(args.cache_dir, seed=args.seed, steps=args.clip_steps)
    shards = output / "shards"
    argv = [
        "--synthetic", "--output", str(shards), "--seed", str(args.seed),
        "--num-classes", str(args.classes), "--num-new", str(args.new_classes),
        "--max-per-class", str(args.max_per_class), "--imbalance-ratio", str(args.imbalance_ratio),
        "--val-per-class", str(args.val_per_class), "--samples-per-shard", "2000",
    ]  # fmt: skip
    parser = argparse.ArgumentParser(prog="candle-dist make-shards")
    make_shards.add_arguments(parser)
    make_shards.main(parser.parse_args(argv))  # its errors are the demo's
    stores = output / "features"
    for split in ("train", "val"):
        urls = [str(p) for p in sorted(shards.glob(f"{split}-*.tar"))]
        if not (stores / split / "manifest.json").exists():
            extract(
                urls, stores / split, "tiny-clip", str(clip), batch_size=256, workers=1,
                tokens=tokens,
            )  # fmt: skip
    return stores / "train", stores / "val"


def main(args: argparse.Namespace) -> int:
    output = check_arguments(args)
    output.mkdir(parents=True, exist_ok=True)
    # Everything here is small (a 128-dim tiny CLIP, 100 classes): one thread per process is as
    # fast as two on an idle machine and much faster on a busy one (no spinning OpenMP threads).
    torch.set_num_threads(1)
    train_dir, val_dir = prepare_features(args, output)
    train, val = training_data_from_store(str(train_dir)), eval_data_from_store(str(val_dir))
    counts, num_base = train.counts, train.num_base_classes
    for name in METHODS:  # a rerun trains the demo's runs anew (compare would reuse them)
        shutil.rmtree(output / name, ignore_errors=True)
    overrides = [
        f"optim.epochs={args.epochs}",
        "optim.batch_size=128",
        "train.log_every=5",
        "train.checkpoint_every=100000",
    ]
    runs = compare(train, val, METHODS, output, seeds=[args.seed], overrides=overrides).runs
    results = {name: runs[name][0].metrics for name in METHODS}
    curves = {}
    for name in ("candle_ce", "candle_cla"):
        records = [json.loads(line) for line in (runs[name][0].folder / "metrics.jsonl").open()]
        curves[name] = [(r["step"], r["loss"]) for r in records if "loss" in r]

    summary = {
        method: {key: metrics[key] for key in COLUMNS} for method, metrics in results.items()
    }
    to_json({"num_new_classes": len(counts) - num_base, **summary}, output / "metrics.json")
    plot_per_class_accuracy(
        {m: results[m]["per_class"] for m in results}, counts, output / "per_class_accuracy.png"
    )
    plot_shot_groups(summary, output / "shot_groups.png")
    steps = [s for s, _ in curves["candle_cla"]]
    plot_loss_curve(
        steps, {m: [v for _, v in c][: len(steps)] for m, c in curves.items()}, output / "loss.png"
    )
    print(
        f"\n{len(counts)} classes ({len(counts) - num_base} new), {len(train.labels)} training "
        f"images (max {counts.max()}, min {counts[:num_base].min()} per base class)"
    )
    print(f"{'method':<16}" + "".join(f"{c:>8}" for c in COLUMNS))
    for method, row in summary.items():
        cells = "".join(f"{'-' if row[c] is None else f'{row[c]:.4f}':>8}" for c in COLUMNS)
        print(f"{method:<16}{cells}")
    print(f"wrote {output / 'metrics.json'}, plots and checkpoints to {output}")
    final = runs["candle_cla"][0].folder / "final"
    print(f"try: candle-dist predict --checkpoint {final} IMAGE.jpg")
    return 0

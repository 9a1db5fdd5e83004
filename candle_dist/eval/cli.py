"""Evaluate a trained head on a feature store: metrics JSON and plots.

Example:
  candle-dist eval --checkpoint runs/inat2018/final --features features/val --output eval

--checkpoint is the `final/` directory a training run writes (head.pt, head_meta.json,
classifier.pt). By default scores come from the head's test forward over batches of
--batch-size images (as in training-time evaluation; fusion makes scores batch-dependent);
--exported uses the batch-independent exported classifier instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from candle_dist.errors import UserInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a run's final/ directory")
    parser.add_argument("--features", required=True, help="feature store directory to evaluate")
    parser.add_argument("--output", help="where to write metrics.json and plots")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--exported", action="store_true", help="use the exported classifier")
    parser.add_argument(
        "--device",
        default="auto",
        help="where to score: auto (the GPU of LOCAL_RANK if CUDA is available, else the CPU), "
        "cpu, cuda or cuda:N (default: auto)",
    )


def scoring_device(name: str) -> torch.device:
    """`--device` as a torch device; CUDA is made the current device (no context on GPU 0)."""
    import os

    if name == "auto":
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"--device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserInputError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {name}: no CUDA device is visible; use --device cpu")
        index = device.index if device.index is not None else 0
        if index >= torch.cuda.device_count():
            raise UserInputError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    return device


def load_trained_head(checkpoint: str | Path, device: torch.device | str = "cpu"):
    """(CandleHead on `device`, meta) from a run's final/ directory, with errors that say what
    is wrong."""
    from candle_dist.model.head import CandleHead

    final = Path(checkpoint)
    meta_file, head_file = final / "head_meta.json", final / "head.pt"
    for file in (meta_file, head_file):
        if not file.exists():
            raise UserInputError(
                f"{file} does not exist: --checkpoint must be the final/ directory of a "
                "`candle-dist train` run"
            )
    try:
        meta = json.loads(meta_file.read_text())
        state = torch.load(head_file, map_location="cpu", weights_only=True)
        return CandleHead.from_state_dict(state, device=device, **meta["head_options"]), meta
    except (KeyError, ValueError, RuntimeError) as err:
        raise UserInputError(f"{final} is not a valid candle_dist checkpoint ({err})") from None


def main(args: argparse.Namespace) -> int:
    from candle_dist.classifier import ExportedClassifier
    from candle_dist.eval.metrics import MetricAccumulator, to_json
    from candle_dist.eval.plots import plot_per_class_accuracy, plot_shot_groups
    from candle_dist.train.data import eval_data_from_store
    from candle_dist.train.trainer import predict_scores

    device = scoring_device(args.device)
    head, meta = load_trained_head(args.checkpoint, device)
    data = eval_data_from_store(args.features)
    dim = np.asarray(data.features[:1]).shape[-1]
    if len(data.labels) and dim != head.dim:
        raise UserInputError(
            f"{args.features}: features have dimension {dim} but the checkpoint expects "
            f"{head.dim}: extract with the CLIP model the head was trained on ({meta.get('clip')})"
        )
    if len(data.labels) and int(np.max(data.labels)) >= head.num_classes:
        raise UserInputError(
            f"{args.features}: labels go up to {int(np.max(data.labels))} but the checkpoint "
            f"has {head.num_classes} classes: the store uses another class list"
        )
    classifier = None
    if args.exported:
        classifier = ExportedClassifier.load(Path(args.checkpoint) / "classifier.pt", device)
    counts = np.asarray(meta["counts"])
    acc = MetricAccumulator(counts, meta["num_base_classes"])
    for start in tqdm(range(0, len(data.labels), args.batch_size), desc="eval"):
        rows = torch.as_tensor(
            np.asarray(data.features[start : start + args.batch_size], dtype=np.float32)
        )
        rows = rows.to(device)
        scores = classifier.scores(rows) if classifier else predict_scores(head, rows)
        acc.update(scores.cpu(), data.labels[start : start + args.batch_size])
    metrics = acc.compute()
    output = Path(args.output or Path(args.checkpoint).parent / "eval")
    output.mkdir(parents=True, exist_ok=True)
    to_json(metrics, output / "metrics.json")
    plot_per_class_accuracy(metrics["per_class"], counts, output / "per_class_accuracy.png")
    plot_shot_groups({"candle": metrics}, output / "shot_groups.png")
    keys = ("top1", "top5", "base", "new", "hm", "many", "medium", "few")
    print("  ".join(f"{k} {'-' if metrics[k] is None else f'{metrics[k]:.4f}'}" for k in keys))
    print(f"wrote {output / 'metrics.json'}")
    return 0

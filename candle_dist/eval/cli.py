"""Evaluate a trained head on a feature store: metrics JSON and plots.

Example:
  candle-dist eval --checkpoint runs/inat2018/final --features features/val --output eval

--checkpoint is the `final/` directory a training run writes (head.pt, head_meta.json, and for
the Candle head classifier.pt). A decoder head reads the store's token features. By default
scores come from the head's test forward over batches of --batch-size images (as in
training-time evaluation; the Candle head's fusion makes scores batch-dependent); --exported
uses its batch-independent exported classifier instead. The store must hold the
checkpoint's class list, extracted with its CLIP (compared before scoring). --output (default:
eval/ beside the checkpoint) receives metrics.json (written last) and the plots.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from candle_dist import provenance as prov
from candle_dist.errors import UserInputError
from candle_dist.outputs import check_output_dir, staged_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a run's final/ directory")
    parser.add_argument("--features", required=True, help="feature store directory to evaluate")
    parser.add_argument("--output", help="where to write metrics.json and plots")
    parser.add_argument(
        "--batch-size", type=int, default=1024, help="images scored together (fusion sees a batch)"
    )
    parser.add_argument("--exported", action="store_true", help="use the exported classifier")
    parser.add_argument(
        "--adjust",
        metavar="logit=TAU|tau_norm=TAU",
        help="post-hoc adjustment, no training. logit=TAU: scores minus TAU * log prior, the "
        "prior from the training counts + 1 (as the CLA loss has it, finite for new classes); "
        "any head. tau_norm=TAU: each class's classifier row (and bias) divided by its norm^TAU; "
        "decoder and linear heads. e.g. logit=1.0",
    )
    parser.add_argument(
        "--class-info",
        help="TSV of the classes' taxonomy (header: id, name, then levels from fine to coarse, as "
        "configs/data/inat2018_taxonomy.tsv): adds top-1 at every level and the mean taxonomic "
        "distance of the mistakes",
    )
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


def checkpoint_provenance(meta: dict, dim: int) -> dict:
    """What a checkpoint's training features were made from (checkpoints written before it was
    recorded: their class list, dimension and CLIP)."""
    if meta.get("provenance"):
        return meta["provenance"]
    clip = meta.get("clip") or {}
    return prov.provenance(
        meta["classnames"],
        model=clip.get("model"),
        pretrained=clip.get("pretrained"),
        templates=None,
        dim=dim,
    )


ADJUSTMENTS = ("logit", "tau_norm")


def parse_adjustment(spec: str | None, head_type: str) -> tuple[str, float] | None:
    """`--adjust KIND=TAU` as (kind, tau), checked against the head it adjusts."""
    if spec is None:
        return None
    kind, _, value = spec.partition("=")
    if kind not in ADJUSTMENTS:
        raise UserInputError(f"--adjust {spec!r}: use logit=TAU or tau_norm=TAU (e.g. logit=1.0)")
    if kind == "tau_norm" and head_type == "candle":
        raise UserInputError(
            f"--adjust {spec!r}: the Candle head takes logit=TAU (tau_norm rescales classifier "
            "rows by their norm, and this head's columns are unit-norm prototypes)"
        )
    try:
        tau = float(value)
    except ValueError:
        raise UserInputError(f"--adjust {spec!r}: TAU must be a number, e.g. {kind}=1.0") from None
    if not np.isfinite(tau):
        raise UserInputError(f"--adjust {spec!r}: TAU must be a finite number")
    return kind, tau


def logit_adjustment(tau: float, counts: np.ndarray, device) -> torch.Tensor:
    """The [C] vector post-hoc logit adjustment subtracts from every row of scores: TAU * log
    of the prior (n_c + 1) / sum(n + 1)."""
    prior = torch.as_tensor(counts, dtype=torch.float64) + 1.0
    return (tau * torch.log(prior / prior.sum())).float().to(device)


def main(args: argparse.Namespace) -> int:
    from candle_dist.classifier import ExportedClassifier
    from candle_dist.eval.metrics import MetricAccumulator, to_json
    from candle_dist.eval.plots import plot_per_class_accuracy, plot_shot_groups
    from candle_dist.eval.taxonomy import read_taxonomy, taxonomy_metrics
    from candle_dist.model.heads import load_head
    from candle_dist.train.data import eval_data_from_store
    from candle_dist.train.trainer import eval_inputs, predict_scores

    if args.batch_size < 1:
        raise UserInputError(f"--batch-size {args.batch_size}: give 1 or more images per batch")
    output = check_output_dir(args.output or Path(args.checkpoint).parent / "eval", "--output")
    device = scoring_device(args.device)
    head, meta = load_head(args.checkpoint, device)
    adjust = parse_adjustment(args.adjust, head.head_type)
    data = eval_data_from_store(args.features)
    prov.check_same(
        checkpoint_provenance(meta, head.dim),
        data.provenance,
        f"checkpoint {args.checkpoint}",
        f"store {args.features}",
        fix="evaluate on a store extracted with the checkpoint's class list and CLIP",
    )
    if args.exported and head.head_type != "candle":
        raise UserInputError(
            f"--exported: {args.checkpoint} holds a {head.head_type} head; the exported "
            "classifier (classifier.pt) is the Candle head's: drop --exported"
        )
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
    taxonomy = read_taxonomy(args.class_info, head.num_classes) if args.class_info else None
    counts = np.asarray(meta["counts"])
    adjustment = None
    if adjust is not None and adjust[0] == "logit":
        adjustment = logit_adjustment(adjust[1], counts, device)
    elif adjust is not None:
        head.tau_normalize(adjust[1])
    classifier = None
    if args.exported:
        try:
            classifier = ExportedClassifier.load(Path(args.checkpoint) / "classifier.pt", device)
        except ValueError as err:
            raise UserInputError(str(err)) from None
    acc = MetricAccumulator(counts, meta["num_base_classes"], classnames=meta["classnames"])
    for start in tqdm(range(0, len(data.labels), args.batch_size), desc="eval"):
        rows = eval_inputs(head, data, start, start + args.batch_size).to(device)
        scores = classifier.scores(rows) if classifier else predict_scores(head, rows)
        if adjustment is not None:
            scores = scores - adjustment
        acc.update(scores.cpu(), data.labels[start : start + args.batch_size])
    metrics = acc.compute()
    metrics["adjust"] = args.adjust
    if taxonomy is not None:
        mistakes = acc.mistakes()
        total = len(data.labels)
        correct = total - sum(mistakes.values())
        metrics["taxonomy"] = taxonomy_metrics(*taxonomy, correct, total, mistakes)
    with staged_dir(output, last="metrics.json") as staging:
        to_json(metrics, staging / "metrics.json")
        plot_per_class_accuracy(metrics["per_class"], counts, staging / "per_class_accuracy.png")
        plot_shot_groups({head.head_type: metrics}, staging / "shot_groups.png")
    for keys in (
        ("top1", "top5", "base", "new", "hm", "many", "medium", "few"),
        ("balanced_accuracy", "macro_f1", "eval_loss"),
    ):
        print("  ".join(f"{k} {'-' if metrics[k] is None else f'{metrics[k]:.4f}'}" for k in keys))
    if taxonomy is not None:
        tax = metrics["taxonomy"]
        levels = "  ".join(
            f"{level} {value:.4f}" for level, value in tax["top1"].items() if value is not None
        )
        distance = "-" if tax["mean_distance"] is None else f"{tax['mean_distance']:.4f}"
        print(f"top1 at {levels}  mean taxonomic distance of mistakes {distance}")
    if metrics["confused_pairs"]:
        print("most confused (true -> predicted: images):")
        for pair in metrics["confused_pairs"][:5]:
            print(f"  {pair['true_name']} -> {pair['predicted_name']}: {pair['count']}")
    print(f"wrote {output / 'metrics.json'}")
    return 0

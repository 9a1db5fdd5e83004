"""Every method of configs/methods/ side by side: the demo's data, and synthetic Places-LT features.

python benchmarks/bench_compare.py [--seeds 3 --epochs 5 --scale 0.1 --methods all]

(a) The demo's data (`candle-dist demo`: synthetic long-tailed images, 100 classes of which 20
are known by name only, encoded by the offline tiny CLIP, with token features for the decoder
methods). (b) Synthetic CLIP-like features (candle_dist/data/synthetic_features.py) with the
real Places-LT count profile (configs/data/places_lt_train_counts.tsv, 365 classes, 4,980 down
to 5 images per class) scaled by --scale, and synthetic token features. Both run
`candle_dist.compare.compare` with every method at seeds 0..N-1, each at the learning rate of
its method file, all with SGD, batch 128 and --epochs, and the tables (mean ± sample std over
seeds) go into BENCHMARKS.md (--print-only: printed instead). The defaults fit a 2-core CPU
in about 30 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import write_section
from candle_dist.compare import STD_NOTE, columns, compare, format_cell
from candle_dist.data.synthetic_features import load_counts_tsv, make_synthetic_features
from candle_dist.errors import UserInputError
from candle_dist.train.data import (
    EvalData,
    TrainingData,
    eval_data_from_store,
    training_data_from_store,
    training_data_from_synthetic,
)

ROOT = Path(__file__).resolve().parent.parent
PLACES_COUNTS = ROOT / "configs" / "data" / "places_lt_train_counts.tsv"


def demo_data(work: Path, seed: int) -> tuple[TrainingData, EvalData]:
    """The demo's stores (its defaults), extracted with token features."""
    from candle_dist.demo.run import prepare_features

    args = argparse.Namespace(
        cache_dir=None,
        seed=seed,
        clip_steps=None,
        classes=100,
        new_classes=20,
        max_per_class=300,
        imbalance_ratio=0.01,
        val_per_class=20,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train_dir, val_dir = prepare_features(args, work, tokens=True)
    return training_data_from_store(str(train_dir)), eval_data_from_store(str(val_dir))


def places_data(
    scale: float, dim: int, tokens: int, val_per_class: int, seed: int
) -> tuple[TrainingData, EvalData]:
    """Synthetic features and tokens with the Places-LT profile, every count times `scale`."""
    counts = load_counts_tsv(PLACES_COUNTS).double() * scale
    synthetic = make_synthetic_features(
        len(counts),
        dim,
        counts=counts.round().clamp(min=1).long(),
        val_per_class=val_per_class,
        seed=seed,
        num_tokens=tokens,
    )
    train, val = training_data_from_synthetic(synthetic)
    train.tokens, val.tokens = synthetic.train_tokens.numpy(), synthetic.val_tokens.numpy()
    train.token_projection = tuple(t.numpy() for t in synthetic.token_projection)
    train.source = val.source = f"synthetic Places-LT profile x {scale:g}"
    return train, val


def markdown(content: dict, train: TrainingData) -> str:
    """compare.json's methods as a Markdown table of mean ± std."""
    keys, several = columns(train), len(content["seeds"]) > 1
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, entry in content["methods"].items():
        cells = [format_cell(entry, key, several, " ± ") for key in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(train: TrainingData) -> str:
    counts = np.asarray(train.counts)
    base = counts[: train.num_base_classes]
    return (
        f"{train.num_classes} classes ({train.num_classes - train.num_base_classes} new), "
        f"{len(train.labels):,} training images (max {base.max()}, min {base.min()} per class)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["all"], help="compare's --methods")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of every method")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of every run")
    parser.add_argument("--scale", type=float, default=0.1, help="Places-LT counts times this")
    parser.add_argument("--dim", type=int, default=128, help="synthetic feature dimension")
    parser.add_argument("--tokens", type=int, default=8, help="synthetic tokens per image")
    parser.add_argument("--val-per-class", type=int, default=20, help="synthetic val images")
    parser.add_argument("--only", choices=("demo", "places"), help="run one of the two parts")
    parser.add_argument("--work", help="keep the runs here (a rerun resumes); default: temp")
    parser.add_argument("--print-only", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small heads: one thread is as fast and steadier (see the demo)
    overrides = [
        f"optim.epochs={args.epochs}",
        "optim.batch_size=128",
        "train.log_every=1000",
        "train.checkpoint_every=100000",
    ]
    parts = [p for p in ("demo", "places") if args.only in (None, p)]
    sections = []
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = Path(args.work or stack.enter_context(tempfile.TemporaryDirectory()))
        for part in parts:
            began = time.perf_counter()
            if part == "demo":
                train, val = demo_data(work / "demo", seed=0)
                title = "(a) The demo's data: tiny CLIP features and tokens"
            else:
                train, val = places_data(args.scale, args.dim, args.tokens, args.val_per_class, 0)
                title = (
                    f"(b) Synthetic features, Places-LT profile x {args.scale:g} (D = {args.dim}"
                    f", {args.tokens} tokens per image, {args.val_per_class} val images per class)"
                )
            try:
                result = compare(
                    train,
                    val,
                    args.methods,
                    work / part / "compare",
                    seeds=range(args.seeds),
                    overrides=overrides,
                )
            except UserInputError as err:
                sys.exit(f"bench_compare: {err}")
            sections.append(
                f"### {title}\n\n{describe(train)}; {time.perf_counter() - began:.0f} s in all.\n\n"
                f"{markdown(result.content, train)}"
            )
    body = (
        f"Every method of configs/methods/ (docs/compare.md) through `candle_dist.compare`, "
        f"{args.seeds} seeds, mean ± {STD_NOTE.split(';')[0]}; every method at its method "
        f"file's learning rate, SGD, batch 128, {args.epochs} epochs (`--set "
        + " ".join(overrides)
        + "`); "
        "train_s: seconds per run, a second stage's including its first stage's. "
        f"Whole benchmark: {time.perf_counter() - start:.0f} s.\n\n" + "\n\n".join(sections)
    )
    if args.print_only:
        print(body)
    else:
        write_section("compare", "Method comparison: the baselines and Candle", body)
        print(body)


if __name__ == "__main__":
    main()

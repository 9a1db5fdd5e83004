"""Extraction end to end with ViT-B-32 on this machine: images/s and share of time in the encoder.

    python benchmarks/bench_extract.py [--shards 2] [--per-shard 48] [--batch-size 32]

Writes shards of iNaturalist-like 800 px JPEGs, then runs `candle_dist.features.extract` with
0 loader workers (decode inline), the default, and 2, into fresh stores; the encoder alone on
random tensors of the same batch size is the ceiling. Weights are random (offline machine);
they do not change the cost.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_decode import photo_like_jpeg
from report import write_section

from candle_dist.data.shards import write_classnames, write_shard
from candle_dist.features.clip_loading import load_clip
from candle_dist.features.extract import DistEnv, default_workers, extract

SIZES = ((800, 600), (600, 800), (800, 800))


def write_shards(folder: Path, shards: int, per_shard: int, classes: int = 10) -> str:
    rng = np.random.default_rng(0)
    for s in range(shards):
        samples = [
            {
                "__key__": f"train_{s * per_shard + i:06d}",
                "jpg": photo_like_jpeg(rng, SIZES[i % len(SIZES)]),
                "cls": str(i % classes),
            }
            for i in range(per_shard)
        ]
        write_shard(folder / f"train-{s:06d}.tar", samples)
    write_classnames(folder / "classnames.txt", [f"species {i}" for i in range(classes)])
    return f"{folder}/train-{{000000..{shards - 1:06d}}}.tar"


def encoder_alone(batch_size: int, repeats: int = 2) -> float:
    """Images/s of ViT-B-32's image tower on random input, as extract runs it."""
    model, _, _ = load_clip("ViT-B-32", "none")
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    rates = []
    with torch.inference_mode():
        model.encode_image(x[:2])
        for _ in range(repeats):
            start = time.perf_counter()
            model.encode_image(x)
            rates.append(batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--per-shard", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    default = default_workers(torch.device("cpu"), DistEnv())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        spec = write_shards(Path(tmp) / "shards", args.shards, args.per_shard)
        ceiling = encoder_alone(args.batch_size)
        for workers in (0, default, 2):
            start = time.perf_counter()
            stats = extract(
                spec,
                Path(tmp) / f"store-{workers}-{len(rows)}",
                "ViT-B-32",
                "none",
                batch_size=args.batch_size,
                workers=workers,
                progress=False,
            )
            total = time.perf_counter() - start
            seconds = stats["seconds"]
            rows.append(
                f"| {workers}{' (default)' if workers == default else ''} "
                f"| {stats['samples_done'] / seconds:.1f} "
                f"| {100 * stats['encoder_seconds'] / seconds:.0f}% "
                f"| {100 * stats['loader_wait_seconds'] / seconds:.0f}% "
                f"| {total:.1f} |"
            )
            print(rows[-1], flush=True)
    images = args.shards * args.per_shard
    body = f"""
{images} JPEGs (800 px long side, quality 90) in {args.shards} shards, ViT-B-32 (random
init), fp32 on CPU with {torch.get_num_threads()} torch threads, batch {args.batch_size},
channels_last, `torch.inference_mode`. Images/s and shares are over the encode loop
(decode, encode, write); the last column is the whole `extract()` call (model load and
text features of 10 class names included).

| loader workers | images/s | time in encoder | waiting for loader | whole call (s) |
|---|---|---|---|---|
{chr(10).join(rows)}

Encoder alone on random tensors (same batch, same model): {ceiling:.1f} images/s.
"""
    print(body)
    write_section("extract", "Feature extraction end to end (ViT-B-32, CPU)", body)


if __name__ == "__main__":
    main()

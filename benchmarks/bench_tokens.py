"""Token features: storage per image and extraction images/s with and without `--tokens`.

    python benchmarks/bench_tokens.py [--images 64] [--batch-size 16] [--runs 3]

Writes iNaturalist-like 800 px JPEGs into shards of 16, then runs `candle_dist.features.extract`
into fresh stores for the tiny CLIP (ResNet, 64 px) and ViT-B-16 (224 px), both at random
init (offline machine; weights do not change the cost): without tokens, with every token, and
pooled to a grid (ViT-B-16: --token-grid 7). Bytes per image are read from the store's files;
images/s is the median over the runs of the encode loop (decode, encode, write). The last
columns extrapolate both to iNaturalist 2018's 437,513 training images.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_extract import write_shards
from report import write_section

from candle_dist.features.extract import extract
from candle_dist.features.store import FeatureStore

INAT2018 = 437_513
COLUMNS = (
    "model",
    "tokens",
    "T x W",
    "feature bytes/image",
    "token bytes/image",
    "images/s (min–max)",
    "CPU s/image",
    "CPU vs none",
    "iNat 2018 store (GB)",
    "iNat 2018 hours here",
)
HEADER = f"| {' | '.join(COLUMNS)} |\n|{'---|' * len(COLUMNS)}"
PER_SHARD = 16
SETTINGS = {  # model -> (label, --tokens, --token-grid) rows
    "tiny-clip": [("none", False, None), ("all tokens", True, None), ("grid 1", True, 1)],
    "ViT-B-16": [("none", False, None), ("all tokens", True, None), ("grid 7", True, 7)],
}


def store_bytes(path: Path) -> tuple[float, float]:
    """(feature bytes, token bytes) per image of a store, headers included."""
    store = FeatureStore(path)
    shards = path / "shards"
    tokens = sum(p.stat().st_size for p in shards.glob("*.tokens.npy"))
    features = sum(p.stat().st_size for p in shards.glob("*.npy")) - tokens
    return features / len(store), tokens / len(store)


def extract_rate(
    spec: str, out: Path, model: str, tokens: bool, grid: int | None, batch: int
) -> tuple[float, float]:
    """Images/s of the encode loop of one fresh extraction into `out`, and the CPU seconds
    per image of the whole call (all threads of this process: what others' load on a shared
    machine changes least; model creation and text features included, alike in every setting).
    """
    cpu = time.process_time()
    stats = extract(
        spec,
        out,
        model,
        "none",
        batch_size=batch,
        workers=0,
        progress=False,
        tokens=tokens,
        token_grid=grid,
    )
    cpu = (time.process_time() - cpu) / stats["samples_done"]
    return stats["samples_done"] / stats["seconds"], cpu


def measure(spec: str, root: Path, model: str, args) -> list[dict]:
    """Each setting of `model`: median images/s over the runs, its token shape and bytes.

    One untimed extraction warms the model and the allocator first; the runs then go round the
    settings, each round starting at the next one, so load from other processes and whatever
    the first of a round pays fall on all of them alike.
    """
    settings = SETTINGS[model]
    extract_rate(spec, root / f"{model}-warm", model, False, None, args.batch_size)
    rates: list[list[float]] = [[] for _ in settings]
    cpus: list[list[float]] = [[] for _ in settings]
    for run in range(args.runs):
        for shift in range(len(settings)):
            i = (run + shift) % len(settings)
            _, tokens, grid = settings[i]
            out = root / f"{model}-{i}-{run}"
            rate, cpu = extract_rate(spec, out, model, tokens, grid, args.batch_size)
            rates[i].append(rate)
            cpus[i].append(cpu)
            if run < args.runs - 1:
                shutil.rmtree(out)
    results = []
    for i in range(len(settings)):
        out = root / f"{model}-{i}-{args.runs - 1}"
        features, token_bytes = store_bytes(out)
        info = FeatureStore(out).token_info
        results.append(
            {
                "rate": statistics.median(rates[i]),
                "spread": (min(rates[i]), max(rates[i])),
                "cpu": statistics.median(cpus[i]),
                "features": features,
                "tokens": token_bytes,
                "shape": f"{info['count']} x {info['width']}" if info else "-",
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-tokens-") as tmp:
        spec = write_shards(Path(tmp) / "shards", args.images // PER_SHARD, PER_SHARD)
        for model, settings in SETTINGS.items():
            results = measure(spec, Path(tmp), model, args)
            base_cpu = results[0]["cpu"]
            for (label, _, _), m in zip(settings, results, strict=True):
                lo, hi = m["spread"]
                per_image = m["features"] + m["tokens"]
                rows.append(
                    f"| {model} | {label} | {m['shape']} | {m['features']:,.0f} "
                    f"| {m['tokens']:,.0f} | {m['rate']:.2f} ({lo:.2f}–{hi:.2f}) "
                    f"| {m['cpu']:.3f} | {m['cpu'] / base_cpu:.2f}x "
                    f"| {per_image * INAT2018 / 1e9:,.1f} | {INAT2018 / m['rate'] / 3600:,.1f} |"
                )
                print(rows[-1], flush=True)
    load_after = os.getloadavg()[0]
    body = f"""
{args.images} JPEGs (800 px long side, quality 90) in shards of {PER_SHARD}, random init, fp32 on
CPU with {torch.get_num_threads()} torch threads, batch {args.batch_size}, 0 loader workers.
Images/s: the median (and range) of {args.runs} runs of the encode loop (decode, encode, write
features and tokens), after one untimed run, the runs going round the settings. CPU s/image:
process CPU time of the whole call over its images, median of the same runs (model creation
and text features included, alike in every setting); it compares settings better where other
processes share the cores (1-minute load average {load_before:.1f} at the start,
{load_after:.1f} at the end, {os.cpu_count()} cores). Bytes per image: the store's shard files
over its images (float16 features and tokens, .npy headers included; the tiny CLIP's tokens
are its 2 x 2 feature map of 512 channels). iNat 2018 = {INAT2018:,} training images: store
size in GB (10^9 bytes), and hours of extraction at this machine's rate.

{HEADER}
{chr(10).join(rows)}
"""
    print(body)
    write_section("tokens", "Token features: storage and extraction time", body)


if __name__ == "__main__":
    main()

"""Small inputs for the data-plane tests: a tiny open_clip config and shards of random JPEGs."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
from PIL import Image

from candle_dist.data.shards import write_classnames, write_counts_tsv, write_shard

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny_model_config(folder: Path, name: str = "dataplane-tiny", embed_dim: int = 32) -> Path:
    """Write a ~0.2M-parameter open_clip ViT config; the model name is the file stem."""
    path = Path(folder) / f"{name}.json"
    path.write_text(json.dumps({**TINY_CONFIG, "embed_dim": embed_dim}))
    return path


def jpeg_bytes(rng: np.random.Generator, width: int = 48, height: int = 40) -> bytes:
    """A smooth random colour image as JPEG (blocky noise upsampled, so it compresses)."""
    small = (rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_jpeg_shards(
    folder: Path,
    num_shards: int,
    per_shard: int,
    num_classes: int = 5,
    num_base: int | None = None,
    split: str = "train",
    seed: int = 0,
) -> list[Path]:
    """`split-%06d.tar` shards of random JPEGs labelled round-robin, plus classnames/counts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    num_base = num_classes if num_base is None else num_base
    paths, counts, index = [], np.zeros(num_classes, dtype=np.int64), 0
    for shard in range(num_shards):
        samples = []
        for _ in range(per_shard):
            label = index % num_base
            counts[label] += 1
            key = f"{split}_{index:06d}"
            samples.append({"__key__": key, "jpg": jpeg_bytes(rng), "cls": str(label)})
            index += 1
        path = folder / f"{split}-{shard:06d}.tar"
        write_shard(path, samples)
        paths.append(path)
    names = [f"class number {i}" for i in range(num_classes)]
    write_classnames(folder / "classnames.txt", names)
    write_counts_tsv(folder / "counts.tsv", names, counts, num_base)
    return paths


def shard_spec(folder: Path, num_shards: int, split: str = "train") -> str:
    return f"{folder}/{split}-{{000000..{num_shards - 1:06d}}}.tar"


def store_rows(path: Path) -> dict[str, tuple[int, np.ndarray]]:
    """{key: (label, feature row)} of a store: what must not depend on how it was extracted."""
    from candle_dist.features.store import FeatureStore

    store = FeatureStore(path)
    features = np.asarray(store.features)
    return {
        key: (int(label), features[i])
        for i, (key, label) in enumerate(zip(store.keys, store.labels, strict=True))
    }


def kill_after_first_shard(target, args: tuple, records: Path, num_shards: int) -> dict[str, int]:
    """Run `target(*args)` (an extraction into the store whose shard records are in `records`)
    in a forked child and kill -9 it once its first shard is recorded; returns the recorded
    shards' names and modification times. A forked child inherits the imports, so it starts
    at once."""
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    deadline = time.monotonic() + 120
    while not list(records.glob("*.json")) and child.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    done = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert 0 < len(done) < num_shards, "the run was not killed mid-way"
    return done

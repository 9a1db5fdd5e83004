"""Encode WebDataset shards with a frozen open_clip image tower into a feature store.

Example:
  candle-dist extract --shards 'data/train-{000000..000123}.tar' --output features/train \\
      --model ViT-B-32 --pretrained openai --batch-size 256 --workers 8

Shards are split across ranks (torchrun / accelerate launch / SLURM environment variables; a
plain process is rank 0 of 1) and then across loader workers. Each input shard becomes one
feature file, written under a temporary name and renamed, so a killed run restarted with the
same command redoes only unfinished shards. Damaged samples (corrupt image, missing or bad
label, truncated tar) are skipped and listed in manifest.json; --strict stops at the first.
When every shard is done, rank 0 (or, without a process group, whichever rank finishes last)
writes the text features of all class names, the labels, keys, counts and manifest.json.
Images and class names are encoded under one autocast (--precision, candle_dist/precision.py),
recorded in the store so that `predict` encodes its images the same way.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from candle_dist.data.shards import (
    IMAGE_FIELDS,
    ReadProblem,
    TarReader,
    TarSample,
    atomic_write_text,
    expand_urls,
    is_local,
    read_classnames,
    read_counts_tsv,
    shard_stem,
    take_share,
)
from candle_dist.errors import UserInputError
from candle_dist.features.clip_loading import load_clip
from candle_dist.features.prompts import (
    check_templates,
    encode_classnames,
    fill_template,
    read_class_info,
)
from candle_dist.features.store import (
    DTYPES,
    MANIFEST,
    SHARD_DIR,
    file_sha256,
    finalize_store,
    read_part_record,
    write_part,
)
from candle_dist.features.transforms import ImagePreprocessor, PreprocessSpec
from candle_dist.precision import PRECISIONS, autocast, resolve_precision

IDENTITY_FILE = "extract.json"


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits among the extraction processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "none"


def distributed_env(environ: dict | None = None) -> DistEnv:
    """Rank/world from torchrun or accelerate (RANK, WORLD_SIZE, LOCAL_RANK), else SLURM
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), else a plain process: rank 0 of 1."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            int(env["RANK"]),
            world,
            int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", world)),
            "torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = int(env["SLURM_NTASKS"])
        per_node = env.get("SLURM_NTASKS_PER_NODE", str(world)).split("(")[0]
        return DistEnv(
            int(env["SLURM_PROCID"]),
            world,
            int(env.get("SLURM_LOCALID", 0)),
            int(per_node) if per_node.isdigit() else world,
            "slurm",
        )
    return DistEnv()


def resolve_device(name: str, env: DistEnv) -> torch.device:
    """This rank's device. A GPU is the local rank's among those visible (all of the node's, or
    just its own where SLURM binds one GPU per task) and becomes the current device: CUDA work
    that names no device, such as the loader's pin-memory thread, otherwise opens a context on
    GPU 0 from every rank of the node."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError("--device cuda: no CUDA device visible; use --device cpu")
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    if name != "cpu":
        raise UserInputError(f"--device {name!r}: choose auto, cpu or cuda")
    return torch.device("cpu")


def default_workers(device: torch.device, env: DistEnv) -> int:
    """Loader processes per rank: the node's cores shared by its GPU ranks; 1 on CPU, where the
    encoder needs the cores and decoding at reduced size keeps up with it."""
    if device.type != "cuda":
        return 1
    return max(1, min(16, (os.cpu_count() or 2) // max(1, env.local_world_size) - 1))


@dataclass(frozen=True)
class _Job:
    index: int
    url: str


class _ShardBatches(IterableDataset):
    """Loader side: this worker's shards, decoded and preprocessed, in batches per shard.

    Every shard ends with one batch marked `last` carrying its skipped samples and checksum,
    so the encoder side knows when a shard is complete.
    """

    def __init__(self, jobs: list[_Job], prep: ImagePreprocessor, batch_size: int, classes: int):
        self.jobs = jobs
        self.prep = prep
        self.batch_size = batch_size
        self.num_classes = classes

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        jobs = take_share(self.jobs, info.id, info.num_workers) if info else self.jobs
        for job in jobs:
            yield from self._batches(job)

    def _batches(self, job: _Job) -> Iterator[dict]:
        reader = TarReader(job.url)
        pixels, labels, keys, problems = [], [], [], []
        for item in reader:
            prepared = self._prepare(item) if isinstance(item, TarSample) else item
            if isinstance(prepared, ReadProblem):
                problems.append({"key": prepared.key, "reason": prepared.reason})
                continue
            pixels.append(prepared[0])
            labels.append(prepared[1])
            keys.append(item.key)
            if len(keys) == self.batch_size:
                yield self._batch(job, pixels, labels, keys, problems)
                pixels, labels, keys, problems = [], [], [], []
        last = self._batch(job, pixels, labels, keys, problems)
        last.update(last=True, input_sha256=reader.sha256, input_bytes=reader.num_bytes)
        yield last

    def _prepare(self, sample: TarSample) -> tuple[torch.Tensor, int] | ReadProblem:
        image_field = next((f for f in IMAGE_FIELDS if f in sample.fields), None)
        if image_field is None:
            return ReadProblem(sample.key, f"no image ({'/'.join(IMAGE_FIELDS)} field)")
        raw = sample.fields.get("cls")
        if raw is None:
            return ReadProblem(sample.key, "missing cls (label)")
        try:
            label = int(raw.decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            return ReadProblem(sample.key, f"bad cls {raw[:20]!r} (not an integer)")
        if not 0 <= label < self.num_classes:
            return ReadProblem(
                sample.key, f"label {label} outside the {self.num_classes} class names"
            )
        try:
            pixels = self.prep.pixels(sample.fields[image_field], sample.key)
        except Exception as err:  # PIL raises many types for damaged images
            return ReadProblem(sample.key, f"corrupt image ({type(err).__name__}: {err})")
        return pixels, label

    def _batch(self, job, pixels, labels, keys, problems) -> dict:
        if pixels:
            stacked = torch.stack(pixels)
        else:
            height, width = self.prep.spec.size
            stacked = torch.empty(0, 1 + self.prep.views, 3, height, width, dtype=torch.uint8)
        return {
            "job": job.index,
            "pixels": stacked,
            "labels": torch.tensor(labels, dtype=torch.int64),
            "keys": keys,
            "problems": problems,
            "last": False,
        }


@dataclass(frozen=True)
class _Settings:
    """How the encoder side runs."""

    device: torch.device
    dim: int
    views: int
    batch_size: int
    workers: int
    strict: bool
    dtype: str
    precision: str
    progress: bool


@dataclass
class _ShardBuffer:
    features: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    keys: list = field(default_factory=list)
    problems: list = field(default_factory=list)


@dataclass
class _Plan:
    """What one extraction run works on, resolved and checked before any model is loaded."""

    urls: list[str]
    names: list[str]
    output: Path
    classnames: list[str]
    counts: np.ndarray | None
    num_base: int
    split: str


def _beside(url: str, filename: str) -> Path | None:
    """`filename` in the shard's folder; None when the shard is no local file."""
    return Path(url.removeprefix("file:")).parent / filename if is_local(url) else None


def _plan(shards, output, classnames, counts, split) -> _Plan:
    urls = expand_urls(shards)
    names = [shard_stem(url) for url in urls]
    seen: dict[str, str] = {}
    for url, name in zip(urls, names, strict=True):
        if name in seen:
            raise UserInputError(
                f"shards {seen[name]} and {url} share the name {name!r}, which names their "
                "feature files; extract them into separate stores"
            )
        seen[name] = url
    missing = [u for u in urls if is_local(u) and not Path(u.removeprefix("file:")).is_file()]
    if missing:
        raise UserInputError(
            f"{missing[0]}: shard not found ({len(missing)} of {len(urls)} missing); "
            "check --shards (brace syntax: 'dir/train-{000000..000009}.tar')"
        )
    classnames = classnames or _beside(urls[0], "classnames.txt")
    if classnames is None:
        raise UserInputError("the shards are not local files: pass --classnames FILE")
    class_names = read_classnames(classnames)
    if split == "auto":
        split = "train" if all(name.startswith("train") for name in names) else "eval"
    counts_path = Path(counts) if counts else _beside(urls[0], "counts.tsv")
    if counts or (counts_path is not None and counts_path.is_file()):
        train_counts, num_base = read_counts_tsv(counts_path, len(class_names))
    elif split == "train":
        train_counts, num_base = None, len(class_names)
    else:
        raise UserInputError(
            f"no counts.tsv beside the shards ({counts_path}): an evaluation store needs the "
            "training counts: pass --counts TRAIN_SHARDS/counts.tsv"
        )
    return _Plan(
        urls,
        names,
        Path(output),
        class_names,
        None if split == "train" else train_counts,
        num_base,
        split,
    )


def _check_identity(output: Path, identity: dict) -> None:
    """Refuse to mix features of another model, dimension or setting into an existing store."""
    path = output / IDENTITY_FILE
    existing = None
    for candidate in (path, output / MANIFEST):
        if candidate.is_file():
            existing = json.loads(candidate.read_text())
            break
    if existing is None and any((output / SHARD_DIR).glob("*.json")):
        existing = {"model": "unknown (shard files without extract.json)"}
    if existing is not None:
        diffs = [
            f"{key} {existing.get(key)!r} != {value!r}"
            for key, value in identity.items()
            if existing.get(key) != value
        ]
        if diffs:
            raise UserInputError(
                f"{output}: holds features of another extraction ({'; '.join(diffs)}); "
                "write to a new --output, or delete that directory to start over"
            )
    if not path.is_file():
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(identity, indent=1))


def _feature_dim(clip: torch.nn.Module, spec: PreprocessSpec, device: torch.device) -> int:
    dim = getattr(clip.visual, "output_dim", None)
    if isinstance(dim, int):
        return dim
    with torch.inference_mode():
        return int(clip.encode_image(torch.zeros(1, 3, *spec.size, device=device)).shape[-1])


def _process_group(env: DistEnv) -> bool:
    """Join (or create) the process group when the launcher provides a rendezvous; returns
    whether this call created it. Without one (plain SLURM tasks) ranks coordinate by files."""
    if env.world_size == 1 or not dist.is_available() or dist.is_initialized():
        return False
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return False
    dist.init_process_group(
        "gloo", rank=env.rank, world_size=env.world_size, timeout=datetime.timedelta(hours=12)
    )
    return True


def extract(
    shards: str | Sequence[str],
    output: str | Path,
    model: str | None = None,
    pretrained: str | None = "none",
    *,
    model_config: str | Path | None = None,
    classnames: str | Path | None = None,
    counts: str | Path | None = None,
    templates: Sequence[str] | None = None,
    class_info: str | Path | None = None,
    views: int = 0,
    batch_size: int = 64,
    workers: int | None = None,
    strict: bool = False,
    device: str = "auto",
    precision: str = "auto",
    dtype: str = "float16",
    split: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Extract this rank's unfinished shards into the store `output`; finalize when all are done.

    `model` defaults to the stem of `model_config` when one is given, else ViT-B-32.
    `precision` (auto, bf16, fp32) is resolved on the device and recorded in the store.

    Returns this rank's figures: shards and samples done here, seconds in total, in the
    encoder and waiting for the loader, and whether the store was completed by this call.
    """
    if views < 0 or batch_size < 1:
        raise UserInputError("--views must be >= 0 and --batch-size >= 1")
    if dtype not in DTYPES:
        raise UserInputError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if split not in ("auto", "train", "eval"):
        raise UserInputError(f"--split {split!r}: choose auto, train or eval")
    templates = check_templates(templates)
    plan = _plan(shards, output, classnames, counts, split)
    info = read_class_info(class_info, len(plan.classnames)) if class_info else None
    for template in templates:  # a missing field fails now, not after hours of encoding
        fill_template(template, plan.classnames[0], info[0] if info else None)
    env = distributed_env()
    dev = resolve_device(device, env)
    precision = resolve_precision(precision, dev, "--precision")
    model = model or (Path(model_config).stem if model_config else "ViT-B-32")
    clip, _, tokenizer = load_clip(model, pretrained, model_config, device=dev)
    spec = PreprocessSpec.from_model(clip)
    dim = _feature_dim(clip, spec, dev)
    weights = pretrained or "none"
    identity = {
        "model": model,
        "pretrained": os.path.abspath(weights) if os.path.isfile(weights) else weights,
        "model_config_sha256": file_sha256(model_config) if model_config else None,
        "dim": dim,
        "num_views": views,
        "dtype": dtype,
        "precision": precision,
        "image_size": list(spec.size),
        "view_seed": seed,
    }
    _check_identity(plan.output, identity)
    created_group = _process_group(env)
    try:
        jobs = [
            _Job(i, url)
            for i, url in take_share(list(enumerate(plan.urls)), env.rank, env.world_size)
            if read_part_record(plan.output, plan.names[i]) is None
        ]
        workers = default_workers(dev, env) if workers is None else workers
        say = print if progress else (lambda *a, **k: None)
        say(
            f"rank {env.rank}/{env.world_size} ({env.launcher}): {len(jobs)} shard(s) to encode of "
            f"{len(plan.urls)}; {model} ({weights}), dim {dim}, {views} view(s), {dev}, "
            f"{precision}, {workers} loader worker(s)",
            file=sys.stderr,
        )
        prep = ImagePreprocessor(spec, views=views, seed=seed)
        settings = _Settings(
            dev, dim, views, batch_size, workers, strict, dtype, precision, progress
        )
        stats = _encode(clip, prep, jobs, plan, settings)
        stats.update(rank=env.rank, world_size=env.world_size, store=str(plan.output))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
            if dist.get_rank() == 0:
                _finalize(plan, clip, tokenizer, templates, info, identity, dev)
            dist.barrier()
            stats["finalized"] = True
        else:
            pending = [n for n in plan.names if read_part_record(plan.output, n) is None]
            if not pending:
                _finalize(plan, clip, tokenizer, templates, info, identity, dev)
            stats["finalized"] = not pending
        say(_summary(stats), file=sys.stderr)
        return stats
    finally:
        if created_group:
            dist.destroy_process_group()


def _encode(clip, prep: ImagePreprocessor, jobs: list[_Job], plan: _Plan, run: _Settings) -> dict:
    """The encoder side: batches from the loader through the image tower into shard files."""
    stats = {"shards_done": 0, "samples_done": 0, "samples_skipped": 0}
    encoder_s = wait_s = 0.0
    start = time.perf_counter()
    if jobs:
        clip = clip.to(memory_format=torch.channels_last)
        loader = DataLoader(
            _ShardBatches(jobs, prep, run.batch_size, len(plan.classnames)),
            batch_size=None,
            num_workers=run.workers,
            pin_memory=run.device.type == "cuda",
            prefetch_factor=4 if run.workers else None,
        )
        buffers: dict[int, _ShardBuffer] = {}
        bar = tqdm(total=len(jobs), unit="shard", disable=not run.progress, file=sys.stderr)
        batches = iter(loader)
        while True:
            tick = time.perf_counter()
            batch = next(batches, None)
            wait_s += time.perf_counter() - tick
            if batch is None:
                break
            buffer = buffers.setdefault(batch["job"], _ShardBuffer())
            url = plan.urls[batch["job"]]
            if run.strict and batch["problems"]:
                problem = batch["problems"][0]
                raise UserInputError(
                    f"shard {url}: sample {problem['key']}: {problem['reason']} (--strict; "
                    "without it such samples are skipped and listed in manifest.json)"
                )
            tick = time.perf_counter()
            if len(batch["keys"]):
                buffer.features.append(_encode_batch(clip, prep, batch["pixels"], run))
            encoder_s += time.perf_counter() - tick
            buffer.labels += batch["labels"].tolist()
            buffer.keys += batch["keys"]
            buffer.problems += batch["problems"]
            if batch["last"]:
                done = buffers.pop(batch["job"])
                _write_shard(plan, batch, done, run)
                stats["shards_done"] += 1
                stats["samples_done"] += len(done.keys)
                stats["samples_skipped"] += len(done.problems)
                bar.update(1)
                rate = stats["samples_done"] / (time.perf_counter() - start)
                bar.set_postfix(img_s=f"{rate:.1f}")
        bar.close()
    stats.update(
        seconds=time.perf_counter() - start, encoder_seconds=encoder_s, loader_wait_seconds=wait_s
    )
    return stats


def _encode_batch(
    clip, prep: ImagePreprocessor, pixels: torch.Tensor, run: _Settings
) -> np.ndarray:
    """[b, 1 + K, 3, H, W] uint8 pixels -> [b, 1 + K, D] float32 features."""
    b, v = pixels.shape[:2]
    x = prep.normalize(pixels.flatten(0, 1).to(run.device, non_blocking=True))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(run.device, run.precision):
        features = clip.encode_image(x)
    return features.float().cpu().numpy().reshape(b, v, -1)


def _write_shard(plan: _Plan, batch: dict, buffer: _ShardBuffer, run: _Settings) -> None:
    index = batch["job"]
    shape = (len(buffer.keys), 1 + run.views, run.dim)
    encoded = np.concatenate(buffer.features) if buffer.features else np.zeros(shape, np.float32)
    write_part(
        plan.output,
        plan.names[index],
        encoded[:, 0],
        np.asarray(buffer.labels, dtype=np.int64),
        buffer.keys,
        views=encoded[:, 1:] if run.views else None,
        dtype=run.dtype,
        url=plan.urls[index],
        skipped=buffer.problems,
        input_sha256=batch["input_sha256"],
        input_bytes=batch["input_bytes"],
    )


def _finalize(plan: _Plan, clip, tokenizer, templates, info, identity: dict, dev) -> None:
    """Text features, labels, keys, counts and, last, the manifest."""
    text = encode_classnames(
        clip,
        tokenizer,
        plan.classnames,
        templates,
        device=dev,
        class_info=info,
        precision=identity["precision"],
    )
    finalize_store(
        plan.output,
        plan.names,
        text.numpy(),
        plan.classnames,
        plan.counts,
        plan.num_base,
        **{k: v for k, v in identity.items() if k not in ("dim", "dtype", "num_views")},
        logit_scale=float(clip.logit_scale.detach().float().cpu()),
        templates=list(templates),
        split=plan.split,
        config_hash=hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(),
    )
    for stale in (plan.output / SHARD_DIR).glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


def _summary(stats: dict) -> str:
    seconds = max(stats["seconds"], 1e-9)
    line = (
        f"rank {stats['rank']}/{stats['world_size']}: {stats['samples_done']} samples from "
        f"{stats['shards_done']} shard(s) in {seconds:.1f}s "
        f"({stats['samples_done'] / seconds:.1f} img/s, encoder "
        f"{100 * stats['encoder_seconds'] / seconds:.0f}% of the time), "
        f"{stats['samples_skipped']} skipped"
    )
    if stats["finalized"]:
        return line + f"; store complete: {stats['store']}"
    return line + "; other ranks' shards are still pending (rerun to finish the store)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="shard URL(s), brace-expanded")
    parser.add_argument("--output", required=True, help="store directory (one per split)")
    parser.add_argument(
        "--model", help="open_clip model name (default: the --model-config stem, or ViT-B-32)"
    )
    parser.add_argument(
        "--pretrained", default="none", help="open_clip tag, checkpoint path, or none (random)"
    )
    parser.add_argument("--model-config", help="open_clip model config JSON (name = file stem)")
    parser.add_argument("--classnames", help="class names file (default: beside the shards)")
    parser.add_argument("--counts", help="training counts.tsv (default: beside the shards)")
    parser.add_argument(
        "--templates",
        nargs="+",
        help="prompt templates: {} = class name, {field} = a --class-info column "
        "(default 'a photo of a {}.')",
    )
    parser.add_argument(
        "--class-info", help="TSV with a header, one row per class: fields for the templates"
    )
    parser.add_argument("--views", type=int, default=0, help="augmented views per image")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per forward pass")
    parser.add_argument(
        "--workers", type=int, default=None, help="loader processes per rank (default: by device)"
    )
    parser.add_argument("--strict", action="store_true", help="stop at the first bad sample")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="autocast of the CLIP encoders, recorded in the store for predict: bf16 or fp32 "
        "(auto: bf16 on GPUs with native bf16, fp32 elsewhere) (default: auto)",
    )
    parser.add_argument("--dtype", default="float16", choices=DTYPES, help="stored feature type")
    parser.add_argument(
        "--split",
        default="auto",
        choices=("auto", "train", "eval"),
        help="train: counts = stored labels; eval: counts from counts.tsv (auto: by shard name)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the augmented views")


def main(args: argparse.Namespace) -> int:
    extract(
        args.shards,
        args.output,
        args.model,
        args.pretrained,
        model_config=args.model_config,
        classnames=args.classnames,
        counts=args.counts,
        templates=args.templates,
        class_info=args.class_info,
        views=args.views,
        batch_size=args.batch_size,
        workers=args.workers,
        strict=args.strict,
        device=args.device,
        precision=args.precision,
        dtype=args.dtype,
        split=args.split,
        seed=args.seed,
    )
    return 0

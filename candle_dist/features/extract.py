"""Encode WebDataset shards with a frozen open_clip image tower into a feature store.

Example:
  candle-dist extract --shards 'data/train-{000000..000123}.tar' --output features/train \\
      --model ViT-B-32 --pretrained openai --batch-size 256 --workers 8

--pretrained is required: an open_clip tag, a checkpoint path, or `none` for random weights
(the summary line then says RANDOM WEIGHTS: such features check the plumbing only).

Shards are split across ranks (torchrun / accelerate launch / SLURM environment variables; a
plain process is rank 0 of 1) and then across loader workers. Each input shard becomes one
feature file, written under a temporary name and renamed, so a killed run restarted with the
same command redoes only unfinished shards; features of another CLIP, class list or setting
are refused. Damaged samples (corrupt image, missing or bad label, truncated tar) are skipped;
what they cost is counted (exactly where the shard's samples record how many it holds, as
make-shards writes them), listed in manifest.json and said as LOST in the last line; --strict
stops at the first. When every shard is done, rank 0 (or, without a process group, whichever
rank finishes last) writes the text features of all class names, the labels, keys, counts and,
last, manifest.json; a store without any sample is an error and stays incomplete.
Images and class names are encoded under one autocast (--precision, candle_dist/precision.py),
recorded in the store so that `predict` encodes its images the same way.
--tokens also stores each image's final token states of the image tower ([T, W] float16 per
image, candle_dist/features/tokens.py; --token-grid G pools them to 1 + G*G tokens), streamed
into one file per shard and resumed the same way; a store's token setting cannot change.
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
    TokenWriter,
    file_sha256,
    finalize_store,
    read_part_record,
    shard_loss,
    write_part,
)
from candle_dist.features.tokens import TokenLayout, TokenTap, token_layout, token_projection
from candle_dist.features.transforms import ImagePreprocessor, PreprocessSpec
from candle_dist.outputs import check_output_dir
from candle_dist.precision import PRECISIONS, autocast, resolve_precision
from candle_dist.provenance import check_same, provenance

IDENTITY_FILE = "extract.json"
RANDOM_WEIGHTS = "none"
SHOWN = 3  # shards named in the summary line before "and N more"


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
        read, expected, damage = 0, None, {}
        for item in reader:
            if isinstance(item, TarSample):
                read += 1
                expected = _recorded_count(item) if read == 1 else expected
                prepared = self._prepare(item)
            else:  # the tar itself is damaged: nothing after this point can be read
                damage = {"damaged_after": read, "damage": item.reason.split()[0]}
                prepared = item
            if isinstance(prepared, ReadProblem):
                problems.append({"key": prepared.key, "reason": prepared.reason})
                continue
            pixels.append(prepared[0])
            labels.append(prepared[1])
            keys.append(item.key)
            if len(keys) == self.batch_size:
                yield self._batch(job, pixels, labels, keys, problems)
                pixels, labels, keys, problems = [], [], [], []
        if not damage and expected is not None and read < expected:
            problems.append(
                {
                    "key": None,
                    "reason": f"{expected - read} sample(s) missing: the shard's samples record "
                    f"{expected}, its tar holds {read}",
                }
            )
        last = self._batch(job, pixels, labels, keys, problems)
        last.update(
            last=True,
            input_sha256=reader.sha256,
            input_bytes=reader.num_bytes,
            samples_read=read,
            expected_samples=expected,
            **damage,
        )
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


def _recorded_count(sample: TarSample) -> int | None:
    """How many samples the shard holds, as make-shards records in each sample's json; None
    for shards written otherwise (a truncated one then lost an unknown number)."""
    try:
        count = json.loads(sample.fields["json"]).get("shard_samples")
    except (KeyError, ValueError, AttributeError):
        return None
    return count if isinstance(count, int) and count >= 0 else None


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
    tokens: TokenLayout | None = None


@dataclass
class _ShardBuffer:
    features: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    keys: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    tokens: TokenWriter | None = None  # streams the shard's tokens to disk as they come


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


def _check_store_dir(output: Path) -> None:
    """`output` is new, empty or a store of extract (to resume or redo): any other folder's
    files (the shards' own classnames.txt, say) would be overwritten by the store's."""
    check_output_dir(output, "--output")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not any((output / name).exists() for name in (IDENTITY_FILE, MANIFEST, SHARD_DIR)):
        raise UserInputError(
            f"--output {output}: holds other files, no feature store; choose a new or empty "
            "folder (one per split)"
        )


def _check_identity(output: Path, identity: dict, record: dict) -> None:
    """Refuse to mix features of another model, class list, dimension or setting into an
    existing store; a new store records what it is made of in extract.json first."""
    path = output / IDENTITY_FILE
    fix = f"write to a new --output, or delete {output} to start over"
    existing, source = None, None
    for candidate in (path, output / MANIFEST):
        if candidate.is_file():
            try:
                existing, source = json.loads(candidate.read_text()), candidate
            except json.JSONDecodeError:
                raise UserInputError(f"{candidate}: not valid JSON; {fix}") from None
            break
    if existing is None and any((output / SHARD_DIR).glob("*.json")):
        raise UserInputError(
            f"{output}: holds shard files of an unknown extraction (no {IDENTITY_FILE}); {fix}"
        )
    if existing is not None:
        store, command = f"store {output} ({source.name})", "this extract command"
        check_same(existing.get("provenance") or {}, record, store, command, fix=fix)
        if existing.get("tokens") != identity["tokens"]:
            raise UserInputError(
                f"{store} and {command} do not match: tokens "
                f"{_tokens_shown(existing.get('tokens'))} != {_tokens_shown(identity['tokens'])}"
                f"; {fix}"
            )
        for key, value in identity.items():
            if existing.get(key) != value:
                raise UserInputError(
                    f"{store} and {command} do not match: {key} {existing.get(key)!r} != "
                    f"{value!r}; {fix}"
                )
    if not path.is_file():
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**identity, "provenance": record}, indent=1))


def _tokens_shown(entry: dict | None) -> str:
    """A store's token setting as the options that make it."""
    if entry is None:
        return "none (no --tokens)"
    grid = "" if entry.get("grid") is None else f" --token-grid {entry['grid']}"
    return f"--tokens{grid} ({entry.get('count')} x {entry.get('width')})"


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


def _check_numbers(
    views: int, batch_size: int, workers: int | None, seed: int, dtype: str, split: str
) -> None:
    if views < 0:
        raise UserInputError(f"--views {views}: give a whole number >= 0")
    if batch_size < 1:
        raise UserInputError(f"--batch-size {batch_size}: give a whole number >= 1")
    if workers is not None and workers < 0:
        raise UserInputError(
            f"--workers {workers}: give a whole number >= 0 (0: no loader process)"
        )
    if seed < 0:
        raise UserInputError(f"--seed {seed}: give a whole number >= 0")
    if dtype not in DTYPES:
        raise UserInputError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if split not in ("auto", "train", "eval"):
        raise UserInputError(f"--split {split!r}: choose auto, train or eval")


def _check_token_options(tokens: bool, token_grid: int | None) -> None:
    """What can be told before the model is loaded (its grid bounds --token-grid from above)."""
    if token_grid is None:
        return
    if not tokens:
        raise UserInputError(
            f"--token-grid {token_grid}: pools the stored tokens, so it needs --tokens"
        )
    if token_grid < 1:
        raise UserInputError(f"--token-grid {token_grid}: give a whole number >= 1")


def _weights(pretrained: str | None) -> str:
    """The --pretrained value, required: random weights only when asked for by name."""
    if pretrained is None or not pretrained.strip():
        raise UserInputError(
            "--pretrained is required: an open_clip tag (e.g. openai), a checkpoint path, or "
            f"'{RANDOM_WEIGHTS}' for random weights (whose features mean nothing)"
        )
    return RANDOM_WEIGHTS if pretrained.strip().lower() == RANDOM_WEIGHTS else pretrained


def extract(
    shards: str | Sequence[str],
    output: str | Path,
    model: str | None = None,
    pretrained: str | None = None,
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
    tokens: bool = False,
    token_grid: int | None = None,
) -> dict:
    """Extract this rank's unfinished shards into the store `output`; finalize when all are done.

    `model` defaults to the stem of `model_config` when one is given, else ViT-B-32.
    `pretrained` is required: an open_clip tag, a checkpoint path, or "none" (random weights).
    `precision` (auto, bf16, fp32) is resolved on the device and recorded in the store.
    `tokens` also stores the image tower's final token states, pooled to a `token_grid` x
    `token_grid` grid when given (candle_dist/features/tokens.py).
    Everything the user gives is checked before anything is written.

    Returns this rank's figures: shards and samples done here, seconds in total, in the
    encoder and waiting for the loader, and whether the store was completed by this call.
    """
    _check_numbers(views, batch_size, workers, seed, dtype, split)
    _check_token_options(tokens, token_grid)
    weights = _weights(pretrained)
    _check_store_dir(Path(output))
    templates = check_templates(templates)
    plan = _plan(shards, output, classnames, counts, split)
    info = read_class_info(class_info, len(plan.classnames)) if class_info else None
    for template in templates:  # a missing field fails now, not after hours of encoding
        fill_template(template, plan.classnames[0], info[0] if info else None)
    env = distributed_env()
    dev = resolve_device(device, env)
    precision = resolve_precision(precision, dev, "--precision")
    model = model or (Path(model_config).stem if model_config else "ViT-B-32")
    clip, _, tokenizer = load_clip(model, weights, model_config, device=dev)
    spec = PreprocessSpec.from_model(clip)
    dim = _feature_dim(clip, spec, dev)
    layout = token_layout(clip.visual, model, token_grid) if tokens else None
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
        "tokens": layout.entry() if layout else None,
    }
    record = provenance(
        plan.classnames,
        model=model,
        pretrained=identity["pretrained"],
        templates=templates,
        dim=dim,
    )
    _check_identity(plan.output, identity, record)
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
            f"rank {env.rank}/{env.world_size} ({env.launcher}): {len(jobs)} shard(s) to encode "
            f"of {len(plan.urls)}; {model} ({_weights_shown(weights)}), dim {dim}, "
            f"{views} view(s), {_tokens_said(layout)}{dev}, {precision}, "
            f"{workers} loader worker(s)",
            file=sys.stderr,
        )
        prep = ImagePreprocessor(spec, views=views, seed=seed)
        settings = _Settings(
            dev, dim, views, batch_size, workers, strict, dtype, precision, progress, layout
        )
        stats = _encode(clip, prep, jobs, plan, settings)
        stats.update(rank=env.rank, world_size=env.world_size, store=str(plan.output))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
            error = None
            if dist.get_rank() == 0:
                try:
                    _finalize(plan, clip, tokenizer, templates, info, identity, dev, strict, layout)
                except Exception as err:  # every rank stops with rank 0's message, none hangs
                    error = err
            message = [None if error is None else str(error)]
            dist.broadcast_object_list(message, src=0)
            if error is not None:
                raise error
            if message[0] is not None:
                raise UserInputError(message[0])
            stats["finalized"] = True
        else:
            pending = [n for n in plan.names if read_part_record(plan.output, n) is None]
            if not pending:
                _finalize(plan, clip, tokenizer, templates, info, identity, dev, strict, layout)
            stats["finalized"] = not pending
        manifest = json.loads((plan.output / MANIFEST).read_text()) if stats["finalized"] else None
        stats.update(
            num_lost=manifest["num_lost"] if manifest else None,
            random_weights=weights == RANDOM_WEIGHTS,
        )
        say(_summary(stats, manifest), file=sys.stderr)
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
        tap = TokenTap(clip.visual, run.tokens) if run.tokens else None
        loader = DataLoader(
            _ShardBatches(jobs, prep, run.batch_size, len(plan.classnames)),
            batch_size=None,
            num_workers=run.workers,
            pin_memory=run.device.type == "cuda",
            prefetch_factor=4 if run.workers else None,
        )
        buffers: dict[int, _ShardBuffer] = {}
        bar = tqdm(total=len(jobs), unit="shard", disable=not run.progress, file=sys.stderr)
        try:
            batches = iter(loader)
            while True:
                tick = time.perf_counter()
                batch = next(batches, None)
                wait_s += time.perf_counter() - tick
                if batch is None:
                    break
                buffer = buffers.get(batch["job"])
                if buffer is None:
                    buffer = buffers[batch["job"]] = _new_buffer(plan, batch["job"], run)
                url = plan.urls[batch["job"]]
                if run.strict and batch["problems"]:
                    raise UserInputError(_strict_error(url, batch))
                tick = time.perf_counter()
                tokens = None
                if len(batch["keys"]):
                    features, tokens = _encode_batch(clip, prep, batch["pixels"], run, tap)
                    buffer.features.append(features)
                encoder_s += time.perf_counter() - tick
                if tokens is not None:
                    buffer.tokens.append(tokens)
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
        finally:
            bar.close()
            for unfinished in buffers.values():
                if unfinished.tokens is not None:
                    unfinished.tokens.discard()
            if tap is not None:
                tap.remove()
    stats.update(
        seconds=time.perf_counter() - start, encoder_seconds=encoder_s, loader_wait_seconds=wait_s
    )
    return stats


def _strict_error(url: str, batch: dict) -> str:
    """The --strict error for the first problem of a batch, naming the shard and the sample."""
    problem = batch["problems"][0]
    what = problem["reason"]
    if what.startswith(("truncated tar", "unreadable tar")):
        what = f"{what} after sample {batch.get('damaged_after')}"
    elif problem["key"] is not None:
        what = f"sample {problem['key']}: {what}"
    return (
        f"shard {url}: {what} (--strict; without it such samples are skipped, counted as LOST "
        "and listed in manifest.json)"
    )


def _new_buffer(plan: _Plan, index: int, run: _Settings) -> _ShardBuffer:
    """The buffer of a shard whose first batch has come; its tokens go straight to disk."""
    if run.tokens is None:
        return _ShardBuffer()
    count, width = run.tokens.count, run.tokens.width
    return _ShardBuffer(tokens=TokenWriter(plan.output, plan.names[index], count, width))


def _encode_batch(
    clip, prep: ImagePreprocessor, pixels: torch.Tensor, run: _Settings, tap: TokenTap | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """[b, 1 + K, 3, H, W] uint8 pixels -> [b, 1 + K, D] float32 features and, with `tap`, the
    original images' [b, T, W] float16 tokens from the same forward pass."""
    b, v = pixels.shape[:2]
    x = prep.normalize(pixels.flatten(0, 1).to(run.device, non_blocking=True))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(run.device, run.precision):
        features = clip.encode_image(x)
        tokens = tap.take(v).cpu().numpy() if tap is not None else None
    return features.float().cpu().numpy().reshape(b, v, -1), tokens


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
        tokens=buffer.tokens.close() if buffer.tokens is not None else None,
        url=plan.urls[index],
        skipped=buffer.problems,
        input_sha256=batch["input_sha256"],
        input_bytes=batch["input_bytes"],
        samples_read=batch["samples_read"],
        expected_samples=batch["expected_samples"],
        **{k: batch[k] for k in ("damaged_after", "damage") if k in batch},
    )


def _finalize(
    plan: _Plan,
    clip,
    tokenizer,
    templates,
    info,
    identity: dict,
    dev,
    strict: bool,
    layout: TokenLayout | None,
) -> None:
    """Text features, labels, keys, counts and, last, the manifest; a store without samples
    (or, with --strict, with losses, met in an earlier run) stays incomplete: an error."""
    records = [read_part_record(plan.output, name) or {} for name in plan.names]
    shards = [
        {"url": url, **record, "num_lost": shard_loss(record)[0]}
        for url, record in zip(plan.urls, records, strict=True)
    ]
    fix = "fix the shards (candle-dist make-shards) and extract them into a new --output"
    summary = {  # the loss fields of the manifest, before it is written
        "shards": shards,
        "skipped": [{"shard": r.get("name"), **p} for r in records for p in r.get("skipped", [])],
        "num_lost": sum(s["num_lost"] for s in shards),
        "num_lost_is_lower_bound": any(shard_loss(r)[1] for r in records),
    }
    if not any(record.get("num_samples") for record in records):
        lost = _losses(summary) or "the shards hold no samples"
        raise UserInputError(
            f"no sample of the {len(records)} shard(s) could be stored in {plan.output}: "
            f"{lost}; {fix} (or delete {plan.output} and rerun)"
        )
    if strict and (summary["num_lost"] or summary["num_lost_is_lower_bound"]):
        raise UserInputError(
            f"{plan.output}: {_losses(summary)}, skipped by an earlier run without --strict "
            f"(--strict); {fix}, or rerun without --strict"
        )
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
        **{k: v for k, v in identity.items() if k not in ("dim", "dtype", "num_views", "tokens")},
        tokens=identity["tokens"],
        token_projection=token_projection(clip.visual, layout) if layout else None,
        logit_scale=float(clip.logit_scale.detach().float().cpu()),
        templates=list(templates),
        split=plan.split,
        config_hash=hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(),
    )
    for stale in (plan.output / SHARD_DIR).glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


def _tokens_said(layout: TokenLayout | None) -> str:
    """The first line's word on tokens: how many of which width, when stored."""
    return f"tokens {layout.count} x {layout.width}, " if layout else ""


def _weights_shown(weights: str) -> str:
    return (
        f"RANDOM WEIGHTS: --pretrained {RANDOM_WEIGHTS}" if weights == RANDOM_WEIGHTS else weights
    )


def _shard_file(shard: dict) -> str:
    url = shard.get("url") or shard.get("name", "?")
    return url.split()[-1].rstrip("/").rsplit("/", 1)[-1]


def _losses(manifest: dict) -> str:
    """What the store lost, per shard (the first few), as one clause; "" when nothing."""
    kinds: dict[str, list[str]] = {}
    for problem in manifest["skipped"]:
        kind = problem["reason"].split(" (")[0]
        if not kind.startswith(("truncated tar", "unreadable tar")):
            kinds.setdefault(problem["shard"], [])
            if kind not in kinds[problem["shard"]]:
                kinds[problem["shard"]].append(kind)
    parts = []
    for shard in manifest["shards"]:
        lost, after = shard.get("num_lost", 0), shard.get("damaged_after")
        if after is None and not lost:
            continue
        why = kinds.get(shard.get("name"), [])[:SHOWN]
        damage = (
            None if after is None else f"{shard.get('damage', 'truncated')} after sample {after}"
        )
        if damage and shard.get("expected_samples") is None:
            before = f" ({', '.join(why)} before that)" if why else ""
            parts.append(f"{_shard_file(shard)} {damage}, the rest LOST{before}")
        else:
            why = [damage, *why] if damage else why
            parts.append(f"{lost} LOST from {_shard_file(shard)} ({', '.join(why)})")
    if len(parts) <= 1:
        return "".join(parts)
    more = f" and {len(parts) - SHOWN} more shard(s)" if len(parts) > SHOWN else ""
    total = manifest["num_lost"]
    bound = "at least " if manifest["num_lost_is_lower_bound"] else ""
    return f"{bound}{total} sample(s) LOST: {'; '.join(parts[:SHOWN])}{more}"


def _summary(stats: dict, manifest: dict | None) -> str:
    """The last line: this rank's figures and, once the store is complete, what it lost and
    whether its CLIP had random weights."""
    seconds = max(stats["seconds"], 1e-9)
    line = (
        f"rank {stats['rank']}/{stats['world_size']}: {stats['samples_done']} samples from "
        f"{stats['shards_done']} shard(s) in {seconds:.1f}s "
        f"({stats['samples_done'] / seconds:.1f} img/s, encoder "
        f"{100 * stats['encoder_seconds'] / seconds:.0f}% of the time)"
    )
    if manifest is None:
        if stats["samples_skipped"]:
            line += f", {stats['samples_skipped']} damaged sample(s) skipped"
        line += "; other ranks' shards are still pending (rerun to finish the store)"
    else:
        line += f"; store complete: {stats['store']} ({manifest['num_samples']} samples)"
        losses = _losses(manifest)
        if losses:
            line += f"; {losses} (listed in its manifest.json; --strict stops instead)"
    if stats["random_weights"]:
        line += f"; {_weights_shown(RANDOM_WEIGHTS)}, the features check the plumbing only"
    return line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="shard URL(s), brace-expanded")
    parser.add_argument("--output", required=True, help="store directory (one per split)")
    parser.add_argument(
        "--model", help="open_clip model name (default: the --model-config stem, or ViT-B-32)"
    )
    parser.add_argument(
        "--pretrained",
        help="required: open_clip tag, checkpoint path, or none (random weights, said so)",
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
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto: this rank's GPU (local rank) if CUDA is available, else the CPU",
    )
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
    parser.add_argument(
        "--tokens",
        action="store_true",
        help="also store each image's final token states of the image tower, fp16, for heads "
        "that attend within an image (ViT: class + patch tokens before proj; ResNet: mean + "
        "feature-map positions). Costly: ViT-B/16 at iNat 2018 (437,513 images) is 197 tokens "
        "x 768 x 2 bytes = 132 GB; a 7 x 7 grid (50 tokens) = 34 GB",
    )
    parser.add_argument(
        "--token-grid",
        type=int,
        default=None,
        metavar="G",
        help="with --tokens: average-pool the patch grid (ResNet: feature map) to G x G, "
        "token 0 kept first: 1 + G*G tokens (default: not set, every token)",
    )


def main(args: argparse.Namespace) -> int:
    try:
        _run(args)
    except OSError as err:  # a disk or permission problem met while writing the store
        raise UserInputError(
            f"{err.filename or args.output}: {err.strerror or err}; check the path, its "
            "permissions and free space, then rerun the same command (finished shards are kept)"
        ) from None
    return 0


def _run(args: argparse.Namespace) -> None:
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
        tokens=args.tokens,
        token_grid=args.token_grid,
    )

"""Build the offline tiny CLIP: open_clip's "tiny-clip" pretrained on synthetic captioned images.

Example:
  candle-dist pretrain-tiny --seed 0

The demo needs a CLIP whose zero-shot and new-class accuracy mean something, without downloads.
This trains the small open_clip architecture in candle_dist/model_configs/tiny-clip.json (a
small ModifiedResNet image tower, which learns shapes in far fewer CPU steps than a ViT of the
same cost, and a 4-layer text transformer) with the CLIP contrastive loss on drawn images of
(colour, texture, shape) classes whose captions compose the attributes. Training shows every
attribute value and attribute pair but holds out a fixed quarter of the combinations, so those
classes are recognized by name only. The checkpoint (a state dict that
`open_clip.create_model_and_transforms("tiny-clip", pretrained=PATH)` loads) and a JSON of its
zero-shot accuracy go to the cache directory: --cache-dir, else $CANDLE_DIST_CACHE, else
$XDG_CACHE_HOME/candle_dist, else ~/.cache/candle_dist. About 3 minutes on a shared 2-core
machine (one thread, so the result is the same on every machine); later calls reuse the file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from tqdm import tqdm

from candle_dist.cache import default_cache_dir
from candle_dist.data.synthetic_images import (
    COLOURS,
    SHAPES,
    TEXTURES,
    VisualClass,
    all_classes,
    render,
    synthetic_classes,
)
from candle_dist.errors import UserInputError

MODEL_NAME = "tiny-clip"
CONFIG_PATH = Path(__file__).resolve().parent.parent / "model_configs" / f"{MODEL_NAME}.json"
PROMPT = "a photo of a {}."

DEFAULT_STEPS = 200
BATCH_SIZE = 256
IMAGES_PER_CLASS = 48  # pool of drawn images per training class, reused across steps
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.1
WARMUP_FRACTION = 0.1
# One thread: the result then does not depend on the machine's core count, and on a shared
# 2-core machine two threads ran 4x slower per step than one (threads waiting on each other).
TRAIN_THREADS = 1
RECIPE_VERSION = 1  # bump when the training recipe changes, so old cached checkpoints are not used

TRAIN_JPEG_QUALITY = (75, 95)  # shards store JPEG (make-shards uses 90): train on its artefacts

EVAL_JPEG_QUALITY = (90, 90)  # the zero-shot report sees what make-shards writes
EVAL_CLASSES = 100  # the zero-shot report: one draw of synthetic_classes(EVAL_CLASSES, seed=0)
EVAL_IMAGES_PER_CLASS = 20
EVAL_ALL_IMAGES_PER_CLASS = 4  # and over all classes of the world, with fewer images each


def _config() -> dict:
    return json.loads(CONFIG_PATH.read_text())


def image_size() -> int:
    """The side in pixels of the tiny CLIP's square input images."""
    return int(_config()["vision_cfg"]["image_size"])


def register_tiny_clip() -> None:
    """Make "tiny-clip" a model name open_clip knows (idempotent)."""
    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)


def is_held_out(cls: VisualClass) -> bool:
    """Whether pretraining never shows this combination (a fixed quarter of all combinations).

    The rule is a Latin-square pattern over attribute indices, so every attribute value and
    every pair of attribute values is still seen in some training combination.
    """
    index = SHAPES.index(cls.shape) + COLOURS.index(cls.colour) + TEXTURES.index(cls.texture)
    return index % 4 == 0


def pretraining_classes() -> list[VisualClass]:
    """The combinations the tiny CLIP sees as images during pretraining."""
    return [cls for cls in all_classes() if not is_held_out(cls)]


def _validated_steps(steps: int | None) -> int:
    if steps is None:
        return DEFAULT_STEPS
    if steps < 1:
        raise UserInputError(f"--steps {steps}: the tiny CLIP needs at least 1 training step")
    return steps


def checkpoint_path(
    cache_dir: str | Path | None = None, seed: int = 0, steps: int | None = None
) -> Path:
    """Where the checkpoint for this seed, step count, config and recipe lives (may not exist)."""
    steps = _validated_steps(steps)
    recipe = {
        "config": _config(),
        "steps": steps,
        "batch_size": BATCH_SIZE,
        "images_per_class": IMAGES_PER_CLASS,
        "learning_rate": LEARNING_RATE,
        "train_jpeg_quality": TRAIN_JPEG_QUALITY,
        "recipe_version": RECIPE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"{MODEL_NAME}-seed{seed}-{digest}.pt"


def ensure_tiny_clip(
    cache_dir: str | None = None, seed: int = 0, steps: int | None = None, force: bool = False
) -> Path:
    """The cached tiny CLIP checkpoint for `seed`; built first if missing or forced."""
    path = checkpoint_path(cache_dir, seed, steps)
    if path.exists() and not force:
        return path
    if path.parent.exists() and not path.parent.is_dir():
        raise UserInputError(f"cache dir {path.parent} is a file; pass a directory as --cache-dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict, report = pretrain(seed=seed, steps=_validated_steps(steps))
    _atomic_write(
        path.with_suffix(".json"), lambda f: f.write(json.dumps(report, indent=2).encode())
    )
    _atomic_write(path, lambda f: torch.save(state_dict, f))
    return path


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary name in the same folder and rename, so readers never see half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def create_model() -> tuple[torch.nn.Module, object]:
    """A randomly initialised tiny CLIP and its tokenizer (initialised from torch's global RNG)."""
    register_tiny_clip()
    model = open_clip.create_model(MODEL_NAME)
    return model, open_clip.get_tokenizer(MODEL_NAME)


def to_model_input(images: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """uint8 images [N, H, W, 3] at the model's size -> normalized float [N, 3, H, W].

    Equal to open_clip's eval transform for this config on images already at its size (the
    resize and centre crop are then the identity), so pretraining sees what extraction will.
    """
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255 - mean) / std


def draw_images(
    classes: list[VisualClass],
    per_class: int,
    rng: np.random.Generator,
    size: int,
    jpeg_quality: tuple[int, int],
    desc: str,
) -> torch.Tensor:
    """uint8 [len(classes) * per_class, size, size, 3], class-major, each through a JPEG round
    trip at a quality drawn from the inclusive range `jpeg_quality`, as shards store images."""
    images = np.empty((len(classes) * per_class, size, size, 3), dtype=np.uint8)
    for i, cls in enumerate(tqdm(classes, desc=desc, unit="class", leave=False)):
        for j in range(per_class):
            buffer = io.BytesIO()
            quality = int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1))
            render(cls, rng, size).save(buffer, format="JPEG", quality=quality)
            images[i * per_class + j] = np.asarray(Image.open(buffer).convert("RGB"))
    return torch.from_numpy(images)


@torch.no_grad()
def zero_shot_correct(
    model: torch.nn.Module, tokenizer, classes: list[VisualClass], images: torch.Tensor
) -> np.ndarray:
    """Top-1 zero-shot hits [len(classes), per_class] with PROMPT, on class-major images."""
    model.eval()
    text = model.encode_text(
        tokenizer([PROMPT.format(cls.name) for cls in classes]), normalize=True
    )
    hits = []
    for batch in torch.split(images, 512):
        image = model.encode_image(to_model_input(batch, model), normalize=True)
        hits.append((image @ text.T).argmax(dim=1))
    predicted = torch.cat(hits).view(len(classes), -1)
    return (predicted == torch.arange(len(classes)).view(-1, 1)).numpy()


def evaluate(model: torch.nn.Module, tokenizer, seed: int, size: int) -> dict:
    """Zero-shot top-1 on seen and held-out combinations: a 100-class draw and all classes."""
    rng = np.random.default_rng([seed, 2])
    report = {}
    for key, classes, per_class in (
        (f"classes_{EVAL_CLASSES}", synthetic_classes(EVAL_CLASSES, seed=0), EVAL_IMAGES_PER_CLASS),
        ("classes_all", all_classes(), EVAL_ALL_IMAGES_PER_CLASS),
    ):
        images = draw_images(
            classes, per_class, rng, size, EVAL_JPEG_QUALITY, desc=f"eval images ({key})"
        )
        accuracy = zero_shot_correct(model, tokenizer, classes, images).mean(axis=1)
        held_out = np.array([is_held_out(cls) for cls in classes])
        report[key] = {
            "num_classes": len(classes),
            "num_held_out": int(held_out.sum()),
            "chance": 1 / len(classes),
            "seen_top1": float(accuracy[~held_out].mean()),
            "held_out_top1": float(accuracy[held_out].mean()),
        }
    return report


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only, as open_clip trains CLIP."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim < 2 or "token_embedding" in name or "logit_scale" in name
        (no_decay if skip else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0},
    ]
    return torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=(0.9, 0.98), eps=1e-6)


def _learning_rate(step: int, steps: int) -> float:
    warmup = max(1, int(WARMUP_FRACTION * steps))
    if step < warmup:
        return LEARNING_RATE * (step + 1) / warmup
    return LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@contextlib.contextmanager
def _isolated(seed: int) -> Iterator[None]:
    """Seed torch's RNG and use TRAIN_THREADS threads, restoring the caller's RNG and threads."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(TRAIN_THREADS)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def pretrain(seed: int = 0, steps: int = DEFAULT_STEPS) -> tuple[dict, dict]:
    """Train the tiny CLIP from scratch; returns (state dict, report). Deterministic given seed.

    Each step draws BATCH_SIZE distinct training classes, one pooled image and one random caption
    each, so the batch has no duplicate pairs and the plain CLIP loss applies.
    """
    steps = _validated_steps(steps)
    started = time.perf_counter()
    with _isolated(seed):
        model, tokenizer = create_model()
        size = image_size()
        classes = pretraining_classes()
        rng = np.random.default_rng([seed, 1])
        pool = draw_images(
            classes, IMAGES_PER_CLASS, rng, size, TRAIN_JPEG_QUALITY, desc="drawing training images"
        )
        captions = [cls.captions() for cls in classes]
        tokens = tokenizer([c for per_class in captions for c in per_class])
        tokens = tokens.view(len(classes), len(captions[0]), -1)
        batch_size = min(BATCH_SIZE, len(classes))
        optimizer = _optimizer(model)
        loss_fn = open_clip.ClipLoss()
        model.train()
        losses = []
        bar = tqdm(range(steps), desc="pretraining tiny CLIP", unit="step")
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, steps)
            picked = torch.from_numpy(rng.choice(len(classes), batch_size, replace=False))
            image_index = picked * IMAGES_PER_CLASS + torch.from_numpy(
                rng.integers(IMAGES_PER_CLASS, size=batch_size)
            )
            caption_index = torch.from_numpy(rng.integers(tokens.shape[1], size=batch_size))
            image_features, text_features, logit_scale = model(
                to_model_input(pool[image_index], model), tokens[picked, caption_index]
            )
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        report = {
            "model": MODEL_NAME,
            "seed": seed,
            "steps": steps,
            "batch_size": batch_size,
            "prompt": PROMPT,
            "pretraining_classes": len(classes),
            "held_out_classes": len(all_classes()) - len(classes),
            "final_loss": float(np.mean(losses[-10:])),
            "zero_shot": evaluate(model, tokenizer, seed, size),
            "train_seconds": round(time.perf_counter() - started, 1),
        }
    state_dict = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return state_dict, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", default=None, help="where to cache (default: see above)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument(
        "--steps", type=int, default=None, help=f"training steps (default {DEFAULT_STEPS})"
    )
    parser.add_argument("--force", action="store_true", help="retrain even if cached")


def main(args: argparse.Namespace) -> int:
    if args.seed < 0:
        raise UserInputError(f"--seed {args.seed}: give a whole number >= 0")
    if args.steps is not None and args.steps < 1:
        raise UserInputError(f"--steps {args.steps}: give a whole number >= 1")
    path = ensure_tiny_clip(args.cache_dir, seed=args.seed, steps=args.steps, force=args.force)
    report = json.loads(path.with_suffix(".json").read_text())
    print(f"tiny CLIP checkpoint: {path}")
    for key, row in report["zero_shot"].items():
        print(
            f"zero-shot top-1 over {row['num_classes']} classes ({key}): "
            f"seen {row['seen_top1']:.4f}, held-out {row['held_out_top1']:.4f} "
            f"({row['num_held_out']} held out), chance {row['chance']:.4f}"
        )
    return 0

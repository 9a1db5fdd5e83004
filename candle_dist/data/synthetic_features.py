"""Synthetic CLIP-like features: class directions, text features and long-tailed image clusters.

The geometry imitates what the Candle head sees from a frozen CLIP, at any scale, in seconds:

- class c has a random unit direction u_c in a random `intrinsic_dim`-dimensional subspace of
  the D dimensions (CLIP features have a low effective dimension; it also keeps the task's
  difficulty independent of D, depending on the number of classes as real tasks do);
- its text feature is `text_norm * n(u_c + text_noise * e_c)` (e_c a random unit vector of
  the subspace): the class name describes the class imperfectly and leans towards other
  classes, so zero-shot is well above chance but clearly below what the images teach;
- its image features are `image_norm * j * (u_c + gap + noise) / r`: a cluster around u_c
  shifted by one shared "modality gap" vector (norm `modality_gap`, any direction of the D
  dimensions); noise = Gaussian in the subspace (expected norm `image_noise`) plus isotropic
  Gaussian over all D dimensions (expected norm `ambient_noise`); a per-image norm jitter
  j = exp(N(0, norm_jitter²)); r normalizing the expected norm to `image_norm`. They are
  unnormalized, like CLIP outputs, so prototypes (means of raw features) behave as on real
  features;
- training counts are long-tailed (an exponential profile or a counts file); the last
  `num_new` classes are new: a text feature, validation images, no training images;
- validation is balanced: `val_per_class` images of every class, new ones included;
- optionally (`num_tokens` > 0) token features per image, [N, T, W] float16, as a ViT's
  output tokens before the projection to D: token 0 projects exactly onto the image feature
  (`token @ P + b`, `token_projection` = (P [W, D], b [D])), the other T-1 are patches: with
  probability `foreground` a noisier view of the class (semantic noise `token_noise`), plus one
  of `num_distractors` shared background directions; every token also has noise in the W - D
  dimensions the projection discards. Patches hold class evidence the pooled feature lacks,
  beside distractors, so a head that attends over tokens has something to find.

Everything is drawn from one seeded generator: the same arguments give the same tensors (the
tokens are drawn last, so asking for them leaves the other tensors as they were).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from candle_dist.errors import UserInputError

CLIP_LOGIT_SCALE = math.log(100.0)  # OpenAI CLIP's trained log-temperature: s = 100


@dataclass
class SyntheticFeatures:
    """Train/val image features, text features and counts of one synthetic long-tailed task.

    Classes 0..num_base_classes-1 are base (counts > 0), the rest are new (count 0).
    Training samples are ordered by class.
    """

    train_features: torch.Tensor  # [N, D] float32
    train_labels: torch.Tensor  # [N] int64
    val_features: torch.Tensor  # [M, D] float32
    val_labels: torch.Tensor  # [M] int64, val_per_class of every class
    text_features: torch.Tensor  # [C, D] float32
    counts: torch.Tensor  # [C] int64, 0 for new classes
    num_base_classes: int
    classnames: list[str]
    logit_scale: float = CLIP_LOGIT_SCALE
    train_tokens: torch.Tensor | None = None  # [N, T, W] float16 (num_tokens > 0)
    val_tokens: torch.Tensor | None = None  # [M, T, W] float16
    # (P [W, D], b [D]) float32: token 0 @ P + b is the image feature
    token_projection: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def exponential_counts(num_classes: int, max_count: int, imbalance_ratio: float) -> torch.Tensor:
    """Long-tailed counts [C]: class i gets round(max_count * ratio^(-i/(C-1))), at least 1.

    `imbalance_ratio` is max/min (iNaturalist 2018: 500; the Candle configs' "0.02" is its
    inverse, 50), so class 0 has `max_count` images and class C-1 about max_count / ratio.
    """
    if num_classes < 1:
        raise UserInputError(f"num_classes: need at least 1 class, got {num_classes}")
    if max_count < 1:
        raise UserInputError(f"max_count: need at least 1 image per class, got {max_count}")
    if imbalance_ratio < 1:
        hint = f" (did you mean {1 / imbalance_ratio:g}?)" if imbalance_ratio > 0 else ""
        raise UserInputError(
            f"imbalance_ratio: {imbalance_ratio} is below 1; it is max/min count, e.g. 100{hint}"
        )
    exponent = torch.arange(num_classes, dtype=torch.float64) / max(num_classes - 1, 1)
    counts = torch.round(max_count * float(imbalance_ratio) ** -exponent)
    return counts.clamp(min=1).long()


def load_counts_tsv(path: str | os.PathLike) -> torch.Tensor:
    """Per-class training counts [C] from a TSV of `class_id<TAB>count` lines (header allowed).

    Class ids must be 0..C-1, each once, in any order; '#' lines and blank lines are skipped.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserInputError(f"{path}: cannot read counts file ({err.strerror})") from err
    line_of: dict[int, int] = {}  # class id -> line number
    values = []
    for number, line in enumerate(lines, start=1):
        fields = line.strip().split("\t")
        if not fields[0] or fields[0].startswith("#"):
            continue
        if len(fields) != 2:
            raise UserInputError(
                f"{path}:{number}: expected 'class_id<TAB>count', got {line.strip()!r}"
            )
        try:
            class_id, count = int(fields[0]), int(fields[1])
        except ValueError:
            if not line_of:  # a header line such as "class_id<TAB>count"
                continue
            raise UserInputError(
                f"{path}:{number}: class id and count must be integers, got {line.strip()!r}"
            ) from None
        if count < 0:
            raise UserInputError(f"{path}:{number}: class {class_id} has negative count {count}")
        if class_id in line_of:
            raise UserInputError(
                f"{path}:{number}: class {class_id} already has a count on line {line_of[class_id]}"
            )
        line_of[class_id] = number
        values.append(count)
    if not line_of:
        raise UserInputError(f"{path}: no 'class_id<TAB>count' lines found")
    missing = sorted(set(range(len(line_of))) - line_of.keys())
    if missing:
        raise UserInputError(
            f"{path}: class ids must be 0..{len(line_of) - 1}, one line each; class {missing[0]} "
            f"is missing (ids given: {min(line_of)}..{max(line_of)})"
        )
    ids = list(line_of)
    counts = torch.zeros(len(ids), dtype=torch.long)
    counts[torch.tensor(ids)] = torch.tensor(values)
    return counts


def _base_counts(
    num_classes: int,
    num_new: int,
    counts: torch.Tensor | np.ndarray | Sequence[int] | None,
    imbalance_ratio: float,
    max_count: int,
) -> torch.Tensor:
    """Counts [C] with the last num_new classes at 0 and every base class at >= 1."""
    if not 0 <= num_new < num_classes:
        raise UserInputError(
            f"num_new: {num_new} must be in [0, {num_classes}); at least one class needs images"
        )
    num_base = num_classes - num_new
    if counts is None:
        base = exponential_counts(num_base, max_count, imbalance_ratio)
    else:
        given = torch.as_tensor(np.asarray(counts)).long().flatten()
        if given.numel() != num_classes:
            raise UserInputError(
                f"counts: {given.numel()} entries for num_classes = {num_classes}; "
                "give one count per class (the last num_new become new classes)"
            )
        base = given[:num_base]
        empty = torch.nonzero(base <= 0)
        if empty.numel():
            raise UserInputError(
                f"counts: base class {int(empty[0])} has {int(base[empty[0]])} images; give "
                "every base class at least one, or raise num_new to make it a new class"
            )
    return torch.cat([base, torch.zeros(num_new, dtype=torch.long)])


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def make_synthetic_features(
    num_classes: int,
    dim: int = 512,
    *,
    counts: torch.Tensor | np.ndarray | Sequence[int] | None = None,
    imbalance_ratio: float = 100.0,
    max_count: int = 100,
    num_new: int = 0,
    val_per_class: int = 10,
    seed: int = 0,
    intrinsic_dim: int = 64,
    text_noise: float = 1.0,
    image_noise: float = 1.5,
    ambient_noise: float = 0.3,
    modality_gap: float = 1.0,
    norm_jitter: float = 0.1,
    image_norm: float = 10.0,
    text_norm: float = 8.0,
    num_tokens: int = 0,
    token_dim: int | None = None,
    token_noise: float = 3.0,
    foreground: float = 0.5,
    num_distractors: int = 16,
) -> SyntheticFeatures:
    """A synthetic long-tailed task (see the module docstring for the geometry).

    Training counts: `counts` (one per class, e.g. from `load_counts_tsv`) if given, else
    `exponential_counts(num_classes - num_new, max_count, imbalance_ratio)`; either way the
    last `num_new` classes get 0. `num_tokens` > 0 adds token features of width `token_dim`
    (default `dim`; at least `dim`, so that token 0 can project onto the image feature).
    """
    if dim < 2 or intrinsic_dim < 2:
        raise UserInputError(f"dim, intrinsic_dim: must be at least 2, got {dim}, {intrinsic_dim}")
    if val_per_class < 0:
        raise UserInputError(f"val_per_class: must be >= 0, got {val_per_class}")
    noises = {"text_noise": text_noise, "image_noise": image_noise, "ambient_noise": ambient_noise}
    for name, value in noises.items():
        if value < 0:
            raise UserInputError(f"{name}: must be >= 0, got {value}")
    width = dim if token_dim is None else token_dim
    _check_token_options(num_tokens, width, dim, token_noise, foreground, num_distractors)
    train_counts = _base_counts(num_classes, num_new, counts, imbalance_ratio, max_count)

    gen = torch.Generator().manual_seed(seed)
    k = min(intrinsic_dim, dim)
    basis = torch.linalg.qr(torch.randn(dim, k, generator=gen, dtype=torch.float64))[0]
    basis = basis.T.float()  # [k, D], orthonormal rows: the semantic subspace
    directions = _unit(torch.randn(num_classes, k, generator=gen)) @ basis
    text_offsets = _unit(torch.randn(num_classes, k, generator=gen)) @ basis
    text_features = text_norm * _unit(directions + text_noise * text_offsets)
    gap = modality_gap * _unit(torch.randn(dim, generator=gen))
    # Independent random terms: E||u + gap + noise||² = 1 + gap² + image_noise² + ambient².
    scale = image_norm / math.sqrt(1 + modality_gap**2 + image_noise**2 + ambient_noise**2)

    def images(labels: torch.Tensor, noise: float = image_noise) -> torch.Tensor:
        n = labels.numel()
        semantic = torch.randn(n, k, generator=gen) @ (basis * (noise / math.sqrt(k)))
        ambient = torch.randn(n, dim, generator=gen) * (ambient_noise / math.sqrt(dim))
        jitter = torch.exp(norm_jitter * torch.randn(n, 1, generator=gen))
        return (directions[labels] + gap + semantic + ambient) * (scale * jitter)

    classes = torch.arange(num_classes)
    train_labels = torch.repeat_interleave(classes, train_counts)
    val_labels = torch.repeat_interleave(classes, val_per_class)
    data = SyntheticFeatures(
        train_features=images(train_labels),
        train_labels=train_labels,
        val_features=images(val_labels),
        val_labels=val_labels,
        text_features=text_features,
        counts=train_counts,
        num_base_classes=num_classes - num_new,
        classnames=[f"class_{i:05d}" for i in range(num_classes)],
    )
    if not num_tokens:
        return data
    # [W, D] with orthonormal columns: x @ lift.T @ lift = x for every x of the D dimensions
    lift = torch.linalg.qr(torch.randn(width, dim, generator=gen, dtype=torch.float64))[0].float()
    bias = 0.1 * image_norm / math.sqrt(dim) * torch.randn(dim, generator=gen)
    distractors = image_norm * _unit(torch.randn(num_distractors, dim, generator=gen))

    def tokens(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, patches_per_image = labels.numel(), num_tokens - 1
        patches = images(labels.repeat_interleave(patches_per_image), token_noise)
        shown = torch.rand(len(patches), 1, generator=gen) < foreground
        background = distractors[torch.randint(num_distractors, (len(patches),), generator=gen)]
        patches = torch.where(shown, patches, 0.0) + background
        rows = torch.cat([(features - bias).unsqueeze(1), patches.view(n, -1, dim)], dim=1)
        discarded = torch.randn(n, num_tokens, width, generator=gen)
        discarded = (discarded - discarded @ lift @ lift.T) * (ambient_noise * scale)
        return (rows @ lift.T + discarded).half()

    data.train_tokens = tokens(data.train_features, train_labels)
    data.val_tokens = tokens(data.val_features, val_labels)
    data.token_projection = (lift, bias)
    return data


def _check_token_options(
    num_tokens: int, width: int, dim: int, noise: float, foreground: float, distractors: int
) -> None:
    """Token options a task can be drawn with (all ignored when num_tokens is 0)."""
    if num_tokens < 0:
        raise UserInputError(f"num_tokens: must be >= 0 (0 = no tokens), got {num_tokens}")
    if not num_tokens:
        return
    if width < dim:
        raise UserInputError(
            f"token_dim: {width} is below dim = {dim}; token 0 projects onto the image feature, "
            "which needs token_dim >= dim"
        )
    if noise < 0 or not 0 <= foreground <= 1 or distractors < 1:
        raise UserInputError(
            f"token_noise {noise}, foreground {foreground}, num_distractors {distractors}: "
            "need token_noise >= 0, foreground in [0, 1] and num_distractors >= 1"
        )

"""Fast image decode + preprocess with the geometry of open_clip's eval transform.

open_clip's eval transform decodes the full JPEG, resizes its short side to the model's size
(bicubic), centre-crops and normalizes. Here the JPEG decoder itself first scales by 1/2, 1/4
or 1/8 in the DCT (`PIL.Image.draft`) down to the smallest size still at least the resized
size, and a single PIL resize with a source box then produces exactly the centre crop open_clip
would (same sampling grid, same filter). Non-JPEG inputs skip the draft and give open_clip's
result to float precision. Augmented views (`RandomResizedCrop` + horizontal flip, torchvision's
sampling rule) are drawn from a generator seeded by the sample key, so a view is the same in
every run, rank and loader worker.

Example:
    prep = ImagePreprocessor.for_model(model)
    pixels = prep(jpeg_bytes, key="train_00000042")   # [1, 3, 224, 224] float32
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
from PIL import Image

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
VIEW_SCALE = (0.08, 1.0)
VIEW_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class PreprocessSpec:
    """What an open_clip model's eval transform does: size, normalization, resize rule."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> PreprocessSpec:
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return cls(
            size=(int(size[0]), int(size[1])),
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
            interpolation=cfg.get("interpolation") or "bicubic",
            resize_mode=cfg.get("resize_mode") or "shortest",
            fill_color=int(cfg.get("fill_color") or 0),
        )

    @property
    def exact(self) -> bool:
        """Whether the fast path reproduces this transform's geometry (else open_clip's runs)."""
        square = self.size[0] == self.size[1]
        return self.resize_mode == "squash" or (self.resize_mode == "shortest" and square)

    def open_clip_transform(self):
        """open_clip's own eval transform for this spec (the baseline, and the fallback)."""
        return open_clip.image_transform(
            self.size,
            is_train=False,
            mean=self.mean,
            std=self.std,
            resize_mode=self.resize_mode,
            interpolation=self.interpolation,
            fill_color=self.fill_color,
        )


def key_seed(key: str, seed: int) -> list[int]:
    """A generator seed from the sample key: the same views wherever the sample is processed."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return [seed, int.from_bytes(digest, "little")]


def eval_box(width: int, height: int, spec: PreprocessSpec) -> tuple[float, float, float, float]:
    """The source-pixel box that open_clip's resize + centre crop maps onto the output."""
    out_h, out_w = spec.size
    if spec.resize_mode == "squash":
        return (0.0, 0.0, float(width), float(height))
    # torchvision Resize(int): short side -> size, long side -> int(size * long / short).
    if width <= height:
        new_w, new_h = out_w, int(out_w * height / width)
    else:
        new_w, new_h = int(out_h * width / height), out_h
    left = round((new_w - out_w) / 2.0)
    top = round((new_h - out_h) / 2.0)
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)


def random_crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (torchvision's rule: 10 tries, then a ratio-clamped centre crop)."""
    area = width * height
    log_ratio = (math.log(VIEW_RATIO[0]), math.log(VIEW_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*VIEW_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return (left, top, left + w, top + h)
    ratio = width / height
    if ratio < VIEW_RATIO[0]:
        w, h = width, round(width / VIEW_RATIO[0])
    elif ratio > VIEW_RATIO[1]:
        w, h = round(height * VIEW_RATIO[1]), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return (left, top, left + w, top + h)


class ImagePreprocessor:
    """Image bytes -> pixels [1 + views, 3, H, W]: the eval view, then the augmented ones.

    `pixels()` returns uint8, a quarter of float32's bytes to ship from loader workers, and
    `normalize()` turns a batch of them into the model's input on the encoder's device.
    Calling the preprocessor does both.
    """

    def __init__(self, spec: PreprocessSpec, views: int = 0, seed: int = 0, draft: bool = True):
        self.spec = spec
        self.views = views
        self.seed = seed
        self.draft = draft
        self.resample = _RESAMPLE.get(spec.interpolation, Image.Resampling.BICUBIC)
        self.mean = torch.tensor(spec.mean).mul(255.0).view(3, 1, 1)
        self.inv_std = torch.tensor(spec.std).mul(255.0).reciprocal().view(3, 1, 1)
        self.fallback = None if spec.exact else spec.open_clip_transform()

    @classmethod
    def for_model(cls, model: torch.nn.Module, views: int = 0, seed: int = 0):
        return cls(PreprocessSpec.from_model(model), views=views, seed=seed)

    def __call__(self, data: bytes, key: str = "") -> torch.Tensor:
        return self.normalize(self.pixels(data, key))

    def pixels(self, data: bytes, key: str = "") -> torch.Tensor:
        """uint8 [1 + views, 3, H, W] (already normalized float when open_clip's own
        transform has to run, i.e. for resize modes the fast path does not reproduce)."""
        image, original_size, scale = self.decode(data)
        views = [self.eval_view(image, original_size, scale)]
        if self.views:
            rng = np.random.default_rng(key_seed(key, self.seed))
            views += [self.random_view(image, rng) for _ in range(self.views)]
        if self.fallback is not None:
            views = [views[0]] + [self.normalize(v) for v in views[1:]]
        return torch.stack(views)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (any leading dims) -> float32 model input; float input passes through."""
        if pixels.dtype != torch.uint8:
            return pixels
        mean, inv_std = self.mean.to(pixels.device), self.inv_std.to(pixels.device)
        return pixels.float().sub_(mean).mul_(inv_std)

    def decode(self, data: bytes) -> tuple[Image.Image, tuple[int, int], float]:
        """RGB image, reduced in the JPEG decoder when allowed: (image, original size, factor)."""
        image = Image.open(io.BytesIO(data))
        original_size = image.size
        scale = 1.0
        if self.draft and image.format == "JPEG":
            out_h, out_w = self.spec.size
            # Random crops can be small: keep twice the output size for them.
            factor = 2 if self.views else 1
            drafted = image.draft("RGB", (factor * out_w, factor * out_h))
            if drafted is not None:
                scale = original_size[0] / drafted[1][2]
        return (image if image.mode == "RGB" else image.convert("RGB")), original_size, scale

    def eval_view(
        self, image: Image.Image, original_size: tuple[int, int], scale: float
    ) -> torch.Tensor:
        if self.fallback is not None:
            return self.fallback(image)
        box = tuple(c / scale for c in eval_box(*original_size, self.spec))
        return self.to_tensor(image.resize(self.spec.size[::-1], self.resample, box=box))

    def random_view(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        box = random_crop_box(*image.size, rng)
        out = image.resize(self.spec.size[::-1], self.resample, box=box)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.to_tensor(out)

    @staticmethod
    def to_tensor(image: Image.Image) -> torch.Tensor:
        """uint8 [3, H, W]."""
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)

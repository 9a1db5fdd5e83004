"""A procedurally drawn image world: classes are (colour, texture, shape) triples, drawn in numpy.

Every class has a readable name ("red striped circle") and varied captions that compose its
attributes, so a CLIP trained on some combinations can recognize unseen ones by name. Images
vary in position, scale, rotation, colour and background noise, so telling classes apart takes
real recognition, and are a deterministic function of the random generator passed in.

Example:
    classes = synthetic_classes(100, seed=0)
    image = render(classes[0], np.random.default_rng(1))  # 64x64 RGB PIL image
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from candle_dist.errors import UserInputError

SHAPES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "hexagon",
    "heart",
    "crescent",
)
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "white", "black")
TEXTURES = ("solid", "striped", "dotted", "checkered", "outlined")

_RGB = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 40),
    "green": (35, 165, 55),
    "cyan": (40, 205, 220),
    "blue": (35, 65, 225),
    "purple": (140, 45, 200),
    "pink": (250, 130, 195),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
_TEXTURE_PHRASES = {
    "solid": "a plain solid fill",
    "striped": "stripes",
    "dotted": "dots",
    "checkered": "a checkerboard pattern",
    "outlined": "only its outline drawn",
}
_CAPTION_TEMPLATES = (
    "a photo of a {name}.",
    "{a_colour} {colour} {texture} {shape}.",
    "{a_colour} {colour} {shape} with {phrase}.",
    "{a_texture} {texture} {shape} in {colour}.",
    "a picture of {a_texture} {texture} {colour} {shape}.",
    "{colour} {shape}, {texture}.",
    "a drawing of a {shape} that is {colour} and {texture}.",
    "a {shape}: {colour}, {texture}.",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(TEXTURES)


@dataclass(frozen=True)
class VisualClass:
    """One class of the synthetic world: a colour, a texture and a shape."""

    colour: str
    texture: str
    shape: str

    @property
    def name(self) -> str:
        """The readable class name used in prompts, e.g. "red striped circle"."""
        return f"{self.colour} {self.texture} {self.shape}"

    def captions(self) -> list[str]:
        """Every caption of this class: several templates that each name all three attributes."""
        fields = {
            "a_colour": _article(self.colour),
            "a_texture": _article(self.texture),
            "name": self.name,
            "colour": self.colour,
            "texture": self.texture,
            "shape": self.shape,
            "phrase": _TEXTURE_PHRASES[self.texture],
        }
        return [template.format(**fields) for template in _CAPTION_TEMPLATES]

    def caption(self, rng: np.random.Generator) -> str:
        """One of `captions()`, chosen by `rng`."""
        captions = self.captions()
        return captions[int(rng.integers(len(captions)))]


def all_classes() -> list[VisualClass]:
    """Every combination of the vocabularies, in a fixed order (shape-major)."""
    return [
        VisualClass(colour, texture, shape)
        for shape, colour, texture in itertools.product(SHAPES, COLOURS, TEXTURES)
    ]


def synthetic_classes(num_classes: int, seed: int) -> list[VisualClass]:
    """`num_classes` distinct classes drawn without replacement; the same for the same seed."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise UserInputError(
            f"num_classes={num_classes}: the synthetic world has {MAX_CLASSES} classes "
            f"({len(SHAPES)} shapes x {len(COLOURS)} colours x {len(TEXTURES)} textures); "
            f"choose 1..{MAX_CLASSES}"
        )
    order = np.random.default_rng(seed).permutation(MAX_CLASSES)
    every = all_classes()
    return [every[i] for i in order[:num_classes]]


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), float32, each [size, size]."""
    axis = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(axis, axis, indexing="xy")


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape in its own frame, where it spans about [-1, 1] (v points down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "triangle":
        return (v <= 0.75) & (v >= 1.5 * np.abs(u) - 0.95)
    if shape == "star":
        radius = np.sqrt(u * u + v * v)
        angle = np.arctan2(u, -v)
        spike = np.abs(((angle * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at tips, 0 between
        return radius <= 0.45 + 0.6 * spike
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.3)
    if shape == "diamond":
        return np.abs(u) / 0.75 + np.abs(v) <= 1.0
    if shape == "hexagon":
        au, av = np.abs(u), np.abs(v)
        return (av <= 0.85) & (0.866 * au + 0.5 * av <= 0.85)
    if shape == "heart":
        x, y = u * 1.15, -v * 1.15 + 0.25
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    if shape == "crescent":
        return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + (v + 0.1) ** 2 >= 0.62)
    raise UserInputError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def _texture_mask(
    texture: str, x: np.ndarray, y: np.ndarray, period: float, rng: np.random.Generator
) -> np.ndarray:
    """Where the secondary colour goes, in rotated pixel coordinates (pattern size in pixels)."""
    if texture in ("solid", "outlined"):
        return np.zeros(x.shape, dtype=bool)
    px, py = rng.uniform(0, period, size=2)
    if texture == "striped":
        return ((x + px) % period) < period / 2
    if texture == "checkered":
        return (np.floor((x + px) / period * 1.25) + np.floor((y + py) / period * 1.25)) % 2 == 0
    if texture == "dotted":
        dx = (x + px) % period - period / 2
        dy = (y + py) % period - period / 2
        return dx * dx + dy * dy <= (0.3 * period) ** 2
    raise UserInputError(f"unknown texture {texture!r}; known textures: {', '.join(TEXTURES)}")


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion by `steps` pixels (4-neighbourhood, outside the image counts as empty)."""
    out = mask.copy()
    for _ in range(steps):
        shrunk = out.copy()
        shrunk[[0, -1], :] = False
        shrunk[:, [0, -1]] = False
        shrunk[1:, :] &= out[:-1, :]
        shrunk[:-1, :] &= out[1:, :]
        shrunk[:, 1:] &= out[:, :-1]
        shrunk[:, :-1] &= out[:, 1:]
        out = shrunk
    return out


def render(cls: VisualClass, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Draw one image of `cls`: random pose, colour jitter, noisy tinted background; RGB."""
    if cls.colour not in _RGB:
        raise UserInputError(f"unknown colour {cls.colour!r}; known colours: {', '.join(COLOURS)}")
    x, y = _pixel_grid(size)
    radius = size * rng.uniform(0.24, 0.42)
    cx, cy = rng.uniform(radius, size - radius, size=2)
    theta = np.deg2rad(rng.uniform(-15.0, 15.0))
    cos, sin = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    rx = cos * (x - cx) + sin * (y - cy)  # pixel offsets in the shape's rotated frame
    ry = -sin * (x - cx) + cos * (y - cy)
    inside = _shape_mask(cls.shape, rx / radius, ry / radius)
    if cls.texture == "outlined":
        inside &= ~_erode(inside, int(rng.integers(2, 4)) * size // 64 + 1)
    period = size * rng.uniform(0.09, 0.13)
    secondary_at = _texture_mask(cls.texture, rx, ry, period, rng)

    f32 = np.float32
    base = np.asarray(_RGB[cls.colour], dtype=f32) * f32(rng.uniform(0.85, 1.1))
    base = np.clip(base + rng.normal(0, 10, size=3).astype(f32), 0, 255)
    luminance = float(base @ np.asarray([0.299, 0.587, 0.114], dtype=f32)) / 255
    secondary = base * f32(0.3) if luminance > 0.45 else base + (255 - base) * f32(0.7)

    background = (rng.uniform(70, 180) + rng.normal(0, 12, size=3)).astype(f32)  # tinted grey
    slope = rng.normal(0, 0.6, size=2).astype(f32)  # a soft lighting gradient
    ramp = slope[0] * (x - f32(size / 2)) + slope[1] * (y - f32(size / 2))
    image = background + ramp[..., None]
    image[inside] = base
    image[inside & secondary_at] = secondary
    noise = rng.standard_normal((size, size, 3), dtype=f32) * f32(rng.uniform(4, 14))
    image += noise
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="RGB")

"""Decode + preprocess to 224 px: ours (reduced JPEG decode) vs open_clip's transform, per core.

    python benchmarks/bench_decode.py [--images 96] [--rounds 5]

Generates iNaturalist-like JPEGs (800 px long side, quality 90, three aspect ratios), then
times, on one thread, open_clip's ViT-B-32 eval transform on a plain PIL decode against
`candle_dist.features.transforms.ImagePreprocessor`. Fidelity: cosine and PSNR of the pixel
tensors, and cosine of ViT-B-32 (random init, the only weights offline) image features, with
the cosine between features of different images as the scale of that last number.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from report import write_section

from candle_dist.features.clip_loading import load_clip
from candle_dist.features.transforms import ImagePreprocessor, PreprocessSpec

SIZES = ((800, 600), (600, 800), (800, 800))


def photo_like_jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """Smooth colour fields, shapes with edges and sensor-like noise: photo-sized JPEGs."""
    width, height = size
    coarse = (rng.random((height // 50 + 2, width // 50 + 2, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(20, 160))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse((x - r, y - r // 2, x + r, y + r // 2), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 6, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def images_per_second(fn, images: list[bytes], rounds: int) -> list[float]:
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for data in images:
            fn(data)
        rates.append(len(images) / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    images = [photo_like_jpeg(rng, SIZES[i % len(SIZES)]) for i in range(args.images)]
    model, plain_transform, _ = load_clip("ViT-B-32", "none")
    ours = ImagePreprocessor(PreprocessSpec.from_model(model))

    def plain(data: bytes) -> torch.Tensor:
        return plain_transform(Image.open(io.BytesIO(data)).convert("RGB"))

    plain_rates, our_rates = [], []
    for _ in range(args.rounds):  # interleaved, so load changes hit both alike
        plain_rates += images_per_second(plain, images, 1)
        our_rates += images_per_second(ours, images, 1)
    plain_rate, our_rate = statistics.median(plain_rates), statistics.median(our_rates)

    sample = images[:32]
    a = torch.stack([plain(d) for d in sample])
    b = torch.stack([ours(d)[0] for d in sample])
    pixel_cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))
    mse = ((a - b) * torch.tensor(model.visual.preprocess_cfg["std"]).view(3, 1, 1)).pow(2)
    psnr = 10 * torch.log10(1.0 / mse.flatten(1).mean(1))
    with torch.inference_mode():
        fa, fb = model.encode_image(a), model.encode_image(b)
    feature_cos = torch.nn.functional.cosine_similarity(fa, fb)
    across = torch.nn.functional.cosine_similarity(fa, fa.roll(1, 0))

    fmin = feature_cos.min()
    mean_kb = sum(map(len, images)) / len(images) / 1024
    body = f"""
{args.images} generated JPEGs, 800 px long side (800x600, 600x800, 800x800), quality 90,
{mean_kb:.0f} KB on average; preprocessing to ViT-B-32's 224 px eval input on one thread
(`torch.set_num_threads(1)`), median of {args.rounds} interleaved rounds.

| path | images/s per core | ratio |
|---|---|---|
| open_clip eval transform on a plain PIL decode | {plain_rate:.1f} | 1.00 |
| ours: JPEG draft decode + one box resize | {our_rate:.1f} | {our_rate / plain_rate:.2f} |

Fidelity on {len(sample)} images (ours vs plain):

| measure | median | min |
|---|---|---|
| pixel tensor cosine | {pixel_cos.median():.5f} | {pixel_cos.min():.5f} |
| PSNR of 0..1 pixels (dB) | {psnr.median():.1f} | {psnr.min():.1f} |
| ViT-B-32 image feature cosine (random init) | {feature_cos.median():.5f} | {fmin:.5f} |
| same, between *different* images (scale) | {across.median():.5f} | {across.min():.5f} |

Random-init features are the only ones available offline; the pixel-level figures do not
depend on weights.
"""
    print(body)
    write_section("decode", "Decode + preprocess: reduced JPEG decode vs open_clip", body)


if __name__ == "__main__":
    main()

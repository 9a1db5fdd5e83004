"""Top-k class names with scores, as JSON lines, from a trained run's exported classifier.

Example:
  candle-dist predict --checkpoint runs/demo/candle_cla/final photos/ bird.jpg --top-k 3
  candle-dist predict --checkpoint runs/x/final 'shards/val-{000000..000003}.tar'
  candle-dist predict --checkpoint runs/x/final features/val      # a feature store
  candle-dist predict --checkpoint runs/x/final feats.npy         # [N, D] features

Inputs are image files, folders of images, WebDataset shards (brace expansion allowed), feature
stores or .npy feature arrays. Images are encoded with the CLIP that made the training features
and under the same autocast (both recorded in the checkpoint; --model/--pretrained/--precision
override them), so the classifier scores features like those it was trained on. Predictions use
the exported classifier, so a sample's scores never depend on the rest of its batch (see
candle_dist/classifier.py for why the head's own test forward does, in every mask mode).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from candle_dist.errors import UserInputError
from candle_dist.precision import PRECISIONS, autocast, resolve_precision

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="images, folders, shards, stores or .npy")
    parser.add_argument("--checkpoint", required=True, help="a run's final/ directory")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", help="JSON lines file (default: standard output)")
    parser.add_argument("--model", help="override the CLIP model name")
    parser.add_argument("--pretrained", help="override the CLIP weights (tag, path or none)")
    parser.add_argument("--model-config", help="open_clip model config JSON for --model")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="autocast of the image encoder (default: the one the training features were "
        "extracted with; auto where the checkpoint does not record it)",
    )


class _Encoder:
    """Lazily loaded frozen CLIP image tower + the fast eval preprocessing + its autocast."""

    def __init__(self, clip_info: dict, args: argparse.Namespace, device: torch.device):
        self.info, self.args, self.device = clip_info or {}, args, device
        self.model = self.prep = self.precision = None

    def __call__(self, images: list[bytes], keys: list[str]) -> torch.Tensor:
        if self.model is None:
            from candle_dist.features.clip_loading import load_clip
            from candle_dist.features.transforms import ImagePreprocessor

            name = self.args.model or self.info.get("model")
            pretrained = self.args.pretrained or self.info.get("pretrained")
            if not name or not pretrained:
                raise UserInputError(
                    f"{self.args.checkpoint}: the checkpoint does not record which CLIP made its "
                    "features (trained from arrays?): pass --model and --pretrained"
                )
            self.precision = self._precision()
            self.model, _, _ = load_clip(name, pretrained, self.args.model_config, self.device)
            self.prep = ImagePreprocessor.for_model(self.model)
        pixels = []
        for data, key in zip(images, keys, strict=True):
            try:
                pixels.append(self.prep(data, key)[0])
            except Exception as err:  # PIL raises many types for damaged files
                raise UserInputError(f"{key}: not a readable image ({err})") from None
        with torch.inference_mode(), autocast(self.device, self.precision):
            batch = torch.stack(pixels).to(self.device)
            return self.model.encode_image(batch).float().cpu()

    def _precision(self) -> str:
        """--precision, else the precision the training features were extracted with."""
        if self.args.precision:
            return resolve_precision(self.args.precision, self.device, "--precision")
        recorded = self.info.get("precision")
        if recorded is None:
            precision = resolve_precision("auto", self.device)
            print(
                f"candle-dist predict: {self.args.checkpoint} does not record the precision of "
                f"its features (extracted before it was recorded); encoding in {precision} (the "
                "auto rule); pass --precision to choose",
                file=sys.stderr,
            )
            return precision
        try:
            return resolve_precision(recorded, self.device, "--precision")
        except UserInputError as err:
            raise UserInputError(
                f"{self.args.checkpoint}: its features were extracted in {recorded}, but {err}"
            ) from None


def _image_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _batches(inputs: list[str], batch_size: int) -> Iterator[tuple[str, list[str], object]]:
    """('features', keys, array) or ('images', keys, list of bytes) batches, input by input."""
    from candle_dist.data.shards import ReadProblem, TarReader, expand_urls

    for item in inputs:
        path = Path(item)
        if item.endswith(".npy"):
            if not path.exists():
                raise UserInputError(f"{item} does not exist")
            array = np.load(path, mmap_mode="r")
            if array.ndim != 2:
                raise UserInputError(f"{item}: expected a [N, D] feature array, got {array.shape}")
            for s in range(0, len(array), batch_size):
                keys = [f"{item}:{i}" for i in range(s, min(s + batch_size, len(array)))]
                yield "features", keys, np.array(array[s : s + batch_size], dtype=np.float32)
        elif path.is_dir() and (path / "manifest.json").exists():
            from candle_dist.features.store import FeatureStore

            store = FeatureStore(path)
            for s in range(0, len(store), batch_size):
                rows = np.array(store.features[s : s + batch_size], dtype=np.float32)
                yield "features", list(store.keys[s : s + batch_size]), rows
        elif ".tar" in item:
            pending_keys, pending = [], []
            for url in expand_urls(item):
                if (
                    Path(url).suffix == ".tar"
                    and not url.startswith("pipe:")
                    and not Path(url).exists()
                ):
                    raise UserInputError(f"shard {url} does not exist")
                for sample in TarReader(url):
                    if isinstance(sample, ReadProblem):
                        print(
                            f"candle-dist predict: skipped {url}: {sample.reason}", file=sys.stderr
                        )
                        continue
                    field = next((f for f in IMAGE_FIELDS if f in sample.fields), None)
                    if field is None:
                        continue
                    pending_keys.append(f"{url}:{sample.key}")
                    pending.append(sample.fields[field])
                    if len(pending) == batch_size:
                        yield "images", pending_keys, pending
                        pending_keys, pending = [], []
            if pending:
                yield "images", pending_keys, pending
        elif path.is_dir() or path.is_file():
            files = _image_files(path) if path.is_dir() else [path]
            if not files:
                raise UserInputError(
                    f"{item}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            for s in range(0, len(files), batch_size):
                chunk = files[s : s + batch_size]
                yield "images", [str(f) for f in chunk], [f.read_bytes() for f in chunk]
        else:
            raise UserInputError(
                f"{item} does not exist (expected an image, a folder, shards, a store or .npy)"
            )


def main(args: argparse.Namespace) -> int:
    from candle_dist.classifier import ExportedClassifier

    final = Path(args.checkpoint)
    classifier_file = final / "classifier.pt"
    if not classifier_file.exists():
        raise UserInputError(
            f"{classifier_file} does not exist: --checkpoint must be the final/ directory of a "
            "finished `candle-dist train` run"
        )
    try:
        classifier = ExportedClassifier.load(classifier_file)
    except (ValueError, RuntimeError) as err:
        raise UserInputError(str(err)) from None
    meta_file = final / "head_meta.json"
    clip_info = json.loads(meta_file.read_text()).get("clip") if meta_file.exists() else None
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    encode = _Encoder(clip_info, args, device)
    out = open(args.output, "w") if args.output else sys.stdout  # noqa: SIM115
    try:
        for kind, keys, payload in _batches(args.inputs, args.batch_size):
            features = torch.as_tensor(payload) if kind == "features" else encode(payload, keys)
            if features.shape[-1] != classifier.dim:
                raise UserInputError(
                    f"{keys[0]}: features have dimension {features.shape[-1]} but the classifier "
                    f"expects {classifier.dim}: use the CLIP the head was trained with"
                )
            for key, top in zip(keys, classifier.topk(features, args.top_k), strict=True):
                record = {
                    "input": key,
                    "topk": [{"class": c, "score": round(s, 4)} for c, s in top],
                }
                out.write(json.dumps(record) + "\n")
    finally:
        if args.output:
            out.close()
    return 0

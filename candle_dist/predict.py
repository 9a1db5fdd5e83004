"""Top-k classes as JSON lines, from a trained run's exported classifier.

Each line: {"input": ..., "topk": [{"id", "class", "score", "prob"}, ...]}: the class id and
name, the score (the head's logit, CLIP's scale s = exp(logit_scale) included) and `prob`, the
softmax of the scores over all classes at temperature 1.

Example:
  candle-dist predict --checkpoint runs/demo/candle_cla/seed-0/final photos/ bird.jpg --top-k 3
  candle-dist predict --checkpoint runs/x/final 'shards/val-{000000..000003}.tar'
  candle-dist predict --checkpoint runs/x/final features/val      # a feature store
  candle-dist predict --checkpoint runs/x/final feats.npy         # [N, D] features
  candle-dist predict --checkpoint exports/x feats.npy            # a `candle-dist export` dir

Inputs are image files, folders of images, WebDataset shards (brace expansion allowed), feature
stores or .npy feature arrays. Images are encoded with the CLIP that made the training features
and under the same autocast (both recorded in the checkpoint; --model/--pretrained/--precision
override them, but only to restate the recorded CLIP: features of another CLIP, or a store
extracted with one, are refused), so the classifier scores features like those it was trained
on. With --output, the file appears only when every input was read. Predictions use
the exported classifier, so a sample's scores never depend on the rest of its batch (see
candle_dist/classifier.py for why the head's own test forward does, in every mask mode).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from candle_dist import provenance as prov
from candle_dist.errors import UserInputError
from candle_dist.precision import PRECISIONS, autocast, resolve_precision

if TYPE_CHECKING:
    from candle_dist.classifier import ExportedClassifier

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
# the CLIP fields of features, compared between the checkpoint and what predict is given (the
# class list and templates make the text side, which the exported classifier carries itself)
FEATURE_FIELDS = ("dim", "model", "pretrained")
UNKNOWN_CLIP = "arrays"  # what FeatureStore.from_arrays records for features of unknown origin


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="images, folders, shards, stores or .npy")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a run's final/ directory or a directory written by `candle-dist export`",
    )
    parser.add_argument("--top-k", type=int, default=5, help="classes listed per input")
    parser.add_argument("--batch-size", type=int, default=64, help="images encoded together")
    parser.add_argument("--output", help="JSON lines file (default: standard output)")
    parser.add_argument("--model", help="override the CLIP model name")
    parser.add_argument("--pretrained", help="override the CLIP weights (tag, path or none)")
    parser.add_argument("--model-config", help="open_clip model config JSON for --model")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
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


def _check_inputs(inputs: list[str], record: dict) -> None:
    """Every input exists, and every feature store holds features of the checkpoint's CLIP
    (its provenance `record`), before any prediction is made."""
    from candle_dist.data.shards import expand_urls, is_local
    from candle_dist.features.store import FeatureStore
    from candle_dist.train.data import store_provenance

    for item in inputs:
        path = Path(item)
        if _is_store(path):
            prov.check_same(
                record,
                store_provenance(FeatureStore(path)),
                "the checkpoint",
                f"store {item}",
                fix="predict on features extracted with the checkpoint's CLIP",
                fields=FEATURE_FIELDS,
            )
        elif _is_shards(item):
            for url in expand_urls(item):
                if is_local(url) and not Path(url.removeprefix("file:")).exists():
                    raise UserInputError(f"shard {url} does not exist")
        elif not path.exists():
            raise UserInputError(
                f"{item} does not exist (expected an image, a folder, shards, a store or .npy)"
            )


def _is_store(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").exists()


def _is_shards(item: str) -> bool:
    return ".tar" in item and not item.endswith(".npy") and not Path(item).is_dir()


def _batches(inputs: list[str], batch_size: int) -> Iterator[tuple[str, list[str], object]]:
    """('features', keys, array) or ('images', keys, list of bytes) batches, input by input
    (checked by `_check_inputs`)."""
    from candle_dist.data.shards import ReadProblem, TarReader, expand_urls

    for item in inputs:
        path = Path(item)
        if item.endswith(".npy"):
            try:
                array = np.load(path, mmap_mode="r")
            except OSError as err:
                raise UserInputError(f"{item}: cannot be read ({err.strerror})") from None
            except ValueError:
                raise UserInputError(
                    f"{item}: not a readable .npy array (damaged, or another format); give a "
                    "[N, D] float array written with numpy.save"
                ) from None
            if array.ndim != 2:
                raise UserInputError(f"{item}: expected a [N, D] feature array, got {array.shape}")
            for s in range(0, len(array), batch_size):
                keys = [f"{item}:{i}" for i in range(s, min(s + batch_size, len(array)))]
                yield "features", keys, np.array(array[s : s + batch_size], dtype=np.float32)
        elif _is_store(path):
            from candle_dist.features.store import FeatureStore

            store = FeatureStore(path)
            for s in range(0, len(store), batch_size):
                rows = np.array(store.features[s : s + batch_size], dtype=np.float32)
                yield "features", list(store.keys[s : s + batch_size]), rows
        elif _is_shards(item):
            pending_keys, pending = [], []
            for url in expand_urls(item):
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
        else:
            files = _image_files(path) if path.is_dir() else [path]
            if not files:
                raise UserInputError(
                    f"{item}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            for s in range(0, len(files), batch_size):
                chunk = files[s : s + batch_size]
                yield "images", [str(f) for f in chunk], [_read(f) for f in chunk]


def _read(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as err:
        raise UserInputError(f"{file}: cannot be read ({err.strerror})") from None


def _checkpoint_record(classifier, clip_info: dict | None) -> dict:
    """The provenance of the classifier's training features; for classifiers exported before
    it was recorded, their CLIP from head_meta.json."""
    record = dict(classifier.provenance)
    for key in ("model", "pretrained"):
        if record.get(key) is None and clip_info:
            record[key] = clip_info.get(key)
    if record.get("model") == UNKNOWN_CLIP:
        record["model"] = record["pretrained"] = None
    return record


def _check_clip_options(record: dict, args: argparse.Namespace) -> None:
    """--model/--pretrained may only restate the CLIP the checkpoint's features came from;
    a recorded weights file that no longer exists (moved) may be named anew."""
    weights = args.pretrained
    if weights and os.path.isfile(weights):
        weights = os.path.abspath(weights)  # as extraction records local weights
    recorded = record.get("pretrained")
    if recorded and os.path.isabs(recorded) and not os.path.exists(recorded):
        weights = None
    prov.check_same(
        record,
        {"model": args.model, "pretrained": weights},
        "the checkpoint",
        "--model/--pretrained",
        fix="drop --model/--pretrained to encode with the CLIP the checkpoint was trained on",
        fields=("model", "pretrained"),
    )


def load_classifier_and_clip(final: Path) -> tuple[ExportedClassifier, dict | None]:
    """The classifier of a run's final/ or of a `candle-dist export` directory, and the record of
    the CLIP that made its features (from head_meta.json, or the export's config.json)."""
    from candle_dist.classifier import MODEL_FILE, ExportedClassifier, read_config
    from candle_dist.model.heads import require_candle_run

    require_candle_run(final, "predict")
    exported = (final / MODEL_FILE).exists()
    classifier_file = final / "classifier.pt"
    if not exported and not classifier_file.exists():
        raise UserInputError(
            f"{final} holds neither classifier.pt nor {MODEL_FILE}: --checkpoint must be the "
            "final/ directory of a finished `candle-dist train` run or a directory written by "
            "`candle-dist export`"
        )
    try:
        if exported:
            return ExportedClassifier.load(final), read_config(final).get("clip")
        classifier = ExportedClassifier.load(classifier_file)
    except ValueError as err:
        raise UserInputError(str(err)) from None
    meta_file = final / "head_meta.json"
    try:
        clip_info = json.loads(meta_file.read_text()).get("clip") if meta_file.exists() else None
    except (OSError, ValueError, AttributeError) as err:
        raise UserInputError(
            f"{meta_file} is damaged ({err}): restore it from the training run's final/"
        ) from None
    return classifier, clip_info


def main(args: argparse.Namespace) -> int:
    from candle_dist.eval.cli import scoring_device
    from candle_dist.outputs import check_output_file

    for option, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserInputError(f"{option} {value}: give 1 or more")
    output = check_output_file(args.output, "--output") if args.output else None
    classifier, clip_info = load_classifier_and_clip(Path(args.checkpoint))
    record = _checkpoint_record(classifier, clip_info)
    _check_clip_options(record, args)
    _check_inputs(args.inputs, record)
    device = scoring_device(args.device)
    encode = _Encoder(clip_info, args, device)
    tmp = None if output is None else output.with_name(f".{output.name}.tmp-{os.getpid()}")
    out = sys.stdout if tmp is None else open(tmp, "w")  # noqa: SIM115
    try:
        for kind, keys, payload in _batches(args.inputs, args.batch_size):
            features = torch.as_tensor(payload) if kind == "features" else encode(payload, keys)
            if features.shape[-1] != classifier.dim:
                raise UserInputError(
                    f"{keys[0]}: features have dimension {features.shape[-1]} but the classifier "
                    f"expects {classifier.dim}: use the CLIP the head was trained with"
                )
            for key, top in zip(keys, classifier.predictions(features, args.top_k), strict=True):
                out.write(json.dumps({"input": key, "topk": top}) + "\n")
        if tmp is not None:
            out.close()
            os.replace(tmp, output)
    finally:
        if tmp is not None:
            out.close()
            tmp.unlink(missing_ok=True)
    return 0

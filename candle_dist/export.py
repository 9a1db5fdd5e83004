"""Export a trained run's classifier as a self-contained directory, with a model card.

Example:
  candle-dist export runs/x/final --output exports/x
  candle-dist export runs/x/final --output exports/x --format safetensors,onnx
  candle-dist export runs/x/final --output exports/x --format onnx --with-image-tower

The directory loads with `candle_dist.classifier.load(DIR)` without the training code, and
`candle-dist predict --checkpoint DIR` classifies images or features with it:
  model.safetensors  the exported classifier's tensors
  config.json        its other fields and dimensions, the CLIP that made its features (model,
                     pretrained, templates, precision) and their provenance record
  classnames.txt     the class names, one a line, in class-id order
  README.md          a model card: data, method, metrics, intended use, limits
  model.onnx         (--format onnx) image features [N, D] -> scores [N, C], checked against
                     torch with onnxruntime when written (needs candle_dist[export])
  model_with_image_tower.onnx
                     (--with-image-tower) preprocessed images [N, 3, H, W] in 0..1 -> scores
                     [N, C]: CLIP's normalization and image tower (fp32), then the classifier;
                     needs the recorded CLIP's weights locally, recorded as onnx_image_tower in
                     config.json
Everything is checked before anything is written; an earlier export at DIR is replaced whole.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

from candle_dist.errors import UserInputError

FORMATS = ("safetensors", "onnx")
ONNX_FILE = "model.onnx"
TOWER_FILE = "model_with_image_tower.onnx"
# max |onnxruntime - torch| on the scores (CLIP's scale s ~ 100 included): 1e-4, or float32's
# rounding of a D-term dot product at that scale where it is larger (measured: 2.3e-5 at D = 32,
# 8.4e-5 at D = 1024 with 10,000 classes; torch's own float32 error there is 3-6e-5)
ONNX_TOLERANCE = 1e-4


def onnx_tolerance(scores_max: float, dim: int) -> float:
    """The allowed max |onnxruntime - torch| for scores up to `scores_max` over `dim` features."""
    return max(ONNX_TOLERANCE, 8 * 2.0**-24 * scores_max * dim**0.5)


ONNX_OPSET = 17  # the first with LayerNormalization
CHECK_ROWS = 64  # random feature rows scored by both at export time
CHECK_IMAGES = 4  # random images scored by both when the image tower is exported


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a finished run's final/ directory")
    parser.add_argument(
        "--output",
        required=True,
        help="the export directory (created; an earlier export there is replaced)",
    )
    parser.add_argument(
        "--format",
        default="safetensors",
        help="comma-separated: safetensors (always written), onnx (adds model.onnx; "
        'needs pip install "candle_dist[export]")',
    )
    parser.add_argument(
        "--with-image-tower",
        action="store_true",
        help=f"with --format onnx, also write {TOWER_FILE}: preprocessed images [N, 3, H, W] "
        "in 0..1 -> scores, the recorded CLIP's image tower included (its weights must be local)",
    )


def _formats(text: str) -> list[str]:
    chosen = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise UserInputError(
            f"--format {text}: unknown format {', '.join(map(repr, unknown)) or '(none)'}; "
            f"choose from {', '.join(FORMATS)} (comma-separated)"
        )
    return chosen


def read_json(file: Path, what: str) -> dict[str, Any] | None:
    """The JSON object in `file` (None when there is no such file)."""
    if not file.exists():
        return None
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise UserInputError(f"{file} is damaged ({err}): {what}") from None
    if not isinstance(value, dict):
        raise UserInputError(f"{file} is not a JSON object: {what}")
    return value


def check_export_output(path: str) -> Path:
    """--output as a new or empty folder, or an earlier export (which is replaced)."""
    from candle_dist.classifier import MODEL_FILE
    from candle_dist.outputs import check_output_dir

    out = check_output_dir(path, "--output")
    if out.is_dir() and any(out.iterdir()) and not (out / MODEL_FILE).exists():
        raise UserInputError(
            f"--output {out} is a folder holding other files (not an earlier export: no "
            f"{MODEL_FILE}): choose a new or empty folder"
        )
    return out


def clip_record(meta: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The CLIP that made the training features: head_meta.json's, with the templates of the
    classifier's provenance."""
    clip = meta.get("clip") or {}
    return {
        "model": clip.get("model", record.get("model")),
        "pretrained": clip.get("pretrained", record.get("pretrained")),
        "model_config": clip.get("model_config"),
        "precision": clip.get("precision"),
        "templates": record.get("templates"),
    }


def _export_checked(module, example, file: Path, input_name: str, dim: int) -> float:
    """`module` traced to `file` (TorchScript exporter, batch axis dynamic); the max
    |onnxruntime - torch| of its scores of `example`, which must be within `onnx_tolerance`."""
    import numpy as np
    import onnxruntime
    import torch

    legacy = (
        {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    )
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and trace notes
        torch.onnx.export(
            module,
            (example[:2],),
            str(file),
            input_names=[input_name],
            output_names=["scores"],
            dynamic_axes={input_name: {0: "n"}, "scores": {0: "n"}},
            opset_version=ONNX_OPSET,
            **legacy,
        )
        want = module(example).numpy()
    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {input_name: example.numpy()})
    diff = float(np.abs(got.astype(np.float64) - want).max()) if got.shape == want.shape else None
    allowed = onnx_tolerance(float(np.abs(want).max()), dim)
    if diff is None or not diff <= allowed:
        raise UserInputError(
            f"{file.name}: onnxruntime's scores differ from torch's (max |diff| {diff}, shape "
            f"{got.shape} vs {want.shape}; allowed {allowed:.2g}); nothing was written: export "
            "with --format safetensors, or try other torch / onnxruntime versions"
        )
    return diff


def _write_onnx(classifier, file: Path) -> float:
    """model.onnx from the classifier's scoring module, checked on random features."""
    import torch

    features = torch.randn(CHECK_ROWS, classifier.dim, generator=torch.Generator().manual_seed(0))
    return _export_checked(
        classifier.scorer.eval(), features, file, "image_features", classifier.dim
    )


def _load_recorded_clip(clip: dict[str, Any]):
    """The CLIP the classifier's features were made by, on the CPU in fp32, from local weights
    only: an open_clip tag would download them, which an export must not depend on."""
    from candle_dist.features.clip_loading import NO_WEIGHTS, load_clip

    model, pretrained = clip.get("model"), clip.get("pretrained")
    if not model or model == "arrays" or pretrained is None:
        raise UserInputError(
            f"--with-image-tower: the run does not record the CLIP that made its features (model "
            f"{model!r}, trained from arrays?): train from a store written by `candle-dist extract`"
        )
    if pretrained.lower() not in NO_WEIGHTS and not os.path.isfile(pretrained):
        raise UserInputError(
            f"--with-image-tower: the recorded CLIP weights {pretrained!r} (model {model}) are not "
            "a local file: the weights must be available locally; export where that checkpoint "
            "exists, or drop --with-image-tower"
        )
    return load_clip(model, pretrained, clip.get("model_config"), "cpu")[0].float()


def _write_image_tower_onnx(
    classifier, clip: dict[str, Any], file: Path
) -> tuple[dict[str, Any], float]:
    """TOWER_FILE: images in 0..1 -> CLIP normalization -> encode_image (fp32) -> scores, checked
    on random images; its config.json record (file, image_size, mean, std) and the max diff."""
    import torch

    from candle_dist.features.transforms import PreprocessSpec

    class ImageTower(torch.nn.Module):
        """One graph, so that ONNX users need neither open_clip nor the normalization constants."""

        def __init__(self, model: torch.nn.Module, spec: PreprocessSpec, scorer: torch.nn.Module):
            super().__init__()
            self.model, self.scorer = model, scorer
            self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.scorer(self.model.encode_image((images - self.mean) / self.std))

    model = _load_recorded_clip(clip)
    spec = PreprocessSpec.from_model(model)
    module = ImageTower(model, spec, classifier.scorer).eval()
    images = torch.rand(CHECK_IMAGES, 3, *spec.size, generator=torch.Generator().manual_seed(0))
    diff = _export_checked(module, images, file, "images", classifier.dim)
    size = spec.size[0] if spec.size[0] == spec.size[1] else list(spec.size)
    record = {"file": file.name, "image_size": size, "mean": list(spec.mean), "std": list(spec.std)}
    return record, diff


def run_classifier(final: Path, meta: dict[str, Any]):
    """The classifier of a run's `final` (with its head_meta.json `meta`): classifier.pt, or,
    when that was written before the raw class inputs were recorded (candle_dist.classifier
    CLASS_INPUTS, which adding classes needs), the same classifier rebuilt from head.pt."""
    import torch

    from candle_dist.classifier import CLASS_INPUTS, ExportedClassifier, classifier_state

    try:
        classifier = ExportedClassifier.load(final / "classifier.pt")
    except ValueError as err:
        raise UserInputError(str(err)) from None
    head_file = final / "head.pt"
    if all(k in classifier.state for k in CLASS_INPUTS) or not head_file.is_file():
        return classifier
    from candle_dist.model.head import CandleHead

    try:
        full = torch.load(head_file, map_location="cpu", weights_only=True)
        head = CandleHead.from_state_dict(full, **meta["head_options"])
    except (KeyError, TypeError, RuntimeError, OSError) as err:
        raise UserInputError(
            f"{head_file} and head_meta.json cannot rebuild the head ({err}): restore them from "
            "the training run"
        ) from None
    state = classifier_state(head, classifier.classnames, classifier.state.get("provenance"))
    return ExportedClassifier(state)


def _number(value: float | None) -> str:
    return "n/a (no classes in this group)" if value is None else f"{value:.4f}"


def _data_section(meta: dict[str, Any], classifier) -> list[str]:
    total = len(classifier.classnames)
    base = classifier.num_base_classes
    lines = [
        "## Data",
        "",
        f"- Training features: `{meta.get('train_source') or 'not recorded'}`",
        f"- Classes: {total} ({base} base, trained on images; {total - base} new, known only "
        "by name)",
    ]
    counts = meta.get("counts")
    if counts:
        per_base = counts[:base]
        low, high = min(per_base), max(per_base)
        ratio = f"{high / low:.1f}" if low else "undefined (a base class has no images)"
        lines += [
            f"- Training images: {sum(counts)}; per base class: max {high}, min {low}; "
            f"imbalance ratio (max / min) {ratio}",
        ]
    else:
        lines.append("- Training images per class: not recorded")
    sha = classifier.provenance.get("classes_sha256")
    lines += [f"- Class list sha256 (classnames.txt): `{sha}`", ""]
    return lines


def _method_section(classifier, run_config: dict[str, Any] | None) -> list[str]:
    st = classifier.state
    lines = [
        "## Method",
        "",
        "- Candle head over frozen CLIP features: image tokens fused with visual prototypes "
        "and class text tokens by one attention layer; scores = s * cos(image, text) + "
        "s * visual_scale * cos(image, prototype), exported batch-independent (a prediction "
        "depends on its own image only)",
        f"- Mask mode: `{st['mask']}`; attention heads: {st['num_heads']}; "
        f"logit scale s: {st['scale']:.4g}; visual_scale: {st['visual_scale']:g}",
    ]
    if run_config is None:
        lines.append("- Loss: not recorded (the run's config.json was not found)")
    else:
        from candle_dist.model.losses import LOSSES, loss_options

        loss = run_config.get("loss") or {}
        name = loss.get("name")
        options = loss_options(name) if name in LOSSES else {}
        shown = ", ".join(f"{k}={loss.get(k, v)}" for k, v in options.items()) or "no options"
        optim, train = run_config.get("optim") or {}, run_config.get("train") or {}
        lines.append(f"- Loss: `{name}` ({shown})")
        lines.append(
            f"- Training: epochs {optim.get('epochs')}, batch size {optim.get('batch_size')}, "
            f"lr {optim.get('lr')}, sampler `{train.get('sampler')}`"
        )
    return [*lines, ""]


def _metrics_section(metrics: dict[str, Any] | None) -> list[str]:
    lines = ["## Metrics", ""]
    if metrics is None:
        return [
            *lines,
            "Not recorded (the run has no eval.json: it was trained without data.val); "
            "evaluate with `candle-dist eval --checkpoint RUN/final --features STORE`.",
            "",
        ]
    samples = metrics.get("num_samples") or {}
    lines += [
        f"The run's evaluation on its validation store ({samples.get('all', '?')} images; "
        "many / medium / few: base classes by their number of training images).",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    keys = ("top1", "top5", "many", "medium", "few", "base", "new", "hm")
    keys += tuple(k for k in ("balanced_accuracy", "macro_f1") if k in metrics)
    lines += [f"| {key} | {_number(metrics.get(key))} |" for key in keys if key in metrics]
    return [*lines, ""]


def _use_and_limits(clip: dict[str, Any], classifier) -> list[str]:
    model, pretrained = clip.get("model"), clip.get("pretrained")
    precision = clip.get("precision") or "not recorded"
    templates = clip.get("templates")
    prompts = f" (prompt templates {templates})" if templates else ""
    lines = [
        "## Intended use",
        "",
        f"Classify CLIP image features made by `{model}` with weights `{pretrained}` "
        f"(autocast {precision}, dimension {classifier.dim}) into the {len(classifier.classnames)}"
        " classes of classnames.txt:",
        "",
        "- images: `candle-dist predict --checkpoint DIR photos/` encodes them with that CLIP",
        "- features in Python: `candle_dist.classifier.load(DIR).scores(features)` ([N, C])",
        f"- features elsewhere: `{ONNX_FILE}` (when exported with `--format onnx`), input "
        "`image_features` [N, D], output `scores` [N, C]",
        f"- images elsewhere: `{TOWER_FILE}` (when exported with `--with-image-tower`), input "
        "`images` [N, 3, H, W] RGB in 0..1, resized and cropped as the CLIP's preprocessing does "
        "(H, W: config.json `onnx_image_tower`; normalized inside), output `scores` [N, C]",
        "",
        "## Limits",
        "",
        "- Features from another CLIP (other model, weights or preprocessing) are meaningless to "
        "this classifier; `candle-dist predict` refuses stores extracted with another one.",
        f"- The {len(classifier.classnames) - classifier.num_base_classes} new classes are "
        f"recognized through their names' text embeddings{prompts} only; expect them to be less "
        "accurate than base classes and to fail on names CLIP does not know.",
        "- Long tail: base classes with few training images are less reliable than the overall "
        "top1 suggests (see many / medium / few above); scores are not calibrated probabilities.",
    ]
    if pretrained == "none" or model == "arrays":
        lines.append(
            "- **Not a real-world model**: its features come from random CLIP weights or from "
            f"arrays of unknown origin (model `{model}`, pretrained `{pretrained}`), e.g. a "
            "synthetic demo or test run; its metrics say nothing about real images."
        )
    return [*lines, ""]


def model_card(
    classifier,
    meta: dict[str, Any],
    clip: dict[str, Any],
    run_config: dict[str, Any] | None,
    metrics: dict[str, Any] | None,
    source: Path,
) -> str:
    """README.md of an export: what the classifier was trained on and how, how well it did,
    and what it can be used for."""
    total = len(classifier.classnames)
    head = [
        f"# Candle classifier: {total} classes, CLIP `{clip.get('model')}`",
        "",
        f"Exported by `candle-dist export` from `{source}`.",
        "",
    ]
    sections = (
        _data_section(meta, classifier),
        _method_section(classifier, run_config),
        _metrics_section(metrics),
        _use_and_limits(clip, classifier),
    )
    return "\n".join(head + [line for section in sections for line in section])


def main(args: argparse.Namespace) -> int:
    from candle_dist.classifier import write_directory
    from candle_dist.model.heads import require_candle_run
    from candle_dist.outputs import staged_dir

    formats = _formats(args.format)
    if args.with_image_tower and "onnx" not in formats:
        raise UserInputError(
            f"--with-image-tower needs --format onnx (got --format {args.format}): add onnx, "
            "e.g. --format safetensors,onnx"
        )
    final = Path(args.checkpoint)
    require_candle_run(final, "export")
    classifier_file = final / "classifier.pt"
    if not classifier_file.is_file():
        raise UserInputError(
            f"{classifier_file} does not exist: CHECKPOINT must be the final/ directory of a "
            "finished `candle-dist train` run"
        )
    if "onnx" in formats:
        absent = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if absent:
            raise UserInputError(
                f'--format onnx needs {" and ".join(absent)}: pip install "candle_dist[export]"'
            )
    restore = "restore it from the training run"
    meta = read_json(final / "head_meta.json", restore)
    if meta is None:
        raise UserInputError(f"{final / 'head_meta.json'} does not exist: {restore}")
    classifier = run_classifier(final, meta)
    run_config = read_json(final.parent / "config.json", restore)
    metrics = read_json(final.parent / "eval.json", restore)
    out = check_export_output(args.output)
    clip = clip_record(meta, classifier.provenance)
    card = model_card(classifier, meta, clip, run_config, metrics, final)
    written = ["model.safetensors", "config.json", "classnames.txt", "README.md"]
    with staged_dir(out, replace=True) as tmp:
        write_directory(classifier, tmp, clip)
        (tmp / "README.md").write_text(card)
        if "onnx" in formats:
            diff = _write_onnx(classifier, tmp / ONNX_FILE)
            written.append(f"{ONNX_FILE}: onnxruntime vs torch max |diff| {diff:.2g}")
        if args.with_image_tower:
            record, diff = _write_image_tower_onnx(classifier, clip, tmp / TOWER_FILE)
            config = json.loads((tmp / "config.json").read_text())
            config["onnx_image_tower"] = record
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            written.append(f"{TOWER_FILE}: onnxruntime vs torch max |diff| {diff:.2g}")
    print(f"wrote {out} ({', '.join(written)})")
    return 0

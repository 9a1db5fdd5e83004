"""Add classes known by name (and optionally a few images) to an exported classifier, without
retraining.

Example:
  candle-dist add-classes exports/x --names new.txt --output exports/x-grown
  candle-dist add-classes runs/x/final --names new.txt --images few_shots/ --output exports/y

DIR is an export directory (`candle-dist export`) or a run's final/. Each new name is encoded by
the CLIP text tower and prompt templates the classifier records (model, pretrained, templates,
autocast precision; --class-info fills template fields such as {genus}), like the head's new
classes: its text feature goes through the trained text projection, and its prototype is that
text feature (a text-initialized virtual prototype, tied to the text). A class with images in
--images FOLDER/NAME/ gets a visual prototype instead: the mean raw image feature of those images,
encoded with the same CLIP and precision. The class tokens of all classes, old and new, are then
fused again with the trained fusion (candle_dist.classifier.class_tokens) and DIR2 is written in
the export-directory format: new classes take ids C..C+K-1 (in --names order), classnames.txt
and the provenance's class list are extended and config.json lists `added_classes`.

How existing classes' scores change (candle_dist/model/fusion.py's mask table, with no image in
the class-token fusion): class queries see class tokens in every mode, so every mode changes the
fused columns of existing classes:
  none                 prototype and text queries see all prototypes and texts: both change
  in_visual            prototype queries see themselves and all texts (the new texts change
                       them); text queries see everything: both change
  in_text              prototype queries see everything; text queries see all prototypes
                       (the new prototypes change them): both change
  between_visual_text  prototypes see prototypes, texts see texts: both change
and image queries attend to the class keys their mode allows (none, in_text: all prototypes
and texts; in_visual: the texts; between_visual_text: the prototypes), which now include the new
classes'. The result equals declaring the new classes at training time with these raw inputs and
the trained parameters (tests/test_add_classes.py). The change to existing scores is a softmax
re-weighting: on the demo (100 classes, 20 added; benchmarks/bench_add_classes.py) base accuracy
stayed 0.814 after adding, against 0.801 with the classes declared at training.
Everything is checked before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from candle_dist.errors import UserInputError

ADDED = "added_classes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", metavar="DIR", help="an export directory or a finished run's final/"
    )
    parser.add_argument(
        "--names", required=True, help="the new class names, one a line (UTF-8), in id order"
    )
    parser.add_argument(
        "--class-info",
        help="TSV with a header row, one row per new class in --names order: the fields the "
        "recorded templates name (e.g. {genus})",
    )
    parser.add_argument(
        "--images",
        help="a folder with one subfolder per new class that has images, named like the class; "
        "such a class gets the mean image feature as its prototype",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="the new export directory (created; an earlier export there is replaced)",
    )
    parser.add_argument("--device", default="auto", help="where CLIP encodes: auto, cpu, cuda")
    parser.add_argument("--batch-size", type=int, default=64, help="images encoded together")


def read_names(path: str, existing: list[str]) -> list[str]:
    """The new class names of --names: one a line, none empty, none repeated or present."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserInputError(
            f"--names {file}: cannot be read ({err}); give a UTF-8 text file"
        ) from None
    names = [line.rstrip("\r") for line in text.split("\n")]
    if names and names[-1] == "":
        names.pop()
    if not names:
        raise UserInputError(f"--names {file} is empty: give one new class name a line")
    for number, name in enumerate(names, 1):
        if not name.strip():
            raise UserInputError(f"--names {file}: line {number} is empty; remove it")
    seen: set[str] = set()
    repeated = [n for n in names if n in seen or seen.add(n)]
    if repeated:
        raise UserInputError(f"--names {file}: {repeated[0]!r} is listed twice; list it once")
    present = [n for n in names if n in set(existing)]
    if present:
        shown = ", ".join(map(repr, present[:5])) + (" ..." if len(present) > 5 else "")
        raise UserInputError(
            f"--names {file}: {len(present)} name(s) already in the classifier ({shown}); "
            "list only new classes"
        )
    return names


def image_folders(path: str, names: list[str]) -> dict[str, list[Path]]:
    """Per new class with a subfolder of --images, its image files (every subfolder must be a
    new class's and hold images)."""
    from candle_dist.predict import IMAGE_SUFFIXES

    root = Path(path)
    if not root.is_dir():
        raise UserInputError(f"--images {root}: not a folder (one subfolder per class)")
    found = {}
    wanted = set(names)
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub.name not in wanted:
            raise UserInputError(
                f"--images {root}: subfolder {sub.name!r} is not a name of --names; name each "
                "subfolder exactly like its new class"
            )
        files = sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserInputError(f"--images {sub}: no image files; add images or remove it")
        found[sub.name] = files
    if not found:
        raise UserInputError(f"--images {root}: no subfolders; make one per class with images")
    return found


def load_source(path: str) -> tuple[Any, dict[str, Any]]:
    """The classifier at DIR, with its raw class inputs, and the record of its CLIP (model,
    pretrained, model_config, precision, templates)."""
    from candle_dist.classifier import CLASS_INPUTS, MODEL_FILE
    from candle_dist.export import clip_record, read_json, run_classifier
    from candle_dist.model.heads import require_candle_run
    from candle_dist.predict import UNKNOWN_CLIP, load_classifier_and_clip

    folder = Path(path)
    require_candle_run(folder, "add-classes")
    if not (folder / MODEL_FILE).exists() and (folder / "head_meta.json").is_file():
        meta = read_json(folder / "head_meta.json", "restore it from the training run") or {}
        classifier = run_classifier(folder, meta)
        clip = clip_record(meta, classifier.provenance)
    else:
        classifier, clip = load_classifier_and_clip(folder)
        clip = clip or {}
    missing = [k for k in CLASS_INPUTS if k not in classifier.state]
    if missing:
        raise UserInputError(
            f"{folder} was exported before the raw class inputs were recorded ({', '.join(missing)}"
            " missing): re-export it from its run with this version (`candle-dist export "
            "RUN/final --output DIR`)"
        )
    if not clip.get("model") or not clip.get("pretrained") or clip["model"] == UNKNOWN_CLIP:
        raise UserInputError(
            f"{folder} does not record the CLIP that made its features (trained from arrays?): "
            "new names can only be encoded by that CLIP; train from a store written by "
            "`candle-dist extract`"
        )
    if not clip.get("templates"):
        raise UserInputError(
            f"{folder} does not record its prompt templates (exported before they were): "
            "re-export it from its run with this version"
        )
    return classifier, clip


def _precision(clip: dict[str, Any], device: torch.device) -> str:
    """The autocast the classifier's features were encoded under (auto where not recorded)."""
    from candle_dist.precision import resolve_precision

    recorded = clip.get("precision")
    if recorded is None:
        print(
            "candle-dist add-classes: the classifier does not record its features' precision; "
            "encoding under the auto rule",
            file=sys.stderr,
        )
        return resolve_precision("auto", device)
    try:
        return resolve_precision(recorded, device, "--device")
    except UserInputError as err:
        raise UserInputError(f"its features were encoded in {recorded}, but {err}") from None


def encode_new_classes(
    clip: dict[str, Any],
    names: list[str],
    info: list[dict[str, str]] | None,
    images: dict[str, list[Path]],
    device: torch.device,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prototypes, texts) [K, D] of the new classes, raw: texts from the recorded CLIP and
    templates; prototypes the mean image feature where images are given, else the text."""
    from candle_dist.features.clip_loading import load_clip
    from candle_dist.features.prompts import encode_classnames
    from candle_dist.features.transforms import ImagePreprocessor
    from candle_dist.precision import autocast

    precision = _precision(clip, device)
    model, _, tokenizer = load_clip(
        clip["model"], clip["pretrained"], clip.get("model_config"), device
    )
    texts = encode_classnames(
        model,
        tokenizer,
        names,
        clip["templates"],
        device=device,
        class_info=info,
        precision=precision,
    )
    prototypes = texts.clone()
    prep = ImagePreprocessor.for_model(model)
    for index, name in enumerate(names):
        files = images.get(name)
        if not files:
            continue
        total = torch.zeros(texts.shape[1])
        for start in range(0, len(files), batch_size):
            pixels = []
            for file in files[start : start + batch_size]:
                try:
                    pixels.append(prep(file.read_bytes(), str(file))[0])
                except Exception as err:  # PIL raises many types for damaged files
                    raise UserInputError(f"{file}: not a readable image ({err})") from None
            with torch.inference_mode(), autocast(device, precision):
                out = model.encode_image(torch.stack(pixels).to(device)).float().cpu()
            total += out.sum(0)
        prototypes[index] = total / len(files)
    return prototypes, texts


def grown_state(
    state: dict[str, Any],
    names: list[str],
    prototypes: torch.Tensor,
    texts: torch.Tensor,
    image_counts: list[int],
) -> dict[str, Any]:
    """The classifier state with `names` appended (raw inputs `prototypes`, `texts` [K, D]) and
    the class tokens of all classes fused again."""
    from candle_dist.classifier import FUSION_PARAMS, class_tokens
    from candle_dist.provenance import classes_sha256

    dtype = state["class_prototypes"].dtype
    all_protos = torch.cat([state["class_prototypes"], prototypes.to(dtype)])
    all_texts = torch.cat([state["class_texts"], texts.to(dtype)])
    params = {k: state[k] for k in (*FUSION_PARAMS, "norm_eps")}
    tokens = class_tokens(
        all_protos, all_texts, params, int(state["num_heads"]), str(state["mask"])
    )
    classnames = [*state["classnames"], *names]
    record = dict(state.get("provenance") or {})
    record.update(num_classes=len(classnames), classes_sha256=classes_sha256(classnames))
    added = [
        {"name": name, "images": count} for name, count in zip(names, image_counts, strict=True)
    ]
    return {
        **state,
        **tokens,
        "classnames": classnames,
        "provenance": record,
        "class_prototypes": all_protos,
        "class_texts": all_texts,
        ADDED: [*(state.get(ADDED) or []), *added],
    }


def main(args: argparse.Namespace) -> int:
    from candle_dist.classifier import ExportedClassifier, write_directory
    from candle_dist.eval.cli import scoring_device
    from candle_dist.export import check_export_output
    from candle_dist.features.prompts import fill_template, read_class_info
    from candle_dist.outputs import staged_dir

    if args.batch_size < 1:
        raise UserInputError(f"--batch-size {args.batch_size}: give 1 or more")
    classifier, clip = load_source(args.checkpoint)
    names = read_names(args.names, classifier.classnames)
    info = read_class_info(args.class_info, len(names)) if args.class_info else None
    for template in clip["templates"]:  # a missing field fails now, before CLIP is loaded
        fill_template(template, names[0], info[0] if info else None)
    images = image_folders(args.images, names) if args.images else {}
    out = check_export_output(args.output)
    if out.resolve() == Path(args.checkpoint).resolve():
        raise UserInputError(f"--output {out} is DIR itself: choose a new folder")
    device = scoring_device(args.device)
    prototypes, texts = encode_new_classes(clip, names, info, images, device, args.batch_size)
    counts = [len(images.get(name, ())) for name in names]
    grown = ExportedClassifier(grown_state(classifier.state, names, prototypes, texts, counts))
    with staged_dir(out, replace=True) as tmp:
        write_directory(grown, tmp, clip)
    with_images = sum(1 for c in counts if c)
    print(
        f"wrote {out}: {len(classifier.classnames)} + {len(names)} classes ({with_images} with "
        f"images, ids {len(classifier.classnames)}..{len(grown.classnames) - 1})"
    )
    return 0

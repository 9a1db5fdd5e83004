"""Write WebDataset shards (jpg, cls, json) from an image folder, a list, iNat JSON or synthetic.

Examples:
  candle-dist make-shards --synthetic --num-classes 100 --num-new 20 --output data/synth
  candle-dist make-shards --from-list ImageNet_LT_train.txt --val ImageNet_LT_val.txt \\
      --root /data/imagenet --classnames names.txt --classnames-have-ids --output data/inlt
  candle-dist make-shards --from-inat train2018.json --val val2018.json --root /data/inat \\
      --max-per-class 100 --imbalance-ratio 0.02 --new-fraction 0.5 --output data/inat

Writes OUTPUT/train-%06d.tar (base classes only, optionally subsampled to a long tail:
class i keeps max_per_class * ratio^(i / (C_base - 1)) images), OUTPUT/val-%06d.tar (every
class, balanced with --val-per-class), classnames.txt and counts.tsv. Class ids are renumbered
so that base classes are 0..C_base-1 and new classes (names only, no training images) follow;
a base class without training images is an error that names the option declaring it new
(--new-classes FILE). Files that are no images by content are skipped and listed in
skipped.tsv and the last line (--strict: an error instead). Each sample's json records how many
samples its shard holds, so that `extract` can count what a truncated shard lost.

A new OUTPUT is built in OUTPUT.partial and renamed when complete; in an existing OUTPUT,
classnames.txt and counts.tsv are written last. Sample order is a seeded shuffle; rerunning an
interrupted command writes only missing shards.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from candle_dist.data.shards import (
    atomic_write_text,
    read_classnames,
    write_classnames,
    write_counts_tsv,
    write_shard,
)
from candle_dist.errors import UserInputError
from candle_dist.outputs import check_output_dir

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
TAR_OVERHEAD = 3 * 1536 + 256  # pax + ustar headers of jpg/cls/json, plus the json body
SPLIT_CODES = {"train": 0, "val": 1}
SKIPPED_FILE = "skipped.tsv"
FINISHED_MARKERS = ("classnames.txt", "counts.tsv")  # written last: the shards are complete
SHOWN = 3  # names quoted in a message before "and N more"


@dataclass(frozen=True)
class Item:
    """One image to shard: where it comes from (relative to its root) and its source class."""

    path: str
    label: int


@dataclass
class Dataset:
    """Class names and the images of each split, in the source's own class numbering."""

    classnames: list[str]
    splits: dict[str, list[Item]]
    roots: dict[str, Path]
    synthetic: dict | None = None


@dataclass(frozen=True)
class ClassOrder:
    """Source class ids in output order: base classes first, then new classes."""

    source_ids: list[int]
    num_base: int

    def output_ids(self) -> dict[int, int]:
        return {source: out for out, source in enumerate(self.source_ids)}


def _parse_bytes(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    text = text.strip().upper().removesuffix("B")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give bytes, e.g. 500M or 1G") from None


def _classnames_file(path: str, have_ids: bool) -> tuple[list[str], list[str] | None]:
    """(names, ids): with `have_ids`, each line is 'ID NAME...' (ImageNet wnid lists)."""
    lines = read_classnames(path)
    if not have_ids:
        return lines, None
    ids, names = [], []
    for line_no, line in enumerate(lines, 1):
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise UserInputError(f"{path}:{line_no}: expected 'ID NAME', got {line!r}")
        ids.append(parts[0])
        names.append(parts[1].strip())
    return names, ids


def _images_under(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def _some(names: list[str]) -> str:
    """The first few names quoted, and how many more: a message stays one readable line."""
    shown = ", ".join(repr(name) for name in names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def _from_folder(args) -> Dataset:
    root = Path(args.from_folder)
    if not root.is_dir():
        raise UserInputError(f"--from-folder {root}: not a directory of class folders")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise UserInputError(f"--from-folder {root}: no class folders inside")
    if args.classnames:
        names, ids = _classnames_file(args.classnames, args.classnames_have_ids)
        if ids is None:
            if len(names) != len(folders):
                raise UserInputError(
                    f"{args.classnames}: {len(names)} names for {len(folders)} class folders; "
                    "give one name per folder in sorted folder order, or 'FOLDER NAME' lines "
                    "with --classnames-have-ids"
                )
            ids = folders
        unknown = sorted(set(folders) - set(ids))
        if unknown:
            raise UserInputError(
                f"{args.classnames}: no line for class folder(s) {', '.join(unknown[:5])}"
            )
    else:
        names, ids = [f.replace("_", " ") for f in folders], folders
    label_of = {folder: label for label, folder in enumerate(ids)}
    splits, roots = {}, {}
    for split, folder in (("train", root), ("val", args.val)):
        if folder is None:
            continue
        folder = Path(folder)
        if not folder.is_dir():
            raise UserInputError(f"--val {folder}: not a directory of class folders")
        items = []
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            if class_dir.name not in label_of:
                raise UserInputError(f"{class_dir}: class folder not among the training classes")
            items += [
                Item(str(p.relative_to(folder)), label_of[class_dir.name])
                for p in _images_under(class_dir)
            ]
        splits[split], roots[split] = items, folder
    return Dataset(names, splits, roots)


def _read_list(path: Path, num_classes: int) -> list[Item]:
    if not path.is_file():
        raise UserInputError(f"{path}: list file not found")
    items = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UserInputError(f"{path}:{line_no}: expected 'relative/path label', got {line!r}")
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise UserInputError(
                f"{path}:{line_no}: label {label} outside the {num_classes} class names"
            )
        items.append(Item(parts[0], label))
    return items


def _from_list(args) -> Dataset:
    if not args.classnames:
        raise UserInputError(
            "--from-list needs --classnames FILE (one name per line, line i = label i), "
            "since list files hold only numeric labels"
        )
    names, _ = _classnames_file(args.classnames, args.classnames_have_ids)
    train_list = Path(args.from_list)
    root = Path(args.root) if args.root else train_list.parent
    splits = {"train": _read_list(train_list, len(names))}
    if args.val:
        splits["val"] = _read_list(Path(args.val), len(names))
    return Dataset(names, splits, dict.fromkeys(splits, root))


def _read_inat(path: Path, category_index: dict[int, int] | None):
    if not path.is_file():
        raise UserInputError(f"{path}: iNaturalist/COCO JSON not found")
    try:
        data = json.loads(path.read_text())
        images = {image["id"]: image["file_name"] for image in data["images"]}
        annotations = data.get("annotations", [])
        categories = data["categories"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserInputError(
            f"{path}: not an iNaturalist/COCO JSON with images, annotations, categories ({err})"
        ) from None
    if category_index is None:
        ids = sorted(c["id"] for c in categories)
        category_index = {cid: i for i, cid in enumerate(ids)}
    items = []
    for annotation in annotations:
        cid = annotation["category_id"]
        if cid not in category_index or annotation["image_id"] not in images:
            raise UserInputError(
                f"{path}: annotation {annotation.get('id')} names an unknown image or category"
            )
        items.append(Item(images[annotation["image_id"]], category_index[cid]))
    return items, categories, category_index


def _from_inat(args) -> Dataset:
    train_json = Path(args.from_inat)
    items, categories, index = _read_inat(train_json, None)
    by_id = {c["id"]: c["name"] for c in categories}
    names = [by_id[cid] for cid in sorted(index, key=index.get)]
    splits = {"train": items}
    if args.val:
        splits["val"], _, _ = _read_inat(Path(args.val), index)
    root = Path(args.root) if args.root else train_json.parent
    return Dataset(names, splits, dict.fromkeys(splits, root))


def _synthetic(args) -> Dataset:
    from candle_dist.data.synthetic_images import synthetic_classes

    classes = synthetic_classes(args.num_classes, args.seed)
    per_class = {"train": args.max_per_class or 100, "val": args.val_per_class or 10}
    splits = {
        split: [Item(f"synthetic/{c}/{k}", c) for c in range(len(classes)) for k in range(n)]
        for split, n in per_class.items()
    }
    spec = {"image_size": args.image_size, "jpeg_quality": args.jpeg_quality, "seed": args.seed}
    return Dataset([c.name for c in classes], splits, {}, synthetic=spec)


def _class_ids(path: str, option: str, classnames: list[str]) -> set[int]:
    """Source ids of the classes a file lists, one class name (or source class id) a line."""
    if not Path(path).is_file():
        raise UserInputError(f"{option} {path}: file not found; give class names, one a line")
    index = {name: i for i, name in enumerate(classnames)}
    ids = set()
    for entry in read_classnames(path):
        if entry in index:
            ids.add(index[entry])
        elif entry.isdigit() and int(entry) < len(classnames):
            ids.add(int(entry))
        else:
            raise UserInputError(
                f"{option} {path}: {entry!r} is neither a class name nor a class id below "
                f"{len(classnames)}; use the names classnames.txt will hold, e.g. "
                f"{classnames[0]!r}"
            )
    return ids


def class_order(args, classnames: list[str]) -> ClassOrder:
    """Base classes first, then new ones (each in source order), from the split options: new
    classes get the highest ids whatever their names, as training expects."""
    num_classes = len(classnames)
    if args.base_classes or args.new_classes:
        if args.base_classes:
            base = _class_ids(args.base_classes, "--base-classes", classnames)
        else:
            new = _class_ids(args.new_classes, "--new-classes", classnames)
            if len(new) == num_classes:
                raise UserInputError(
                    f"--new-classes {args.new_classes}: declares all {num_classes} classes new; "
                    "training needs base classes with images: list only the classes without"
                )
            base = set(range(num_classes)) - new
        ordered = sorted(base) + [c for c in range(num_classes) if c not in base]
        return ClassOrder(ordered, len(base))
    num_new = args.num_new or 0
    if args.new_fraction is not None:
        if not 0 <= args.new_fraction < 1:
            raise UserInputError(f"--new-fraction {args.new_fraction}: give a value in [0, 1)")
        num_new = round(num_classes * args.new_fraction)
    if not 0 <= num_new < num_classes:
        raise UserInputError(f"--num-new {num_new}: the data has {num_classes} classes")
    return ClassOrder(list(range(num_classes)), num_classes - num_new)


def long_tail_caps(num_base: int, max_per_class: int | None, ratio: float | None) -> list:
    """Per base class (in output order) the most images kept: the exponential profile
    `max_per_class * ratio^(i / (C_base - 1))`, at least 1; None means no cap."""
    if ratio is None:
        return [max_per_class] * num_base
    steps = max(1, num_base - 1)
    return [max(1, int(max_per_class * ratio ** (i / steps))) for i in range(num_base)]


def select(
    items: list[Item], order: ClassOrder, caps: list, seed: int, split: str
) -> list[tuple[Item, int]]:
    """(item, output label) pairs kept for a split, in a seeded shuffled order.

    Per class a seeded random subset up to its cap; the training split keeps base classes only.
    """
    out_id = order.output_ids()
    by_class: dict[int, list[Item]] = defaultdict(list)
    for item in items:
        by_class[out_id[item.label]].append(item)
    kept = []
    for label in sorted(by_class):
        if label >= len(caps):
            continue
        members = sorted(by_class[label], key=lambda item: item.path)
        cap = caps[label]
        if cap is not None and len(members) > cap:
            rng = np.random.default_rng([seed, SPLIT_CODES[split], label])
            members = [members[i] for i in sorted(rng.choice(len(members), cap, replace=False))]
        kept += [(item, label) for item in members]
    permutation = np.random.default_rng([seed, SPLIT_CODES[split]]).permutation(len(kept))
    return [kept[i] for i in permutation]


def _image(dataset: Dataset, split: str, item: Item, classes) -> tuple[str, bytes]:
    """(webdataset field, encoded image) for one item."""
    if dataset.synthetic is not None:
        from candle_dist.data.synthetic_images import render

        spec = dataset.synthetic
        k = int(item.path.rsplit("/", 1)[1])
        rng = np.random.default_rng([spec["seed"], SPLIT_CODES[split], item.label, k])
        image = render(classes[item.label], rng, spec["image_size"])
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=spec["jpeg_quality"])
        return "jpg", buffer.getvalue()
    path = dataset.roots[split] / item.path
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserInputError(
            f"{path}: cannot read ({err.strerror}); fix the list or --root"
        ) from None
    return IMAGE_SUFFIXES.get(path.suffix.lower(), path.suffix.lower().lstrip(".") or "jpg"), data


def _not_an_image(path: Path) -> str | None:
    """Why the file at `path` is no usable image (judged by its content), or None."""
    try:
        with Image.open(path) as image:
            image.verify()
    except FileNotFoundError:
        raise UserInputError(f"{path}: image not found; fix the list/JSON or --root") from None
    except PermissionError as err:
        raise UserInputError(f"{path}: cannot read ({err.strerror}); fix its permissions") from None
    except UnidentifiedImageError:
        return "no image format recognized in its content"
    except Exception as err:  # PIL raises many types for damaged images
        return f"damaged image ({type(err).__name__}: {err})"
    return None


def drop_non_images(
    dataset: Dataset, split: str, chosen: list[tuple[Item, int]]
) -> tuple[list[tuple[Item, int]], list[tuple[str, str]]]:
    """(chosen items whose files are images, [(path, reason)] of those that are not): a file's
    name does not make it an image, and a text file packed as `x.jpg` fails only in extract."""
    if dataset.synthetic is not None:
        return chosen, []
    kept, bad = [], []
    bar = tqdm(
        chosen, unit="file", desc=f"check {split}", file=sys.stderr, leave=False, disable=None
    )
    for item, label in bar:
        path = dataset.roots[split] / item.path
        reason = _not_an_image(path)
        if reason is None:
            kept.append((item, label))
        else:
            bad.append((str(path), reason))
    return kept, bad


def plan_shards(
    dataset: Dataset, split: str, chosen: list, per_shard: int, max_bytes: int
) -> list[list[tuple[str, Item, int]]]:
    """Cut the chosen (item, label) sequence into shards of (key, item, label).

    A shard closes at `per_shard` samples or before passing `max_bytes` (file sizes; synthetic
    images are a few KB, so only the count applies to them).
    """
    shards, current, size = [], [], 0
    for index, (item, label) in enumerate(chosen):
        item_bytes = 0
        if dataset.synthetic is None:
            path = dataset.roots[split] / item.path
            if not path.is_file():
                raise UserInputError(f"{path}: image not found; fix the list/JSON or --root")
            item_bytes = path.stat().st_size + TAR_OVERHEAD
        if current and (len(current) >= per_shard or size + item_bytes > max_bytes):
            shards.append(current)
            current, size = [], 0
        current.append((f"{split}_{index:08d}", item, label))
        size += item_bytes
    if current:
        shards.append(current)
    return shards


def _plan_id(dataset: Dataset, shards: list) -> str:
    digest = hashlib.sha256(json.dumps(dataset.synthetic, sort_keys=True).encode())
    for shard in shards:
        digest.update(json.dumps([(k, i.path, lab) for k, i, lab in shard]).encode())
        digest.update(b"|")
    return digest.hexdigest()


def _read_plan(plan_file: Path) -> str | None:
    try:
        return json.loads(plan_file.read_text())["plan"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_plan(args, folder: Path, split: str, plan_id: str) -> None:
    """Refuse, before anything is changed, to mix shards of another command into `folder`."""
    previous = _read_plan(folder / f".{split}-plan.json")
    existing = any(folder.glob(f"{split}-*.tar"))
    if (existing or previous) and previous != plan_id and not args.overwrite:
        raise UserInputError(
            f"{folder}: holds {split} shards of a different make-shards command; choose a "
            "new --output, or pass --overwrite to replace them"
        )


def write_split(
    args, dataset: Dataset, split: str, shards: list, names: list[str], folder: Path
) -> None:
    """Write a split's shards into `folder`, skipping those a previous run of the same plan
    finished (`_check_plan` has allowed replacing the others)."""
    plan_file = folder / f".{split}-plan.json"
    plan_id = _plan_id(dataset, shards)
    if _read_plan(plan_file) != plan_id:
        for path in folder.glob(f"{split}-*.tar"):
            path.unlink()
    atomic_write_text(plan_file, json.dumps({"plan": plan_id, "num_shards": len(shards)}))
    for stale in folder.glob(f".{split}-*.tar.tmp-*"):  # left by a killed run
        stale.unlink()
    classes = None
    if dataset.synthetic is not None:
        from candle_dist.data.synthetic_images import synthetic_classes

        classes = synthetic_classes(args.num_classes, args.seed)
    todo = [i for i in range(len(shards)) if not (folder / f"{split}-{i:06d}.tar").is_file()]
    total = sum(len(shards[i]) for i in todo)
    with tqdm(total=total, unit="img", desc=split, file=sys.stderr) as bar:
        for i in todo:
            samples = []
            for key, item, label in shards[i]:
                field, data = _image(dataset, split, item, classes)
                meta = {
                    "path": item.path,
                    "class": names[label],
                    "source_label": item.label,
                    "shard_samples": len(shards[i]),
                }
                samples.append({"__key__": key, field: data, "cls": str(label), "json": meta})
                bar.update(1)
            write_shard(folder / f"{split}-{i:06d}.tar", samples)


def _load(args) -> Dataset:
    if args.synthetic:
        return _synthetic(args)
    if args.from_folder:
        return _from_folder(args)
    if args.from_list:
        return _from_list(args)
    return _from_inat(args)


def _check_options(args) -> Path:
    """Numbers and the output path, checked before any file is read or any folder made;
    returns the output path."""
    for option, value in (
        ("--samples-per-shard", args.samples_per_shard),
        ("--max-shard-bytes", args.max_shard_bytes),
        ("--max-per-class", args.max_per_class),
        ("--val-per-class", args.val_per_class),
        ("--num-classes", args.num_classes),
        ("--image-size", args.image_size),
    ):
        if value is not None and value < 1:
            raise UserInputError(f"{option} {value}: give a whole number >= 1")
    if args.seed < 0:
        raise UserInputError(f"--seed {args.seed}: give a whole number >= 0")
    if not 1 <= args.jpeg_quality <= 100:
        raise UserInputError(f"--jpeg-quality {args.jpeg_quality}: give 1..100")
    if args.imbalance_ratio is not None and not 0 < args.imbalance_ratio <= 1:
        raise UserInputError(
            f"--imbalance-ratio {args.imbalance_ratio}: give min/max count, in (0, 1]"
        )
    if args.synthetic and (args.val or args.classnames or args.root):
        raise UserInputError("--synthetic draws its own images: drop --val/--classnames/--root")
    return check_output_dir(args.output, "--output")


def _check_samples(args, dataset: Dataset, order: ClassOrder, names: list[str], chosen) -> None:
    """No training images, no validation images, or a base class without training images is an
    error now: training would fail (or never learn the class) stages later, not naming why."""
    kind = "folder" if args.from_folder else "list" if args.from_list else "inat"
    empty_source, fix = {
        "folder": (
            "every class folder is empty (no .jpg/.jpeg/.png/.webp files)",
            "put each class's images into its folder",
        ),
        "list": ("the list names no images", "give 'relative/path label' lines"),
        "inat": (
            "the JSON has no annotations",
            "give a JSON with annotations (a test JSON has none)",
        ),
    }[kind]
    if not chosen["train"]:
        source = f"--from-{kind} {args.from_folder or args.from_list or args.from_inat}"
        if dataset.splits["train"]:
            empty_source = "each image is of a class declared new, or not an image by content"
            fix = "declare fewer classes new, or replace the files"
        raise UserInputError(f"{source}: 0 training images: {empty_source}; {fix}")
    if "val" in chosen and not chosen["val"]:
        if dataset.splits["val"]:
            empty_source, fix = "no file is an image by content", "replace the files"
        raise UserInputError(
            f"--val {args.val}: 0 validation images: {empty_source}; {fix}, or leave out --val"
        )
    counts = np.bincount([label for _, label in chosen["train"]], minlength=len(names))
    empty = [names[c] for c in range(order.num_base) if counts[c] == 0]
    if empty:
        if args.base_classes:
            how = f"leave them out of --base-classes {args.base_classes}"
        else:
            how = (
                "declare them new (known by name only) with --new-classes FILE, one class name "
                "a line"
            )
            if args.num_new or args.new_fraction:
                how += " (in place of --num-new/--new-fraction: list every new class)"
        raise UserInputError(
            f"{len(empty)} base class(es) without training images: {_some(empty)}; {how}, "
            "or add their images"
        )


def _write_skipped(folder: Path, bad: list[tuple[str, str, str]]) -> None:
    """skipped.tsv: the files left out for not being images (none: no file, not a stale one)."""
    path = folder / SKIPPED_FILE
    if not bad:
        path.unlink(missing_ok=True)
        return
    rows = ["split\tpath\treason", *("\t".join(row) for row in bad)]
    atomic_write_text(path, "\n".join(rows) + "\n")


def _summary(output: Path, shards: dict, order: ClassOrder, names: list[str], bad: list) -> str:
    """The last line: what was written and, when files were left out, that they were."""
    samples = {
        split: sum(len(shard) for shard in split_shards) for split, split_shards in shards.items()
    }
    line = (
        f"{output}: {samples['train']} training samples of {order.num_base} base classes, "
        f"{len(names) - order.num_base} new class(es)"
    )
    if "val" in samples:
        line += f", {samples['val']} validation samples"
    if bad:
        line += (
            f"; {len(bad)} file(s) SKIPPED as not images: {_some([path for _, path, _ in bad])} "
            f"(listed in {output / SKIPPED_FILE}; --strict stops instead)"
        )
    return line


def make_shards(args: argparse.Namespace) -> None:
    """Run make-shards from parsed arguments (see `add_arguments`)."""
    output = _check_options(args)
    dataset = _load(args)
    order = class_order(args, dataset.classnames)
    names = [dataset.classnames[s] for s in order.source_ids]
    max_per_class = args.max_per_class
    if args.imbalance_ratio is not None and max_per_class is None:
        base = set(order.source_ids[: order.num_base])
        per_class = np.bincount(
            [item.label for item in dataset.splits["train"] if item.label in base] or [0]
        )
        max_per_class = int(per_class.max())
    if dataset.synthetic is not None:
        max_per_class = args.max_per_class or 100
    caps = {
        "train": long_tail_caps(order.num_base, max_per_class, args.imbalance_ratio),
        "val": [args.val_per_class] * len(names),
    }
    chosen, bad = {}, []
    for split, items in dataset.splits.items():
        picked = select(items, order, caps[split], args.seed, split)
        chosen[split], dropped = drop_non_images(dataset, split, picked)
        bad += [(split, path, reason) for path, reason in dropped]
    _check_samples(args, dataset, order, names, chosen)
    if bad and args.strict:
        _, path, reason = bad[0]
        raise UserInputError(
            f"{len(bad)} file(s) are not images by content, e.g. {path} ({reason}); fix or "
            f"remove them, or drop --strict to skip them (then listed in {SKIPPED_FILE})"
        )
    shards = {
        split: plan_shards(dataset, split, picked, args.samples_per_shard, args.max_shard_bytes)
        for split, picked in chosen.items()
    }
    folder = output if output.is_dir() else output.with_name(f"{output.name}.partial")
    for split, split_shards in shards.items():
        _check_plan(args, folder, split, _plan_id(dataset, split_shards))
    folder.mkdir(parents=True, exist_ok=True)
    for marker in FINISHED_MARKERS:
        (folder / marker).unlink(missing_ok=True)
    for split, split_shards in shards.items():
        write_split(args, dataset, split, split_shards, names, folder)
    counts = np.bincount([label for _, label in chosen["train"]], minlength=len(names))
    _write_skipped(folder, bad)
    write_classnames(folder / "classnames.txt", names)
    write_counts_tsv(folder / "counts.tsv", names, counts, order.num_base)
    if folder != output:
        os.replace(folder, output)
    for split, split_shards in shards.items():
        last = len(split_shards) - 1
        count = sum(len(shard) for shard in split_shards)
        print(
            f"{split}: {output}/{split}-{{000000..{last:06d}}}.tar ({count} samples)",
            file=sys.stderr,
        )
    print(_summary(output, shards, order, names, bad), file=sys.stderr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-folder", metavar="DIR", help="one sub-folder of images per class")
    source.add_argument("--from-list", metavar="FILE", help="'relative/path label' lines")
    source.add_argument("--from-inat", metavar="JSON", help="iNaturalist/COCO-style JSON")
    source.add_argument("--synthetic", action="store_true", help="procedurally drawn classes")
    parser.add_argument("--output", required=True, help="directory for shards and class files")
    parser.add_argument("--root", help="image root of list/JSON paths (default: their folder)")
    parser.add_argument("--val", help="validation folder/list/JSON, same format as the source")
    parser.add_argument("--classnames", help="class names, one per line (line i = class i)")
    parser.add_argument(
        "--classnames-have-ids",
        action="store_true",
        help="class-name lines are 'ID NAME' (ID = folder name, e.g. an ImageNet wnid)",
    )
    parser.add_argument(
        "--samples-per-shard", type=int, default=1000, help="samples per tar (and per feature file)"
    )
    parser.add_argument(
        "--max-shard-bytes", type=_parse_bytes, default=10**9, help="e.g. 500M (default 1G)"
    )
    parser.add_argument("--seed", type=int, default=0, help="shuffle, subsampling, synthetic")
    parser.add_argument(
        "--max-per-class", type=int, help="training images of the largest class (synthetic: 100)"
    )
    parser.add_argument(
        "--imbalance-ratio", type=float, help="smallest/largest class count, e.g. 0.02"
    )
    parser.add_argument("--val-per-class", type=int, help="validation cap per class (synthetic 10)")
    new = parser.add_mutually_exclusive_group()
    new.add_argument("--num-new", type=int, help="last N classes are new (no training images)")
    new.add_argument("--new-fraction", type=float, help="fraction of classes that are new")
    new.add_argument("--base-classes", metavar="FILE", help="base class names or ids, one a line")
    new.add_argument(
        "--new-classes",
        metavar="FILE",
        help="new class names or ids, one a line: known by name only (no training images), "
        "given the highest class ids",
    )
    parser.add_argument("--num-classes", type=int, default=100, help="synthetic classes")
    parser.add_argument("--image-size", type=int, default=64, help="synthetic image size")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="synthetic JPEG quality")
    parser.add_argument("--overwrite", action="store_true", help="replace shards of another plan")
    parser.add_argument(
        "--strict", action="store_true", help="stop at files that are not images (else skipped)"
    )


def main(args: argparse.Namespace) -> int:
    try:
        make_shards(args)
    except OSError as err:  # a disk or permission problem met while writing
        where = err.filename or args.output
        raise UserInputError(
            f"{where}: {err.strerror or err}; free space or fix permissions, then rerun the "
            "same command (finished shards are kept)"
        ) from None
    return 0

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
so that base classes are 0..C_base-1 and new classes (names only, no training images) follow.
Sample order is a seeded shuffle; rerunning an interrupted command writes only missing shards.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from candle_dist.data.shards import (
    atomic_write_text,
    read_classnames,
    write_classnames,
    write_counts_tsv,
    write_shard,
)
from candle_dist.errors import UserInputError

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
TAR_OVERHEAD = 3 * 1536 + 256  # pax + ustar headers of jpg/cls/json, plus the json body
SPLIT_CODES = {"train": 0, "val": 1}


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
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


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


def class_order(args, classnames: list[str]) -> ClassOrder:
    """Base classes first (their source order kept), then new ones, from the split options."""
    num_classes = len(classnames)
    if args.base_classes:
        wanted = read_classnames(args.base_classes)
        index = {name: i for i, name in enumerate(classnames)}
        base = set()
        for entry in wanted:
            if entry in index:
                base.add(index[entry])
            elif entry.isdigit() and int(entry) < num_classes:
                base.add(int(entry))
            else:
                raise UserInputError(
                    f"{args.base_classes}: {entry!r} is neither a class name nor a class id "
                    f"below {num_classes}"
                )
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
    if not 0 < ratio <= 1:
        raise UserInputError(f"--imbalance-ratio {ratio}: give min/max count, in (0, 1]")
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


def write_split(args, dataset: Dataset, split: str, shards: list, names: list[str]) -> None:
    """Write a split's shards, skipping those a previous run of the same plan finished."""
    output = Path(args.output)
    plan_file = output / f".{split}-plan.json"
    plan_id = _plan_id(dataset, shards)
    existing = sorted(output.glob(f"{split}-*.tar"))
    previous = json.loads(plan_file.read_text())["plan"] if plan_file.is_file() else None
    if (existing or previous) and previous != plan_id:
        if not args.overwrite:
            raise UserInputError(
                f"{output}: holds {split} shards of a different make-shards command; choose a "
                "new --output, or pass --overwrite to replace them"
            )
        for path in existing:
            path.unlink()
    atomic_write_text(plan_file, json.dumps({"plan": plan_id, "num_shards": len(shards)}))
    for stale in output.glob(f".{split}-*.tar.tmp-*"):  # left by a killed run
        stale.unlink()
    classes = None
    if dataset.synthetic is not None:
        from candle_dist.data.synthetic_images import synthetic_classes

        classes = synthetic_classes(args.num_classes, args.seed)
    todo = [i for i in range(len(shards)) if not (output / f"{split}-{i:06d}.tar").is_file()]
    total = sum(len(shards[i]) for i in todo)
    with tqdm(total=total, unit="img", desc=split, file=sys.stderr) as bar:
        for i in todo:
            samples = []
            for key, item, label in shards[i]:
                field, data = _image(dataset, split, item, classes)
                meta = {"path": item.path, "class": names[label], "source_label": item.label}
                samples.append({"__key__": key, field: data, "cls": str(label), "json": meta})
                bar.update(1)
            write_shard(output / f"{split}-{i:06d}.tar", samples)
    count = sum(len(shard) for shard in shards)
    spec = f"{output}/{split}-{{000000..{len(shards) - 1:06d}}}.tar" if shards else "no shards"
    print(f"{split}: {spec} ({count} samples)", file=sys.stderr)


def _load(args) -> Dataset:
    if args.synthetic:
        return _synthetic(args)
    if args.from_folder:
        return _from_folder(args)
    if args.from_list:
        return _from_list(args)
    return _from_inat(args)


def make_shards(args: argparse.Namespace) -> None:
    """Run make-shards from parsed arguments (see `add_arguments`)."""
    if args.samples_per_shard < 1:
        raise UserInputError("--samples-per-shard must be >= 1")
    if args.synthetic and (args.val or args.classnames or args.root):
        raise UserInputError("--synthetic draws its own images: drop --val/--classnames/--root")
    dataset = _load(args)
    order = class_order(args, dataset.classnames)
    names = [dataset.classnames[s] for s in order.source_ids]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
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
    counts = np.zeros(len(names), dtype=np.int64)
    for split, items in dataset.splits.items():
        chosen = select(items, order, caps[split], args.seed, split)
        if split == "train":
            counts = np.bincount([label for _, label in chosen], minlength=len(names))
        shards = plan_shards(dataset, split, chosen, args.samples_per_shard, args.max_shard_bytes)
        write_split(args, dataset, split, shards, names)
    empty = [names[c] for c in range(order.num_base) if counts[c] == 0]
    if empty:
        print(
            f"warning: {len(empty)} base class(es) without training images, e.g. {empty[0]!r}",
            file=sys.stderr,
        )
    write_classnames(output / "classnames.txt", names)
    write_counts_tsv(output / "counts.tsv", names, counts, order.num_base)


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
    parser.add_argument("--samples-per-shard", type=int, default=1000)
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
    parser.add_argument("--num-classes", type=int, default=100, help="synthetic classes")
    parser.add_argument("--image-size", type=int, default=64, help="synthetic image size")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="synthetic JPEG quality")
    parser.add_argument("--overwrite", action="store_true", help="replace shards of another plan")


def main(args: argparse.Namespace) -> int:
    make_shards(args)
    return 0

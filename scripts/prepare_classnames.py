"""Copy the class lists and count profile the dataset configs use into configs/data/, recording
where each came from.

Example: python scripts/prepare_classnames.py --source-dir DOWNLOADS

DOWNLOADS holds the datasets' published files under their published names (iNat 2018's
categories.json saved as inat2018_categories.json, and the Places-LT / ImageNet-LT lists).

Writes, in class-id order, one name per line (the format `candle-dist extract --classnames`
reads):
  inat2018_classnames.txt   8,142 species names from iNaturalist 2018's categories.json
  inat2018_taxonomy.tsv     the same classes with genus ... kingdom and supercategory
  imagenet_lt_classnames.txt, places_lt_classnames.txt
  places_lt_train_counts.tsv  Places-LT's real per-class training counts (365 classes)
and sources.json: for every output, its source file, the source's and the output's sha256 and
what was done to it, so a reader can check that the committed lists are the published ones.
The class-name files carry no header line because a header would be read as a class name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT_DIR = ROOT / "configs" / "data"
TAXONOMY = ("name", "genus", "family", "order", "class", "phylum", "kingdom", "supercategory")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inat2018(text: str) -> dict[str, str]:
    """Species names and taxonomy from the iNat 2018 categories.json (ids must be 0..C-1)."""
    categories = sorted(json.loads(text), key=lambda c: c["id"])
    ids = [c["id"] for c in categories]
    if ids != list(range(len(ids))):
        raise ValueError("categories.json: ids are not 0..C-1, so line index != class id")
    rows = ["id\t" + "\t".join(TAXONOMY)]
    rows += [f"{c['id']}\t" + "\t".join(str(c[k]) for k in TAXONOMY) for c in categories]
    return {
        "inat2018_classnames.txt": _lines(c["name"] for c in categories),
        "inat2018_taxonomy.tsv": "\n".join(rows) + "\n",
    }


def imagenet_lt(text: str) -> dict[str, str]:
    """`wnid name with spaces` lines -> the name (ImageNet's own names, duplicates kept)."""
    return {"imagenet_lt_classnames.txt": _lines(line.split(" ", 1)[1] for line in _rows(text))}


def places_lt(text: str) -> dict[str, str]:
    """`folder_name folder_name` lines -> readable names: `bazaar-indoor` -> `bazaar (indoor)`."""

    def readable(folder: str) -> str:
        place, _, kind = folder.partition("-")
        place = place.replace("_", " ")
        return f"{place} ({kind.replace('_', ' ')})" if kind else place

    return {"places_lt_classnames.txt": _lines(readable(line.split()[0]) for line in _rows(text))}


def places_lt_counts(text: str) -> dict[str, str]:
    """The real Places-LT per-class training counts (`class_id<TAB>count`), copied unchanged: the
    long-tailed profile synthetic features and tests draw from (`load_counts_tsv`)."""
    return {"places_lt_train_counts.tsv": text}


def _rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _lines(names) -> str:
    return "".join(f"{name}\n" for name in names)


# (dataset, source file, conversion, what the conversion does)
SOURCES: list[tuple[str, str, Callable[[str], dict[str, str]], str]] = [
    (
        "inat2018",
        "inat2018_categories.json",
        inat2018,
        "sorted by id; `name` per line; taxonomy columns to the TSV",
    ),
    ("imagenet_lt", "imagenet_lt_classnames.txt", imagenet_lt, "dropped the leading wnid"),
    (
        "places_lt",
        "places_lt_classnames.txt",
        places_lt,
        "first column; '_' -> ' ', 'place-kind' -> 'place (kind)'",
    ),
    ("places_lt", "places_lt_train_counts.tsv", places_lt_counts, "copied unchanged"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source-dir", type=Path, required=True, help="folder of the published source files"
    )
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    record = {}
    for dataset, filename, convert, how in SOURCES:
        source = args.source_dir / filename
        if not source.is_file():
            print(f"prepare_classnames: {source} not found; pass --source-dir", file=sys.stderr)
            return 2
        data = source.read_bytes()
        for name, text in convert(data.decode("utf-8")).items():
            out = args.output_dir / name
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(out)
            record[name] = {
                "dataset": dataset,
                "source": filename,
                "source_sha256": sha256(data),
                "sha256": sha256(text.encode("utf-8")),
                "lines": text.count("\n"),
                "transform": how,
                "script": "scripts/prepare_classnames.py",
            }
            print(f"{out}: {text.count(chr(10))} lines from {source}")
    sources = args.output_dir / "sources.json"
    sources.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a feature store, checkpoint or exported classifier was made from, and the check that two
stages were made from the same.

A result is meaningful only when its inputs agree: a head trained on one class list scores
columns that mean other classes in another; features from another CLIP (or other weights, or
other prompt templates) live in another space. Every artifact records its provenance — the
class list (a hash of its names and their count), the CLIP model, its pretrained tag, the prompt
templates and the feature dimension — and every consumer compares before any work starts.

    record = provenance(classnames, model="ViT-B-16", pretrained="openai",
                        templates=["a photo of a {}."], dim=512)
    check_same(store_record, checkpoint_record, "store data/val", "checkpoint runs/x/final",
               fix="evaluate with a store extracted for the checkpoint's class list and CLIP")
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from candle_dist.errors import UserInputError

# compared in this order; the first difference is the one reported
FIELDS = ("num_classes", "classes_sha256", "dim", "model", "pretrained", "templates")


def classes_sha256(classnames: Sequence[str]) -> str:
    """sha256 of the class list as classnames.txt holds it (one name a line, in class-id order)."""
    return hashlib.sha256("".join(f"{name}\n" for name in classnames).encode("utf-8")).hexdigest()


def provenance(
    classnames: Sequence[str],
    *,
    model: str | None,
    pretrained: str | None,
    templates: Sequence[str] | None,
    dim: int | None,
) -> dict[str, Any]:
    """The provenance record of an artifact (JSON-serializable)."""
    return {
        "num_classes": len(classnames),
        "classes_sha256": classes_sha256(classnames),
        "dim": None if dim is None else int(dim),
        "model": model,
        "pretrained": pretrained,
        "templates": None if templates is None else list(templates),
    }


def check_same(
    mine: Mapping[str, Any],
    theirs: Mapping[str, Any],
    mine_name: str,
    theirs_name: str,
    *,
    fix: str,
    fields: Sequence[str] = FIELDS,
) -> None:
    """A UserInputError naming the first field on which the two records differ, with both
    values and `fix`. A field missing (or None) on either side is not compared: artifacts
    written before it was recorded stay usable."""
    for field in fields:
        a, b = mine.get(field), theirs.get(field)
        if a is None or b is None or a == b:
            continue
        if field == "classes_sha256":
            what = "the class lists differ (same count, other names or order)"
        else:
            what = f"{field} {_show(a)} != {_show(b)}"
        raise UserInputError(f"{mine_name} and {theirs_name} do not match: {what}; {fix}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

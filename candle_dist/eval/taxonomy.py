"""Taxonomy-aware evaluation: how wrong a mistake is, for class lists with a hierarchy (iNat).

A class-info TSV (header `id`, `name`, then levels from fine to coarse, as
configs/data/inat2018_taxonomy.tsv: genus, family, order, class, phylum, kingdom,
supercategory) gives every class its group at each level. A prediction counts as correct at
level L when it shares the true class's group at L; so top-1 at `genus` is at least the
species top-1, and grows towards 1 with coarser levels. The taxonomic distance of a mistake is
1 + the index of the first listed level at which the two classes share a group (1: same genus,
2: same family, ...), or the number of levels + 1 when they share none: its mean over the
mistakes says how far off the errors are, which top-1 alone cannot tell.

Computed from the (true, predicted) counts of the mistakes that `MetricAccumulator` keeps, so it
streams like the other metrics and never builds a C x C matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from candle_dist.errors import UserInputError
from candle_dist.features.prompts import read_class_info

NOT_LEVELS = ("id", "name")


def read_taxonomy(path: str | Path, num_classes: int) -> tuple[list[str], np.ndarray]:
    """(level names, fine to coarse; [levels, C] int group codes) from a class-info TSV."""
    rows = read_class_info(path, num_classes)
    levels = [key for key in rows[0] if key not in NOT_LEVELS] if rows else []
    if not levels:
        raise UserInputError(
            f"--class-info {path}: no taxonomy columns besides id and name; give levels from fine "
            "to coarse (e.g. genus, family, order, ...)"
        )
    codes = np.empty((len(levels), num_classes), dtype=np.int64)
    for index, level in enumerate(levels):
        groups: dict[str, int] = {}
        codes[index] = [groups.setdefault(row[level], len(groups)) for row in rows]
    return levels, codes


def taxonomy_metrics(
    levels: Sequence[str],
    codes: np.ndarray,
    correct: int,
    total: int,
    mistakes: Mapping[tuple[int, int], int],
) -> dict[str, Any]:
    """Top-1 at every level and the mean taxonomic distance of the mistakes.

    `correct` of `total` images were predicted exactly; `mistakes` counts the others by
    (true class, predicted class)."""
    if total == 0:
        return {"levels": list(levels), "top1": dict.fromkeys(levels), "mean_distance": None}
    pairs = np.array(list(mistakes), dtype=np.int64).reshape(-1, 2)
    counts = np.array(list(mistakes.values()), dtype=np.int64)
    same = codes[:, pairs[:, 0]] == codes[:, pairs[:, 1]]  # [levels, mistakes]
    top1 = {level: (correct + int(counts[same[i]].sum())) / total for i, level in enumerate(levels)}
    first_shared = np.where(same.any(0), same.argmax(0) + 1, len(levels) + 1)
    mean_distance = float((first_shared * counts).sum() / counts.sum()) if len(counts) else 0.0
    return {"levels": list(levels), "top1": top1, "mean_distance": mean_distance}

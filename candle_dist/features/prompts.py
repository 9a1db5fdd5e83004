"""Class-name prompts and their text features (docs/method.md, "Inputs": templates average
unnormalized).

A template holds `{}` for the class name and may name per-class fields such as `{genus}` or
`{supercategory}`, filled from a class-info table (`read_class_info`), e.g.
"a photo of a {}, a kind of {family}." for iNaturalist's taxonomy.

Example:
    text = encode_classnames(model, tokenizer, ["red circle", "blue star"], DEFAULT_TEMPLATES)
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from candle_dist.errors import UserInputError
from candle_dist.precision import autocast, resolve_precision

DEFAULT_TEMPLATES = ("a photo of a {}.",)
FIELD = re.compile(r"\{(\w+)\}")


def read_class_info(path: str | Path, num_classes: int) -> list[dict[str, str]]:
    """Per-class fields from a TSV with a header row, one row per class in class-id order
    (an `id` column, if present, must count 0, 1, 2, ...)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--class-info {path}: file not found (a TSV with a header row)")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if len(rows) != num_classes:
        raise UserInputError(
            f"--class-info {path}: {len(rows)} rows but {num_classes} classes; one row per class, "
            "in class-id order"
        )
    for index, row in enumerate(rows):
        if "id" in row and str(row["id"]).strip() != str(index):
            raise UserInputError(
                f"--class-info {path}: row {index + 2} has id {row['id']!r}, expected {index}"
            )
    return rows


def fill_template(template: str, name: str, info: dict[str, str] | None, where: str = "") -> str:
    """The prompt of one class: `{}` -> its name, `{field}` -> its class-info value."""

    def field(match: re.Match) -> str:
        key = match.group(1)
        if info is None or key not in info:
            known = ", ".join(sorted(info)) if info else "none (pass --class-info)"
            raise UserInputError(
                f"--templates {template!r}: no class-info field {key!r}{where}; fields: {known}"
            )
        return info[key]

    return FIELD.sub(field, template).replace("{}", name)


def check_templates(templates: Sequence[str] | None) -> list[str]:
    """The templates to use (the default when none); each must hold one `{}` for the name."""
    templates = list(templates or DEFAULT_TEMPLATES)
    for template in templates:
        if template.count("{}") != 1:
            raise UserInputError(
                f"--templates {template!r}: a template holds exactly one '{{}}' where the class "
                "name goes, e.g. 'a photo of a {}.'"
            )
    return templates


def encode_classnames(
    model: torch.nn.Module,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    class_info: Sequence[dict[str, str]] | None = None,
    precision: str = "auto",
) -> torch.Tensor:
    """Text features [C, D] float32: per class, the mean over templates of the raw text output,
    encoded under the autocast of `precision` (auto, bf16, fp32; see candle_dist/precision.py),
    which extraction sets to its images' so that a store's two kinds of features agree."""
    templates = check_templates(templates)
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    total = None
    with torch.inference_mode(), autocast(device, precision):
        for template in templates:
            prompts = [
                fill_template(template, name, class_info[i] if class_info else None)
                for i, name in enumerate(classnames)
            ]
            for start in range(0, len(prompts), batch_size):
                tokens = tokenizer(prompts[start : start + batch_size]).to(device)
                out = model.encode_text(tokens).float().cpu()
                if total is None:
                    total = torch.zeros(len(prompts), out.shape[1])
                total[start : start + out.shape[0]] += out
    return total / len(templates)

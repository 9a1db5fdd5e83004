"""Class-name prompts and their text features (DESIGN.md §2: templates average unnormalized).

Example:
    text = encode_classnames(model, tokenizer, ["red circle", "blue star"], DEFAULT_TEMPLATES)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from candle_dist.errors import UserInputError

DEFAULT_TEMPLATES = ("a photo of a {}.",)


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
) -> torch.Tensor:
    """Text features [C, D] float32: per class, the mean over templates of the raw text output."""
    templates = check_templates(templates)
    device = torch.device(device)
    total = None
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
    ):
        for template in templates:
            prompts = [template.replace("{}", name) for name in classnames]
            for start in range(0, len(prompts), batch_size):
                tokens = tokenizer(prompts[start : start + batch_size]).to(device)
                out = model.encode_text(tokens).float().cpu()
                if total is None:
                    total = torch.zeros(len(prompts), out.shape[1])
                total[start : start + out.shape[0]] += out
    return total / len(templates)

"""Open a frozen open_clip model by name: hub tag, local checkpoint or random init.

`load_clip("ViT-B-32", "openai")` on clusters with hub access, `load_clip("ViT-B-32",
"/ckpt/model.pt")` offline, `load_clip("tiny", "none", model_config="tiny.json")` for tests.
Model configs shipped in `candle_dist/model_configs/` are registered with open_clip at import,
so their names work like open_clip's own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import open_clip
import torch

from candle_dist.errors import UserInputError

PACKAGE_CONFIGS = Path(__file__).resolve().parent.parent / "model_configs"
NO_WEIGHTS = ("none", "")
RANDOM_INIT_SEED = 0

if PACKAGE_CONFIGS.is_dir():
    open_clip.add_model_config(PACKAGE_CONFIGS)


def register_model_config(path: str | Path) -> str:
    """Register an open_clip model config JSON; returns the model name (the file's stem)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: model config not found; pass an open_clip model JSON")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserInputError(f"{path}: not a JSON model config ({err})") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise UserInputError(
            f"{path}: open_clip model config lacks {', '.join(missing)}; see open_clip's "
            "model_configs/ViT-B-32.json for the layout"
        )
    open_clip.add_model_config(path)
    return path.stem


def _resolve_pretrained(model: str, pretrained: str | None) -> str | None:
    if pretrained is None or pretrained.lower() in NO_WEIGHTS:
        return None
    if os.path.isfile(pretrained):
        return pretrained
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained in tags:
        return pretrained
    known = ", ".join(tags) if tags else "none known"
    raise UserInputError(
        f"--pretrained {pretrained!r}: neither a checkpoint file nor an open_clip tag of {model} "
        f"({known}); give a tag, a checkpoint path, or 'none' for random weights"
    )


def load_clip(
    model: str,
    pretrained: str | None,
    model_config: str | Path | None = None,
    device: str | torch.device = "cpu",
):
    """(model, eval preprocess, tokenizer): the model in eval mode with gradients off.

    `pretrained` is an open_clip tag, a local checkpoint path, or "none": random weights drawn
    from a fixed seed, so that every rank and every resumed run encodes with the same model.
    `model_config` is an extra open_clip config JSON registered under its file stem.
    """
    if model_config is not None:
        registered = register_model_config(model_config)
        model = model or registered
    if model not in open_clip.list_models():
        hint = (
            f"; {model_config} registers the name {Path(model_config).stem!r}"
            if model_config
            else ""
        )
        raise UserInputError(
            f"--model {model!r}: not an open_clip model name (e.g. ViT-B-32, ViT-B-16, ViT-L-14)"
            f"{hint}"
        )
    weights = _resolve_pretrained(model, pretrained)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            clip, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=weights, device=device
            )
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err)
        raise UserInputError(
            f"--pretrained {pretrained}: could not load weights for {model} ({first_line}); "
            "without hub access download the checkpoint elsewhere and pass its path"
        ) from None
    clip.eval()
    clip.requires_grad_(False)
    return clip, preprocess, open_clip.get_tokenizer(model)

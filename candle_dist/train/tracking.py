"""Experiment tracking through Accelerate's trackers (TensorBoard by default; W&B, MLflow, Aim).

`train.log_with` names the trackers (`[]` for none). The run logs, under `train.output/tracking`
(TensorBoard's event files) or the tracker's own store:
- the resolved config as hyper-parameters (`section.key`),
- every `train.log_every` steps: `train/loss` and its three terms, `train/lr`, `train/steps_per_s`
  and `train/samples_per_s`,
- every evaluation (per epoch with `train.eval_every_epoch`, and at the end): `eval/<metric>` for
  each scalar metric (top1, top5, base, new, hm, many, medium, few, balanced_accuracy, ...).
`metrics.jsonl` in `train.output` holds the same records either way.
"""

from __future__ import annotations

import json
from typing import Any

from candle_dist.errors import UserInputError

TRACKERS = ("tensorboard", "wandb", "mlflow", "aim")
PROJECT = "candle_dist"


def check_trackers(names: list[str]) -> list[str]:
    """`names` if each is a known tracker whose package is installed; else one clear error."""
    from accelerate.utils import (
        is_aim_available,
        is_mlflow_available,
        is_tensorboard_available,
        is_wandb_available,
    )

    installed = {
        "tensorboard": (is_tensorboard_available, "tensorboard"),
        "wandb": (is_wandb_available, "wandb"),
        "mlflow": (is_mlflow_available, "mlflow"),
        "aim": (is_aim_available, "aim"),
    }
    for name in names:
        if name not in installed:
            raise UserInputError(
                f"train.log_with: unknown tracker {name!r}: choose from {', '.join(TRACKERS)} "
                "(or [] for none)"
            )
        available, package = installed[name]
        if not available():
            raise UserInputError(
                f"train.log_with: {name} is not installed: pip install {package}, or remove it "
                "from train.log_with"
            )
    return list(names)


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """The config flattened to `section.key` scalars (lists and None as JSON text), the types
    every tracker accepts."""
    flat = {}
    for section, values in config.items():
        for key, value in values.items():
            scalar = isinstance(value, bool | int | float | str)
            flat[f"{section}.{key}"] = value if scalar else json.dumps(value)
    return flat


def eval_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """`eval/<name>` for every scalar metric that has a value."""
    return {
        f"eval/{name}": float(value)
        for name, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }

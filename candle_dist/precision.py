"""Which floating-point precision a run computes in, and the autocast context that gives it.

One rule for every stage (extract, train, eval, predict), so that features are encoded at
predict time the way they were encoded for training (README "GPUs and precision"):

- `auto`: bf16 autocast on a CUDA device with native bf16 (compute capability >= 8.0: A100,
  H100, L4, RTX 30xx and later); fp32 elsewhere: on the CPU (bf16 matmuls there are slow), and
  on GPUs without native bf16 (V100, T4), where bf16 is emulated and fp16's range is too narrow
  for the head's scaled logits without a grad scaler;
- `bf16`: bf16 autocast (parameters, optimizer state, log-sum-exp and reductions stay fp32);
- `fp32`: no autocast.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from candle_dist.errors import UserInputError

PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls in hardware (CUDA compute capability >= 8.0)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8


def resolve_precision(requested: str, device: torch.device, where: str = "precision") -> str:
    """`requested` (auto, bf16, fp32) on `device` -> "bf16" or "fp32"; `where` names the option
    in error messages."""
    if requested not in PRECISIONS:
        raise UserInputError(f"{where}={requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if requested == "bf16" and device.type == "cuda" and not native_bf16(device):
        name = torch.cuda.get_device_name(device)
        raise UserInputError(
            f"{where}=bf16: {name} has no native bf16 (compute capability < 8.0); "
            f"use {where}=fp32 (or auto)"
        )
    return requested


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The autocast context of a resolved precision ("bf16" or "fp32") on `device`."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

"""Token features: the image tower's final token states, for heads that attend within an image.

What `candle-dist extract --tokens` stores per image, [T, W] float16:

- ViT (open_clip VisionTransformer that pools its class token): the class token, then the patch
  tokens in row-major order, after `ln_post` and before the output projection `proj`; W is the
  tower's width (768 for ViT-B-16, T = 1 + 14 * 14 = 197).
- ResNet (open_clip ModifiedResNet): the mean of the final feature map's positions, then the
  positions in row-major order: the tokens AttentionPool2d attends over, before its positional
  embedding; W is the number of channels.

`grid=G` average-pools the patch grid (ResNet: the feature map) to G x G with adaptive average
pooling and keeps token 0 first: 1 + G * G tokens (token 0 stays the class token, or the mean
of the whole map).

The token projection (matrix [W, D], bias [D], float32) maps token 0 into the CLIP image
embedding space, so a head that starts from it starts near zero-shot:

- ViT: `proj` and a zero bias; token0 @ proj is the pooled image feature (up to the fp16
  rounding of the stored token).
- ResNet: c_proj(v_proj(x + p)) as one affine map, p the mean of AttentionPool2d's positional
  embeddings: attention pooling when its attention is uniform over the map's tokens (their mean
  is token 0, so the uniform average of the values is v_proj(token0 + p)), an approximation
  otherwise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from open_clip.transformer import VisionTransformer

from candle_dist.errors import UserInputError

SUPPORTED = (
    "--tokens supports open_clip ViT towers that pool their class token (no attentional "
    "pooler) and ModifiedResNet towers"
)


@dataclass(frozen=True)
class TokenLayout:
    """What one image's stored tokens are: recorded as the manifest's `tokens` entry."""

    tower: str  # "vit" or "resnet"
    count: int  # T, token 0 included
    width: int  # W
    grid: int | None  # G of --token-grid, None: every patch / position
    source_grid: tuple[int, int]  # the tower's patch grid or feature map (rows, columns)

    def entry(self) -> dict:
        return {**asdict(self), "source_grid": list(self.source_grid)}


def token_layout(visual: torch.nn.Module, model: str, grid: int | None) -> TokenLayout:
    """The tokens of this image tower at `grid`; a tower or grid it cannot serve is refused."""
    if isinstance(visual, VisionTransformer):
        unsupported = _vit_unsupported(visual)
        if unsupported:
            raise UserInputError(f"--tokens: {model}'s image tower {unsupported}; {SUPPORTED}")
        tower, width = "vit", int(visual.conv1.out_channels)
        source = tuple(int(n) for n in visual.grid_size)
    elif isinstance(visual, ModifiedResNet) and isinstance(visual.attnpool, AttentionPool2d):
        tower, width = "resnet", int(visual.attnpool.k_proj.in_features)
        side = math.isqrt(visual.attnpool.positional_embedding.shape[0] - 1)
        source = (side, side)
    else:
        raise UserInputError(
            f"--tokens: {model}'s image tower is a {type(visual).__name__}; {SUPPORTED}"
        )
    if grid is not None and not 1 <= grid <= min(source):
        raise UserInputError(
            f"--token-grid {grid}: {model}'s {'patch grid' if tower == 'vit' else 'feature map'}"
            f" is {source[0]} x {source[1]}; give a whole number from 1 to {min(source)}"
        )
    count = 1 + (grid * grid if grid is not None else source[0] * source[1])
    return TokenLayout(tower, count, width, grid, source)


def _vit_unsupported(visual: VisionTransformer) -> str | None:
    """Why a ViT tower's class token after `ln_post` is not what it pools, or None."""
    if visual.attn_pool is not None:
        return "pools with an attentional pooler"
    if visual.pool_type != "tok":
        return f"pools by {visual.pool_type!r}, not its class token"
    if visual.proj is None:
        return "has no output projection"
    return None  # ln_post is per token: before or after pooling (final_ln_after_pool) alike


class TokenTap:
    """Keeps the token states of the image tower's last forward pass (a forward hook), so
    encode_image computes the features as without --tokens and the tokens cost no second pass."""

    def __init__(self, visual: torch.nn.Module, layout: TokenLayout):
        self.visual = visual
        self.layout = layout
        self._states: torch.Tensor | None = None
        # open_clip before `Transformer.batch_first` runs the ViT transformer on [L, N, W]
        self._sequence_first = layout.tower == "vit" and not hasattr(
            visual.transformer, "batch_first"
        )
        if layout.tower == "vit":
            self._hook = visual.transformer.register_forward_hook(self._keep_output)
        else:
            self._hook = visual.attnpool.register_forward_pre_hook(self._keep_input)

    def _keep_output(self, module, args, output) -> None:
        self._states = output

    def _keep_input(self, module, args) -> None:
        self._states = args[0]

    def take(self, views: int = 1) -> torch.Tensor:
        """[b, T, W] float16 tokens of the last forward's images, whose `views` consecutive
        rows are one image's views: the first of each, the original image, is kept."""
        states = self._states.transpose(0, 1) if self._sequence_first else self._states
        states = states[::views]
        self._states = None
        if self.layout.tower == "vit":
            states = self.visual.ln_post(states).float()
            first, cells = states[:, :1], states[:, 1:]
        else:
            cells = states.float().flatten(2).transpose(1, 2)  # [b, C, h, w] -> [b, h * w, C]
            first = cells.mean(1, keepdim=True)
        if self.layout.grid is not None:
            cells = pool_grid(cells, self.layout.source_grid, self.layout.grid)
        return torch.cat([first, cells], 1).to(torch.float16)

    def remove(self) -> None:
        self._hook.remove()


def pool_grid(cells: torch.Tensor, source: tuple[int, int], grid: int) -> torch.Tensor:
    """[b, h * w, W] row-major cells -> [b, grid * grid, W] by adaptive average pooling."""
    b, _, width = cells.shape
    maps = cells.transpose(1, 2).reshape(b, width, *source)
    return F.adaptive_avg_pool2d(maps, grid).flatten(2).transpose(1, 2)


def token_projection(visual: torch.nn.Module, layout: TokenLayout) -> tuple[np.ndarray, np.ndarray]:
    """(matrix [W, D], bias [D]) float32 mapping token 0 to the image embedding (module doc)."""
    if layout.tower == "vit":
        matrix = visual.proj.detach().double()
        bias = torch.zeros(matrix.shape[1], dtype=torch.float64)
    else:
        pool = visual.attnpool
        v_w, v_b = pool.v_proj.weight.detach().double(), pool.v_proj.bias.detach().double()
        c_w, c_b = pool.c_proj.weight.detach().double(), pool.c_proj.bias.detach().double()
        position = pool.positional_embedding.detach().double().mean(0)
        matrix = (c_w @ v_w).T
        bias = (position @ v_w.T + v_b) @ c_w.T + c_b
    return matrix.float().cpu().numpy(), bias.float().cpu().numpy()

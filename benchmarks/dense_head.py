"""The Candle head written the way the published code computes it: the dense baseline.

Everything the memory-efficient head avoids is materialized here, on purpose: one
torch.nn.MultiheadAttention over all L = B + 2C tokens with a freshly built L x L boolean mask
(so torch forms [heads, L, L] attention weights, their softmax and dropout), and the three full
R x C logit matrices fed to plain `F.cross_entropy(logits + log prior)`. Parameter names match
`CandleHead`, so both train the same model; only the computation differs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def reference_mask(mode: str, num_images: int, num_classes: int, device=None) -> torch.Tensor:
    """[L, L] boolean (True = may not attend) over tokens [images | prototypes | texts]."""
    visual = num_images + num_classes
    size = visual + num_classes
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    if mode == "in_visual":
        mask[:visual, :visual] = True
        mask.fill_diagonal_(False)
    elif mode == "in_text":
        mask[visual:, visual:] = True
    elif mode == "between_visual_text":
        mask[:visual, visual:] = True
        mask[visual:, :visual] = True
    return mask


class _DenseFusion(nn.Module):
    """LayerNorm + ratio-scaled torch MultiheadAttention, under the published parameter names."""

    def __init__(self, dim: int, num_heads: int, attn_dropout: float, mask: str):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=attn_dropout)
        self.ratio = nn.Parameter(torch.tensor([0.1]))
        self.mask = mask

    def forward(self, tokens: torch.Tensor, num_images: int, num_classes: int) -> torch.Tensor:
        x = self.norm(tokens)
        mask = reference_mask(self.mask, num_images, num_classes, tokens.device)
        return x + self.ratio * self.attn(x, x, x, attn_mask=mask)[0]


class DenseCandleHead(nn.Module):
    """Dense Candle head (docs/method.md) with "text" virtual prototypes tied to the text features.

    As in the published code, the new classes' rows of `text_features` and `virtual_prototypes`
    are one storage; the text role is used detached (a constant in backward).
    """

    def __init__(
        self,
        *,
        text_features: torch.Tensor,
        visual_prototypes: torch.Tensor,
        logit_scale: float,
        visual_scale: float = 1.0,
        mask: str = "none",
        num_heads: int = 8,
        attn_dropout: float = 0.1,
    ):
        super().__init__()
        num_base, dim = visual_prototypes.shape
        self.register_buffer("text_features", text_features.clone())
        self.register_buffer("visual_prototypes", visual_prototypes.clone())
        self.virtual_prototypes = nn.Parameter(self.text_features[num_base:])
        self.proj_image = nn.Parameter(torch.eye(dim, dtype=text_features.dtype))
        self.proj_text = nn.Parameter(torch.eye(dim, dtype=text_features.dtype))
        self.fusion = _DenseFusion(dim, num_heads, attn_dropout, mask).to(text_features.dtype)
        self.scale = math.exp(float(logit_scale))
        self.visual_scale = float(visual_scale)

    def loss(
        self, image_features: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor
    ) -> torch.Tensor:
        """CLA(logits0) + CLA(logits_vt) + CLA(logits_vv); rows = images then one per class."""
        num_images, num_classes = image_features.shape[0], self.text_features.shape[0]
        xi = image_features @ self.proj_image
        xv = torch.cat([self.visual_prototypes, self.virtual_prototypes]) @ self.proj_image
        xt = self.text_features.detach() @ self.proj_text
        rows0 = F.normalize(torch.cat([xi, xv]), dim=-1)
        logits0 = self.scale * rows0 @ F.normalize(xt, dim=-1).t()

        fused = self.fusion(torch.cat([xi, xv, xt]), num_images, num_classes)
        rows = F.normalize(fused[: num_images + num_classes], dim=-1)
        texts = F.normalize(fused[num_images + num_classes :], dim=-1)
        protos = rows[num_images:]
        logits_vt = self.scale * rows @ texts.t()
        logits_vv = self.scale * self.visual_scale * rows @ protos.t()

        targets = torch.cat([labels, torch.arange(num_classes, device=labels.device)])
        return sum(
            F.cross_entropy(logits + log_prior, targets)
            for logits in (logits0, logits_vt, logits_vv)
        )

"""A plain dense Candle head written from docs/method.md alone: the oracle for every fast path.

Everything is materialized (L x L boolean masks, full R x C logits, torch's own
MultiheadAttention), and the tie between new classes' text features and virtual prototypes
is real shared storage, as in the published code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def dense_mask(mode: str, num_images: int, num_classes: int) -> torch.Tensor:
    """[L, L] boolean, True = may not attend; tokens ordered [images | prototypes | texts]."""
    visual = num_images + num_classes
    size = visual + num_classes
    mask = torch.zeros(size, size, dtype=torch.bool)
    if mode == "in_visual":
        mask[:visual, :visual] = True
        mask[torch.arange(visual), torch.arange(visual)] = False
    elif mode == "in_text":
        mask[visual:, visual:] = True
    elif mode == "between_visual_text":
        mask[:visual, visual:] = True
        mask[visual:, :visual] = True
    return mask


class DenseCandleHead(nn.Module):
    def __init__(self, text, protos, logit_scale, visual_scale, mask, virtual_init, tie, heads):
        super().__init__()
        num_base = protos.shape[0]
        dim = text.shape[1]
        self.text_storage = text.clone()
        self.visual_prototypes = protos.clone()
        if virtual_init == "text" and tie:
            # shares storage with text rows, exactly like the published code
            self.virtual_prototypes = nn.Parameter(self.text_storage[num_base:])
        elif virtual_init == "text":
            self.virtual_prototypes = nn.Parameter(text[num_base:].clone())
        else:
            self.virtual_prototypes = nn.Parameter(torch.zeros(len(text) - num_base, dim))
        self.proj_image = nn.Parameter(torch.eye(dim))
        self.proj_text = nn.Parameter(torch.eye(dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=0.0)
        self.ratio = nn.Parameter(torch.tensor([0.1]))
        self.s = math.exp(float(logit_scale))
        self.s_v = self.s * visual_scale
        self.mask_mode = mask

    def load_from(self, head) -> None:
        """Copy the fast head's parameters (full, single-process) into this oracle."""
        sd = head.state_dict()
        with torch.no_grad():
            self.virtual_prototypes.copy_(sd["virtual_prototypes"])
            self.proj_image.copy_(sd["proj_image"])
            self.proj_text.copy_(sd["proj_text"])
            self.ratio.copy_(sd["fusion.ratio"])
            self.norm.weight.copy_(sd["fusion.norm.weight"])
            self.norm.bias.copy_(sd["fusion.norm.bias"])
            self.attn.in_proj_weight.copy_(sd["fusion.attn.in_proj_weight"])
            self.attn.in_proj_bias.copy_(sd["fusion.attn.in_proj_bias"])
            self.attn.out_proj.weight.copy_(sd["fusion.attn.out_proj.weight"])
            self.attn.out_proj.bias.copy_(sd["fusion.attn.out_proj.bias"])

    def forward(self, f, phase="train"):
        n = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
        text = self.text_storage.detach()  # constant in its text role
        xi = f @ self.proj_image
        xv = torch.cat([self.visual_prototypes, self.virtual_prototypes]) @ self.proj_image
        xt = text @ self.proj_text
        rows = xi if phase == "test" else torch.cat([xi, xv])
        logits0 = self.s * n(rows) @ n(xt).t()
        x = self.norm(torch.cat([xi, xv, xt]))
        mask = dense_mask(self.mask_mode, f.shape[0], text.shape[0])
        attn, _ = self.attn(x, x, x, attn_mask=mask, need_weights=False)
        y = x + self.ratio * attn
        b, c = f.shape[0], text.shape[0]
        xi2, xv2, xt2 = y[:b], y[b : b + c], y[b + c :]
        rows2 = xi2 if phase == "test" else torch.cat([xi2, xv2])
        return (
            logits0,
            self.s * n(rows2) @ n(xt2).t(),
            self.s_v * n(rows2) @ n(xv2).t(),
        )


def dense_cla(logits, targets, counts, tau=1.0):
    """CLA written out: cross-entropy of logits + tau * log((n + 1) / sum(n + 1))."""
    prior = (counts.double() + 1) / (counts.double() + 1).sum()
    return F.cross_entropy(logits + tau * torch.log(prior).to(logits.dtype), targets)

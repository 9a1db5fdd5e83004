"""Candle's cross-modal fusion: `Y = LN(X) + ratio * Attn(LN(X))` over [images|prototypes|texts].

Mask modes (docs/method.md, "Fusion") are expressed by which key groups a query group attends
to, never by an L x L mask tensor:

| mode                  | image/prototype queries see   | text queries see          |
|-----------------------|-------------------------------|---------------------------|
| none                  | images, prototypes, texts     | images, prototypes, texts |
| in_visual             | themselves, texts             | images, prototypes, texts |
| in_text               | images, prototypes, texts     | images, prototypes        |
| between_visual_text   | images, prototypes            | texts                     |

Under class parallelism each rank holds its own tokens (its share of the images, its classes'
prototypes and texts); keys and values are all-gathered with gradients flowing back to owners.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from candle_dist.errors import UserInputError
from candle_dist.model.attention import attention
from candle_dist.parallel.comm import ClassGroup

MASK_MODES = ("none", "in_visual", "in_text", "between_visual_text")


class Fusion(nn.Module):
    """LayerNorm + residual multi-head self-attention scaled by a learnable `ratio`.

    Parameter names (`norm.*`, `attn.in_proj_weight`, `attn.in_proj_bias`, `attn.out_proj.*`,
    `ratio`) match the published Candle head, so its checkpoints load directly.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_dropout: float = 0.1,
        mask: str = "none",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        made = {"device": device, "dtype": dtype}  # made there, not moved (see CandleHead)
        if mask not in MASK_MODES:
            choices = ", ".join(MASK_MODES)
            raise UserInputError(f"unknown mask mode {mask!r}: choose one of {choices}")
        if dim % num_heads:
            raise UserInputError(f"feature dim {dim} is not divisible by num_heads={num_heads}")
        self.norm = nn.LayerNorm(dim, **made)
        # Holds the parameters under torch's names; the computation below is our own.
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=attn_dropout, **made)
        self.ratio = nn.Parameter(torch.tensor([0.1], **made))
        self.mask = mask
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout

    def forward(
        self,
        images: torch.Tensor,
        prototypes: torch.Tensor,
        texts: torch.Tensor,
        comm: ClassGroup | None = None,
        image_sizes: list[int] | None = None,
        class_sizes: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fuse this rank's tokens; `*_sizes` are every rank's counts (gather layout)."""
        comm = comm or ClassGroup(distributed=False)
        image_sizes = image_sizes or [images.shape[0]]
        class_sizes = class_sizes or [prototypes.shape[0]]
        num_img, num_cls = images.shape[0], prototypes.shape[0]
        normed = self.norm(torch.cat([images, prototypes, texts]))
        q, k, v = F.linear(normed, self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, -1)
        q, k, v = (self._heads(t) for t in (q, k, v))

        def gathered(t: torch.Tensor, start: int, stop: int, sizes: list[int]) -> torch.Tensor:
            return comm.gather_rows(t[:, start:stop].transpose(0, 1), sizes).transpose(0, 1)

        keys, values = [], []
        for t, out in ((k, keys), (v, values)):
            out.append(gathered(t, 0, num_img, image_sizes))
            out.append(gathered(t, num_img, num_img + num_cls, class_sizes))
            out.append(gathered(t, num_img + num_cls, num_img + 2 * num_cls, class_sizes))
        visual_k, visual_v = torch.cat(keys[:2], 1), torch.cat(values[:2], 1)
        all_k, all_v = torch.cat(keys, 1), torch.cat(values, 1)
        text_k, text_v = keys[2], values[2]
        split = num_img + num_cls
        q_vis, q_txt = q[:, :split], q[:, split:]
        ids = _token_ids(comm.rank, image_sizes, class_sizes, q.device)
        total_images, total_classes = sum(image_sizes), sum(class_sizes)
        texts_start = total_images + total_classes  # key ids: all images, prototypes, texts
        common = dict(
            dropout_p=self.attn_dropout if self.training else 0.0,
            id_stride=total_images + 2 * total_classes,
        )
        ids_vis, ids_txt = ids[:split], ids[split:]

        if self.mask == "none":
            out = attention(q, all_k, all_v, query_ids=ids, **common)
        elif self.mask == "in_visual":
            own = dict(self_k=k[:, :split], self_v=v[:, :split])
            out_vis = attention(
                q_vis, text_k, text_v, query_ids=ids_vis, key_offset=texts_start, **own, **common
            )
            out_txt = attention(q_txt, all_k, all_v, query_ids=ids_txt, **common)
            out = torch.cat([out_vis, out_txt], 1)
        elif self.mask == "in_text":
            out_vis = attention(q_vis, all_k, all_v, query_ids=ids_vis, **common)
            out_txt = attention(q_txt, visual_k, visual_v, query_ids=ids_txt, **common)
            out = torch.cat([out_vis, out_txt], 1)
        else:  # between_visual_text
            out_vis = attention(q_vis, visual_k, visual_v, query_ids=ids_vis, **common)
            out_txt = attention(
                q_txt, text_k, text_v, query_ids=ids_txt, key_offset=texts_start, **common
            )
            out = torch.cat([out_vis, out_txt], 1)

        out = out.transpose(0, 1).reshape(normed.shape)
        fused = normed + self.ratio * self.attn.out_proj(out)
        return fused[:num_img], fused[num_img:split], fused[split:]

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], self.num_heads, -1).transpose(0, 1)


def _token_ids(
    rank: int, image_sizes: list[int], class_sizes: list[int], device: torch.device
) -> torch.Tensor:
    """Positions of this rank's tokens in the one-process sequence [images | prototypes | texts]:
    the ids attention dropout is keyed by, so that P ranks drop what one process drops."""
    images, classes = sum(image_sizes), sum(class_sizes)
    image_start, class_start = sum(image_sizes[:rank]), sum(class_sizes[:rank])
    num_img, num_cls = image_sizes[rank], class_sizes[rank]
    return torch.cat([
        torch.arange(image_start, image_start + num_img, device=device),
        torch.arange(images + class_start, images + class_start + num_cls, device=device),
        torch.arange(images + classes + class_start, images + classes + class_start + num_cls,
                     device=device),
    ])  # fmt: skip

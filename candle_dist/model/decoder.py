"""The token decoder of the Imbalance-VLM baseline: a few transformer blocks over CLIP tokens.

`extract --tokens` stores each image's final token states (docs/scaling.md, "Token features");
the decoder runs `depth` pre-norm blocks over them (multi-head self-attention with qkv bias, a
GELU MLP of `mlp_ratio` times the width, no dropout), takes the first token's output and maps it
to the CLIP embedding space with an affine output projection. The projection starts as the one
the store recorded (the image tower's own: `proj` of a ViT, exact), and every block's residual
branches start at zero, so an untrained decoder returns the tower's image embedding: with a
text-initialized classifier it starts at zero-shot. The blocks are replicated over ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from candle_dist.errors import UserInputError


class DecoderBlock(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); both residual branches start at zero."""

    def __init__(
        self, width: int, heads: int, mlp_ratio: float, *, device=None, dtype=None
    ) -> None:
        super().__init__()
        if width % heads:
            raise UserInputError(
                f"head.decoder_heads={heads}: the token width {width} must divide into that "
                "many heads"
            )
        made = {"device": device, "dtype": dtype}
        hidden = max(1, round(width * mlp_ratio))
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, **made)
        self.qkv = nn.Linear(width, 3 * width, bias=True, **made)
        self.out = nn.Linear(width, width, **made)
        self.norm2 = nn.LayerNorm(width, **made)
        self.fc1 = nn.Linear(width, hidden, **made)
        self.fc2 = nn.Linear(hidden, width, **made)
        for layer in (self.out, self.fc2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, w = x.shape
        qkv = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [n, heads, t, w/heads]
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, w)
        x = x + self.out(attended)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TokenDecoder(nn.Module):
    """Tokens [n, T, W] -> embeddings [n, D]: blocks, first token, affine output projection.

    `projection` is (matrix [W, D], bias [D]) from the store (the tower's own output map); None
    gives a random one (Xavier, zero bias)."""

    def __init__(
        self,
        width: int,
        dim: int,
        *,
        depth: int = 3,
        heads: int = 4,
        mlp_ratio: float = 0.5,
        projection: tuple[torch.Tensor, torch.Tensor] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        made = {"device": device, "dtype": dtype}
        self.width, self.dim = width, dim
        self.blocks = nn.ModuleList(
            DecoderBlock(width, heads, mlp_ratio, **made) for _ in range(depth)
        )
        self.projection = nn.Linear(width, dim, **made)
        with torch.no_grad():
            if projection is None:
                nn.init.xavier_uniform_(self.projection.weight)
                nn.init.zeros_(self.projection.bias)
            else:
                matrix, bias = (torch.as_tensor(p, dtype=torch.float32) for p in projection)
                self.projection.weight.copy_(matrix.t())
                self.projection.bias.copy_(bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.to(self.projection.weight.dtype)
        for block in self.blocks:
            x = block(x)
        return self.projection(x[:, 0])

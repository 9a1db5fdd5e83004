"""The process group the class dimension is split over, and the autograd-aware gather on it.

`ClassGroup(None)` is the single-process case: every collective is the identity, so one code
path serves 1 and P ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class ClassGroup:
    """Rank and size of the class-parallel group (the default group when distributed)."""

    def __init__(self, group: dist.ProcessGroup | None = None, *, distributed: bool | None = None):
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized()
        self.group = group
        self.distributed = bool(distributed) and dist.get_world_size(group) > 1
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (no autograd); returns the tensor."""
        if self.distributed:
            reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
            dist.all_reduce(tensor, op=reduce_op, group=self.group)
        return tensor

    def sizes_of(self, local_rows: int, device: torch.device) -> list[int]:
        """Every rank's row count (one tiny all-gather)."""
        if not self.distributed:
            return [local_rows]
        mine = torch.tensor([local_rows], device=device)
        everyone = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine, group=self.group)
        return [int(t) for t in everyone]

    def gather_rows(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every rank's rows (uneven sizes allowed); gradients flow back to owners."""
        if not self.distributed:
            return tensor
        return _GatherRows.apply(tensor, sizes, self)

    def gather_constant(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """`gather_rows` without autograd, for labels and other constants."""
        if not self.distributed:
            return tensor
        return _all_gather_padded(tensor.detach(), sizes, self)


def _all_gather_padded(tensor: torch.Tensor, sizes: list[int], comm: ClassGroup) -> torch.Tensor:
    # gloo's all_gather needs equal shapes: pad to the largest share, then trim.
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded.contiguous(), group=comm.group)
    return torch.cat([piece[:n] for piece, n in zip(pieces, sizes, strict=True)])


class _GatherRows(torch.autograd.Function):
    """Forward: all-gather of row blocks. Backward: sum the gradient over ranks, keep own block."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int], comm: ClassGroup) -> torch.Tensor:
        ctx.sizes, ctx.comm = sizes, comm
        return _all_gather_padded(tensor, sizes, comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        ctx.comm.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.comm.rank])
        return grad[start : start + ctx.sizes[ctx.comm.rank]], None, None

"""The process group the class dimension is split over, and the autograd-aware gather on it.

`ClassGroup(None)` is the single-process case: every collective is the identity, so one code
path serves 1 and P ranks.

The group owns the device its collectives run on: NCCL takes CUDA tensors only (gloo, which the
CPU tests use, takes anything), so every tensor handed to a collective is checked against that
device here, and the tensors the group makes itself are made there. Sums of half-precision
tensors (gradients of bf16 activations under autocast) are taken in float32, so that P ranks
add their parts as exactly as one process adds them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class ClassGroup:
    """Rank, size and collective device of the class-parallel group (the default group when
    distributed).

    `device` is where collectives run: by default CUDA's current device when the group's backend
    is NCCL, else the CPU. The trainer passes its accelerator's device.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        distributed: bool | None = None,
        device: torch.device | str | None = None,
    ):
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized()
        self.group = group
        self.distributed = bool(distributed) and dist.get_world_size(group) > 1
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self.device = torch.device(device) if device is not None else self._default_device()

    def _default_device(self) -> torch.device:
        if self.distributed and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def check(self, tensor: torch.Tensor, what: str = "tensor") -> torch.Tensor:
        """`tensor`, if it lives on the collective device; a RuntimeError naming both otherwise
        (what NCCL would refuse, or worse, read as a device pointer)."""
        if self.distributed and not _same_device(tensor.device, self.device):
            raise RuntimeError(
                f"{what} on {tensor.device} handed to a collective of the class group on "
                f"{self.device}"
            )
        return tensor

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (no autograd); returns the tensor. A sum of a half-precision
        tensor is taken in float32 and rounded once."""
        if not self.distributed:
            return tensor
        self.check(tensor, "all_reduce input")
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        if op == "sum" and tensor.dtype in (torch.float16, torch.bfloat16):
            wide = tensor.float()
            dist.all_reduce(wide, op=reduce_op, group=self.group)
            return tensor.copy_(wide)
        dist.all_reduce(tensor, op=reduce_op, group=self.group)
        return tensor

    def flag(self, value: bool) -> torch.Tensor:
        """A one-element float tensor on the collective device (for an all-reduce MAX vote)."""
        return torch.tensor([1.0 if value else 0.0], device=self.device)

    def sizes_of(self, local_rows: int) -> list[int]:
        """Every rank's row count (one tiny all-gather, and a host sync: callers that know the
        sizes, like the trainer for its batch shares, pass them instead)."""
        if not self.distributed:
            return [local_rows]
        mine = torch.tensor([local_rows], device=self.device)
        everyone = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine, group=self.group)
        return torch.cat(everyone).tolist()

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


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" (no index) means the current CUDA device
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def _all_gather_padded(tensor: torch.Tensor, sizes: list[int], comm: ClassGroup) -> torch.Tensor:
    # all_gather needs equal shapes (NCCL and gloo): pad to the largest share, then trim.
    comm.check(tensor, "all_gather input")
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

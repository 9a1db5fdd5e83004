"""Checkpoint state of a class-parallel head: one-process state dicts from any rank count.

A head keeps some tensors split over ranks by class (`class_sharded_ranges` names them, with
their full length and every rank's row count) and the rest replicated. Checkpoints hold the
one-process ("full") state dict, so a run resumes, and a trained head loads, with any number
of ranks.
"""

from __future__ import annotations

import torch

from candle_dist.errors import UserInputError


class ClassShardedState:
    """Mixin of `nn.Module` heads with `comm` (a ClassGroup) and `class_sharded_ranges()`."""

    def class_sharded_ranges(self) -> dict[str, tuple[int, list[int]]]:
        raise NotImplementedError

    def gather_full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """All ranks' rows of a class-sharded tensor (a state entry or its optimizer state)."""
        _, sizes = self.class_sharded_ranges()[name]
        return self.comm.gather_constant(local, sizes)

    def slice_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full class-sharded tensor."""
        length, sizes = self.class_sharded_ranges()[name]
        if full.shape[0] != length:
            raise UserInputError(
                f"checkpoint entry {name} has {full.shape[0]} rows but this head expects {length}: "
                "the checkpoint was trained on a different class list"
            )
        start = sum(sizes[: self.comm.rank])
        return full[start : start + sizes[self.comm.rank]]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The one-process state dict (class-sharded entries gathered); same on every rank."""
        state = self.state_dict()
        for name in self.class_sharded_ranges():
            state[name] = self.gather_full(name, state[name])
        return {name: value.detach().cpu() for name, value in state.items()}

    def load_full_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load a one-process state dict (from any number of ranks) into this rank's shard."""
        state = dict(state)
        for name in self.class_sharded_ranges():
            if name in state:
                state[name] = self.slice_full(name, state[name])
        self.load_state_dict(state, strict=strict)

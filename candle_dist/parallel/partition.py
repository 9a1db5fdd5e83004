"""Contiguous, possibly uneven split of a dimension (classes, batch rows) across ranks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Partition:
    """`total` items split over `world_size` ranks; the first `total % world_size` get one more.

    >>> p = Partition(10, 3)
    >>> p.sizes, p.range(1)
    ([4, 3, 3], (4, 7))
    """

    total: int
    world_size: int

    def size(self, rank: int) -> int:
        return self.total // self.world_size + int(rank < self.total % self.world_size)

    def start(self, rank: int) -> int:
        return self.total // self.world_size * rank + min(rank, self.total % self.world_size)

    def range(self, rank: int) -> tuple[int, int]:
        start = self.start(rank)
        return start, start + self.size(rank)

    @property
    def sizes(self) -> list[int]:
        return [self.size(r) for r in range(self.world_size)]

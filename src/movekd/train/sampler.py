"""A resumable, deterministic sampler: the order depends only on (seed, epoch), and it can start
mid-epoch, so a resumed run sees exactly the batches the interrupted run would have seen next."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Indices of one epoch from position ``start`` of the global order, this rank's share only.

    With ``world`` processes, global positions ``start + rank, start + rank + world, ...`` go to
    ``rank`` (as ``DistributedSampler`` does), so every process sees ``batch_size`` samples per step
    and ``start`` counts samples of the global order consumed so far. It draws nothing from the
    global RNG, so resuming does not shift dropout masks.
    """

    def __init__(self, size: int, seed: int, epoch: int = 0, start: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1):
        self.size, self.seed, self.epoch, self.start, self.shuffle = size, seed, epoch, start, shuffle
        self.rank, self.world = rank, world

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self):
        return iter(self.order()[self.start + self.rank::self.world])

    def __len__(self) -> int:
        return len(range(self.start + self.rank, self.size, self.world))

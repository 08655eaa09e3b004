"""Resumable, deterministic samplers: the order depends only on (seed, epoch), and they can start
mid-epoch, so a resumed run sees exactly the batches the interrupted run would have seen next.
``ResumableSampler`` is a plain shuffle; ``ModalityLengthGroupedBatchSampler`` is LLaVA's
``--group_by_modality_length`` batching (stage option ``group_by_modality_length``)."""

from __future__ import annotations

from typing import Mapping, Sequence

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

    def _end(self) -> int:
        # Every rank gets the same number of samples (the last ``< world`` are dropped, as
        # ``DistributedSampler(drop_last=True)``): a rank with one batch more would run a backward
        # whose gradient all-reduce no other rank joins.
        return self.start + (self.size - self.start) // self.world * self.world

    def __iter__(self):
        return iter(self.order()[self.start + self.rank:self._end():self.world])

    def __len__(self) -> int:
        return len(range(self.start + self.rank, self._end(), self.world))


def split_to_even_chunks(indices: list[int], lengths: Mapping[int, int] | Sequence[int],
                         num_chunks: int) -> list[list[int]]:
    """LLaVA's split of one mega-batch into ``num_chunks`` per-device batches of about equal total
    length: longest first, each to the chunk with the least length so far, until it is full. When the
    mega-batch does not divide evenly (a modality's last one), a round-robin split instead."""
    if len(indices) % num_chunks:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


class ModalityLengthGroupedBatchSampler(Sampler[list[int]]):
    """LLaVA's ``LengthGroupedSampler(group_by_modality=True)`` as a resumable batch sampler.

    ``lengths``: one signed length per item, positive with an image, negative text-only (LLaVA's
    ``modality_lengths``: word counts; :meth:`movekd.data.LlavaDataset.modality_lengths`). Each
    modality is shuffled and cut into mega-batches of ``batch_size × world`` items; a mega-batch is
    sorted by length (longest first) and split into one batch per rank (:func:`split_to_even_chunks`).
    The full mega-batches of both modalities are shuffled together.

    Unlike LLaVA, whose last mega-batch joins the two modalities' remainders (a mixed batch), each
    modality's remainder is its own final step, split over the ranks; so no per-device batch ever
    mixes image and text-only samples, every item comes once per epoch, and every rank gets the same
    number of batches. A remainder smaller than ``world`` cannot give each rank a sample: its batches
    are topped up by repeating its items (as ``DistributedSampler`` pads), the only duplicates.

    The order depends only on (seed, epoch). ``start`` counts items of the global order consumed, as
    in :class:`ResumableSampler` (the loop adds ``batch_size × world`` per step), and must be a
    multiple of ``batch_size × world``; this rank's batches from that step on are yielded.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, epoch: int = 0, start: int = 0,
                 rank: int = 0, world: int = 1):
        if any(length == 0 for length in lengths):
            raise ValueError("modality lengths must be non-zero (the sign marks image vs text-only)")
        step = batch_size * world
        if start % step:
            raise ValueError(f"start {start} is not a multiple of batch_size x world = {step}")
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, epoch
        self.start_step, self.rank, self.world = start // step, rank, world

    def steps(self) -> list[list[list[int]]]:
        """The epoch's global plan: steps, each a list of ``world`` per-device batches."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        mega = self.batch_size * self.world
        full: list[list[list[int]]] = []
        tails: list[list[list[int]]] = []
        for sign in (1, -1):  # images first, then text-only (LLaVA's order for the remainders)
            items = [i for i, length in enumerate(self.lengths) if length * sign > 0]
            if not items:
                continue
            size = {i: abs(self.lengths[i]) for i in items}
            shuffled = [items[j] for j in torch.randperm(len(items), generator=generator).tolist()]
            for begin in range(0, len(shuffled), mega):
                block = sorted(shuffled[begin:begin + mega], key=lambda i: size[i], reverse=True)
                chunks = split_to_even_chunks(block, size, self.world)
                if len(block) == mega:
                    full.append(chunks)
                else:
                    tails.append([c if c else [block[r % len(block)]] for r, c in enumerate(chunks)])
        order = torch.randperm(len(full), generator=generator).tolist()
        return [full[j] for j in order] + tails

    def __iter__(self):
        for step in self.steps()[self.start_step:]:
            yield step[self.rank]

    def __len__(self) -> int:
        mega = self.batch_size * self.world
        images = sum(1 for length in self.lengths if length > 0)
        texts = len(self.lengths) - images
        return max(0, -(-images // mega) + -(-texts // mega) - self.start_step)

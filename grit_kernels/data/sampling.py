"""Length-grouped ordering of samples: batches of similar lengths (less padding), deterministic in a seed."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch


def length_grouped_indices(
    lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batch_mult: int = 50
) -> list[int]:
    """A permutation of ``range(len(lengths))`` whose consecutive ``batch_size`` chunks hold similar lengths.

    Shuffles, cuts into mega-batches of ``batch_size * mega_batch_mult``, sorts each by length
    (longest first) and shuffles the order of the resulting batches, keeping the longest batch
    first (an out-of-memory surfaces at step 1). Deterministic in ``seed``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * max(1, mega_batch_mult)
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    if not batches:
        return []
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    first = batches.pop(longest)
    rng.shuffle(batches)
    return [i for b in [first] + batches for i in b]


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batch sampler over :func:`length_grouped_indices`; ``set_epoch(e)`` reshuffles (seed + e).

    ``LengthGroupedBatchSampler(lengths, batch_size, seed=0, mega_batch_mult=50, drop_last=False)``;
    use as ``DataLoader(features, batch_sampler=..., collate_fn=DynamicPaddingCollator(...))``.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        mega_batch_mult: int = 50,
        drop_last: bool = False,
    ):
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.mega_batch_mult, self.drop_last, self.epoch = mega_batch_mult, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = length_grouped_indices(
            self.lengths, self.batch_size, self.seed + self.epoch, self.mega_batch_mult
        )
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

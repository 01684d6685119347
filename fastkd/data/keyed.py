"""Worker-fed batches whose random draws are a function of (seed, epoch, step) alone.

A ``DataLoader``'s workers draw augmentations from generators seeded once per worker (and, with
persistent workers, never again), so which crop a sample gets depends on which worker fetched it
and on everything that worker did before: a run resumed from a checkpoint sees other
augmentations than the uninterrupted run. Here the batch sampler hands out keys
``(epoch, step, index)`` and :class:`KeyedBatches` reseeds the dataset's random sources from
(seed, epoch, step) before fetching each batch, so a batch's pixels and contrast indices are the
same whatever the worker count, worker assignment or history — and a resumed run replays them.
"""
from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset

from fastkd.data._seed import mix_seed

Key = tuple[int, int, int]  # (epoch, step, dataset index)


class EpochBatchSampler:
    """The batches of an epoch as lists of :data:`Key`, for rank ``rank`` of ``world_size``.

    The epoch's order is a permutation of ``range(size)`` seeded by (seed, epoch) when ``shuffle``
    (else 0..N−1), cut into global batches of ``batch_size × world_size``, of which this rank takes
    slice ``rank``: the slices of a global batch together are the batch one process would draw.
    A key's ``step`` is the slice's number in the epoch (global batch × world_size + rank), so every
    slice draws its own random numbers. ``drop_last`` leaves out the last, short global batch
    (training); without it the ranks' last slices may be short or empty (evaluation).
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if size < 1 or batch_size < 1:
            raise ValueError(f"size and batch_size must be positive, got {size} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if drop_last and size < batch_size * world_size:
            raise ValueError(f"the dataset holds {size} samples, fewer than one global batch of "
                             f"{batch_size} x {world_size}")
        self.size, self.batch_size, self.shuffle, self.drop_last = size, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size, self.epoch = int(seed), rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        span = self.batch_size * self.world_size
        return self.size // span if self.drop_last else -(-self.size // span)

    def __iter__(self) -> Iterator[list[Key]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        span = self.batch_size * self.world_size
        for step in range(len(self)):
            first = step * span + self.rank * self.batch_size
            mine = order[first:min(first + self.batch_size, (step + 1) * span)]
            if mine:
                yield [(self.epoch, step * self.world_size + self.rank, i) for i in mine]


class KeyedBatches(Dataset):
    """``dataset`` fetched by :data:`Key` lists, its randomness reseeded per batch (see the module doc).

    Args:
        dataset: a map-style dataset; if it has ``reseed(seed)`` (like
            :class:`~fastkd.data.indexed.IndexedDataset`'s contrast draws) that is called per batch.
        seed: the run's seed.
        rng: the ``random.Random`` the dataset's transform draws from (e.g. the one given to
            :class:`~fastkd.data.transforms.TrainTransform`), reseeded per batch.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, rng: random.Random | None = None):
        self.dataset, self.seed, self.rng = dataset, int(seed), rng

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[Key]) -> list:
        epoch, step, _ = keys[0]
        batch_seed = mix_seed(self.seed, epoch, step)
        if self.rng is not None:
            self.rng.seed(batch_seed)
        reseed = getattr(self.dataset, "reseed", None)
        if callable(reseed):
            reseed(batch_seed)
        indices = [key[2] for key in keys]
        fetch = getattr(self.dataset, "__getitems__", None)
        return fetch(indices) if callable(fetch) else [self.dataset[i] for i in indices]

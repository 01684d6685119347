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
    """The batches of an epoch as lists of :data:`Key`: a permutation of ``range(size)`` seeded by
    (seed, epoch) when ``shuffle`` (else in order), cut into ``batch_size`` pieces."""

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int = 0):
        if size < 1 or batch_size < 1:
            raise ValueError(f"size and batch_size must be positive, got {size} and {batch_size}")
        if drop_last and size < batch_size:
            raise ValueError(f"the dataset holds {size} samples, fewer than one batch of {batch_size}")
        self.size, self.batch_size, self.shuffle, self.drop_last = size, batch_size, shuffle, drop_last
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)

    def __iter__(self) -> Iterator[list[Key]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        for step in range(len(self)):
            yield [(self.epoch, step, i) for i in order[step * self.batch_size:(step + 1) * self.batch_size]]


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

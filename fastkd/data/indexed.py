"""Datasets that also return each sample's index, as CRD's memory banks need.

:class:`IndexedDataset` wraps any map-style dataset of ``(image, label)`` items:

- ``IndexedDataset(ds)[i]`` → ``(image, label, i)``;
- ``IndexedDataset(ds, num_negatives=K, mode=...)[i]`` → ``(image, label, i, contrast_idx)`` with
  ``contrast_idx`` int64 ``[K + 1]``, the positive first (RepDistiller's
  ``CIFAR100InstanceSample``; see :class:`~fastkd.data.contrast.ContrastSampler`).

A ``DataLoader`` fetches a whole batch through ``__getitems__``, so the contrast indices of a
batch come from one vectorised draw rather than one draw per sample. The draws are
reproducible: in the main process they follow ``seed``; in a ``DataLoader`` worker they follow
``seed`` and the worker's seed (which the loader derives from torch's global RNG each epoch),
so workers draw different rows.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from fastkd.data._seed import mix_seed
from fastkd.data.contrast import ContrastSampler


class IndexedDataset(Dataset):
    """``dataset``'s items with the sample index appended (and contrast indices); see the module doc.

    Args:
        dataset: a map-style dataset of ``(image, label)`` items.
        num_negatives: ``K``; when given, items also carry ``contrast_idx`` ``[K + 1]``.
        mode: ``"exact"`` or ``"relax"``, the positive's rule.
        labels: the labels of all samples, if ``dataset`` has no ``targets`` attribute.
        seed: seeds the contrast draws.
    """

    def __init__(self, dataset: Dataset, num_negatives: int | None = None, mode: str = "exact", *,
                 labels: Sequence[int] | None = None, seed: int = 0):
        self.dataset = dataset
        self.sampler = None
        self.seed = int(seed)
        if num_negatives is not None:
            if labels is None:
                labels = getattr(dataset, "targets", None)
                if labels is None:
                    raise TypeError(f"dataset ({type(dataset).__name__}) has no 'targets'; pass labels= to draw "
                                    "contrast indices")
            if len(labels) != len(dataset):
                raise ValueError(f"labels has {len(labels)} entries but dataset has {len(dataset)} samples")
            self.sampler = ContrastSampler(np.asarray(labels), num_negatives, mode, seed=self.seed)
        self._worker_seed: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def reseed(self, seed: int) -> None:
        """Seed the contrast draws of the next batch (:class:`~fastkd.data.keyed.KeyedBatches` calls this
        per batch, so the draws do not depend on the worker); the per-worker reseeding stops."""
        info = get_worker_info()
        self._worker_seed = info.seed if info is not None else None
        if self.sampler is not None:
            self.sampler.generator.manual_seed(int(seed))

    def _generator(self) -> torch.Generator:
        """The sampler's generator, reseeded once per DataLoader worker (and per epoch there)."""
        info = get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self._worker_seed = info.seed
            self.sampler.generator.manual_seed(mix_seed(self.seed, info.seed))
        return self.sampler.generator

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple]:
        """The items of a whole batch, with one draw of contrast indices for all of them."""
        n = len(self.dataset)
        indices = [int(i) + n if int(i) < 0 else int(i) for i in indices]
        for i in indices:
            if not 0 <= i < n:
                raise IndexError(f"index {i} is out of range for a dataset of {n} samples")
        items = [(*self.dataset[i], i) for i in indices]
        if self.sampler is None:
            return items
        contrast = self.sampler(torch.tensor(indices, dtype=torch.int64), self._generator())
        return [(*item, row) for item, row in zip(items, contrast)]

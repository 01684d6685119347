"""Datasets held whole on the training device, with augmentation done there by tensor ops.

A CIFAR training set is 150 MB of uint8: it fits on any GPU, and then an epoch needs no worker
processes, no host-to-device copies and no per-image Python. :class:`DeviceDataset` holds the
images (uint8 ``[N, H, W, C]``) and labels on a device; :class:`DeviceLoader` walks it in batches
and, per batch, gathers the images, applies the standard CIFAR augmentation — a random
``H×W`` crop of the image zero-padded by ``padding`` pixels on each side, then a horizontal flip
with probability 1/2 — as one indexed gather (:func:`crop_flip`), and normalises
``(x - mean) / std`` in float32. Everything also works on CPU tensors.

Distributed runs: rank r of W (``rank``, ``world_size``) walks the same order in global batches
of W·``batch_size`` and takes rows [r·b, (r+1)·b) of each, with that slice of the global batch's
crop / flip / contrast draws, so the ranks' batches together are exactly one process's batch of
W·b (the contrast draw is made for the whole global batch on every rank, W times the work of
one slice, to keep that identity).

Randomness is a function of ``(seed, epoch)`` only, so a resumed run sees the same batches: each
pass builds a generator on the data's device seeded with ``mix_seed(seed, epoch)`` and draws, in
this order, the permutation of the epoch (``randperm``, when shuffling), then per batch, when
augmenting, the crop rows ``top`` and columns ``left`` (``randint(0, 2·padding + 1)`` each) and,
with ``flip``, the flips (``randint(0, 2)``). A contrast sampler draws the batches' contrast indices
(on the CPU one batch ahead, in a worker thread) from a second generator, seeded with ``mix_seed(seed, epoch, CONTRAST_STREAM)``: the images a
network sees do not depend on whether a loss samples contrast indices, so the teacher outputs cached
for one recipe's batches (:mod:`fastkd.train.teacher_cache`) are those of every recipe with the same
data, seed and batch size (as in the worker-fed path, where the transform and the contrast sampler
are reseeded separately).
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastkd.data._seed import mix_seed
from fastkd.data.contrast import ContrastSampler

CONTRAST_STREAM = 1  # mixed into the contrast generator's seed: its draws never shift the crops


def crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
              padding: int) -> torch.Tensor:
    """Crops of zero-padded images, mirrored where ``flip``: one gather for the whole batch.

    ``images`` is ``[B, H, W, C]``; the image is padded with ``padding`` zeros on every side and
    the ``H×W`` window whose top-left corner is ``(top[b], left[b])`` in padded coordinates
    (each in ``[0, 2·padding]``) is returned, reversed along W where ``flip[b]`` is true.
    """
    b, h, w, _ = images.shape
    padded = F.pad(images, (0, 0, padding, padding, padding, padding)) if padding else images
    dev = images.device
    rows = top[:, None] + torch.arange(h, device=dev)
    j = torch.arange(w, device=dev)
    cols = left[:, None] + torch.where(flip[:, None], w - 1 - j, j)
    return padded[torch.arange(b, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]


class DeviceDataset:
    """Images (uint8 ``[N, H, W, C]``), labels (int64 ``[N]``) and normalisation on one device.

    Args:
        images: uint8 array or tensor ``[N, H, W, C]``.
        labels: integer labels ``[N]``.
        mean, std: per-channel statistics in the units of ``images``.
        device: where everything lives (``"cuda"`` for training on a GPU).
    """

    def __init__(self, images, labels, mean: Sequence[float], std: Sequence[float],
                 device: str | torch.device = "cpu"):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {tuple(images.shape)}")
        labels = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
        if labels.shape != images.shape[:1] or labels.dtype.is_floating_point:
            raise ValueError(f"labels must be {images.shape[0]} integers, got {labels.dtype} {tuple(labels.shape)}")
        channels = images.shape[-1]
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(f"mean and std need one value per channel ({channels}, std > 0), "
                             f"got {tuple(mean)} and {tuple(std)}")
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)

    @classmethod
    def from_dataset(cls, dataset, device: str | torch.device = "cpu") -> "DeviceDataset":
        """From an in-memory dataset: anything with ``data``, ``targets``, ``mean`` and ``std``
        (:class:`~fastkd.data.arrays.ArrayDataset`, CIFAR, digits, a cached ImageFolder)."""
        if getattr(dataset, "data", None) is None:
            raise ValueError(f"dataset ({type(dataset).__name__}) holds no 'data' array; "
                             "an ImageFolder needs cache=True")
        return cls(dataset.data, dataset.targets, dataset.mean, dataset.std, device)

    def __len__(self) -> int:
        return self.images.shape[0]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, H, W, C]`` → float32 ``[B, C, H, W]`` (channels-last strides) ``(x - mean) / std``."""
        x = images.permute(0, 3, 1, 2).float()
        return x.sub_(self.mean[:, None, None]).div_(self.std[:, None, None])


class DeviceLoader:
    """Batches ``(images, labels, indices[, contrast_idx])`` of a :class:`DeviceDataset`.

    Args:
        dataset: the data, on its device.
        batch_size: samples per batch.
        shuffle: a fresh permutation each epoch (else dataset order).
        augment: random crop of the ``padding``-padded image and, with ``flip``, horizontal flips.
        drop_last: leave out the last, smaller batch (static shapes for CUDA graphs).
        padding: zero pixels added on each side before cropping (4 for CIFAR).
        flip: flip half the images (on by default; off for digits or text).
        contrast: a :class:`~fastkd.data.contrast.ContrastSampler` over ``dataset.labels``; batches
            then also carry its ``[B, K + 1]`` contrast indices.
        seed: with the epoch, fixes every draw (see the module doc).
        channels_last: return images in channels-last memory format (else contiguous NCHW).
        channels: the channels the model takes; greyscale data (1 channel, kept so in memory: a third of
            the bytes) is repeated to them batch by batch. ``None``: as stored.
        inputs: uint8 ``[B, H, W, C]`` augmented images → the batch's float ``[B, C', H, W]`` input, in place of
            the dataset's normalisation (e.g. :class:`~fastkd.data.views.ViewSplit`'s paired views, made
            after the crop and flip so that they share them); ``channels`` does not apply then.
        rank, world_size: this process's slice of each global batch (see the module doc).
    """

    def __init__(self, dataset: DeviceDataset, batch_size: int, *, shuffle: bool = True, augment: bool = True,
                 drop_last: bool = False, padding: int = 4, flip: bool = True,
                 contrast: ContrastSampler | None = None, seed: int = 0, channels_last: bool = False,
                 channels: int | None = None, rank: int = 0, world_size: int = 1, inputs=None):
        if not isinstance(dataset, DeviceDataset):
            raise TypeError(f"dataset must be a DeviceDataset, got {type(dataset).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be an int ≥ 0, got {padding!r}")
        if contrast is not None:
            if contrast.device != dataset.device:
                raise ValueError(f"contrast samples on {contrast.device} but the dataset is on {dataset.device}")
            if contrast.num_data != len(dataset):
                raise ValueError(f"contrast was built for {contrast.num_data} samples but the dataset has "
                                 f"{len(dataset)}")
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.padding, self.flip, self.contrast = padding, flip, contrast
        self.seed, self.channels_last = int(seed), channels_last
        stored = dataset.images.shape[-1]
        if channels is not None and channels != stored and stored != 1:
            raise ValueError(f"channels={channels}: the dataset's images have {stored} channels; only greyscale "
                             "(1-channel) images are repeated")
        self.channels, self.inputs = channels, inputs
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        self.rank, self.world_size = int(rank), int(world_size)
        if drop_last and len(dataset) < batch_size * world_size:
            raise ValueError(f"the dataset holds {len(dataset)} samples, fewer than one global batch of {batch_size} x "
                             f"{world_size}: an epoch would train nothing (set data.batch_size={len(dataset)} or less)")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose draws the next pass makes (each pass then advances it by one)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n, span = len(self.dataset), self.batch_size * self.world_size
        return n // span if self.drop_last else math.ceil(n / span)

    def generator(self, epoch: int) -> torch.Generator:
        """The generator an epoch's pass draws from (a fresh one, seeded from ``seed`` and ``epoch``)."""
        return torch.Generator(device=self.dataset.device).manual_seed(mix_seed(self.seed, epoch))

    def contrast_generator(self, epoch: int) -> torch.Generator:
        """The generator an epoch's contrast indices are drawn from (apart from the crops' generator)."""
        return torch.Generator(device=self.dataset.device).manual_seed(mix_seed(self.seed, epoch, CONTRAST_STREAM))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        data, dev = self.dataset, self.dataset.device
        g = self.generator(epoch)
        g_contrast = self.contrast_generator(epoch) if self.contrast is not None else None
        n = len(data)
        order = torch.randperm(n, generator=g, device=dev) if self.shuffle else torch.arange(n, device=dev)
        width = self.batch_size * self.world_size  # the global batch
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        starts = range(0, len(self) * width, width)
        draws = None
        if self.contrast is not None:
            draws = _drawn_ahead(self.contrast, [order[start:start + width] for start in starts], g_contrast,
                                 background=dev.type == "cpu")
        for start in starts:
            every = order[start:start + width]
            index = every[mine]
            images = data.images[index]
            if self.augment:
                b, span = every.numel(), 2 * self.padding + 1
                top = torch.randint(0, span, (b,), generator=g, device=dev)[mine]
                left = torch.randint(0, span, (b,), generator=g, device=dev)[mine]
                if self.flip:
                    flip = torch.randint(0, 2, (b,), generator=g, device=dev).bool()[mine]
                else:
                    flip = torch.zeros(index.numel(), dtype=torch.bool, device=dev)
                images = crop_flip(images, top, left, flip, self.padding)
            x = data.normalize(images) if self.inputs is None else self.inputs(images)
            if self.inputs is None and self.channels is not None and x.shape[1] != self.channels:
                x = x.expand(-1, self.channels, -1, -1)
            x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()
            batch = (x, data.labels[index], index)
            if draws is not None:
                batch = (*batch, next(draws)[mine])
            if index.numel():  # a rank's slice of the short last batch may be empty
                yield batch


def _drawn_ahead(sampler: ContrastSampler, batches: list[torch.Tensor], generator: torch.Generator,
                 background: bool) -> Iterator[torch.Tensor]:
    """The contrast indices of each of ``batches`` (global batches of dataset indices), in order, from
    ``generator``. With ``background`` (CPU data) each batch's draw is made in a worker thread while the
    previous batch trains, one batch ahead: the same draws in the same order (one thread, one generator), off
    the step's critical path (CRD's class-aware draw of 64 × 16,384 negatives takes ~60 ms on one CPU core, as
    long as the fused CRD op itself). On a GPU the draws are queued kernels already and run inline."""
    if not background:
        for every in batches:
            yield sampler.draw(every, generator)
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastkd-contrast")
    try:
        pending = [pool.submit(sampler.draw, every, generator) for every in batches[:1]]
        for position in range(len(batches)):
            drawn = pending.pop(0).result()
            if position + 1 < len(batches):
                pending.append(pool.submit(sampler.draw, batches[position + 1], generator))
            yield drawn
    finally:  # an abandoned pass waits for its draw in flight: the sampler's buffers are not shared
        pool.shutdown(wait=True, cancel_futures=True)

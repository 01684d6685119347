"""Datasets, CRD's contrast sampling and device-side augmentation.

- :func:`load_digits` / :class:`Digits`: the embedded default (the UCI digits, shipped in the package).
- :class:`CIFAR10` / :class:`CIFAR100`: the python-pickle folders, downloaded on request.
- :class:`ImageFolder`: ``root/<class>/<image>`` trees, optionally decoded once into a uint8 cache.
- :class:`IndexedDataset`: items with their index (and contrast indices) for CRD.
- :class:`ContrastSampler`: RepDistiller's 'exact' / 'relax' contrast indices for a whole batch.
- :class:`DeviceDataset` / :class:`DeviceLoader`: in-memory sets on the GPU, crop + flip there.

Images held in memory are uint8 ``[N, H, W, C]`` with per-channel ``mean`` / ``std`` in the same
units (:class:`ArrayDataset`); batches are float32 ``[B, C, H, W]``.
"""
from fastkd.data.arrays import ArrayDataset, channel_stats, normalize
from fastkd.data.cifar import CIFAR10, CIFAR100
from fastkd.data.contrast import ContrastSampler
from fastkd.data.device import DeviceDataset, DeviceLoader, crop_flip
from fastkd.data.digits import Digits, DigitsTensors, load_digits
from fastkd.data.folder import ImageFolder
from fastkd.data.indexed import IndexedDataset

__all__ = [
    "ArrayDataset", "channel_stats", "normalize", "CIFAR10", "CIFAR100", "ContrastSampler", "DeviceDataset",
    "DeviceLoader", "crop_flip", "Digits", "DigitsTensors", "load_digits", "ImageFolder", "IndexedDataset",
]

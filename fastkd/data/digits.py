"""The embedded default dataset: the UCI handwritten digits, shipped inside fastkd (no download).

``digits.npz`` beside this module holds 1,797 grey 8×8 images (uint8, pixel values 0..16,
``images`` ``[1797, 8, 8]``) and their labels (int64, ``targets`` ``[1797]``, ten classes): the
test part (``optdigits.tes``) of "Optical Recognition of Handwritten Digits" by E. Alpaydin and
C. Kaynak (Bogazici University, 1998) from the UCI Machine Learning Repository, which publishes it
under CC BY 4.0, in the order and form scikit-learn ships it as ``sklearn.datasets.load_digits``.
It was written once, with scikit-learn 1.9.1, by::

    bunch = sklearn.datasets.load_digits()   # images: float64 integers 0..16
    numpy.savez_compressed("digits.npz", images=bunch.images.astype(numpy.uint8),
                           targets=bunch.target.astype(numpy.int64))

so the arrays equal scikit-learn's bit for bit (``tests/test_data.py`` checks their digests, and
compares them with scikit-learn's copy where scikit-learn is installed).

The split is fixed: per class, a permutation from ``numpy.random.RandomState(seed)`` (a generator
whose stream numpy keeps stable) sends ``round(test_fraction · n_class)`` images to the test set;
each split keeps the original order. With the defaults that is 1,347 training and 450 test images.

Images stay in their own units (0..16) as uint8; ``mean`` / ``std`` are the training split's,
in those units. ``size`` (a multiple of 8) repeats pixels (nearest-neighbour upsampling, which
leaves mean and std unchanged) so that models built for 32×32 inputs can eat them, and
``channels=3`` repeats the grey channel for RGB models.
"""
from __future__ import annotations

from importlib import resources
from typing import Callable, NamedTuple

import numpy as np
import torch

from fastkd.data.arrays import ArrayDataset, channel_stats, normalize

NUM_CLASSES = 10
FILE = "digits.npz"


def raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The shipped arrays (see the module doc): uint8 images ``[1797, 8, 8]``, int64 labels ``[1797]``."""
    with (resources.files(__package__) / FILE).open("rb") as stream, np.load(stream) as arrays:
        return arrays["images"], arrays["targets"]


def _split_indices(targets: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    test = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(targets == c)
        test.append(members[rng.permutation(len(members))[: int(round(test_fraction * len(members)))]])
    is_test = np.zeros(len(targets), dtype=bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _images(size: int, channels: int, test_fraction: float, seed: int):
    if isinstance(size, bool) or not isinstance(size, int) or size < 8 or size % 8:
        raise ValueError(f"size must be a multiple of 8 (8, 16, 32, ...), got {size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    images, targets = raw_digits()
    factor = size // 8
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    images = np.repeat(images[..., None], channels, axis=3)
    train, test = _split_indices(targets, test_fraction, seed)
    return images, targets, train, test


class Digits(ArrayDataset):
    """The shipped digits as an :class:`~fastkd.data.arrays.ArrayDataset` (see the module doc).

    Args:
        train: the training split (else the test split).
        size: image side, a multiple of 8 (pixels are repeated).
        channels: 1 (grey) or 3 (the grey channel repeated).
        transform: as in :class:`~fastkd.data.arrays.ArrayDataset`.
        test_fraction, seed: define the fixed split; change them only on purpose.
    """

    def __init__(self, train: bool = True, size: int = 8, channels: int = 1, transform: Callable | None = None,
                 test_fraction: float = 0.25, seed: int = 0):
        images, targets, train_idx, test_idx = _images(size, channels, test_fraction, seed)
        mean, std = channel_stats(images[train_idx])
        rows = train_idx if train else test_idx
        super().__init__(images[rows], targets[rows], mean, std, [str(c) for c in range(NUM_CLASSES)], transform)


class DigitsTensors(NamedTuple):
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(size: int = 8, channels: int = 1, test_fraction: float = 0.25, seed: int = 0) -> DigitsTensors:
    """The digits split as tensors: float32 images ``[N, channels, size, size]`` normalised with the
    training split's mean and std, int64 labels ``[N]``."""
    images, targets, train_idx, test_idx = _images(size, channels, test_fraction, seed)
    mean, std = channel_stats(images[train_idx])
    return DigitsTensors(normalize(images[train_idx], mean, std), torch.from_numpy(targets[train_idx]),
                         normalize(images[test_idx], mean, std), torch.from_numpy(targets[test_idx]))

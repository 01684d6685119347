"""CIFAR-10 and CIFAR-100 from the standard python-pickle folders.

``root`` holds (or receives, with ``download=True``) the folder unpacked from the archive at
https://www.cs.toronto.edu/~kriz/cifar.html:

- CIFAR-10: ``cifar-10-batches-py/`` with ``data_batch_1`` … ``data_batch_5``, ``test_batch`` and
  ``batches.meta``;
- CIFAR-100: ``cifar-100-python/`` with ``train``, ``test`` and ``meta`` (fine labels).

Each data file is a pickled dict whose ``data`` is uint8 ``[n, 3072]`` (the red plane, then
green, then blue, each row-major 32×32) and whose ``labels`` (``fine_labels`` for CIFAR-100)
is a list of ints. ``root`` may also be that folder itself. Pickle runs code from the file:
load only archives you trust (the download checks the published MD5).

The normalisation is each training set's per-channel mean / std (the values RepDistiller uses
for CIFAR-100), kept in 0-255 units in ``mean`` / ``std``.
"""
from __future__ import annotations

import os
import pickle
from typing import Callable

import numpy as np

from fastkd.data.arrays import ArrayDataset
from fastkd.data.download import download as fetch
from fastkd.data.download import extract_tar


def _unpickle(path: str):
    """A pickled CIFAR file (written by Python 2: ``latin1`` keeps its byte strings); bytes keys → str."""
    with open(path, "rb") as stream:
        entry = pickle.load(stream, encoding="latin1")
    if isinstance(entry, dict):
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    return entry


class _CIFAR(ArrayDataset):
    name: str
    folder: str
    url: str
    archive_md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    mean_01: tuple[float, float, float]
    std_01: tuple[float, float, float]

    def __init__(self, root: str | os.PathLike, train: bool = True, transform: Callable | None = None,
                 download: bool = False):
        root = os.fspath(root)
        files = self.train_files if train else self.test_files
        if download:
            self.fetch_missing(root)
        folder = self._find(root)
        if folder is None:
            wanted = ", ".join(self.train_files + self.test_files)
            raise FileNotFoundError(
                f"{self.name} not found under {root!r}: expected the folder {os.path.join(root, self.folder)!r} "
                f"holding {wanted} (the python version of {self.url}); pass download=True (in a recipe: "
                f"data.download=true) to fetch it")
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise FileNotFoundError(f"{self.name} folder {folder!r} lacks {', '.join(missing)}; "
                                    f"expected {', '.join(files)} (download=True, in a recipe data.download=true, "
                                    f"fetches them again)")
        parts = [self._read(os.path.join(folder, f)) for f in files]
        data = np.concatenate([p[0] for p in parts])
        targets = np.concatenate([p[1] for p in parts])
        super().__init__(data, targets, tuple(255 * m for m in self.mean_01), tuple(255 * s for s in self.std_01),
                         self._classes(folder), transform)
        self.root, self.train = root, train

    @classmethod
    def _find(cls, root: str) -> str | None:
        """The folder holding the data files: ``root/<folder>`` or ``root`` itself."""
        for folder in (os.path.join(root, cls.folder), root):
            if any(os.path.isfile(os.path.join(folder, f)) for f in cls.train_files + cls.test_files):
                return folder
        return None

    @classmethod
    def fetch_missing(cls, root: str | os.PathLike) -> None:
        """:meth:`download` unless ``root`` already holds every data file (both splits)."""
        folder = cls._find(os.fspath(root))
        if folder is None or not all(os.path.isfile(os.path.join(folder, f)) for f in cls.train_files + cls.test_files):
            cls.download(root)

    @classmethod
    def download(cls, root: str | os.PathLike) -> None:
        """Fetch the archive into ``root``, check its MD5 and unpack it there."""
        archive = fetch(cls.url, os.path.join(os.fspath(root), os.path.basename(cls.url)), cls.archive_md5)
        extract_tar(archive, root)

    def _read(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        entry = _unpickle(path)
        if not isinstance(entry, dict) or "data" not in entry or self.label_key not in entry:
            raise ValueError(f"{path} is not a {self.name} batch: expected a pickled dict with "
                             f"'data' and '{self.label_key}'")
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry[self.label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
            raise ValueError(f"{path}: expected data [n, 3072] and n labels, got {data.shape} and {labels.shape}")
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels

    def _classes(self, folder: str) -> list[str] | None:
        path = os.path.join(folder, self.meta_file)
        if not os.path.isfile(path):
            return None
        meta = _unpickle(path)
        if not isinstance(meta, dict) or self.names_key not in meta:
            return None
        return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in meta[self.names_key]]


class CIFAR10(_CIFAR):
    """CIFAR-10 (50,000 training / 10,000 test images, 10 classes); see the module doc.

    Args:
        root: the folder holding ``cifar-10-batches-py/`` (or that folder itself).
        train: the five training batches (else ``test_batch``).
        transform: as in :class:`~fastkd.data.arrays.ArrayDataset`.
        download: fetch and unpack the archive (163 MB) when the files are absent.
    """

    name = "CIFAR-10"
    folder = "cifar-10-batches-py"
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    archive_md5 = "c58f30108f718f92721af3b95e74349a"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file, label_key, names_key = "batches.meta", "labels", "label_names"
    mean_01 = (0.4914, 0.4822, 0.4465)
    std_01 = (0.2470, 0.2435, 0.2616)


class CIFAR100(_CIFAR):
    """CIFAR-100 with its fine labels (50,000 / 10,000 images, 100 classes); see the module doc.

    Args:
        root: the folder holding ``cifar-100-python/`` (or that folder itself).
        train: the ``train`` file (else ``test``).
        transform: as in :class:`~fastkd.data.arrays.ArrayDataset`.
        download: fetch and unpack the archive (161 MB) when the files are absent.
    """

    name = "CIFAR-100"
    folder = "cifar-100-python"
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    archive_md5 = "eb9058c3a382ffc7106e4002c42a8d85"
    train_files = ("train",)
    test_files = ("test",)
    meta_file, label_key, names_key = "meta", "fine_labels", "fine_label_names"
    mean_01 = (0.5071, 0.4867, 0.4408)
    std_01 = (0.2675, 0.2565, 0.2761)

"""Image trees in ImageNet's layout, ``root/<class>/<image>``, decoded with PIL.

Classes are the sub-folders of ``root`` in sorted order (label = position), samples every file
below a class folder whose extension is in :data:`EXTENSIONS` (any case), sorted by path: the
same mapping as torchvision's ``ImageFolder``.

For sets of small images (CIFAR-10 as JPEGs: 60,000 files, about 17 s to decode on two cores)
``cache=True`` decodes every image once into a uint8 array ``[N, H, W, C]`` and later constructions
load it instead of decoding. ``C`` is 1 when every image is greyscale (a third of the bytes of RGB),
else 3. With ``size`` every image is brought to ``size`` × ``size`` as it is decoded
(:func:`~fastkd.data.arrays.fit_images`: ``resize``, ``pad`` or ``crop``), so the images may differ in
size; without it they must all have one size. The array is saved in fastkd's cache folder
(:func:`fastkd._cache.root`, ``images/``; not beside the user's data) unless ``cache_path`` says
otherwise, written to a temporary file and renamed, so a killed run never leaves a partial cache
that is read back. The cache records a fingerprint of the tree (class names, relative paths and file
sizes) and of ``size`` / ``fit``, and is rebuilt when they change. A cached folder has ``data`` like
an :class:`~fastkd.data.arrays.ArrayDataset` (``mean`` / ``std``: its own per-channel statistics unless
given) and can go to the GPU with :class:`~fastkd.data.device.DeviceDataset`.

Paired trees (cross-modal runs, e.g. RGB and depth of the same scenes): with ``pair_root`` (recipe key
``data.pair_root``) every sample ``root/<class>/<name>.<ext>`` has a partner ``pair_root/<class>/<name>.<any
image extension>`` (the same path less the extension; :func:`partner_files`), and the cached array holds each
partner's pixels as extra channels after the image's: ``C`` = the image's channels (1 or 3, as above) + the
partners' (1 when every partner is greyscale, else 3). Partners are brought to ``size`` the same way; without
``size`` each must have its image's size. Partner files no sample asks for are left out. The fingerprint
covers the partners' relative paths and sizes too, and the default cache file is named after both roots.

:func:`evaluation_folder` is the one rule for the held-out split of a tree: ``val/`` when it exists,
else ``test/``.
"""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from fastkd import _cache
from fastkd.data._files import atomic_write
from fastkd.data.arrays import FITS, channel_stats, fit_images, normalize

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def decode(path: str) -> np.ndarray:
    """One image file → uint8 RGB array ``[H, W, 3]``."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def decode_kept(path: str) -> np.ndarray:
    """One image file → uint8 ``[H, W, 1]`` for a greyscale image, ``[H, W, 3]`` otherwise."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in GREY_MODES:
            return np.asarray(image.convert("L"))[..., None]
        return np.asarray(image.convert("RGB"))


def evaluation_folder(root: str) -> str:
    """The held-out split of an image tree: ``root/val`` when it exists, else ``root/test``."""
    for name in ("val", "test"):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    raise FileNotFoundError(f"{root!r} has neither val/ nor test/ beside train/: put the held-out images in "
                            f"{os.path.join(root, 'val')}/<class>/<image>")


def scan(root: str, extensions: Sequence[str] = EXTENSIONS) -> tuple[list[str], list[tuple[str, int]]]:
    """The class names of ``root`` and its ``(path, label)`` samples; see the module doc."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"root {root!r} is not a folder; expected root/<class>/<image>")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"root {root!r} has no class folders; expected root/<class>/<image>")
    wanted = tuple(x.lower() for x in extensions)
    samples = []
    for label, name in enumerate(classes):
        found = []
        for folder, _, files in os.walk(os.path.join(root, name), followlinks=True):
            found.extend(os.path.join(folder, f) for f in files if f.lower().endswith(wanted))
        samples.extend((path, label) for path in sorted(found))
    if not samples:
        raise FileNotFoundError(f"root {root!r} holds no image files with extensions {', '.join(wanted)}")
    return classes, samples


def _fingerprint(root: str, classes: list[str], samples: list[tuple[str, int]], shape: str = "") -> str:
    digest = hashlib.sha256(("\n".join(classes) + "\n" + shape).encode())
    for path, label in samples:
        digest.update(f"\n{os.path.relpath(path, root)}\t{label}\t{os.path.getsize(path)}".encode())
    return digest.hexdigest()


def _pair_fingerprint(fingerprint: str, pair_root: str, partners: list[str]) -> str:
    """``fingerprint`` (the image tree's) extended with the partners' relative paths and file sizes."""
    digest = hashlib.sha256(f"{fingerprint}\npairs".encode())
    for path in partners:
        digest.update(f"\n{os.path.relpath(path, pair_root)}\t{os.path.getsize(path)}".encode())
    return digest.hexdigest()


def partner_files(root: str, samples: list[tuple[str, int]], pair_root: str,
                  extensions: Sequence[str] = EXTENSIONS) -> list[str]:
    """The file of ``pair_root`` that pairs with each of ``root``'s ``samples``: the one at the sample's path
    relative to ``root`` less its extension, with any image extension (``train/cat/0001.jpg`` ↔
    ``pair_root/cat/0001.png``). ``ValueError`` (naming ``data.pair_root`` and the files) for a sample without a
    partner, for two partners with one stem and for two samples with one stem (their partners could not be
    told apart); ``FileNotFoundError`` when ``pair_root`` is not a folder."""
    if not os.path.isdir(pair_root):
        raise FileNotFoundError(f"data.pair_root: {pair_root!r} is not a folder; expected the partners of {root} "
                                f"there, as {os.path.join(pair_root, '<class>', '<file>')}")
    wanted = tuple(x.lower() for x in extensions)
    stems: dict[str, str] = {}
    for path, _ in samples:
        stem = os.path.splitext(os.path.relpath(path, root))[0]
        if stem in stems:
            raise ValueError(f"data.pair_root: {stems[stem]} and {path} share the stem {stem!r}, so their partners "
                             "in data.pair_root cannot be told apart: rename one")
        stems[stem] = path
    found: dict[str, list[str]] = {}
    for folder in sorted({os.path.dirname(stem) for stem in stems}):
        where = os.path.join(pair_root, folder)
        if not os.path.isdir(where):
            continue
        for name in sorted(os.listdir(where)):
            path = os.path.join(where, name)
            if name.lower().endswith(wanted) and os.path.isfile(path):
                found.setdefault(os.path.join(folder, os.path.splitext(name)[0]), []).append(path)
    partners = []
    for stem, path in stems.items():
        matches = found.get(stem, [])
        if not matches:
            raise ValueError(f"data.pair_root: {path} has no partner: no image file "
                             f"{os.path.join(pair_root, stem)}.<ext> ({', '.join(wanted)})")
        if len(matches) > 1:
            raise ValueError(f"data.pair_root: {path} has {len(matches)} partners with the stem {stem!r} "
                             f"({', '.join(matches)}): keep one")
        partners.append(matches[0])
    return partners


class ImageFolder(Dataset):
    """``(image, label)`` items from ``root/<class>/<image>``; see the module doc.

    Args:
        root: the tree's root folder.
        transform: called on the PIL image; by default the image becomes a float ``[3, H, W]``
            tensor normalised with ``mean`` / ``std``.
        cache: decode everything once into ``data`` and keep it in a file for later runs.
        cache_path: where that file goes (fastkd's cache folder by default; see the module doc).
        size, fit: with ``cache``, bring every image to ``size`` × ``size`` this way (see the module doc).
        mean, std: per-channel statistics in 0-255 units: ImageNet's by default, or with ``cache`` the
            cached images' own.
        num_workers: threads decoding while the cache is built (``min(8, cpu count)`` by default).
        pair_root: with ``cache``, a tree of partner files whose pixels are stacked after the images' channels
            (see the module doc); ``pair_channels`` is then their channel count (0 without).
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, *, cache: bool = False,
                 cache_path: str | os.PathLike | None = None, size: int | None = None, fit: str = "resize",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 num_workers: int | None = None, pair_root: str | os.PathLike | None = None):
        self.root = os.fspath(root)
        self.classes, self.samples = scan(self.root)
        self.pair_root = os.fspath(pair_root) if pair_root is not None else None
        self.partners: list[str] | None = None
        if self.pair_root is not None:
            if not cache:
                raise ValueError("pair_root (data.pair_root) stacks the partners as channels of the cached images: "
                                 "it needs cache=True (data.in_memory=true)")
            self.partners = partner_files(self.root, self.samples, self.pair_root)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.targets = np.array([label for _, label in self.samples], dtype=np.int64)
        if fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
        self.size, self.fit = size, fit
        self.transform = transform
        self.data: np.ndarray | None = None
        self.cache_path = None
        self.pair_channels = 0
        if cache:
            self.cache_path = os.fspath(cache_path) if cache_path is not None else self._default_cache_path()
            self.data = self._cached(num_workers)
        if mean is None or std is None:
            mean, std = channel_stats(self.data) if self.data is not None else (IMAGENET_MEAN, IMAGENET_STD)
        channels = self.data.shape[-1] if self.data is not None else 3
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(f"mean and std need {channels} values (std > 0), got {tuple(mean)} and {tuple(std)}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def _default_cache_path(self) -> str:
        roots = os.path.abspath(self.root) + ("" if self.pair_root is None else "\n" + os.path.abspath(self.pair_root))
        key = hashlib.sha256(roots.encode()).hexdigest()[:16]
        return str(_cache.root() / "images" / f"{key}-{self.size or 'own'}-{self.fit}.npz")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        image = self.data[i] if self.data is not None else decode(self.samples[i][0])
        if self.transform is None:
            return normalize(image, self.mean, self.std), int(self.targets[i])
        from PIL import Image

        return self.transform(Image.fromarray(image)), int(self.targets[i])

    # --- the cache ----------------------------------------------------------------------------
    def _cached(self, num_workers: int | None) -> np.ndarray:
        fingerprint = _fingerprint(self.root, self.classes, self.samples, f"{self.size}-{self.fit}")
        if self.partners is not None:
            fingerprint = _pair_fingerprint(fingerprint, self.pair_root, self.partners)
        data = self._read_cache(fingerprint)
        if data is not None:
            return data
        data = self.decode_all(num_workers)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
            with atomic_write(self.cache_path) as stream:
                np.savez(stream, data=data, targets=self.targets, fingerprint=np.array(fingerprint),
                         pair_channels=np.array(self.pair_channels))
        except OSError as e:
            warnings.warn(f"could not write the image cache {self.cache_path!r} ({e}); "
                          "pass a writable cache_path to keep it", stacklevel=3)
        return data

    def _read_cache(self, fingerprint: str) -> np.ndarray | None:
        """The cached array if the file is there, complete and made from this very tree."""
        if not os.path.isfile(self.cache_path):
            return None
        try:
            with np.load(self.cache_path, allow_pickle=False) as saved:
                if str(saved["fingerprint"]) != fingerprint:
                    return None
                data = saved["data"]
                pair_channels = int(saved["pair_channels"]) if "pair_channels" in saved.files else 0
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            warnings.warn(f"ignoring the unreadable image cache {self.cache_path!r} ({e}); rebuilding it", stacklevel=4)
            return None
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[0] != len(self.samples):
            return None
        self.pair_channels = pair_channels
        return data

    def _decode(self, path: str) -> np.ndarray:
        image = decode_kept(path)
        return image if self.size is None else fit_images(image[None], self.size, self.fit)[0]

    def decode_all(self, num_workers: int | None = None) -> np.ndarray:
        """Decode every image into one uint8 ``[N, H, W, C]`` array, C = 1 when all are greyscale, else 3, with
        the partners' channels after them when the folder has a ``pair_root`` (threads; PIL releases the GIL)."""
        def other_size(i: int, image: np.ndarray, first: np.ndarray) -> str:
            return (f"{self.samples[i][0]} is {image.shape[1]}x{image.shape[0]} but {self.samples[0][0]} is "
                    f"{first.shape[1]}x{first.shape[0]}: give the images one size (data.image_size=N in a recipe, "
                    "size=N here)")

        data = self._decode_files([path for path, _ in self.samples], num_workers, other_size)
        self.pair_channels = 0
        if self.partners is None:
            return data

        def other_partner(i: int, image: np.ndarray, _) -> str:
            return (f"data.pair_root: {self.partners[i]} is {image.shape[1]}x{image.shape[0]} but its image "
                    f"{self.samples[i][0]} is {data.shape[2]}x{data.shape[1]}: give the pairs one size, or "
                    "data.image_size=N (size=N here) to bring both to N x N")

        partners = self._decode_files(self.partners, num_workers, other_partner, data.shape[1:3])
        self.pair_channels = partners.shape[-1]
        return np.concatenate([data, partners], axis=-1)

    def _decode_files(self, paths: list[str], num_workers: int | None, mismatch: Callable,
                      shape: tuple[int, int] | None = None) -> np.ndarray:
        """``paths`` decoded into uint8 ``[N, H, W, 1 or 3]`` (1 when all are greyscale), each of ``shape`` (the
        first file's when ``None``); ``mismatch(i, image, first)`` words the error for a file of another size."""
        first = self._decode(paths[0])
        shape = tuple(shape) if shape is not None else first.shape[:2]
        data = np.empty((len(paths), *shape, 3), dtype=np.uint8)
        grey = np.zeros(len(paths), dtype=bool)

        def put(i: int) -> None:
            image = first if i == 0 else self._decode(paths[i])
            if image.shape[:2] != shape:
                raise ValueError(mismatch(i, image, first))
            data[i] = image
            grey[i] = image.shape[-1] == 1

        workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
        if workers <= 1:
            for i in range(len(paths)):
                put(i)
        else:
            chunks = [range(i, min(i + 256, len(paths))) for i in range(0, len(paths), 256)]
            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(lambda chunk: [put(i) for i in chunk], chunks):
                    pass
        return np.ascontiguousarray(data[..., :1]) if grey.all() else data

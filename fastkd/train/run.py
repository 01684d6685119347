"""From a recipe to a running :class:`~fastkd.train.engine.Trainer`: models, data, teacher weights.

Datasets that fit in memory (digits, CIFAR, a cached ImageFolder of small images with
``data.in_memory=true``) are held on the training device and batched there with device-side
crop + flip (:mod:`fastkd.data.device`), so the input pipeline never waits on Python workers.
Image trees on disk (ImageNet) are decoded by DataLoader workers with the standard transforms.
Under torchrun each rank loads its slice of every global batch (:mod:`fastkd.train.distributed`).
"""
from __future__ import annotations

import os
import random
import warnings

import torch

from fastkd import models
from fastkd.data.cifar import CIFAR10, CIFAR100
from fastkd.data.contrast import ContrastSampler
from fastkd.data.device import DeviceDataset, DeviceLoader
from fastkd.data.digits import Digits
from fastkd.data.folder import ImageFolder
from fastkd.data.indexed import IndexedDataset
from fastkd.data.keyed import EpochBatchSampler, KeyedBatches
from fastkd.data.transforms import EvalTransform, TrainTransform
from fastkd.losses import entry
from fastkd.train import distributed
from fastkd.train.checkpoint import load_checkpoint, read_weights
from fastkd.train.engine import Trainer
from fastkd.train.objectives import build_objective, needs_teacher, reads_teacher_state
from fastkd.train.recipe import Recipe

DIGITS_SIZE = 32  # the CIFAR zoo's input size: digits' 8×8 pixels are repeated 4×


class StreamedLoader:
    """Worker-fed batches of a dataset read from disk (pinned memory, persistent workers, a few
    batches prefetched per worker) whose order and random draws (augmentations, contrast indices)
    are a function of (seed, epoch, step), so a resumed run replays them exactly (see
    :mod:`fastkd.data.keyed`); under torchrun each rank takes its slice of every global batch.
    ``channels_last`` hands the model channels-last batches."""

    def __init__(self, dataset, batch_size: int, *, shuffle: bool, num_workers: int, seed: int, pin_memory: bool,
                 rng: random.Random | None = None, channels_last: bool = False):
        self.channels_last = channels_last
        self.batches = EpochBatchSampler(len(dataset), batch_size, shuffle=shuffle, drop_last=shuffle, seed=seed,
                                         rank=distributed.rank(), world_size=distributed.world_size())
        self.loader = torch.utils.data.DataLoader(
            KeyedBatches(dataset, seed, rng), batch_sampler=self.batches, num_workers=num_workers,
            pin_memory=pin_memory, persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def close(self) -> None:
        """Stops the persistent workers now. Left to the garbage collector, the DataLoader's iterator is
        often finalised inside a reference cycle after its queues, and each worker then waits out a
        5-second join timeout (measured: 20 s after a 2-loader, 2-worker run)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            self.loader._iterator = None
            iterator._shutdown_workers()

    def __iter__(self):
        for batch in self.loader:
            if self.channels_last:
                batch = (batch[0].contiguous(memory_format=torch.channels_last), *batch[1:])
            yield batch


def streamed_loaders(recipe: Recipe, device: torch.device, num_negatives: int | None):
    """ImageNet-style: ImageFolder trees decoded by workers with the standard train / val transforms."""
    data = recipe.data
    val_dir = os.path.join(data.root, "val" if os.path.isdir(os.path.join(data.root, "val")) else "test")
    augment = random.Random()  # reseeded for every batch by StreamedLoader
    train_set = ImageFolder(os.path.join(data.root, "train"), TrainTransform(data.image_size, rng=augment))
    test_set = ImageFolder(val_dir, EvalTransform(data.image_size))
    contrast = num_negatives if data.contrast_mode is not None else None
    indexed = IndexedDataset(train_set, contrast, data.contrast_mode or "exact", seed=recipe.seed)
    pin = device.type == "cuda"
    train = StreamedLoader(indexed, data.batch_size, shuffle=True, num_workers=data.num_workers, seed=recipe.seed,
                           pin_memory=pin, rng=augment, channels_last=recipe.channels_last)
    test = StreamedLoader(test_set, data.batch_size, shuffle=False, num_workers=data.num_workers, seed=recipe.seed,
                          pin_memory=pin, channels_last=recipe.channels_last)
    return train, test, list(train_set.classes), len(train_set)


def datasets(recipe: Recipe):
    """(train, test) in-memory datasets of the recipe's data section, and the class count (their
    ``classes`` attribute names the classes)."""
    data = recipe.data
    if data.name == "digits":
        return (Digits(train=True, size=DIGITS_SIZE, channels=3), Digits(train=False, size=DIGITS_SIZE, channels=3), 10)
    if data.root is None:
        raise ValueError(f"data.root must name the folder of {data.name} (e.g. data.root=/data/{data.name})")
    if data.name in ("cifar10", "cifar100"):
        cls = CIFAR10 if data.name == "cifar10" else CIFAR100
        if data.download:  # one process per machine fetches what is missing; the others wait for it
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                cls.fetch_missing(data.root)
            distributed.barrier()
        return cls(data.root, train=True), cls(data.root, train=False), 10 if data.name == "cifar10" else 100
    train = ImageFolder(os.path.join(data.root, "train"), cache=True)
    test = ImageFolder(os.path.join(data.root, "test" if os.path.isdir(os.path.join(data.root, "test")) else "val"),
                       cache=True)
    return train, test, len(train.classes)


def loaders(recipe: Recipe, device: torch.device, num_negatives: int | None):
    """``(train, test, class names, number of training samples)``: device-side loaders for in-memory
    sets, worker-fed ones for image trees on disk; with ``data.contrast_mode`` the train batches carry
    CRD's contrast indices."""
    if recipe.data.name == "imagefolder" and not recipe.data.in_memory:
        if recipe.data.root is None:
            raise ValueError("data.root must name the image tree (with train/ and val/ inside)")
        return streamed_loaders(recipe, device, num_negatives)
    train_set, test_set, _ = datasets(recipe)
    train_data = DeviceDataset.from_dataset(train_set, device)
    test_data = DeviceDataset.from_dataset(test_set, device)
    contrast = None
    if recipe.data.contrast_mode is not None and num_negatives is not None:
        contrast = ContrastSampler(train_data.labels, num_negatives, recipe.data.contrast_mode, seed=recipe.seed,
                                   device=device)
    flip = recipe.data.name != "digits"  # a mirrored digit is another glyph
    shard = {"rank": distributed.rank(), "world_size": distributed.world_size()}
    train = DeviceLoader(train_data, recipe.data.batch_size, augment=recipe.data.device_augment, flip=flip,
                         contrast=contrast, seed=recipe.seed, drop_last=True, channels_last=recipe.channels_last,
                         **shard)
    test = DeviceLoader(test_data, max(recipe.data.batch_size, 256), shuffle=False, augment=False,
                        channels_last=recipe.channels_last, **shard)
    return train, test, list(train_set.classes), len(train_data)


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load ``path``'s weights into ``model``: a fastkd checkpoint or export, a RepDistiller checkpoint
    ({'model': state_dict}) or a bare state_dict, read without running pickled code (see
    :func:`fastkd.train.checkpoint.read_weights`)."""
    model.load_state_dict(read_weights(path))


def training_device(device: str | torch.device | None) -> torch.device:
    """``device`` checked (a name torch knows, a CUDA device that exists), or, when ``None``, CUDA when
    there is one and the CPU otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name torch knows (cpu, cuda, cuda:1, ...)") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, no GPU visible"
        raise ValueError(f"device {device!r}: this machine has no CUDA device for torch {torch.__version__} ({build}); "
                         "use device cpu, or leave the device out to take whatever there is")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1})")
    return chosen


def contrast_negatives(recipe: Recipe) -> int | None:
    """K, the negatives per sample of dataset-side contrast sampling (``data.contrast_mode``): the
    ``num_negatives`` option of the loss that takes ``contrast_idx`` (CRD); None when none does."""
    for name, options in recipe.losses.items():
        if name != "ce" and "contrast_idx" in entry(name).takes:
            return options.get("num_negatives", entry(name).default("num_negatives"))
    return None


def make_trainer(recipe: Recipe, device: str | torch.device | None = None, output: str | None = None) -> Trainer:
    """The trainer a recipe describes, on ``device`` (CUDA when there is one, by default; under
    torchrun this rank's GPU, after :func:`fastkd.train.distributed.setup`)."""
    device = distributed.setup(None if device is None else training_device(device)) or training_device(None)
    recipe = distributed.scaled_recipe(recipe)
    torch.manual_seed(recipe.seed)
    train, test, class_names, num_data = loaders(recipe, device, contrast_negatives(recipe))
    classes = len(class_names)
    student = models.create(recipe.student.name, num_classes=classes)
    if recipe.student.checkpoint:
        load_weights(student, recipe.student.checkpoint)
    teacher = teacher_state = None
    if recipe.teacher is not None and recipe.teacher.checkpoint and not needs_teacher(recipe.losses):
        warnings.warn(f"teacher.checkpoint={recipe.teacher.checkpoint} is set, but no loss of this run distils from "
                      f"a teacher (losses: {', '.join(recipe.losses)}): the file is not read. Add a distillation loss "
                      "(losses.kd.weight=0.9, ...) or leave teacher.checkpoint out", UserWarning, stacklevel=2)
    if needs_teacher(recipe.losses):
        if recipe.teacher is None:
            raise ValueError(f"losses {sorted(set(recipe.losses) - {'ce'})} need a teacher (teacher.name=...)")
        if not recipe.teacher.checkpoint:
            raise ValueError("teacher.checkpoint must name the teacher's weights (a RepDistiller {'model': ...} "
                             "file or a fastkd checkpoint; `fastkd train` makes one)")
        teacher = models.create(recipe.teacher.name, num_classes=classes)
        load_weights(teacher, recipe.teacher.checkpoint)
        if reads_teacher_state(recipe.losses):  # SSKD's second stage also reads the stage-1 head
            teacher_state = load_checkpoint(recipe.teacher.checkpoint)
        teacher.to(device)
    student.to(device)
    if recipe.channels_last:
        student.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    if recipe.compile:
        # in place, so state_dict keys stay the model's own; FASTKD_COMPILE_BACKEND picks another backend
        student.compile(backend=os.environ.get("FASTKD_COMPILE_BACKEND", "inductor"))
    sample = next(iter(train))[0][:8]
    distiller = build_objective(recipe.losses, student, teacher, sample, num_data, teacher_state)
    meta = {"student": recipe.student.name, "num_classes": classes, "classes": class_names}
    return Trainer(recipe, distiller, train, test, device=device, output=output, meta=meta)

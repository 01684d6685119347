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
from fastkd.data.tinted import TintedDigits
from fastkd.data.arrays import fit_images
from fastkd.data.folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, evaluation_folder
from fastkd.data.indexed import IndexedDataset
from fastkd.data.keyed import EpochBatchSampler, KeyedBatches
from fastkd.data.transforms import EvalTransform, TrainTransform
from fastkd.losses import entry
from fastkd.models import TeacherEnsemble
from fastkd.train import distributed, views
from fastkd.train.checkpoint import load_checkpoint, read_model
from fastkd.train.engine import Trainer
from fastkd.train.objectives import build_objective, needs_teacher, objective_of, reads_teacher_state
from fastkd.train.recipe import Recipe, budget_warnings

DIGITS_SIZE = 32  # the CIFAR zoo's input size: digits' 8×8 pixels are repeated 4×
MODEL_CHANNELS = 3  # the zoo's models take RGB: greyscale data (kept 1-channel in memory) is repeated per batch


class StreamedLoader:
    """Worker-fed batches of a dataset read from disk (pinned memory, persistent workers, a few
    batches prefetched per worker) whose order and random draws (augmentations, contrast indices)
    are a function of (seed, epoch, step), so a resumed run replays them exactly (see
    :mod:`fastkd.data.keyed`); under torchrun each rank takes its slice of every global batch.
    ``channels_last`` hands the model channels-last batches."""

    def __init__(self, dataset, batch_size: int, *, shuffle: bool, num_workers: int, seed: int, pin_memory: bool,
                 rng: random.Random | None = None, channels_last: bool = False):
        self.channels_last, self.dataset = channels_last, dataset
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


STREAMED_SIZE = 224  # a streamed image tree's train crop / val centre crop when data.image_size is null


def _normalisation(recipe: Recipe, pixel_max: float, channels: int) -> tuple[list[float], list[float]] | None:
    """The recipe's ``data.mean`` / ``data.std`` (0-1 units) in the data's pixel units, checked against the
    data's channel count; ``None`` when the recipe leaves them to the data."""
    data = recipe.data
    if data.mean is None and data.std is None:
        return None
    if data.mean is None or data.std is None:
        raise ValueError("data.mean and data.std go together: give both (fastkd stats DIR prints them) or neither")
    for key, values in (("data.mean", data.mean), ("data.std", data.std)):
        if len(values) != channels:
            raise ValueError(f"{key} has {len(values)} value(s) but the images have {channels} channel(s)")
    return [m * pixel_max for m in data.mean], [s * pixel_max for s in data.std]


def streamed_loaders(recipe: Recipe, device: torch.device, num_negatives: int | None):
    """ImageNet-style: ImageFolder trees decoded by workers with the standard train / val transforms."""
    data = recipe.data
    size = data.image_size or STREAMED_SIZE
    mean, std = _normalisation(recipe, 255.0, 3) or (IMAGENET_MEAN, IMAGENET_STD)
    augment = random.Random()  # reseeded for every batch by StreamedLoader
    train_set = ImageFolder(os.path.join(data.root, "train"), TrainTransform(size, mean=mean, std=std, rng=augment))
    test_set = ImageFolder(evaluation_folder(data.root), EvalTransform(size, mean=mean, std=std))
    contrast = num_negatives if data.contrast_mode is not None else None
    indexed = IndexedDataset(train_set, contrast, data.contrast_mode or "exact", seed=recipe.seed)
    pin = device.type == "cuda"
    train = StreamedLoader(indexed, data.batch_size, shuffle=True, num_workers=data.num_workers, seed=recipe.seed,
                           pin_memory=pin, rng=augment, channels_last=recipe.channels_last)
    test = StreamedLoader(test_set, data.batch_size, shuffle=False, num_workers=data.num_workers, seed=recipe.seed,
                          pin_memory=pin, channels_last=recipe.channels_last)
    return train, test, list(train_set.classes), len(train_set)


def _read_sets(recipe: Recipe):
    """The recipe's (train, test) in-memory sets as stored, and their pixel maximum."""
    data = recipe.data
    if data.name == "digits":  # pixel repetition where the size allows it (the published 32 × 32 does)
        size = data.image_size if data.image_size and data.image_size % 8 == 0 else DIGITS_SIZE
        return Digits(train=True, size=size, channels=3), Digits(train=False, size=size, channels=3), 16.0
    if data.name == "tinted_digits":  # the digits in colour, for cross-modal runs (fastkd.data.tinted)
        size = data.image_size if data.image_size and data.image_size % 8 == 0 else DIGITS_SIZE
        return TintedDigits(train=True, size=size), TintedDigits(train=False, size=size), 255.0
    if data.root is None:
        raise ValueError(f"data.root must name the folder of {data.name} (e.g. data.root=/data/{data.name})")
    if data.name in ("cifar10", "cifar100"):
        cls = CIFAR10 if data.name == "cifar10" else CIFAR100
        if data.download:  # one process per machine fetches what is missing; the others wait for it
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                cls.fetch_missing(data.root)
            distributed.barrier()
        return cls(data.root, train=True), cls(data.root, train=False), 255.0
    folders = os.path.join(data.root, "train"), evaluation_folder(data.root)
    # the partners' tree, split for split (data.pair_root/train, data.pair_root/val or test as data.root has)
    pairs = [None if data.pair_root is None else os.path.join(data.pair_root, os.path.basename(f)) for f in folders]
    train = ImageFolder(folders[0], cache=True, size=data.image_size, fit=data.fit, pair_root=pairs[0])
    side = train.data.shape[1] if train.data.shape[1] == train.data.shape[2] else None
    test = ImageFolder(folders[1], cache=True, size=data.image_size or side, fit=data.fit, pair_root=pairs[1])
    if train.pair_channels != test.pair_channels:
        raise ValueError(f"data.pair_root: the partners in {pairs[0]} have {train.pair_channels} channel(s) but those "
                         f"in {pairs[1]} have {test.pair_channels} (1: every file greyscale, 3: some in colour): store "
                         "both splits' partners alike")
    return train, test, 255.0


def datasets(recipe: Recipe):
    """(train, test) in-memory datasets of the recipe's data section, and the class count (their
    ``classes`` attribute names the classes). Images are brought to ``data.image_size`` (as
    ``data.fit`` says) when it is set; both sets are normalised with ``data.mean`` / ``data.std`` when
    they are set, else with the training set's own statistics. Each set's ``pixel_max`` is its stored images'
    white (16 for the digits, else 255)."""
    data = recipe.data
    train, test, pixel_max = _read_sets(recipe)
    train.pixel_max = test.pixel_max = pixel_max
    if data.image_size:
        for split in (train, test):
            split.data = fit_images(split.data, data.image_size, data.fit)
    given = _normalisation(recipe, pixel_max, train.data.shape[-1])
    train.mean, train.std = given or (train.mean, train.std)
    test.mean, test.std = train.mean, train.std
    return train, test, len(train.classes)


def loaders(recipe: Recipe, device: torch.device, num_negatives: int | None):
    """``(train, test, class names, number of training samples)``: device-side loaders for in-memory
    sets, worker-fed ones for image trees on disk; with ``data.contrast_mode`` the train batches carry
    CRD's contrast indices."""
    if recipe.data.name == "imagefolder" and not recipe.data.in_memory:
        if recipe.data.root is None:
            raise ValueError("data.root must name the image tree (with train/ and val/ inside)")
        if views.views_of(recipe) is not None:
            raise ValueError("data.view / data.teacher_view need the images in memory: set data.in_memory=true")
        return streamed_loaders(recipe, device, num_negatives)
    train_set, test_set, _ = datasets(recipe)
    train_data = DeviceDataset.from_dataset(train_set, device)
    test_data = DeviceDataset.from_dataset(test_set, device)
    contrast = None
    if recipe.data.contrast_mode is not None and num_negatives is not None:
        contrast = ContrastSampler(train_data.labels, num_negatives, recipe.data.contrast_mode, seed=recipe.seed,
                                   device=device)
    flip = recipe.data.name not in ("digits", "tinted_digits")  # a mirrored digit is another glyph
    shard = {"rank": distributed.rank(), "world_size": distributed.world_size()}
    # cross-modal runs: every network's view made per batch after the shared crop + flip (fastkd.train.views)
    split = views.split_for(recipe, train_set, device)
    feed = {"channels": MODEL_CHANNELS} if split is None else {"channels": None, "inputs": split}
    train = DeviceLoader(train_data, recipe.data.batch_size, augment=recipe.data.device_augment, flip=flip,
                         contrast=contrast, seed=recipe.seed, drop_last=True, channels_last=recipe.channels_last,
                         **feed, **shard)
    test = DeviceLoader(test_data, max(recipe.data.batch_size, 256), shuffle=False, augment=False,
                        channels_last=recipe.channels_last, **feed, **shard)
    return train, test, list(train_set.classes), len(train_data)


def data_summary(recipe: Recipe, train, test, classes: int, num_data: int) -> str:
    """One line on what a run trains on: the data, its classes, the split sizes and the image shape."""
    data = recipe.data
    where = f" ({data.root}{' + ' + data.pair_root if data.pair_root else ''})" if data.root else ""
    if isinstance(train, DeviceLoader):
        _, h, w, c = train.dataset.images.shape
        shape = f"{h}x{w}x{c}" + (f", repeated to {train.channels} channels" if train.channels not in (None, c) else "")
        tested = len(test.dataset)
    else:
        size = data.image_size or STREAMED_SIZE
        shape, tested = f"{size}x{size} crops", len(test.dataset)
    return f"{data.name}{where}: {classes} classes, {num_data} training / {tested} test images, {shape}"


def _strip_prefix(state: dict, expected: dict) -> dict:
    """``state`` without a DDP / compile wrapper's key prefix (``module.``, ``_orig_mod.``) when the model's keys
    have none: torchvision's and timm's training scripts save such checkpoints."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _listed(keys: list[str], most: int = 4) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f", … ({len(keys) - most} more)" if len(keys) > most else "")


def load_weights(model: torch.nn.Module, path: str, name: str | None = None, role: str | None = None,
                 key: str = "checkpoint") -> None:
    """Load ``path``'s weights into ``model``: a fastkd checkpoint or export, a RepDistiller checkpoint
    ({'model': state_dict}), {'state_dict': ...} (timm's scripts), a ``.safetensors`` file or a bare
    state_dict (a DDP ``module.`` prefix is taken off), read without running pickled code (see
    :func:`fastkd.train.checkpoint.read_model`). ``name`` (the model name ``model`` was built from) is
    checked against the name a fastkd file records, and weights that do not fit ``model`` are refused
    with a report of the tensors that differ in shape, the model's keys missing from the file and the
    file's keys the model does not have (``role``, e.g. ``teacher``, and ``key``, ``checkpoint`` or
    ``weights``, name the recipe keys to fix)."""
    state, recorded = read_model(path)
    where = f"{role}.{key} {path}" if role else path
    if name is not None and recorded is not None and recorded != name:
        if role is None:
            raise ValueError(f"{path} holds a {recorded} (its file says so), not a {name}")
        raise ValueError(f"{where} holds a {recorded} (its file says so) but {role}.name is {name}: "
                         f"set {role}.name={recorded}, or give {role}.{key} the weights of a {name}")
    expected = model.state_dict()
    state = _strip_prefix(state, expected)
    shapes = [f"{k} {list(v.shape)} in the file, {list(expected[k].shape)} in the model" for k, v in state.items()
              if k in expected and hasattr(v, "shape") and tuple(v.shape) != tuple(expected[k].shape)]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if shapes or missing or unexpected:
        report = [f"{len(shapes)} tensors differ in shape" + (f" ({_listed(shapes, 2)})" if shapes else ""),
                  f"{len(missing)} are missing" + (f" ({_listed(missing)})" if missing else ""),
                  f"{len(unexpected)} are not the model's" + (f" ({_listed(unexpected)})" if unexpected else "")]
        fix = (f"Is {role}.name right? (and {role}.kwargs: a timm model's img_size, depth, ...)" if role
               else "Is the model name right?")
        raise ValueError(f"{where} does not hold weights of a {name or type(model).__name__}: {'; '.join(report)}. "
                         + fix)
    model.load_state_dict(state)


def build_model(config, classes: int, role: str, view=None) -> torch.nn.Module:
    """The recipe section ``config``'s (``student`` / ``teacher``) model for ``classes`` classes, with its
    ``kwargs``, and its weights when ``checkpoint`` or ``weights`` names a file. ``view``: a function that makes
    the model read its own view of the batches (:func:`fastkd.train.views.attach`, cross-modal runs), applied
    before the weights load (it rebuilds the first convolution for the view's channels)."""
    kwargs = dict(config.kwargs)
    if kwargs.pop("num_classes", classes) != classes:
        raise ValueError(f"{role}.kwargs.num_classes: the class count comes from the data ({classes}); leave it out")
    try:
        model = models.create(config.name, num_classes=classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{role}.name={config.name} with {role}.kwargs={kwargs}: {exc}") from None
    if view is not None:
        model = view(model)
    for key in ("checkpoint", "weights"):
        if getattr(config, key):
            load_weights(model, getattr(config, key), config.name, role, key)
    return model


def check_models(recipe: Recipe) -> None:
    """The recipe's model names exist here (their package installed), checked before any data is loaded."""
    roles = [("student", recipe.student)]
    if recipe.teacher is not None and needs_teacher(recipe.losses):
        roles.append(("teacher", recipe.teacher))
    if recipe.teachers and needs_teacher(recipe.losses):
        roles += [(f"teachers[{i}]", config) for i, config in enumerate(recipe.teachers)]
    for role, config in roles:
        try:
            models.check(config.name)
        except (ValueError, ImportError) as exc:
            raise type(exc)(f"{role}.name: {exc}") from None


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


def trained_student(recipe: Recipe, name: str, weights: str, classes: int, loader) -> torch.nn.Module:
    """The student model ``name`` as a finished run has it: built with the recipe's ``student.kwargs``, reading its
    view of ``loader``'s batches (cross-modal runs), with the weights in the file ``weights`` (``fastkd eval``,
    ``fastkd probe``)."""
    model = views.attach(models.create(name, num_classes=classes, **dict(recipe.student.kwargs)), loader, recipe)
    load_weights(model, weights, name)
    return model


def build_teacher(recipe: Recipe, classes: int, device: torch.device, loader=None) -> torch.nn.Module:
    """The recipe's teacher with its weights (``checkpoint`` or ``weights``), on ``device`` (channels-last when the
    recipe says so); with ``teachers``, all of them as one :class:`~fastkd.models.TeacherEnsemble` (each member's
    weights required). In a cross-modal run (``loader`` given) each network reads the teacher's view.

    Built under a forked RNG: its random initialisation, overwritten by the checkpoint, leaves the run's
    random stream as it was, so the losses' parameters (CRD's embeds, ...) start the same whether the
    teacher is built (a live run) or read from a cache (``teacher.cache``): the two runs are one.
    """
    view = None if loader is None else (lambda m: views.attach(m, loader, recipe, "teacher"))
    configs = recipe.teachers or []
    missing = [f"teachers[{i}]" for i, config in enumerate(configs) if not (config.checkpoint or config.weights)]
    if missing:
        raise ValueError(f"{', '.join(missing)}: each teacher of an ensemble needs its weights: checkpoint (a fastkd or "
                         "RepDistiller checkpoint; `fastkd train` makes one) or weights (any file of weights)")
    with torch.random.fork_rng(devices=[]):
        if configs:
            teacher = TeacherEnsemble([build_model(config, classes, f"teachers[{i}]", view)
                                       for i, config in enumerate(configs)], recipe.ensemble_average,
                                      taps=[config.taps for config in configs], names=[config.name for config in configs])
        else:
            teacher = build_model(recipe.teacher, classes, "teacher", view)
    teacher.eval().to(device)
    if recipe.channels_last:
        teacher.to(memory_format=torch.channels_last)
    return teacher


def make_trainer(recipe: Recipe, device: str | torch.device | None = None, output: str | None = None) -> Trainer:
    """The trainer a recipe describes, on ``device`` (CUDA when there is one, by default; under
    torchrun this rank's GPU, after :func:`fastkd.train.distributed.setup`)."""
    device = distributed.setup(None if device is None else training_device(device)) or training_device(None)
    for line in budget_warnings(recipe):
        warnings.warn(line, UserWarning, stacklevel=2)
    recipe = distributed.scaled_recipe(recipe)
    check_models(recipe)
    torch.manual_seed(recipe.seed)
    train, test, class_names, num_data = loaders(recipe, device, contrast_negatives(recipe))
    classes = len(class_names)
    student = build_model(recipe.student, classes, "student", lambda m: views.attach(m, train, recipe, "student"))
    teacher = teacher_state = cache = None
    given = [f"teacher.{key}={getattr(recipe.teacher, key)}" for key in ("checkpoint", "weights", "cache")
             if recipe.teacher is not None and getattr(recipe.teacher, key)]
    given += ["teachers"] if recipe.teachers else []
    if given and not needs_teacher(recipe.losses):
        warnings.warn(f"{' and '.join(given)} is set, but no loss of this run distils from a teacher (losses: "
                      f"{', '.join(recipe.losses)}): it is not read. Add a distillation loss (losses.kd.weight=0.9, "
                      f"...) or leave {' and '.join(g.split('=')[0] for g in given)} out", UserWarning, stacklevel=2)
    if recipe.teachers and needs_teacher(recipe.losses):
        objective = objective_of(recipe.losses)
        if objective != "offline":
            raise ValueError(f"teachers: an ensemble teaches through the offline distiller; these losses "
                             f"({', '.join(recipe.losses)}) train the {objective} objective, which takes one teacher")
        teacher = build_teacher(recipe, classes, device, train)
    elif needs_teacher(recipe.losses):
        if recipe.teacher is None:
            raise ValueError(f"losses {sorted(set(recipe.losses) - {'ce'})} need a teacher (teacher.name=...)")
        if recipe.teacher.cache:  # the teacher's outputs come with the batches; the teacher is not built
            from fastkd.train.cache_check import open_cache

            cache = open_cache(recipe, train, device)
        else:
            if not (recipe.teacher.checkpoint or recipe.teacher.weights):
                raise ValueError("teacher.checkpoint must name the teacher's weights (a RepDistiller {'model': ...} "
                                 "file or a fastkd checkpoint; `fastkd train` makes one), or teacher.weights any file "
                                 "of weights (safetensors, a state_dict, a timm / torchvision checkpoint), or "
                                 "teacher.cache a teacher cache (`fastkd cache-teacher`)")
            teacher = build_teacher(recipe, classes, device, train)
            if reads_teacher_state(recipe.losses):  # SSKD's second stage also reads the stage-1 head
                teacher_state = load_checkpoint(recipe.teacher.checkpoint)
    student.to(device)
    if recipe.channels_last:
        student.to(memory_format=torch.channels_last)
    if recipe.compile:
        # in place, so state_dict keys stay the model's own; FASTKD_COMPILE_BACKEND picks another backend
        student.compile(backend=os.environ.get("FASTKD_COMPILE_BACKEND", "inductor"))
    shown = train  # the data as loaded (a cached run's batches also carry the teacher's outputs)
    if cache is not None:
        train = cache.batches(train, distributed.rank(), device)
    sample = next(iter(train))[0][:8]
    taps = {"student_taps": recipe.student.taps,  # an ensemble's members carry their own taps
            "teacher_taps": recipe.teacher.taps if recipe.teacher is not None and (teacher is not None or cache is not None)
            else None}
    distiller = build_objective(recipe.losses, student, teacher, sample, num_data, teacher_state, teacher_cache=cache,
                                **taps)
    # the model the run trains and saves as its student (SSKD's first stage trains a head on its teacher)
    saved = recipe.teacher.name if recipe.teacher is not None and distiller.student is teacher else recipe.student.name
    meta = {"student": saved, "num_classes": classes, "classes": class_names,
            "data": data_summary(recipe, shown, test, classes, num_data)}
    return Trainer(recipe, distiller, train, test, device=device, output=output, meta=meta)

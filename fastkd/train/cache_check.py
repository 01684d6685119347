"""Whether a teacher cache (:mod:`fastkd.train.teacher_cache`) serves a run: :func:`describe_run` is what a
cache and a run must agree on (the teacher and its weights, the seed, the batches' data, augmentation and
normalisation, batch and world size, compute dtype and memory format); :func:`open_cache` opens the cache a
recipe's ``teacher.cache`` names and refuses one that disagrees, with every reason, before anything trains.
``fastkd cache-teacher`` (:mod:`fastkd.train.cache_teacher`) writes the same description into the manifest.
"""
from __future__ import annotations

import dataclasses
import hashlib

import torch

from fastkd.data.device import DeviceLoader
from fastkd.losses import entry
from fastkd.train import distributed
from fastkd.train.engine import amp_dtype
from fastkd.train.recipe import Recipe
from fastkd.train.rundir import weights_digest
from fastkd.train.teacher_cache import TeacherCache, dtype_name, teacher_needs

# recipe data keys that do not change the batches' pixels (where the data is, how it is loaded, CRD's contrast
# draws, which have their own generator), or that are compared on their own (batch size)
_NOT_PIXELS = ("root", "pair_root", "num_workers", "download", "contrast_mode", "batch_size")


def data_fingerprint(loader) -> dict:
    """What the batches of ``loader`` are made from: a digest of the training images and labels as held
    (after resizing) with the normalisation, and the augmentation (an in-memory set); the file list (a
    streamed tree)."""
    if isinstance(loader, DeviceLoader):
        data = loader.dataset
        digest = hashlib.sha256()
        digest.update(data.images.detach().cpu().contiguous().numpy().tobytes())
        digest.update(data.labels.detach().cpu().numpy().tobytes())
        digest.update(f"{data.mean.tolist()} {data.std.tolist()} {loader.channels}".encode())
        return {"images": "sha256:" + digest.hexdigest()[:16], "samples": len(data),
                "augmentation": {"augment": loader.augment, "padding": loader.padding, "flip": loader.flip,
                                 "shuffle": loader.shuffle}}
    from fastkd.data.folder import _fingerprint

    folder = getattr(getattr(loader, "dataset", None), "dataset", None)
    if folder is None or not hasattr(folder, "samples"):
        raise ValueError(f"a teacher cache needs a fastkd train loader (in memory or a streamed image tree), got "
                         f"{type(loader).__name__}")
    transform = getattr(folder, "transform", None)
    augmentation = {"transform": type(transform).__name__,
                    **{key: value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
                       for key, value in sorted(vars(transform).items()) if key != "rng"}} if transform else None
    return {"images": "sha256:" + _fingerprint(folder.root, folder.classes, folder.samples)[:16],
            "samples": len(folder), "augmentation": augmentation}


def describe_run(recipe: Recipe, loader, teacher_weights: str | None, device: torch.device) -> dict:
    """What a run's teacher sees and computes, for comparison with a cache's manifest: the teacher (name,
    digest of its weights — ``None`` when the run names no checkpoint), the seed, batch size and world
    size, the data and its fingerprint, the compute dtype, memory format and whether features are read
    before their activation (AB)."""
    amp = amp_dtype(recipe, device)
    data = {key: value for key, value in dataclasses.asdict(recipe.data).items() if key not in _NOT_PIXELS}
    return {"teacher": {"name": recipe.teacher.name, "weights": teacher_weights},
            "seed": recipe.seed, "batch_size": recipe.data.batch_size, "world_size": distributed.world_size(),
            "data": data, "data_fingerprint": data_fingerprint(loader),
            "compute_dtype": dtype_name(amp or torch.float32), "channels_last": recipe.channels_last,
            "preact": any(entry(key).preact for key in recipe.losses if key != "ce")}


def logit_temperatures(losses: dict) -> dict[str, float]:
    """{loss: temperature} of the losses that read the teacher's logits and have a temperature (KD, DKD)."""
    found = {}
    for key, options in losses.items():
        if key == "ce" or "logits_t" not in entry(key).takes:
            continue
        if "temperature" in entry(key).options:
            found[key] = float(options.get("temperature", entry(key).default("temperature")))
    return found


def teacher_file(recipe: Recipe) -> str | None:
    """The file the recipe's teacher weights come from: ``teacher.checkpoint``, else ``teacher.weights``."""
    return recipe.teacher.checkpoint or recipe.teacher.weights if recipe.teacher is not None else None


def open_cache(recipe: Recipe, loader, device: torch.device) -> TeacherCache:
    """The cache ``teacher.cache`` names, checked against the run ``recipe`` describes (``loader``: its train
    loader); ``ValueError`` with every reason it does not match."""
    from fastkd.train.objectives import objective_of

    objective = objective_of(recipe.losses)
    if objective != "offline":
        raise ValueError(f"teacher.cache serves the offline distiller's losses; this recipe's losses run in the "
                         f"{objective} objective, whose teacher sees inputs made inside the step")
    cache = TeacherCache(recipe.teacher.cache)
    needs = teacher_needs(recipe.losses)
    weights = weights_digest(teacher_file(recipe)) if teacher_file(recipe) else None
    staged = any(entry(key).init is not None for key in recipe.losses if key != "ce")
    epochs = max(recipe.epochs, recipe.init_epochs if staged else 0)
    cache.check(describe_run(recipe, loader, weights, device), needs, epochs, distributed.rank(),
                logit_temperatures(recipe.losses))
    made = (cache.manifest.get("torch"), str(cache.manifest.get("device", "")).split(":")[0])
    if made != (torch.__version__, device.type):
        import warnings

        warnings.warn(f"teacher.cache {cache.folder} was written by torch {made[0]} on {made[1] or 'an unknown device'}; "
                      f"this run uses torch {torch.__version__} on {device.type}: the teacher's outputs are the same "
                      "teacher's on the same batches, but not bit for bit what a live run here would compute",
                      RuntimeWarning, stacklevel=2)
    return cache

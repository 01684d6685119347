"""Run folders: one folder per run configuration, so that no run resumes or reports another run.

A run's folder holds ``config.yaml`` (what the run is: the resolved recipe, a digest of every
file of weights it starts from and, for a run with ``teacher.cache``, the cache's manifest digest), ``last.pt``, ``best.pt``, the metrics files and, while a process
trains in it, a lock. By default the folder is derived from the run itself,
``runs/<recipe>/<student>[-from-<teacher>]-<id>``, where ``<id>`` is a hash of the configuration
(:func:`run_id`), so two different runs never share a folder and the same command finds its own
folder again and resumes.

:func:`claim` is the one way in. It locks the folder (``fcntl.flock`` on ``.lock``: the kernel
releases it when the process ends however it ends, so a killed run never blocks the next) and
compares the configuration with the one the folder's run holds (once it has a checkpoint): the
same configuration resumes; another one is refused with the keys that differ, unless the caller chose to start fresh (the old run's
files move to a sibling folder, nothing is deleted) or to resume anyway (the old configuration is
kept beside the new one).

Keys that do not change a run's numbers (:data:`IGNORED`: where it writes, how many loader
workers, how often it checkpoints, where it logs) are left out of the comparison and the id.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import yaml

from fastkd.data._files import atomic_write, file_mode
from fastkd.train.checkpoint import read_weights
from fastkd.train.recipe import Recipe, dotted

CONFIG = "config.yaml"
LAST, BEST = "last.pt", "best.pt"
LOCK = ".lock"
RUNS = "runs"
# dotted keys that do not change what a run computes
IGNORED = ("output", "data.num_workers", "data.download", "checkpoint_every", "eval_every", "logger",
           "logger_project", "teacher.cache")  # a teacher cache is compared by its manifest's digest, not its path
MODES = ("auto", "fresh", "resume")


class RunFolderError(RuntimeError):
    """A run folder cannot be used as asked (another configuration, another live process)."""


# keys added after runs had ids (issue 17's weights / kwargs / taps): left out while unset, so that a run
# folder made before them keeps its id and resumes
_ADDED_LATER = {f"{role}.{key}": value for role in ("student", "teacher")
                for key, value in (("weights", None), ("kwargs", {}), ("taps", None))}
_ADDED_LATER.update({"teachers": None, "ensemble_average": "probs", "data.pair_root": None})  # issue 18


def _unset_since(key: str, value: Any) -> bool:
    return key in _ADDED_LATER and value == _ADDED_LATER[key]


def _ignored(key: str) -> bool:
    return any(key == name or key.startswith(name + ".") for name in IGNORED)


def weights_digest(path: str) -> str:
    """A digest of the weights a file holds (names, dtypes, shapes and values of its state_dict): two
    files with the same weights match whatever else they hold (timings, optimiser state)."""
    digest = hashlib.sha256()
    for name, value in sorted(read_weights(path).items()):
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous()
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return "sha256:" + digest.hexdigest()[:16]


def reads_teacher(recipe: Recipe) -> bool:
    """Whether a run of ``recipe`` loads its teacher (its losses distil from one)."""
    from fastkd.train.objectives import needs_teacher

    return (recipe.teacher is not None or bool(recipe.teachers)) and needs_teacher(recipe.losses)


def describe(recipe: Recipe) -> dict[str, Any]:
    """What a run computes: the resolved recipe (less :data:`IGNORED`) and, for each checkpoint it
    starts from, the digest of its weights (``"missing"`` for a file that is not there)."""
    config = {key: value for key, value in dotted(recipe.to_dict()).items()
              if not _ignored(key) and not _unset_since(key, value)}
    files = {"student.checkpoint": recipe.student.checkpoint, "student.weights": recipe.student.weights}
    if reads_teacher(recipe) and recipe.teacher is not None:
        files.update({"teacher.checkpoint": recipe.teacher.checkpoint, "teacher.weights": recipe.teacher.weights})
    if reads_teacher(recipe):
        files.update({f"teachers[{i}].{key}": getattr(config, key) for i, config in enumerate(recipe.teachers or ())
                      for key in ("checkpoint", "weights")})
    weights = {key: weights_digest(path) if os.path.isfile(path) else "missing"
               for key, path in files.items() if path}
    cached = {}
    if reads_teacher(recipe) and recipe.teacher is not None and recipe.teacher.cache:  # the teacher's outputs come from a cache: which one
        cached["teacher_cache[digest]"] = cache_digest(recipe.teacher.cache)
    return {**config, **{f"weights[{key}]": digest for key, digest in weights.items()}, **cached}


def cache_digest(folder: str) -> str:
    """The digest a teacher cache's manifest gives itself (what the cache holds and was made for), or
    ``"missing"``."""
    from fastkd.train.teacher_cache import MANIFEST

    try:
        with open(os.path.join(folder, MANIFEST)) as stream:
            return str(json.load(stream).get("digest", "missing"))
    except (OSError, ValueError):
        return "missing"


def run_id(description: dict[str, Any]) -> str:
    """Eight hex digits of a hash of :func:`describe`'s result."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:8]


def recipe_stem(recipe_name: str | None) -> str:
    """A shipped recipe's name, or a recipe file's name without its folder and extension."""
    if not recipe_name:
        return "run"
    return os.path.splitext(os.path.basename(recipe_name.rstrip("/")))[0] or "run"


def _in_path(model: str) -> str:
    """A model name as part of a folder name: ``timm:vit_tiny_patch16_224`` → ``timm-vit_tiny_patch16_224``."""
    return model.replace(":", "-").replace("/", "-")


def default_folder(recipe_name: str | None, recipe: Recipe, description: dict[str, Any] | None = None,
                   root: str = RUNS) -> str:
    """``runs/<recipe>/<student>[-from-<teacher>]-<id>``: the folder a run writes to unless told otherwise (an
    ensemble's teachers joined by ``+``, or ``<M>-teachers`` past three)."""
    description = describe(recipe) if description is None else description
    name = _in_path(recipe.student.name)
    if reads_teacher(recipe) and recipe.teachers:  # an ensemble: its members' names, or their count
        names = [_in_path(config.name) for config in recipe.teachers]
        name += "-from-" + ("+".join(names) if len(names) <= 3 else f"{len(names)}-teachers")
    elif reads_teacher(recipe):
        name += f"-from-{_in_path(recipe.teacher.name)}"
    return os.path.join(root, recipe_stem(recipe_name), f"{name}-{run_id(description)}")


def stored_description(folder: str) -> dict[str, Any] | None:
    """The description of the run ``folder`` holds: from its ``config.yaml``, or for a folder written
    before run folders had one, from the recipe inside its ``last.pt`` (no weight digests then). ``None``
    when the folder holds no checkpoint: then there is nothing a run could resume (at most a start
    that failed)."""
    last = os.path.join(folder, LAST)
    if not os.path.isfile(last):
        return None
    config = os.path.join(folder, CONFIG)
    if os.path.isfile(config):
        with open(config) as stream:
            tree = yaml.safe_load(stream) or {}
        return tree.get("run", {}).get("describes")
    from fastkd.train.checkpoint import load_checkpoint

    recipe = load_checkpoint(last).get("recipe")
    return {key: value for key, value in dotted(recipe).items() if not _ignored(key) and not _unset_since(key, value)} \
        if isinstance(recipe, dict) else None


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` lines for every key whose value differs (a folder written before weight
    digests existed is not compared on them)."""
    keys = sorted(set(old) | set(new))
    if not any(key.startswith("weights[") for key in old):
        keys = [key for key in keys if not key.startswith("weights[")]
    absent = "(absent)"
    return [f"{key}: {old.get(key, absent)!r} -> {new.get(key, absent)!r}" for key in keys
            if old.get(key, absent) != new.get(key, absent)]


def _lock_owner(path: str) -> str:
    with contextlib.suppress(OSError):
        with open(path) as stream:
            return stream.read().strip() or "unknown"
    return "unknown"


@contextlib.contextmanager
def _locked(folder: str) -> Iterator[None]:
    """Hold the folder's lock for the ``with`` block, or raise :class:`RunFolderError` at once."""
    path = os.path.join(folder, LOCK)
    handle = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(
                f"run folder {folder} is in use by another fastkd process ({_lock_owner(path)}): wait for it to "
                "finish, stop it, or give this run another folder (--output DIR)") from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(handle, 0)
    finally:
        os.close(handle)  # releases the lock


def _set_aside(folder: str) -> str:
    """Move every run file of ``folder`` (all but the lock) into a new sibling folder; its path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{folder.rstrip(os.sep)}.replaced-{stamp}"
    target, n = base, 1
    while os.path.exists(target):
        target, n = f"{base}-{n}", n + 1
    os.makedirs(target)
    for name in os.listdir(folder):
        if name != LOCK:
            os.replace(os.path.join(folder, name), os.path.join(target, name))
    return target


def _write_config(folder: str, recipe: Recipe, description: dict[str, Any], recipe_name: str | None,
                  command: str) -> None:
    tree = {"run": {"recipe": recipe_name, "command": command, "id": run_id(description), "describes": description},
            "recipe": {**recipe.to_dict(), "output": folder}}
    header = ("# A fastkd run: 'recipe' is the resolved recipe (fastkd distill/train/show/eval take this file or its\n"
              "# folder as a recipe); 'run.describes' is what the run computes, compared when the run is resumed.\n")
    with atomic_write(os.path.join(folder, CONFIG)) as stream:
        stream.write((header + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)).encode())


@dataclass
class Claim:
    """What :func:`claim` found: the folder, whether a checkpoint is there to resume, and, when the
    configuration changed, the differences and where an old run's files went."""
    folder: str
    resume: bool
    changed: list[str]
    set_aside: str | None = None


@contextlib.contextmanager
def claim(folder: str, recipe: Recipe, recipe_name: str | None = None, command: str = "distill",
          mode: str = "auto", description: dict[str, Any] | None = None) -> Iterator[Claim]:
    """Lock ``folder`` for a run of ``recipe`` and write its ``config.yaml``; see the module doc.

    ``mode``: ``auto`` resumes the same configuration and refuses another one; ``fresh`` moves an
    existing run aside and starts over; ``resume`` continues an existing run with the new configuration.
    ``description``: :func:`describe`'s result for ``recipe``, when the caller has it already.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    os.makedirs(folder, exist_ok=True)
    with _locked(folder):
        description = describe(recipe) if description is None else description
        stored = stored_description(folder)
        changed = differences(stored, description) if stored is not None else []
        aside = None
        if mode == "fresh" and os.listdir(folder) != [LOCK]:
            aside, stored, changed = _set_aside(folder), None, []
        elif changed and mode == "auto":
            raise RunFolderError(
                f"run folder {folder} holds a run with another configuration:\n  " + "\n  ".join(changed) +
                "\nStart this run in its own folder (leave out --output, or give another one), start over here with "
                "--fresh (the old run's files move to a sibling folder), or continue the old run with this "
                "configuration with --resume.")
        elif changed and os.path.isfile(os.path.join(folder, CONFIG)):  # --resume: the old one stays beside
            os.replace(os.path.join(folder, CONFIG),
                       os.path.join(folder, f"config.before-{time.strftime('%Y%m%d-%H%M%S')}.yaml"))
        _write_config(folder, recipe, description, recipe_name, command)
        yield Claim(folder, os.path.isfile(os.path.join(folder, LAST)), changed, aside)

"""Recipes: what a distillation run trains, with what, for how long — one YAML file per setting.

A recipe is a tree of plain values validated into :class:`Recipe`. A YAML file may name a
``base`` recipe (a shipped name such as ``cifar100`` or a path) whose values it overrides; any
key can also be overridden on the command line as ``section.key=value`` (the value parsed as
YAML: ``optim.lr=0.1``, ``losses.kd.weight=0.9``, ``schedule.milestones=[30,60,90]``). Unknown
keys are rejected with the list of the valid ones, so a typo never trains silently.

Losses: ``losses`` maps a loss name to its ``weight`` and the keyword arguments of its module
(``losses.kd.temperature=4``): the total is Σ weight · loss. ``ce`` is the student's cross
entropy on the labels; the others are the losses registered under those keys
(:func:`fastkd.losses.registered`): a loss's options are its constructor's keywords less those
the objective derives from the probed features (its entry's ``derived``).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from fastkd.losses import entry, registered
from fastkd.train.loggers import LOGGERS

@dataclass
class DataConfig:
    name: str = "digits"            # digits | tinted_digits | cifar10 | cifar100 | imagefolder
    root: str | None = None
    batch_size: int = 64
    num_workers: int = 0
    device_augment: bool = True     # crop + flip on the device for datasets held in memory
    contrast_mode: str | None = None  # CRD's dataset-side sampling: exact | relax | None (the loss samples)
    # the side images are trained at: data held in memory is brought to it once (see fit); streamed
    # imagefolder: the train crop / val centre crop. null: the images' own size (224 when streamed)
    image_size: int | None = None
    fit: str = "resize"             # in memory, images of another size: resize | pad | crop (fastkd.data.arrays.fit_images)
    mean: list[float] | None = None  # per-channel normalisation in 0-1 units (fastkd stats DIR prints them);
    std: list[float] | None = None   # null: the training split's own (in memory), ImageNet's (streamed)
    in_memory: bool = False         # imagefolder: decode once into a uint8 cache held on the device
    download: bool = False          # cifar10 / cifar100: fetch the archive into root when its files are absent
    # cross-modal runs (fastkd.data.views): the view the trained model (the student) sees — rgb | L | ab | Lab
    # or a name in views — and the view the teacher sees; null: the images as they are
    view: str | None = None
    teacher_view: str | None = None
    views: dict[str, list[int]] | None = None  # user views, {name: [stored channel indices]} (e.g. RGB + depth)
    # imagefolder in memory: a second tree (pair_root/{train,val|test}/<class>/<file>) whose files pair with
    # root's by class folder and stem, stacked as channels after the images' (depth: data.views={depth: [3]})
    pair_root: str | None = None


@dataclass
class ModelConfig:
    # a zoo name (resnet8x4), tv:NAME (torchvision) or timm:NAME (timm): fastkd.models.create; `fastkd models` lists them
    name: str = "resnet8x4"
    checkpoint: str | None = None   # a RepDistiller-style {'model': state_dict} file, or a fastkd checkpoint
    # weights from any local file: safetensors, a state_dict, {'model': ...}, {'state_dict': ...}, torchvision /
    # timm checkpoints (DDP's 'module.' prefix taken off); missing / unexpected keys are reported and refused
    weights: str | None = None
    kwargs: dict = field(default_factory=dict)  # keyword arguments of the model's builder (timm: img_size, patch_size, ...)
    taps: list[str] | None = None   # modules to read features from (stem, stages..., pooled); null: the model's defaults


@dataclass
class TeacherConfig(ModelConfig):
    # a folder written by `fastkd cache-teacher` (fastkd.train.teacher_cache): the teacher is not built or
    # run, each batch reads the teacher's outputs from the cache, which must match this run
    cache: str | None = None


@dataclass
class OptimConfig:
    name: str = "sgd"               # sgd | adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    reference_batch: int | None = None  # lr is for this global batch: lr × batch·world / reference_batch


@dataclass
class ScheduleConfig:
    name: str = "multistep"         # multistep | cosine
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    warmup_epochs: int = 0


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig | None = field(default_factory=lambda: TeacherConfig("resnet32x4"))
    # an ensemble of teachers (the CRD paper's ensemble distillation): [{name, checkpoint | weights, kwargs, taps}, ...]
    # in place of `teacher` (which is then null); logit losses read the ensemble's prediction, feature losses
    # each teacher (fastkd.train.distiller.Distiller, fastkd.models.TeacherEnsemble)
    teachers: list[TeacherConfig] | None = None
    ensemble_average: str = "probs"  # probs | logits: how the teachers' predictions are averaged
    student: ModelConfig = field(default_factory=ModelConfig)
    losses: dict[str, dict[str, Any]] = field(default_factory=lambda: {"ce": {"weight": 1.0}})
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    epochs: int = 240
    init_epochs: int = 30           # FT / AB / FSP: the initialisation stage's epochs (RepDistiller's --init_epochs)
    amp: str = "auto"               # auto | bf16 | fp16 | off
    cuda_graph: bool = False
    compile: bool = False
    channels_last: bool = True      # networks and batches in channels-last memory format (NHWC; faster convolutions, no
                                    # layout copies in their backward on the CPU: 20% of a resnet8x4 step)
    sync_bn: bool = False           # torchrun: the student's BatchNorm statistics over the global batch
    seed: int = 0
    output: str | None = None       # the run folder; None: derived from the run (fastkd.train.rundir)
    eval_every: int = 1
    checkpoint_every: int = 1
    logger: str = "none"            # none | wandb | mlflow: the metrics also go to a tracker (fastkd.train.loggers)
    logger_project: str = "fastkd"  # the W&B project / MLflow experiment

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "teacher": TeacherConfig, "student": ModelConfig, "optim": OptimConfig,
             "schedule": ScheduleConfig}
_CHOICES = {("data", "name"): ("digits", "tinted_digits", "cifar10", "cifar100", "imagefolder"), ("data", "fit"): ("resize", "pad", "crop"),
            ("data", "contrast_mode"): (None, "exact", "relax"),
            ("optim", "name"): ("sgd", "adamw"), ("schedule", "name"): ("multistep", "cosine"),
            ((), "amp"): ("auto", "bf16", "fp16", "off"), ((), "ensemble_average"): ("probs", "logits"), ((), "logger"): ("none", *LOGGERS)}


def shipped() -> list[str]:
    """The names of the recipes shipped inside the package."""
    folder = resources.files("fastkd") / "recipes"
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def _read(name_or_path: str) -> dict[str, Any]:
    """A recipe file's tree with its ``base`` chain merged in (the file's own values win). A run folder,
    or its ``config.yaml``, gives the resolved recipe that run used."""
    if os.path.isdir(name_or_path) and os.path.isfile(os.path.join(name_or_path, "config.yaml")):
        name_or_path = os.path.join(name_or_path, "config.yaml")
    if os.path.isfile(name_or_path):
        with open(name_or_path) as stream:
            tree = yaml.safe_load(stream) or {}
    elif name_or_path in shipped():
        tree = yaml.safe_load((resources.files("fastkd") / "recipes" / f"{name_or_path}.yaml").read_text()) or {}
    else:
        raise ValueError(f"recipe {name_or_path!r} is neither a file nor a shipped recipe ({', '.join(shipped())})")
    if not isinstance(tree, dict):
        raise ValueError(f"recipe {name_or_path!r} must hold a mapping at the top, got {type(tree).__name__}")
    if set(tree) == {"run", "recipe"}:  # a run folder's config.yaml (fastkd.train.rundir)
        tree = dict(tree["recipe"])
        tree.pop("output", None)
    base = tree.pop("base", None)
    return _merge(_read(base), tree) if base else tree


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "losses":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)  # a recipe's losses replace its base's whole set
    return merged


def dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A recipe tree as ``{"section.key": value}``, the keys overrides use (lists, scalars and empty
    mappings are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """``a.b.c=value`` into ``tree`` (value parsed as YAML)."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} must look like key=value (e.g. optim.lr=0.1)")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ValueError(f"override {assignment!r} has an empty key")
    node = tree
    for key in keys[:-1]:
        if isinstance(node, list):  # teachers.1.checkpoint=...: an entry of a list, by position
            node = node[_position(node, key, assignment)]
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise ValueError(f"override {assignment!r}: {key!r} is not a section")
    if isinstance(node, list):
        node[_position(node, keys[-1], assignment)] = _value(raw)
    else:
        node[keys[-1]] = _value(raw)


def _position(node: list, key: str, assignment: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ValueError(f"override {assignment!r}: {key!r} is not a position in a list of {len(node)} "
                         f"(0 .. {len(node) - 1})")
    return int(key)


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _value(raw: str) -> Any:
    """An override's value, parsed as YAML; ``1e-3`` too is a number (YAML 1.1 reads it as a string
    unless written ``1.0e-3``)."""
    value = yaml.safe_load(raw)
    return float(value) if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()) else value


def _unknown(where: str, keys, valid) -> None:
    bad = sorted(set(keys) - set(valid))
    if bad:
        raise ValueError(f"unknown key{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))} in {where}; "
                         f"valid: {', '.join(sorted(valid))}")


def _typed(where: str, value, annotation: str):
    """Check a leaf against its dataclass annotation (the few types recipes use)."""
    expect = {"str": str, "int": int, "float": (int, float), "bool": bool, "list[int]": list, "list[float]": list,
              "list[str]": list, "dict": dict}
    for option in annotation.replace(" ", "").split("|"):
        if option == "None" and value is None:
            return value
        if option == "dict[str,list[int]]" and isinstance(value, dict) and all(
                isinstance(v, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in v)
                for v in value.values()):
            return {str(k): list(v) for k, v in value.items()}
        kind = expect.get(option)
        if kind is not None and isinstance(value, kind) and not (option in ("int", "float") and isinstance(value, bool)):
            if option == "list[int]" and not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                continue
            if option == "list[str]" and not (value and all(isinstance(v, str) and v for v in value)):
                continue
            if option == "dict" and not all(isinstance(k, str) for k in value):
                continue
            if option == "list[float]":
                if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                    continue
                return [float(v) for v in value]
            return float(value) if option == "float" else value
    raise ValueError(f"{where} must be {annotation}, got {value!r}")


# the ranges of numeric keys: (what the error says, the test); a recipe outside them never starts
_AT_LEAST_1 = ("an integer >= 1", lambda v: v >= 1)
_AT_LEAST_0 = (">= 0", lambda v: v >= 0)
_RANGES: dict[str, tuple[str, Any]] = {
    "epochs": _AT_LEAST_1, "eval_every": _AT_LEAST_1, "checkpoint_every": _AT_LEAST_1, "init_epochs": _AT_LEAST_0,
    "data.batch_size": _AT_LEAST_1, "data.num_workers": _AT_LEAST_0,
    "data.image_size": ("an integer >= 1 or null", lambda v: v is None or v >= 1),
    "data.mean": ("a list of numbers in [0, 1] or null", lambda v: v is None or all(0 <= m <= 1 for m in v)),
    "data.std": ("a list of numbers > 0 or null", lambda v: v is None or all(0 < s < math.inf for s in v)),
    "optim.lr": ("a finite number > 0", lambda v: 0 < v < math.inf), "optim.momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
    "optim.weight_decay": ("a finite number >= 0", lambda v: 0 <= v < math.inf),
    "optim.reference_batch": ("an integer >= 1 or null", lambda v: v is None or v >= 1),
    "schedule.gamma": ("a finite number > 0", lambda v: 0 < v < math.inf), "schedule.warmup_epochs": _AT_LEAST_0,
    "schedule.milestones": ("a list of epochs >= 0", lambda v: all(m >= 0 for m in v)),
}


def _in_range(recipe: "Recipe") -> None:
    """Refuse a value outside its key's range (:data:`_RANGES`; a loss weight must be finite and >= 0)."""
    for key, value in dotted(recipe.to_dict()).items():
        what, test = _RANGES.get(key, (None, None))
        if key.startswith("losses.") and key.endswith(".weight"):
            what, test = "a finite number >= 0", lambda v: 0 <= v < math.inf
        if test is not None and not test(value):
            raise ValueError(f"{key} must be {what}, got {value!r}")


def _section(name: str, cls, tree) -> Any:
    if tree is None and name == "teacher":
        return None
    if not isinstance(tree, dict):
        raise ValueError(f"{name} must be a mapping, got {tree!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _unknown(name, tree, fields)
    values = {}
    for key, value in tree.items():
        values[key] = _typed(f"{name}.{key}", value, fields[key].type)
        choices = _CHOICES.get((name, key))
        if choices is not None and values[key] not in choices:
            raise ValueError(f"{name}.{key} must be one of {choices}, got {value!r}")
    return cls(**values)


def _losses(tree) -> dict[str, dict[str, Any]]:
    if not isinstance(tree, dict) or not tree:
        raise ValueError(f"losses must be a non-empty mapping of loss name → options, got {tree!r}")
    _unknown("losses", tree, ["ce", *registered()])
    checked = {}
    for name, options in tree.items():
        options = {"weight": options} if isinstance(options, (int, float)) else options
        if not isinstance(options, dict) or "weight" not in options:
            raise ValueError(f"losses.{name} needs a weight (losses.{name}.weight=...), got {options!r}")
        valid = ["weight"] if name == "ce" else ["weight", *entry(name).options]
        _unknown(f"losses.{name}", options, valid)
        checked[name] = dict(options, weight=_typed(f"losses.{name}.weight", options["weight"], "float"))
    return checked


def _teachers(tree) -> list[TeacherConfig] | None:
    """``teachers``: a non-empty list of teacher sections (``name``, ``checkpoint`` or ``weights``, ``kwargs``,
    ``taps``), or null. A teacher cache serves one teacher: ``cache`` is refused here."""
    if tree is None:
        return None
    if not isinstance(tree, list) or not tree:
        raise ValueError(f"teachers must be a non-empty list of teachers ([{{name: ..., checkpoint: ...}}, ...]), "
                         f"got {tree!r}")
    configs = [_section(f"teachers[{i}]", TeacherConfig, item) for i, item in enumerate(tree)]
    for i, config in enumerate(configs):
        if config.cache:
            raise ValueError(f"teachers[{i}].cache: a teacher cache (fastkd cache-teacher) serves one teacher, not "
                             "an ensemble's member; give its checkpoint or weights")
    return configs


def build(tree: dict[str, Any]) -> Recipe:
    """Validate a recipe tree into a :class:`Recipe`."""
    fields = {f.name for f in dataclasses.fields(Recipe)}
    _unknown("the recipe", tree, fields)
    values: dict[str, Any] = {}
    for key, value in tree.items():
        if key in _SECTIONS:
            values[key] = _section(key, _SECTIONS[key], value)
        elif key == "losses":
            values[key] = _losses(value)
        elif key == "teachers":
            values[key] = _teachers(value)
        else:
            annotation = next(f.type for f in dataclasses.fields(Recipe) if f.name == key)
            values[key] = _typed(key, value, annotation)
            choices = _CHOICES.get(((), key))
            if choices is not None and values[key] not in choices:
                raise ValueError(f"{key} must be one of {choices}, got {value!r}")
    if values.get("teachers") is not None:  # an ensemble in place of the single teacher
        single = values.get("teacher", Recipe().teacher)
        given = [f"teacher.{key}" for key in ("checkpoint", "weights", "cache") if single is not None and getattr(single, key)]
        if given:
            raise ValueError(f"teachers lists an ensemble and {' and '.join(given)} names a single teacher's: give "
                             "one (teacher: null with teachers, or no teachers)")
        values["teacher"] = None
    recipe = Recipe(**values)
    _in_range(recipe)
    roles = [("student", recipe.student), ("teacher", recipe.teacher)]
    roles += [(f"teachers[{i}]", config) for i, config in enumerate(recipe.teachers or ())]
    for role, config in roles:
        if config is not None and config.checkpoint and config.weights:
            raise ValueError(f"{role}.checkpoint and {role}.weights both name a file of weights: give one "
                             f"({role}.weights for any file of weights, {role}.checkpoint for a fastkd run's checkpoint)")
    _check_pairs(recipe.data)
    if recipe.data.download and recipe.data.name == "imagefolder":
        raise ValueError("data.download=true fetches CIFAR-10 / CIFAR-100 only: an imagefolder tree must already be "
                         "under data.root (set data.download=false)")
    return recipe


def _check_pairs(data: DataConfig) -> None:
    """``data.pair_root`` goes with an in-memory image tree and a chosen view (see :mod:`fastkd.data.folder`)."""
    if data.pair_root is None:
        return
    if data.name != "imagefolder":
        raise ValueError(f"data.pair_root pairs the files of an image tree (data.name=imagefolder), not "
                         f"data.name={data.name}: lay the data out as data.root/{{train,val}}/<class>/<file>")
    if not data.in_memory:
        raise ValueError(f"data.pair_root={data.pair_root} needs data.in_memory=true: the partners are decoded once "
                         "into the uint8 cache as extra channels (streamed trees, data.in_memory=false, take no views)")
    if data.view is None and data.teacher_view is None:
        raise ValueError(f"data.pair_root={data.pair_root} stacks the partners' channels after the images': choose "
                         "what the run sees with data.view (e.g. data.views={depth: [3]} data.view=depth "
                         "data.teacher_view=rgb)")


def budget_warnings(recipe: Recipe) -> list[str]:
    """What in ``recipe`` is timed for more epochs than it runs: step milestones at or past ``epochs`` (the
    learning rate never reaches them), a warm-up or a loss's ramp longer than the run. One line each; the
    recipe is run as it is (a shortened run keeps its published timings unless they are given anew)."""
    epochs, found = recipe.epochs, []
    late = [m for m in recipe.schedule.milestones if m >= epochs] if recipe.schedule.name == "multistep" else []
    if late:
        kept = recipe.optim.lr * recipe.schedule.gamma ** (len(recipe.schedule.milestones) - len(late))
        found.append(f"schedule.milestones {late} are at or past epochs={epochs}: the learning rate stays at "
                     f"{kept:g} from then on; give milestones inside the run (schedule.milestones=[...]) or use "
                     "schedule.name=cosine")
    if recipe.schedule.warmup_epochs >= epochs:
        found.append(f"schedule.warmup_epochs={recipe.schedule.warmup_epochs} is not shorter than epochs={epochs}: "
                     "the learning rate never reaches optim.lr")
    for name, options in recipe.losses.items():
        option = entry(name).ramp if name != "ce" else None  # the loss's own epoch ramp, as it registered it
        if option is not None:
            length = options.get(option, entry(name).default(option))
            if length > epochs:
                found.append(f"losses.{name}.{option}={length:g} is longer than epochs={epochs}: the {name} weight "
                             f"never reaches its full value; give losses.{name}.{option} for this budget")
    return found


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> Recipe:
    """A shipped recipe (by name) or a YAML file, with ``key=value`` overrides applied."""
    tree = _read(name_or_path)
    for assignment in overrides:
        apply_override(tree, assignment)
    return build(tree)

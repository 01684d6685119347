"""A trained student out of its run folder, as plain weights: ``student.safetensors`` + ``student.json``.

safetensors holds tensors and nothing else, so loading the weights runs no code (unlike a pickle);
the JSON says what they are: the zoo model name, the number and names of the classes, the epoch and
test accuracy they come from. Loading them back::

    from safetensors.torch import load_file
    model = fastkd.models.create(info["model"], num_classes=info["num_classes"], **info["kwargs"])
    model.load_state_dict(load_file("student.safetensors"))

``fastkd eval MODEL student.safetensors`` evaluates them; ``teacher.checkpoint=student.safetensors``
uses them as a teacher.
"""
from __future__ import annotations

import json
import os

import torch

from fastkd.data._files import atomic_write
from fastkd.train.checkpoint import load_checkpoint
from fastkd.train.rundir import BEST, LAST

WEIGHTS, INFO = "student.safetensors", "student.json"
FORMAT = "fastkd-student-1"


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    """The state_dict as safetensors takes it: contiguous CPU tensors, none sharing memory."""
    return {name: value.detach().to("cpu").contiguous().clone() for name, value in state.items()}


def export(run: str, output: str | None = None, which: str = "last") -> tuple[str, str]:
    """Write the student of run folder ``run`` (from its ``last.pt``, or ``best.pt`` with ``which="best"``)
    to ``output`` (default: the run folder) as :data:`WEIGHTS` and :data:`INFO`; returns their paths."""
    try:
        from safetensors.torch import save
    except ImportError:
        raise ImportError("fastkd export needs the safetensors package: pip install safetensors") from None
    if which not in ("last", "best"):
        raise ValueError(f"which must be 'last' or 'best', got {which!r}")
    source = os.path.join(run, BEST if which == "best" else LAST)
    if not os.path.isdir(run):
        raise FileNotFoundError(f"no run folder at {run}")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{run} has no {os.path.basename(source)}: the run has not finished an epoch"
                                + (" with a test evaluation" if which == "best" else ""))
    state = load_checkpoint(source)
    recipe = state.get("recipe") or {}
    meta = dict(state.get("meta") or {"student": (recipe.get("student") or {}).get("name")})
    if not meta.get("student") or not isinstance(state.get("student"), dict):
        raise ValueError(f"{source} is not a fastkd run checkpoint (no student weights and model name)")
    record = next((r for r in reversed(state.get("history") or []) if r.get("test_top1") is not None), {})
    info = {"format": FORMAT, "model": meta["student"], "num_classes": meta.get("num_classes"),
            "classes": meta.get("classes"), "epoch": state.get("epoch"),
            "test_top1": state.get("test_top1", record.get("test_top1")),
            "test_top5": state.get("test_top5", record.get("test_top5")),
            "data": (recipe.get("data") or {}).get("name"), "source": os.path.abspath(source),
            # the builder's keyword arguments (a timm ViT's img_size, patch_size, depth, ...): create(model, **kwargs)
            "kwargs": (recipe.get("student") or {}).get("kwargs") or {},
            # a cross-modal student reads one view (fastkd.data.views): its first conv takes that view's channels
            "view": (recipe.get("data") or {}).get("view")}
    folder = output or run
    os.makedirs(folder, exist_ok=True)
    weights, described = os.path.join(folder, WEIGHTS), os.path.join(folder, INFO)
    payload = save(_tensors(state["student"]), metadata={"format": FORMAT, "model": meta["student"]})
    for path, data in ((weights, payload), (described, (json.dumps(info, indent=2) + "\n").encode())):
        with atomic_write(path) as stream:
            stream.write(data)
    return weights, described

"""Cross-modal runs from a recipe: which views a run's batches carry, and which of them each network reads.

``data.view`` is the view the run's trained model sees (``fastkd train ... data.view=L`` trains a teacher on
luminance), ``data.teacher_view`` the one its teacher sees (``fastkd distill ... data.view=ab
data.teacher_view=L``), ``data.views`` names user views over the stored channels (see
:mod:`fastkd.data.views`; ``data.pair_root`` stacks a second tree's files, depth say, as channels after the
images', :mod:`fastkd.data.folder`). The batches then hold the views stacked, student's first, made after the shared
crop and flip (:class:`~fastkd.data.views.ViewSplit`, the loader's ``inputs``), and each network reads its
own channels (:func:`~fastkd.models.inputs.read_view`): nothing else in the run knows about views.
"""
from __future__ import annotations

import torch
from torch import nn

from fastkd.data.views import ViewSplit
from fastkd.models.inputs import read_view
from fastkd.train.objectives import needs_teacher
from fastkd.train.recipe import Recipe

def views_of(recipe: Recipe) -> tuple[str, str] | None:
    """(the student's view, the teacher's view) of a cross-modal run, or ``None`` when the recipe sets neither."""
    data = recipe.data
    if data.view is None and data.teacher_view is None:
        if data.views:
            raise ValueError(f"data.views names the views {sorted(data.views)}: choose the run's with data.view=NAME "
                             "(and the teacher's with data.teacher_view=NAME)")
        return None
    student = data.view or "rgb"
    return student, data.teacher_view or student


def split_for(recipe: Recipe, train_set, device: str | torch.device) -> ViewSplit | None:
    """The :class:`ViewSplit` of a cross-modal run, normalised by ``train_set``'s images (uint8 ``data``, white at
    its ``pixel_max``, :func:`fastkd.train.run.datasets`), on ``device``; ``None`` for a run without views."""
    chosen = views_of(recipe)
    if chosen is None:
        return None
    student, teacher = chosen
    order = [student] + ([teacher] if teacher != student and needs_teacher(recipe.losses) else [])
    partners = getattr(train_set, "pair_channels", 0)  # data.pair_root: rgb / L / ab read the images before them
    colour = train_set.data.shape[-1] - partners if partners else None
    split = ViewSplit(order, getattr(train_set, "pixel_max", 255.0), recipe.data.views, colour)
    return split.fit(train_set.data).to(device)


def attach(model: nn.Module, loader, recipe: Recipe, side: str = "student") -> nn.Module:
    """``model`` made to read its ``side``'s view (``"student"`` or ``"teacher"``) of ``loader``'s batches;
    unchanged when the loader makes no views. Call it before loading weights: the first convolution is rebuilt
    for the view's channels."""
    split = getattr(loader, "inputs", None)
    if not isinstance(split, ViewSplit):
        return model
    student, teacher = views_of(recipe)
    view = student if side == "student" else teacher
    return read_view(model, split.slices[view], split.channels)

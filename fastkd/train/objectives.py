"""Which objective a recipe's losses describe: the offline :class:`~fastkd.train.distiller.Distiller`,
the online :class:`~fastkd.train.online.OnlineDistiller` (no teacher), or one of the transformed-input
objectives of :mod:`fastkd.train.transformed` (SSKD's two stages, STKD)."""
from __future__ import annotations

import torch
from torch import nn

from fastkd.models.multibranch import MultiBranchResNet
from fastkd.train.distiller import Distiller
from fastkd.train.online import OnlineDistiller
from fastkd.train.recipe import MIXUP_LOSSES, ONLINE_LOSSES, SSKD_LOSSES
from fastkd.train.transformed import MixupDistiller, SSKDDistiller, SSKDTeacherStage


def needs_teacher(losses: dict[str, dict]) -> bool:
    """Whether the losses distil from a teacher (anything but CE and the online losses)."""
    return bool(set(losses) - {"ce", *ONLINE_LOSSES})


def build_objective(losses: dict[str, dict], student: nn.Module, teacher: nn.Module | None, sample: torch.Tensor,
                    num_data: int, teacher_state: dict | None = None) -> nn.Module:
    """The objective for ``losses``. ``teacher_state``: the teacher's checkpoint as loaded (SSKD's
    second stage reads the stage-1 head from its ``losses`` entry)."""
    names = set(losses)
    if names & set(ONLINE_LOSSES):  # before the teacher checks: online runs have none
        return OnlineDistiller(student, losses)
    if "rotation" in names:
        if teacher is None:
            raise ValueError("SSKD's first stage (loss 'rotation') trains a head on a teacher: set teacher.name and "
                             "teacher.checkpoint")
        return SSKDTeacherStage(teacher, losses, sample)
    if names & set(SSKD_LOSSES):
        heads = (teacher_state or {}).get("losses", {})
        head = {k: v for k, v in heads.items() if k.startswith("rotation.head.")}
        if "sskd" in names and not head:
            raise ValueError("the sskd loss needs the teacher's self-supervision head: teacher.checkpoint must be the "
                             "last.pt of SSKD's first stage (recipe cifar100_sskd_teacher)")
        return SSKDDistiller(student, teacher, losses, sample, head)
    if names & set(MIXUP_LOSSES):
        return MixupDistiller(student, teacher, losses)
    if isinstance(student, MultiBranchResNet) and teacher is None:  # branches trained alone (CE only)
        return OnlineDistiller(student, losses)
    return Distiller(student, teacher, losses, sample, num_data)

"""Which objective a recipe's losses describe: the offline :class:`~fastkd.train.distiller.Distiller`,
the online :class:`~fastkd.train.online.OnlineDistiller` (no teacher), or one of the transformed-input
objectives of :mod:`fastkd.train.transformed` (SSKD's two stages, STKD).

Each loss names its objective where it registers (:mod:`fastkd.losses._registry`): ``"offline"``
unless it needs one of its own; the losses of a recipe name at most one other than ``"offline"``.
"""
from __future__ import annotations

import torch
from torch import nn

from fastkd.losses import entry
from fastkd.models.multibranch import MultiBranchResNet
from fastkd.train.distiller import Distiller
from fastkd.train.online import OnlineDistiller
from fastkd.train.transformed import MixupDistiller, SSKDDistiller, SSKDTeacherStage

# the objectives by the name their losses register with
OBJECTIVES: dict[str, type[nn.Module]] = {
    cls.OBJECTIVE: cls for cls in (Distiller, OnlineDistiller, SSKDTeacherStage, SSKDDistiller, MixupDistiller)}


def objective_of(losses: dict[str, dict]) -> str:
    """The objective ``losses`` name: ``"offline"`` unless a loss names another (see :data:`OBJECTIVES`).

    ``ValueError`` when the losses name two, or one that does not exist.
    """
    named = {name: entry(name).objective for name in losses if name != "ce"}
    others = sorted(set(named.values()) - {"offline"})
    if len(others) > 1:
        pairs = ", ".join(f"{key} → {name}" for key, name in named.items() if name != "offline")
        raise ValueError(f"the losses name different objectives ({pairs}); a run trains one")
    objective = others[0] if others else "offline"
    if objective not in OBJECTIVES:
        raise ValueError(f"losses {sorted(k for k, v in named.items() if v == objective)} name the objective "
                         f"{objective!r}, which does not exist; objectives: {', '.join(OBJECTIVES)}")
    return objective


def needs_teacher(losses: dict[str, dict]) -> bool:
    """Whether the losses distil from a teacher: whether any takes a teacher's feature (CE and the online
    losses do not)."""
    return any(entry(name).needs_teacher for name in losses if name != "ce")


def reads_teacher_state(losses: dict[str, dict]) -> bool:
    """Whether the objective reads the teacher's checkpoint beyond its weights: SSKD's second stage
    hands its losses the checkpoint's loss states (the stage-1 head)."""
    return objective_of(losses) == SSKDDistiller.OBJECTIVE


def build_objective(losses: dict[str, dict], student: nn.Module, teacher: nn.Module | None, sample: torch.Tensor,
                    num_data: int, teacher_state: dict | None = None, student_taps: list[str] | None = None,
                    teacher_taps: list[str] | None = None, teacher_cache=None) -> nn.Module:
    """The objective for ``losses``. ``teacher_state``: the teacher's checkpoint as loaded (SSKD's
    second stage reads the stage-1 head from its ``losses`` entry). ``student_taps`` / ``teacher_taps``:
    the modules to read features from (a recipe's ``student.taps`` / ``teacher.taps``; default: the
    models' own). ``teacher_cache``: a :class:`~fastkd.train.teacher_cache.TeacherCache` standing in for
    ``teacher`` (the offline Distiller's batches then carry the teacher's outputs)."""
    taps = {"student_taps": student_taps, "teacher_taps": teacher_taps}
    objective = OBJECTIVES[objective_of(losses)]
    if objective is OnlineDistiller:  # before the teacher checks: online runs have none
        return OnlineDistiller(student, losses)
    if objective is SSKDTeacherStage:
        if teacher is None:
            raise ValueError(f"{objective.WHAT} (losses {sorted(losses)}) trains a head on a teacher: set "
                             "teacher.name and teacher.checkpoint")
        return SSKDTeacherStage(teacher, losses, sample, taps=teacher_taps)
    if objective is SSKDDistiller:
        return SSKDDistiller(student, teacher, losses, sample, (teacher_state or {}).get("losses", {}), **taps)
    if objective is MixupDistiller:
        return MixupDistiller(student, teacher, losses)
    if isinstance(student, MultiBranchResNet) and teacher is None:  # branches trained alone (CE only)
        return OnlineDistiller(student, losses)
    return Distiller(student, teacher, losses, sample, num_data, teacher_cache=teacher_cache, **taps)

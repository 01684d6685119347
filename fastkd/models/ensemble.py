"""Several trained networks as one teacher: :class:`TeacherEnsemble`.

The CRD paper's ensemble distillation (Tian, Krishnan & Isola, ICLR 2020) teaches one student from M
teachers. The ensemble's prediction is the average of its members' class probabilities, the usual ensemble
and the one Hinton et al. (2015) distil from: p_e = (1/M) Σ_m softmax(z_m). As logits that is
z_e = log p_e = logsumexp_m(log_softmax(z_m)) − log M, whose softmax is p_e exactly, so every loss that takes
logits (KD, DKD, ...) and every evaluation reads the ensemble like one network. ``average="logits"`` takes
the mean of the logits instead, z_e = (1/M) Σ_m z_m (the geometric mean of the probabilities, renormalised).

The difference matters at a distillation temperature T: KD softens z_e by T, so with ``probs`` the target
is softmax(log p_e / T) ∝ p_e^(1/T), the averaged prediction softened, not the average of the members'
softened predictions (1/M) Σ_m softmax(z_m / T); with ``logits`` it is softmax(mean z / T).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

AVERAGES = ("probs", "logits")


def combine(logits: Sequence[torch.Tensor], average: str = "probs") -> torch.Tensor:
    """The ensemble's logits from its members' ``logits`` ([B, K] each): see the module doc. In the members'
    dtype (under AMP the losses then see the ensemble as they see one teacher), computed in fp32 at least."""
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    if isinstance(logits, torch.Tensor) or not logits:
        raise ValueError("logits must be a non-empty sequence of the members' [B, K] logits")
    shapes = {tuple(z.shape) for z in logits}
    if len(shapes) != 1:
        raise ValueError(f"the members' logits differ in shape ({sorted(shapes)}): an ensemble's members must "
                         "predict the same classes")
    if len(logits) == 1:
        return logits[0]
    dtype = torch.promote_types(logits[0].dtype, torch.float32)
    if average == "logits":
        return torch.stack([z.to(dtype) for z in logits]).mean(0).to(logits[0].dtype)
    log_probs = torch.stack([F.log_softmax(z.to(dtype), dim=-1) for z in logits])
    return (torch.logsumexp(log_probs, dim=0) - math.log(len(logits))).to(logits[0].dtype)


class TeacherEnsemble(nn.Module):
    """M trained networks as one teacher: ``forward(x)`` gives the ensemble's logits (:func:`combine`).

    ``members``: the networks (any models fastkd builds, each reading the same batch); ``taps``: each
    member's feature taps for the :class:`~fastkd.train.distiller.Distiller` (``None``: its defaults);
    ``names``: what logs call them. The members are frozen and kept in eval mode.
    """

    def __init__(self, members: Sequence[nn.Module], average: str = "probs",
                 taps: Sequence[Sequence[str] | None] | None = None, names: Sequence[str] | None = None):
        super().__init__()
        if isinstance(members, nn.Module) or not members:
            raise ValueError("members must be a non-empty sequence of networks")
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
        self.members = nn.ModuleList(members)
        self.average = average
        count = len(self.members)
        self.taps = list(taps) if taps is not None else [None] * count
        self.names = list(names) if names is not None else [type(m).__name__ for m in self.members]
        for what, values in (("taps", self.taps), ("names", self.names)):
            if len(values) != count:
                raise ValueError(f"{what} has {len(values)} entries for {count} members")
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def __len__(self) -> int:
        return len(self.members)

    def train(self, mode: bool = True):
        return super().train(False)

    def combine(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The ensemble's logits from the members' (see :func:`combine`)."""
        return combine(logits, self.average)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine([member(x) for member in self.members])

    def extra_repr(self) -> str:
        return f"average={self.average!r}, names={self.names}"

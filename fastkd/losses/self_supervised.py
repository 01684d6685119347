"""SSKD and STKD modules (formulas in :mod:`fastkd.functional.self_supervised`).

SSKD (Xu et al., ECCV 2020) runs in two stages: :class:`RotationContrastLoss` trains the teacher's
:class:`SSKDHead` on the frozen teacher (stage 1); :class:`SSKDLoss` then holds that head, frozen,
and the student's head, trained with the student (stage 2), beside :class:`RotationKDLoss`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fastkd import _checks
from fastkd.functional.self_supervised import (rotation_contrast_loss, rotation_kd_loss, sskd_similarity_loss,
                                               stkd_loss)
from fastkd.losses._registry import register, widths

__all__ = ["SSKDHead", "RotationContrastLoss", "SSKDLoss", "RotationKDLoss", "STKDLoss"]


class SSKDHead(nn.Sequential):
    """SSKD's self-supervision head on the pooled penultimate feature: Linear(d, d) → ReLU → Linear(d, d)."""

    def __init__(self, dim: int):
        dim = _checks.integer("dim", dim, 1)
        super().__init__(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))



@register("rotation", takes=("view_pooled_t",), objective="sskd_teacher", derived=("dim",),
          build=lambda cls, probe, **options: cls(probe.width("view_pooled_t"), **options))
class RotationContrastLoss(nn.Module):
    """SSKD stage 1: CE(cos(head(rotated view), head(upright views)) / τ, source index), τ = 1.

    Holds the head being trained (``head``, an :class:`SSKDHead` of ``dim``); ``forward`` takes
    the pooled features of the four views [4B, dim] (:func:`fastkd.functional.rotations` order).
    """

    def __init__(self, dim: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.head = SSKDHead(dim)
        self.temperature = _checks.number("temperature", temperature, positive=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _checks.tensor("features", features, ndim=2)
        _checks.nonempty("features", features)  # before the head runs
        _checks.module_device("features", features, self)
        return rotation_contrast_loss(self.head(features), self.temperature)



def _with_teacher_head(cls, probe, **options) -> nn.Module:
    """SSKD stage 2: heads of the pooled features' widths; the teacher's is stage 1's ``rotation`` head,
    read from the teacher's checkpoint."""
    head = {k.removeprefix("rotation."): v for k, v in probe.get("teacher_losses", {}).items()
            if k.startswith("rotation.head.")}
    if not head:
        raise ValueError("the sskd loss needs the teacher's self-supervision head: teacher.checkpoint must be the "
                         "last.pt of SSKD's first stage (recipe cifar100_sskd_teacher)")
    criterion = widths("view_pooled_s", "view_pooled_t")(cls, probe, **options)
    criterion.load_teacher_head(head)
    return criterion


@register("sskd", takes=("view_pooled_s", "view_pooled_t"), objective="sskd_student",
          build=_with_teacher_head, derived=("s_dim", "t_dim"))
class SSKDLoss(nn.Module):
    """SSKD's similarity transfer: τ²·KL(softmax(S_t/τ) ‖ softmax(S_s/τ)) over selected rows, τ = 0.5.

    S = cos(head(rotated views), head(upright views)) [3B, B] of each network; rows whose source
    the teacher ranks first are kept, plus the best-ranked ``keep_ratio`` (0.75) of the others.
    ``head_s`` (trained with the student) and ``head_t`` (the teacher's, from stage 1, frozen:
    :meth:`load_teacher_head`). Published weight: 10.
    """

    def __init__(self, s_dim: int, t_dim: int, temperature: float = 0.5, keep_ratio: float = 0.75) -> None:
        super().__init__()
        self.head_s = SSKDHead(s_dim)
        self.head_t = SSKDHead(t_dim).requires_grad_(False)
        self.temperature = _checks.number("temperature", temperature, positive=True)
        self.keep_ratio = _checks.number("keep_ratio", keep_ratio, nonnegative=True)

    def load_teacher_head(self, state: Mapping[str, torch.Tensor] | nn.Module) -> None:
        """The stage-1 head: an :class:`SSKDHead`, its ``state_dict``, or a ``RotationContrastLoss`` state."""
        if isinstance(state, nn.Module):
            state = state.state_dict()
        state = {k.removeprefix("head."): v for k, v in state.items() if k != "temperature"}
        self.head_t.load_state_dict(state)

    def train(self, mode: bool = True):
        super().train(mode)
        self.head_t.eval()
        return self

    def forward(self, features_s: torch.Tensor, features_t: torch.Tensor) -> torch.Tensor:
        """``features_s`` [4B, s_dim], ``features_t`` [4B, t_dim]: pooled features of the four views."""
        _checks.pair_of("features_s", features_s, "features_t", features_t, ndim=2)
        _checks.module_device("features_s", features_s, self)
        with torch.no_grad():
            emb_t = self.head_t(features_t)
        return sskd_similarity_loss(self.head_s(features_s), emb_t.to(features_s.dtype), self.temperature,
                                    self.keep_ratio)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, keep_ratio={self.keep_ratio}"


@register("sskd_rot", takes=("view_logits_s", "view_logits_t", "target"), objective="sskd_student")
class RotationKDLoss(nn.Module):
    """SSKD's KD on the rotated views (T = 4) over the rows the teacher classifies well (``keep_ratio``
    1.0 keeps all: the published setting); published weight 2.7. See
    :func:`fastkd.functional.rotation_kd_loss`."""

    def __init__(self, temperature: float = 4.0, keep_ratio: float = 1.0) -> None:
        super().__init__()
        self.temperature = _checks.number("temperature", temperature, positive=True)
        self.keep_ratio = _checks.number("keep_ratio", keep_ratio, nonnegative=True)

    def forward(self, logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return rotation_kd_loss(logits_s, logits_t, target, self.temperature, self.keep_ratio)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, keep_ratio={self.keep_ratio}"



@register("stkd", takes=("mixed_logits_s", "mixed_logits_t", "mix_target_a", "mix_target_b", "mix_lam"),
          objective="mixup")
class STKDLoss(nn.Module):
    """STKD on mixup virtual samples (Zhao et al. 2021), **a reconstruction** (no code was published):
    λ·CE(s(x̃), y_a) + (1 − λ)·CE(s(x̃), y_b) + β·T²·KL(softmax(t(x̃)/T) ‖ softmax(s(x̃)/T)).

    ``alpha`` is the Beta(α, α) parameter of the mixing coefficient; :meth:`mix` draws λ and
    mixes a batch (the engine's STKD objective calls it), ``forward`` takes the logits on the
    mixture. See :func:`fastkd.functional.stkd_loss`.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, temperature: float = 4.0) -> None:
        super().__init__()
        self.alpha = _checks.number("alpha", alpha, positive=True)
        self.beta = _checks.number("beta", beta, nonnegative=True)
        self.temperature = _checks.number("temperature", temperature, positive=True)

    def mix(self, images: torch.Tensor, target: torch.Tensor):
        """(x̃, y_a, y_b, λ): λ ~ Beta(α, α) drawn on the host (torch's CPU generator, no device sync),
        each sample's partner from a random permutation drawn on the images' device."""
        _checks.tensor("images", images, min_ndim=1)
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        partner = torch.randperm(images.shape[0], device=images.device)
        return lam * images + (1 - lam) * images[partner], target, target[partner], lam

    def forward(self, logits_s: torch.Tensor, logits_t: torch.Tensor, target_a: torch.Tensor, target_b: torch.Tensor,
                lam: float) -> torch.Tensor:
        return stkd_loss(logits_s, logits_t, target_a, target_b, lam, self.beta, self.temperature)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"

"""Online distillation (no pre-trained teacher): branches of one network teach each other.

Branch logits come stacked as ``[m, B, K]`` (m branches, batch B, K classes), as
:class:`fastkd.models.MultiBranchResNet` returns them.

- ONE (Lan, Zhu, Gong, NeurIPS 2018) and multi-branch diversity enhancement (Li et al., ACCV 2020):
  :func:`branch_cross_entropy` Σ_i CE(z_i) + CE(z_e) and :func:`online_kd_loss`
  T²·Σ_i KL(softmax(z_e/T) ‖ softmax(z_i/T)), T = 3; the latter adds
  :func:`classifier_diversity_loss` Σ_{i<j} ‖W_iᵀW_j‖_F (weight 5e-8).
- OKDDip (Chen, Mei, Wang, Feng, Chen, AAAI 2020): :func:`peer_attention` and :func:`okddip_loss`,
  with :func:`sigmoid_rampup` for its KD weight.

Precision: as :mod:`fastkd.functional.logits`, fp16 / bf16 inputs are upcast to fp32. An empty
batch (B = 0) raises ``ValueError`` naming the logits, before anything is computed.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from fastkd import _checks
from fastkd._precision import upcast
from fastkd.functional.logits import kd_loss

__all__ = ["branch_cross_entropy", "online_kd_loss", "classifier_diversity_loss", "peer_attention",
           "okddip_loss", "sigmoid_rampup"]


def _check_branches(name: str, logits: torch.Tensor, least: int = 1) -> None:
    """[m ≥ ``least`` branches, B ≥ 1, K] logits, finite."""
    _checks.tensor(name, logits, ndim=3)
    if logits.shape[0] < least:
        raise ValueError(f"{name} must be [branches ≥ {least}, batch, classes], got shape {tuple(logits.shape)}")
    _checks.nonempty(name, logits, dim=1)
    _checks.finite(name, logits)


def branch_cross_entropy(branch_logits: torch.Tensor, target: torch.Tensor,
                         ensemble_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i CE(z_i, y) (+ CE(z_e, y) when ``ensemble_logits`` is given): ONE's supervised term.

    ``branch_logits``: [m, B, K]; ``target``: int64 [B]; ``ensemble_logits``: [B, K]. Each CE is a
    mean over the batch.
    """
    _check_branches("branch_logits", branch_logits)
    m, batch, classes = branch_logits.shape
    _checks.index("target", target, classes, shape=(batch,), device=branch_logits.device)
    loss = F.cross_entropy(upcast(branch_logits).flatten(0, 1), target.repeat(m), reduction="sum") / batch
    if ensemble_logits is not None:
        _checks.pair("branch_logits[0]", branch_logits[0], "ensemble_logits", ensemble_logits)
        loss = loss + F.cross_entropy(upcast(ensemble_logits), target)
    return loss


def online_kd_loss(branch_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """Every branch toward one teacher (ONE's ensemble): T²·Σ_i (1/B) Σ_b KL(softmax(z_t/T) ‖ softmax(z_i/T)).

    ``branch_logits``: [m, B, K]; ``teacher_logits``: [B, K] (the ensemble; detach it to keep the
    gradient out of the teacher, as :class:`fastkd.OnlineKDLoss` does by default).
    """
    temperature = _checks.number("temperature", temperature, positive=True)
    _check_branches("branch_logits", branch_logits)
    _checks.pair("branch_logits[0]", branch_logits[0], "teacher_logits", teacher_logits)
    return sum(kd_loss(z, teacher_logits, temperature) for z in branch_logits.unbind(0))


def classifier_diversity_loss(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Classifier Diversification (Li et al., ACCV 2020): Σ_{i<j} ‖W_iᵀ W_j‖_F over the branch classifiers.

    ``weights``: m ≥ 2 matrices [K, D] (``nn.Linear.weight`` of each branch's classifier) of one
    shape, dtype and device. The gradient reaches every W_i (a public re-implementation detaches
    them, which silently zeroes it; this one does not). ‖A‖_F is computed as sqrt(Σ a²) with
    torch's norm, whose gradient at A = 0 is 0. No batch is involved (K = 0 rows give 0, as torch does).
    """
    if not isinstance(weights, (list, tuple)) or len(weights) < 2:
        raise ValueError(f"weights must be a list of at least 2 classifier weight matrices, got {weights!r:.80}")
    for i, w in enumerate(weights):
        _checks.tensor(f"weights[{i}]", w, ndim=2)
        _checks.pair("weights[0]", weights[0], f"weights[{i}]", w, same_batch=False)  # [K, D]: no batch
    ws = [upcast(w) for w in weights]
    terms = [torch.linalg.matrix_norm(ws[i].transpose(0, 1) @ ws[j])
             for i in range(len(ws)) for j in range(i + 1, len(ws))]
    return torch.stack(terms).sum()


def peer_attention(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """OKDDip's peer attention a[b, i, j] = softmax_j(q_i[b] · k_j[b]); ``query``, ``key``: [p, B, d] → [B, p, p]."""
    _checks.pair_of("query", query, "key", key, ndim=3, same_shape=True)
    q, k = upcast(query).transpose(0, 1), upcast(key).transpose(0, 1)
    return torch.bmm(q, k.transpose(1, 2)).softmax(dim=2)


def okddip_loss(peer_logits: torch.Tensor, leader_logits: torch.Tensor, attention: torch.Tensor,
                temperature: float = 3.0) -> torch.Tensor:
    """OKDDip's distillation terms (Chen et al., "Online Knowledge Distillation with Diverse Peers", AAAI 2020).

    Peer i's target is t_i = Σ_j a_ij z_j (``attention`` a: [B, p, p], rows summing to 1); the
    group leader's target is the peers' mean z̄ = (1/p) Σ_j z_j:

    loss = T²·Σ_i (1/B) Σ_b KL(softmax(t_i/T) ‖ softmax(z_i/T))
         + T²·(1/B) Σ_b KL(softmax(z̄/T) ‖ softmax(z_l/T)).

    The peer targets keep their gradient (it is what trains the attention, as in the published
    code); the leader's target is detached (the leader learns from the peers, not the reverse).
    ``peer_logits``: [p, B, K]; ``leader_logits``: [B, K].
    """
    temperature = _checks.number("temperature", temperature, positive=True)
    _check_branches("peer_logits", peer_logits)
    p, batch, _ = peer_logits.shape
    _checks.pair("peer_logits[0]", peer_logits[0], "leader_logits", leader_logits)
    _checks.tensor("attention", attention, ndim=3)
    if tuple(attention.shape) != (batch, p, p):
        raise ValueError(f"attention must have shape {(batch, p, p)} (batch, peers, peers), "
                         f"got {tuple(attention.shape)}")
    z = upcast(peer_logits)
    targets = torch.einsum("bij,jbk->ibk", upcast(attention), z)
    peers = sum(kd_loss(z_i, t_i, temperature) for z_i, t_i in zip(z.unbind(0), targets.unbind(0)))
    return peers + kd_loss(upcast(leader_logits), z.mean(dim=0).detach(), temperature)


def sigmoid_rampup(epoch: float, length: float = 80.0) -> float:
    """exp(−5 (1 − t)²), t = clip(epoch / length, 0, 1): OKDDip's (and mean teacher's) ramp of the KD weight."""
    epoch = _checks.number("epoch", epoch, nonnegative=True)
    length = _checks.number("length", length, nonnegative=True)
    if length == 0:
        return 1.0
    t = min(epoch / length, 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)

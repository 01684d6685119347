"""Knowledge from transformed inputs: SSKD (rotations) and STKD (mixup).

SSKD (Xu, Liu, Li, Loy, "Knowledge Distillation Meets Self-Supervision", ECCV 2020). Every image
comes in four rotations, interleaved as the published code stacks them: row 4b + r of a
[4B, …] batch is image b rotated by r·90° (:func:`rotations`). An embedding e = head(pooled
feature) of each view gives S = cos(e_rotated, e_upright), [3B, B] (:func:`rotation_similarity`;
row 3b + r − 1 belongs to image b, rotation r, and its true column is b):

- stage 1, the teacher's head (:func:`rotation_contrast_loss`): CE(S / τ, source index), τ = 1;
- stage 2 (:func:`sskd_similarity_loss`): τ²·KL(softmax(S_t/τ) ‖ softmax(S_s/τ)), τ = 0.5, a mean
  over the rows :func:`selected_rows` keeps (the teacher ranks the true source first, plus the
  best-ranked 75% of the others); :func:`rotation_kd_loss` is KD at T = 4 on the rotated views'
  logits over the rows where the teacher ranks the label first plus (keep_ratio 1.0) all others.

STKD (Zhao et al. 2021): :func:`stkd_loss`, a reconstruction (see its docstring).

Every loss here refuses an empty batch (B = 0: ``ValueError`` naming the argument) before computing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd import _checks
from fastkd._precision import upcast
from fastkd.functional.logits import kd_loss
from fastkd.ops import cosine

__all__ = ["rotations", "cosine_similarity_matrix", "rotation_similarity", "rotation_contrast_loss",
           "selected_rows", "sskd_similarity_loss", "rotation_kd_loss", "stkd_loss"]

_EPS = 1e-8  # torch.nn.functional.cosine_similarity's eps


def rotations(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] (H = W) → [4B, C, H, W], row 4b + r = image b rotated by r·90° counter-clockwise."""
    _checks.tensor("images", images, ndim=4, floating=False)
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be square to rotate, got shape {tuple(images.shape)}")
    views = [torch.rot90(images, r, dims=(2, 3)) for r in range(4)]
    return torch.stack(views, dim=1).flatten(0, 1)


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_i, b_j) for every pair: normalize(a) @ normalize(b)ᵀ, [N, D] × [M, D] → [N, M].

    The batch-similarity matrix SSKD needs (3B × B); it matches ``F.cosine_similarity`` up to its
    eps (each norm clamped at 1e-8). Off the ``torch`` backend it runs the op ``fastkd::cosine_matrix``
    (:mod:`fastkd.ops.cosine`: on CUDA one Triton product with the normalisation in its epilogue);
    the fp32 result for fp16 / bf16 inputs either way.
    """
    _checks.tensor("a", a, ndim=2)
    _checks.tensor("b", b, ndim=2)
    _checks.pair("a", a, "b", b, same_shape=False, same_batch=False)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"b has {b.shape[1]} features but a has {a.shape[1]}; they must match")
    return cosine.cosine_matrix(a, b, _EPS)


def _split_views(name: str, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _checks.tensor(name, embeddings, ndim=2)
    _checks.nonempty(name, embeddings)
    if embeddings.shape[0] % 4:
        raise ValueError(f"{name} must hold 4 rotated views per image ([4B, D], see rotations), "
                         f"got shape {tuple(embeddings.shape)}")
    views = embeddings.unflatten(0, (-1, 4))
    return views[:, 0], views[:, 1:].flatten(0, 1)


def rotation_similarity(embeddings: torch.Tensor) -> torch.Tensor:
    """S [3B, B]: cosine similarity of each rotated view's embedding to every upright one (see the module doc)."""
    upright, rotated = _split_views("embeddings", embeddings)
    return cosine_similarity_matrix(rotated, upright)


def _sources(batch: int, device: torch.device) -> torch.Tensor:
    """The true column of each row of S: row 3b + r − 1 → b."""
    return torch.arange(batch, device=device).repeat_interleave(3)


def rotation_contrast_loss(embeddings: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """SSKD stage 1: CE(S / τ, index of the source image), a mean over the 3B rotated views."""
    temperature = _checks.number("temperature", temperature, positive=True)
    similarity = rotation_similarity(embeddings)
    return F.cross_entropy(similarity / temperature, _sources(similarity.shape[1], similarity.device))


def selected_rows(scores: torch.Tensor, target: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """SSKD's selective transfer: a bool mask [R] of the rows of ``scores`` [R, K] to distil.

    With rank_r the position of ``target[r]`` in row r sorted by decreasing score: every row of
    rank 0 is kept, and of the W others the floor(keep_ratio · W) of lowest rank (ties by row
    order). Computed without reading values back to the host.
    """
    keep_ratio = _checks.number("keep_ratio", keep_ratio, nonnegative=True)
    if keep_ratio > 1:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    own = scores.gather(1, target.unsqueeze(1))
    rank = (scores > own).sum(dim=1)
    order = torch.argsort(rank, stable=True)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    correct = (rank == 0).sum()
    keep = correct + torch.floor((len(rank) - correct) * keep_ratio).long()
    return position < keep


def _masked_kl(log_p_t: torch.Tensor, log_p_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over kept rows of KL(p_t ‖ p_s), divided by the number of kept rows (0 when none is kept)."""
    per_row = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    kept = mask.to(per_row.dtype)
    return (per_row * kept).sum() / kept.sum().clamp(min=1)


def sskd_similarity_loss(embeddings_s: torch.Tensor, embeddings_t: torch.Tensor, temperature: float = 0.5,
                         keep_ratio: float = 0.75) -> torch.Tensor:
    """SSKD's similarity transfer: τ²·mean over selected rows of KL(softmax(S_t/τ) ‖ softmax(S_s/τ)).

    ``embeddings_s`` [4B, D_s], ``embeddings_t`` [4B, D_t]: the heads' outputs on the four views
    (D may differ). Rows are kept by :func:`selected_rows` on S_t with the source index as target.
    """
    temperature = _checks.number("temperature", temperature, positive=True)
    _checks.pair("embeddings_s", embeddings_s, "embeddings_t", embeddings_t, same_shape=False)
    s_s, s_t = rotation_similarity(embeddings_s), rotation_similarity(embeddings_t)
    mask = selected_rows(s_t, _sources(s_t.shape[1], s_t.device), keep_ratio)
    log_p_s = F.log_softmax(s_s / temperature, dim=1)
    log_p_t = F.log_softmax(s_t / temperature, dim=1)
    return _masked_kl(log_p_t, log_p_s, mask) * temperature**2


def rotation_kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, temperature: float = 4.0,
                     keep_ratio: float = 1.0) -> torch.Tensor:
    """SSKD's KD on the rotated views: T²·mean over selected rows of KL(softmax(z_t/T) ‖ softmax(z_s/T)).

    ``logits_s``, ``logits_t``: [4B, K] on the four views (:func:`rotations` order); ``target``:
    the labels [B]. Only the 3B rotated rows take part; they are kept by :func:`selected_rows` on
    the teacher's logits with the image's label as target.
    """
    temperature = _checks.number("temperature", temperature, positive=True)
    _checks.pair_of("logits_s", logits_s, "logits_t", logits_t, ndim=2, same_shape=True)
    _, rot_s = _split_views("logits_s", logits_s)
    _, rot_t = _split_views("logits_t", logits_t)
    _checks.index("target", target, logits_s.shape[1], shape=(logits_s.shape[0] // 4,), device=logits_s.device)
    mask = selected_rows(rot_t, target.repeat_interleave(3), keep_ratio)
    log_p_s = F.log_softmax(upcast(rot_s) / temperature, dim=1)
    log_p_t = F.log_softmax(upcast(rot_t) / temperature, dim=1)
    return _masked_kl(log_p_t, log_p_s, mask) * temperature**2


def stkd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, target_a: torch.Tensor, target_b: torch.Tensor,
              lam: float, beta: float = 1.0, temperature: float = 4.0) -> torch.Tensor:
    """STKD on mixup virtual samples, **a reconstruction**: Zhao et al. 2021 ("Similarity Transfer for
    Knowledge Distillation") publish only an abstract, no code and no formula.

    With x̃ = λ x_a + (1 − λ) x_b (λ ~ Beta(α, α), drawn by the caller) and s, t the student's and
    the teacher's logits on x̃:

    loss = λ·CE(s, y_a) + (1 − λ)·CE(s, y_b) + β·T²·(1/B) Σ_b KL(softmax(t/T) ‖ softmax(s/T)),

    so the student learns the mixed labels and, through the teacher's output on the mixture, how
    similar the mixed categories are. ``target_a``, ``target_b``: int64 [B].
    """
    lam = _checks.number("lam", lam)
    if not 0 <= lam <= 1:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    beta = _checks.number("beta", beta, nonnegative=True)
    temperature = _checks.number("temperature", temperature, positive=True)
    _checks.pair_of("logits_s", logits_s, "logits_t", logits_t, ndim=2, same_shape=True)
    batch, classes = logits_s.shape
    _checks.index("target_a", target_a, classes, shape=(batch,), device=logits_s.device)
    _checks.index("target_b", target_b, classes, shape=(batch,), device=logits_s.device)
    z = upcast(logits_s)
    mixed_ce = lam * F.cross_entropy(z, target_a) + (1 - lam) * F.cross_entropy(z, target_b)
    return mixed_ce + beta * kd_loss(logits_s, logits_t, temperature)

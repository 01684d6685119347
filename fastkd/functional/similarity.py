"""Batch-relation losses: each network's batch becomes a B × B (or B × B × B) relation, and the
student's relations are pulled towards the teacher's.

Values match RepDistiller (SP, CC, RKD, PKT) and the CCKD paper (Peng et al. 2019); METHODS.md
gives each formula. Inputs in fp16 / bf16 are computed in fp32, and the loss comes back in fp32.
None of the math reads tensor values on the host; the only data-reading is the NaN / Inf check
of :mod:`fastkd._checks`, which ``fastkd.value_checks(False)`` turns off. An empty batch (B = 0,
where every mean is 0/0) raises ``ValueError`` naming the student's input, on every backend.

SP, CCKD, PKT and RKD's distance and angle terms run on the fused ops of :mod:`fastkd.ops.similarity`
(native C++ on CPU, Triton on CUDA) unless the ``torch`` backend is selected, which runs the published
computation (also in :mod:`fastkd.ops.similarity`); the functions here check their inputs and flatten them.
"""
from __future__ import annotations

import torch

from fastkd import _checks
from fastkd._precision import upcast
from fastkd.ops import iusp as iusp_ops
from fastkd.ops import similarity as ops

__all__ = ["sp_loss", "iusp_loss", "cc_loss", "cckd_loss", "rkd_loss", "pkt_loss"]

# --- SP ---------------------------------------------------------------------------------------

def sp_loss(f_s, f_t) -> torch.Tensor:
    """Similarity-preserving loss (Tung & Mori, ICCV 2019), as RepDistiller's ``Similarity``.

    For each pair of maps, with Q = f flattened to B × (C·H·W), G = QQᵀ and ``rownorm`` dividing
    each row by its L2 norm (eps 1e-12)::

        loss = ‖rownorm(G_t) − rownorm(G_s)‖²_F / B²

    Args:
        f_s: student feature map ``[B, ...]``, or a list / tuple of them.
        f_t: teacher feature map ``[B, ...]`` (its C, H, W may differ from the student's), or a
            list / tuple of the same length; the per-pair losses are summed.

    Returns:
        0-dim tensor. Defined for B = 1 (the loss is then 0 unless a row of G is zero).
    """
    pairs = _checks.named_pairs("f_s", f_s, "f_t", f_t)
    for name_s, s, name_t, t in pairs:
        _checks.pair_of(name_s, s, name_t, t, min_ndim=2)
    return sum(ops.sp(_flat(s), _flat(t)) for _, s, _, t in pairs)


def _flat(f: torch.Tensor) -> torch.Tensor:
    """[B, ...] → [B, D]: a relation compares whole samples."""
    return f.reshape(f.shape[0], -1)


# --- IUSP (SP inside each sequence) -----------------------------------------------------------

def iusp_loss(f_s: torch.Tensor, f_t: torch.Tensor, lengths: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Intra-utterance similarity preservation (Chang, Kao, Sun & Wang, "Intra-Utterance Similarity Preserving
    Knowledge Distillation for Audio Tagging", Interspeech 2020): SP's similarity matrix taken between the frames
    of each sequence instead of between the samples of the batch.

    For sequence b with L_b real frames X_b (``[L_b, C]``; C may differ between student and teacher),
    G_b = X_b X_bᵀ (L_b × L_b) and ``rownorm`` dividing each row by its L2 norm (eps 1e-12) as SP does::

        loss = (1/B) Σ_b ‖rownorm(G_b^t) − rownorm(G_b^s)‖²_F / L_b²

    What the paper does: "instead of preserving the pairwise similarities between inputs within a mini-batch,
    [it] preserves the pairwise similarities between the frames of a single input utterance", SP's matrix
    (rownorm of the Gram, squared Frobenius distance, SP's /b²) taken over the frames of one utterance. The
    parts of its text that could be read while writing this (abstract, introduction) do not print the
    normalising constant or the reduction over the mini-batch. What fastkd does: SP exactly, per utterance
    (/L_b², the side of that utterance's matrix squared), then the mean over the B utterances; at equal lengths
    T that is Σ_b ‖·‖²_F / (B·T²), and at B = 1 it is SP's value with the frames as the batch
    (:func:`sp_loss` of ``f[0]``). A sum over the batch instead of the mean is ``B ×`` this (scale the weight).

    Variable lengths: padding frames are left out of the Gram of their sequence, row and column, and each
    sequence is normalised by its own L_b² (a sequence's loss does not change when padding is added). Give
    either ``lengths`` (the first L_b frames are real) or ``mask`` (True at the real frames, anywhere in the
    sequence: they are gathered to the front first, in order, which changes no value since the loss is the
    same for any order of the frames), or neither (every frame is real).

    Args:
        f_s: student frames ``[B, T, C_s]``.
        f_t: teacher frames ``[B, T, C_t]``: the same B and T.
        lengths: optional integer tensor ``[B]`` with values in [1, T].
        mask: optional bool tensor ``[B, T]``, at least one True per sequence.

    Returns:
        0-dim tensor (fp32 for fp16 / bf16 / fp32 inputs). Runs the fused op ``fastkd::iusp_loss`` (native C++
        on CPU, Triton on CUDA) unless the ``torch`` backend is selected (the eager computation).
    """
    _checks.pair_of("f_s", f_s, "f_t", f_t, ndim=3)
    if f_s.shape[1] != f_t.shape[1]:
        raise ValueError(f"f_t has {f_t.shape[1]} frames (shape {tuple(f_t.shape)}) but f_s has {f_s.shape[1]} "
                         f"(shape {tuple(f_s.shape)}); give the student and teacher the same frames [B, T, C]")
    if f_s.shape[1] == 0:
        raise ValueError(f"f_s has no frames (shape {tuple(f_s.shape)}); each sequence needs at least one frame")
    if lengths is not None and mask is not None:
        raise ValueError("give lengths or mask, not both")
    if mask is not None:
        f_s, f_t, lengths = _masked_to_front(f_s, f_t, mask)
    elif lengths is not None:
        lengths = _lengths(lengths, f_s)
    return iusp_ops.iusp(f_s, f_t, lengths)


def _lengths(lengths, f: torch.Tensor) -> torch.Tensor:
    """``lengths`` checked against [B, T, C] ``f``: an integer tensor [B] on f's device, values in [1, T]; int64."""
    b, t = f.shape[:2]
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be a torch.Tensor of frame counts [B], got {type(lengths).__name__}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor (frame counts), got dtype {lengths.dtype}")
    if tuple(lengths.shape) != (b,):
        raise ValueError(f"lengths must have shape ({b},), one frame count per sequence of f_s, "
                         f"got {tuple(lengths.shape)}")
    if lengths.device != f.device:
        raise ValueError(f"lengths is on {lengths.device} but f_s is on {f.device}; put both on one device")
    if _checks.values_checked() and _checks.has_values(lengths):
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > t:
            raise ValueError(f"lengths holds {lo if lo < 1 else hi}, outside [1, {t}] (f_s has {t} frames); "
                             "every sequence needs between 1 and T real frames")
    return lengths.to(torch.int64)


def _masked_to_front(f_s: torch.Tensor, f_t: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(f_s, f_t, lengths) with each sequence's real frames (``mask``) moved to the front in their order."""
    b, t = f_s.shape[:2]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor [B, T] (True at the real frames), got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if tuple(mask.shape) != (b, t):
        raise ValueError(f"mask must have shape ({b}, {t}), like f_s's first two dimensions, got {tuple(mask.shape)}")
    if mask.device != f_s.device:
        raise ValueError(f"mask is on {mask.device} but f_s is on {f_s.device}; put both on one device")
    lengths = mask.sum(dim=1)
    if _checks.values_checked() and _checks.has_values(mask) and not bool((lengths > 0).all()):
        raise ValueError(f"mask has a sequence without a real frame (row {int((lengths == 0).nonzero()[0])}); "
                         "every sequence needs at least one True")
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices

    def gather(f):
        return f.gather(1, order.unsqueeze(2).expand(-1, -1, f.shape[2]))

    return gather(f_s), gather(f_t), lengths


# --- CC (RepDistiller form) -------------------------------------------------------------------

def cc_loss(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """Correlation congruence, RepDistiller's ``Correlation`` form (Peng et al., ICCV 2019).

    With Δ = |e_s − e_t| (elementwise), the products of consecutive rows::

        loss = 1/(B−1) · Σ_{i<B−1} Σ_d Δ[i, d] · Δ[i+1, d]

    This is the code RepDistiller ships (emailed by the paper's authors), not the paper's kernel
    form: for that, see :func:`cckd_loss`.

    Args:
        e_s, e_t: student and teacher embeddings ``[B, D]`` of the same shape, B ≥ 2.
    """
    _checks.pair_of("e_s", e_s, "e_t", e_t, ndim=2, same_shape=True)
    _checks.min_batch("e_s", e_s, 2, "it pairs each sample with the next one")
    delta = (upcast(e_s) - upcast(e_t)).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


# --- CCKD (paper form) ------------------------------------------------------------------------

def cckd_loss(e_s: torch.Tensor, e_t: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """Correlation congruence, the paper's form (Peng et al., "Correlation Congruence for Knowledge
    Distillation", ICCV 2019): a Taylor-expanded Gaussian RBF on L2-normalised embeddings.

    With ê = rownorm(e) and g = ê êᵀ (cosines)::

        k(g) = Σ_{p=0..P} e^{−2γ} (2γ)^p / p! · g^p     (= exp(−γ‖x − y‖²) as P → ∞, for unit x, y)
        loss = mean over the B² entries of (k(g_s) − k(g_t))²

    Args:
        e_s: student embeddings ``[B, D_s]``.
        e_t: teacher embeddings ``[B, D_t]`` (D_t may differ from D_s).
        gamma: the RBF's γ > 0 (paper: 0.4).
        order: the Taylor order P ≥ 0 (paper: 2). At P = 0 k is the constant e^{−2γ}: the loss is 0, with
            a graph and a zero gradient on every backend.

    Returns:
        0-dim tensor; defined for B = 1 (then 0).
    """
    gamma = _checks.number("gamma", gamma, positive=True)
    order = _checks.integer("order", order, 0)
    _checks.pair_of("e_s", e_s, "e_t", e_t, ndim=2)
    return ops.cckd(e_s, e_t, gamma, order)


# --- RKD --------------------------------------------------------------------------------------

def rkd_loss(f_s: torch.Tensor, f_t: torch.Tensor, w_dist: float = 25.0, w_angle: float = 50.0) -> torch.Tensor:
    """Relational knowledge distillation (Park, Kim, Lu & Cho, CVPR 2019), as RepDistiller's ``RKDLoss``.

    On e = f flattened to ``[B, ·]``, with d_ij = ‖e_i − e_j‖ (RepDistiller's clamped expansion,
    eps 1e-12; d_ii = 0), μ = mean of d over the entries > 0, and a_ijk = cos∠(e_j − e_i, e_k − e_i)::

        loss = w_dist · smooth_l1(d_s / μ_s, d_t / μ_t) + w_angle · smooth_l1(a_s, a_t)

    smooth-L1 with β = 1, mean over the B² (distances) and B³ (angles) entries. The teacher side
    carries no gradient. RepDistiller's μ = ``d[d > 0].mean()`` is a boolean-mask gather (a host
    sync); here μ = Σ d·[d > 0] / Σ [d > 0], the same number.

    Args:
        f_s, f_t: student and teacher features ``[B, ...]`` (flattened per sample; their widths
            may differ), B ≥ 2. One or two features per sample run the published computation on
            every backend (the fused ops' Gram route rounds the angles of so few dimensions: ±1 with one).
        w_dist, w_angle: the weights of the distance and angle terms, finite and ≥ 0 (RepDistiller: 25, 50).
    """
    w_dist = _checks.number("w_dist", w_dist, nonnegative=True)
    w_angle = _checks.number("w_angle", w_angle, nonnegative=True)
    _checks.pair_of("f_s", f_s, "f_t", f_t, min_ndim=2)
    _checks.min_batch("f_s", f_s, 2, "distances need two samples")
    f_s, f_t = _flat(f_s), _flat(f_t)
    return w_dist * ops.rkd_distance(f_s, f_t) + w_angle * ops.rkd_angle(f_s, f_t)


# --- PKT --------------------------------------------------------------------------------------

def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), as RepDistiller's ``PKT``.

    With x̂ = x / (‖x‖ + eps) per row, S = (x̂x̂ᵀ + 1)/2 and P = S with each row divided by its sum::

        loss = mean over the B² entries of P_t · log((P_t + eps) / (P_s + eps))

    Args:
        f_s: student features ``[B, D_s]``.
        f_t: teacher features ``[B, D_t]`` (D_t may differ from D_s). D ≤ 2 runs the published
            computation on every backend: (1 + cos)/2 of (nearly) antiparallel pairs, common there, is of the
            order of eps, where the fused op's Gram-based gradient cancels.
        eps: the stabiliser ≥ 0 (RepDistiller: 1e-7).

    Returns:
        0-dim tensor; defined for B = 1 (then 0).
    """
    eps = _checks.number("eps", eps, nonnegative=True)
    _checks.pair_of("f_s", f_s, "f_t", f_t, ndim=2)
    return ops.pkt(f_s, f_t, eps)

"""CRD as stateless functions: the NCE loss over given memory banks, and the bank update.

Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020 (RepDistiller).
The stateful drop-in (embeds, banks, Z, negative sampling) is :class:`fastkd.CRDLoss`.
"""
from __future__ import annotations

import torch

from fastkd import _checks
from fastkd._precision import accumulation_dtype
from fastkd.ops import crd as _crd

__all__ = ["crd_loss", "crd_bank_update_", "l2_normalize"]


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ‖x‖₂ per row, without an epsilon (RepDistiller's ``Normalize``)."""
    return x / x.pow(2).sum(1, keepdim=True).sqrt()


def _check_banks(memory_s, memory_t, v_s, v_t) -> None:
    _checks.tensor("memory_s", memory_s, ndim=2)
    _checks.tensor("memory_t", memory_t, ndim=2)
    if memory_s.shape != memory_t.shape:
        raise ValueError(f"memory_t has shape {tuple(memory_t.shape)} but memory_s has {tuple(memory_s.shape)}")
    for name, v in (("v_s", v_s), ("v_t", v_t)):
        if v.shape[1] != memory_s.shape[1]:
            raise ValueError(f"{name} has {v.shape[1]} features but the memory banks hold {memory_s.shape[1]}")
        if v.device != memory_s.device:
            raise ValueError(f"{name} is on {v.device} but the memory banks are on {memory_s.device}")


def crd_loss(v_s: torch.Tensor, v_t: torch.Tensor, memory_s: torch.Tensor, memory_t: torch.Tensor,
             contrast_idx: torch.Tensor, z_s: torch.Tensor | None = None, z_t: torch.Tensor | None = None,
             temperature: float = 0.07) -> torch.Tensor:
    """CRD's two NCE terms for L2-normalised embeddings ``v_s``, ``v_t`` ([B, D], B ≥ 1).

    x_s[b,k] = exp(⟨memory_t[c[b,k]], v_s[b]⟩/T), x_t[b,k] = exp(⟨memory_s[c[b,k]], v_t[b]⟩/T),
    P = x / Z and, with K = c.shape[1] − 1, N = len(memory) and ε = 1e-7, each side is
    −(1/B)[Σ_b log(P_b0/(P_b0 + K/N + ε)) + Σ_b Σ_{k≥1} log((K/N)/(P_bk + K/N + ε))].
    ``z_s``/``z_t`` are 0-dim tensors; ``None`` or a value ≤ 0 means 'estimate from this batch'
    (mean(x)·N, as RepDistiller does on its first step). P is computed as exp(s/T − log Z)
    and the terms from log P (:func:`fastkd.ops.crd.nce_terms`), so the loss is finite at any T
    (x alone overflows fp32 once s/T > 88). The banks are not changed. An empty batch raises
    ``ValueError``. It runs the step :class:`fastkd.CRDLoss` runs (:func:`fastkd.ops.crd.nce`): the fused op
    ``fastkd::crd_nce`` off the ``torch`` backend, the published computation on it.
    """
    _checks.tensor("v_s", v_s, ndim=2)
    _checks.tensor("v_t", v_t, ndim=2)
    _checks.pair("v_s", v_s, "v_t", v_t)
    _check_banks(memory_s, memory_t, v_s, v_t)
    temperature = _checks.number("temperature", temperature, positive=True)
    num_data = memory_s.shape[0]
    _checks.index("contrast_idx", contrast_idx, num_data, device=v_s.device)
    if contrast_idx.dim() != 2 or contrast_idx.shape[0] != v_s.shape[0] or contrast_idx.shape[1] < 2:
        raise ValueError(f"contrast_idx must be [B, K+1] with B = {v_s.shape[0]} and K >= 1, "
                         f"got {tuple(contrast_idx.shape)}")
    acc = accumulation_dtype(v_s)
    log_z_s, log_z_t = (_log_z(name, z, acc, v_s.device) for name, z in (("z_s", z_s), ("z_t", z_t)))
    unused_rng = torch.zeros(2, dtype=torch.int64, device=v_s.device)  # the negatives are given: nothing is drawn
    loss, _, _ = _crd.nce(v_s, v_t, memory_s, memory_t, contrast_idx[:, 0], contrast_idx, log_z_s, log_z_t,
                          unused_rng, contrast_idx.shape[1] - 1, temperature)
    return loss


def _log_z(name: str, z: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """log Z of a given Z (−∞, 'estimate', for ``None`` or Z ≤ 0)."""
    if z is None:
        return torch.full((), _crd.NOT_ESTIMATED, dtype=dtype, device=device)
    _checks.tensor(name, z)
    if z.numel() != 1:
        raise ValueError(f"{name} must hold one value, got shape {tuple(z.shape)}")
    z = z.reshape(()).to(device=device, dtype=dtype)
    return _crd.log_z_of(z)


def crd_bank_update_(memory: torch.Tensor, idx: torch.Tensor, v: torch.Tensor, momentum: float = 0.5) -> None:
    """memory[idx] ← rownorm(momentum·memory[idx] + (1 − momentum)·v), in place, no gradient.

    Every new row comes from the bank as it was before the call; a repeated index takes the row
    of its last occurrence. All indices are checked before any row is written. An empty batch
    (B = 0) is well defined here and writes nothing, as the torch reference does, on every backend.
    """
    _checks.tensor("memory", memory, ndim=2)
    _checks.tensor("v", v, ndim=2)
    _checks.index("idx", idx, memory.shape[0], shape=(v.shape[0],), device=memory.device)
    if v.shape[1] != memory.shape[1] or v.device != memory.device:
        raise ValueError(f"v must be [B, {memory.shape[1]}] on {memory.device}, got {tuple(v.shape)} on {v.device}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    _checks.finite("v", v)
    _crd.bank_update_(memory, idx, v, momentum)

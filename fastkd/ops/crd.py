"""CRD's ops: scores against a memory bank, the NCE loss, the bank update.

Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020; the reference
follows RepDistiller's ``ContrastMemory`` + ``ContrastLoss`` step for step (gather the K+1 rows
of each anchor, ``bmm``, ``exp(s / T)``, divide by Z, NCE with noise probability 1/N).

``fastkd::crd_bank_update_`` is a registered custom op: the reference below is its default
kernel, the native extension registers a CPU kernel over it.
"""
from __future__ import annotations

import torch

from fastkd import _native
from fastkd.backends import dispatch, register

NCE_EPS = 1e-7


def scores_reference(anchor: torch.Tensor, bank: torch.Tensor, contrast_idx: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """x[b, k] = exp(<bank[contrast_idx[b, k]], anchor[b]> / T), [B, K+1], fp32 (or fp64)."""
    dtype = torch.promote_types(anchor.dtype, torch.float32)
    batch, cols = contrast_idx.shape
    rows = bank.index_select(0, contrast_idx.reshape(-1)).detach().to(dtype).view(batch, cols, -1)
    dots = torch.bmm(rows, anchor.to(dtype).unsqueeze(2)).squeeze(2)
    return torch.exp(dots / temperature)


def estimate_z(scores: torch.Tensor, z: torch.Tensor, num_data: int) -> torch.Tensor:
    """Z = mean(scores) · N where ``z`` is still negative (not estimated), else ``z``; no host sync."""
    estimate = scores.detach().mean() * num_data
    return torch.where(z < 0, estimate.to(z.dtype), z)


def nce_loss_reference(probs: torch.Tensor, num_data: int) -> torch.Tensor:
    """RepDistiller's ContrastLoss on P = x / Z, [B, K+1] with the positive in column 0.

    −(1/B)[Σ_b log(P_b0 / (P_b0 + K/N + ε)) + Σ_b Σ_{k≥1} log((K/N) / (P_bk + K/N + ε))].
    """
    batch, cols = probs.shape
    noise = (cols - 1) / num_data
    positive = torch.log(probs[:, 0] / (probs[:, 0] + noise + NCE_EPS))
    negative = torch.log(noise / (probs[:, 1:] + noise + NCE_EPS))
    return -(positive.sum() + negative.sum()) / batch


def nce_reference(v_s: torch.Tensor, v_t: torch.Tensor, memory_s: torch.Tensor, memory_t: torch.Tensor,
                  contrast_idx: torch.Tensor, z_s: torch.Tensor, z_t: torch.Tensor, temperature: float,
                  num_data: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both NCE sides of one CRD step; returns (loss, Z_s, Z_t) with Z estimated where negative.

    Student anchors score against the teacher bank and teacher anchors against the student bank.
    """
    x_s = scores_reference(v_s, memory_t, contrast_idx, temperature)
    x_t = scores_reference(v_t, memory_s, contrast_idx, temperature)
    z_s, z_t = estimate_z(x_s, z_s, num_data), estimate_z(x_t, z_t, num_data)
    loss = nce_loss_reference(x_s / z_s.to(x_s.dtype), num_data) + nce_loss_reference(x_t / z_t.to(x_t.dtype), num_data)
    return loss, z_s, z_t


def bank_update_reference(bank: torch.Tensor, index: torch.Tensor, value: torch.Tensor, momentum: float) -> None:
    """bank[y] ← rownorm(m·bank[y] + (1 − m)·value), in place, from the rows before the call.

    When an index repeats inside the batch its last occurrence wins (deterministic, unlike
    ``index_copy_`` on CUDA).
    """
    old = bank.index_select(0, index).to(torch.promote_types(bank.dtype, torch.float32))
    mixed = old * momentum + value.to(old.dtype) * (1.0 - momentum)
    fresh = mixed / mixed.pow(2).sum(1, keepdim=True).sqrt()
    position = torch.arange(index.numel(), device=index.device)
    last = torch.full((bank.shape[0],), -1, dtype=torch.long, device=index.device)
    last.scatter_reduce_(0, index, position, reduce="amax")
    # every occurrence of a repeated index writes the row of its last occurrence
    final = fresh.index_select(0, last.index_select(0, index))
    bank.index_copy_(0, index, final.to(bank.dtype))


_lib = torch.library.Library("fastkd", "FRAGMENT")
_lib.define("crd_bank_update_(Tensor(a!) bank, Tensor index, Tensor value, float momentum) -> ()")
_lib.impl("crd_bank_update_", bank_update_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("fastkd::crd_bank_update_")
def _bank_update_fake(bank, index, value, momentum):
    return None


def _bank_update_native(bank, index, value, momentum):
    torch.ops.fastkd.crd_bank_update_(bank, index, value, momentum)


register("crd_bank_update", "torch", bank_update_reference)
register("crd_bank_update", "native", _bank_update_native)
_native.load()


def bank_update_(bank: torch.Tensor, index: torch.Tensor, value: torch.Tensor, momentum: float) -> None:
    """The bank update on the backend :func:`fastkd.backends.choose` picks for ``bank``'s device."""
    with torch.no_grad():
        dispatch("crd_bank_update", bank.device.type)(bank, index, value.detach(), float(momentum))

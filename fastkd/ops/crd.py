"""CRD's ops: scores against a memory bank, the NCE loss, the bank update.

Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020.

The normaliser Z travels as log Z. Z = mean(exp(s/T))·N spans e^(±1/T): at T = 1e-3 it is far
beyond fp32 (and fp64), so every op takes and returns log Z (−∞, Z = 0, means "not estimated yet":
the op then uses this batch's estimate log(mean(exp(s/T))·N), a log-sum-exp, and returns it).
Every NCE term is a function of log P = s/T − log Z (:func:`nce_terms`), so no exponential
overflows whatever T and the dtype, and where the published exp(s/T)/Z is finite the value is the
published one.

Two torch references live here:

* :func:`nce_reference` follows RepDistiller's ``ContrastMemory`` + ``ContrastLoss`` step for
  step (gather the K+1 rows of each anchor, ``bmm``, divide by T and by Z, NCE with noise
  probability 1/N) in log space and takes its gradient by autograd: the oracle, and the
  ``torch`` backend.
* :func:`nce_with_grad_reference` is the contract of the fused op ``fastkd::crd_nce`` that the
  native, Triton and CUDA kernels implement: the same loss, with the anchors' gradients produced
  in the same pass, so backward only scales them and never gathers a row.

``fastkd::crd_bank_update_`` is the fused momentum update + renormalisation of the batch rows.
Both ops are defined with :func:`fastkd.ops._library.define`; the references are their default kernels and
the native extension registers CPU kernels over them. Their other backends (Triton, CUDA C++) define ops of
their own with the same schemas, in their backend modules. Both ops refuse an empty batch (B = 0) before they
read or write anything; an empty bank update writes nothing.
"""
from __future__ import annotations

import math

import torch

from fastkd._precision import accumulation_dtype
from fastkd.backends import kernel_for
from fastkd.ops import philox
from fastkd.ops._library import Autograd, define, definition

NCE_EPS = 1e-7
NOT_ESTIMATED = float("-inf")  # log Z of a loss whose Z is not estimated yet (Z = 0)


def check_batch(v_s: torch.Tensor) -> None:
    """``crd_nce`` needs at least one anchor: an empty batch would estimate Z from no score (log 0)."""
    if v_s.dim() != 2 or v_s.shape[0] < 1:
        raise ValueError(f"crd_nce: v_s has {v_s.shape[0] if v_s.dim() else 0} rows (shape {tuple(v_s.shape)}); "
                         "the op needs an [B, D] batch with B >= 1")


def logits_reference(anchor: torch.Tensor, bank: torch.Tensor, contrast_idx: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """s[b, k] / T = <bank[contrast_idx[b, k]], anchor[b]> / T, [B, K+1], fp32 (or fp64)."""
    dtype = accumulation_dtype(anchor)
    batch, cols = contrast_idx.shape
    rows = bank.index_select(0, contrast_idx.reshape(-1)).detach().to(dtype).view(batch, cols, -1)
    return torch.bmm(rows, anchor.to(dtype).unsqueeze(2)).squeeze(2) / temperature


def z_known(log_z: torch.Tensor) -> torch.Tensor:
    """Where Z has been estimated: log Z > −∞ (a NaN counts as not estimated)."""
    return log_z > NOT_ESTIMATED


def log_z_of(z: torch.Tensor) -> torch.Tensor:
    """log Z from RepDistiller's Z (a negative Z, its "not estimated yet" marker, is :data:`NOT_ESTIMATED`)."""
    return torch.where(z < 0, torch.full_like(z, NOT_ESTIMATED), z.log())


def log_z_estimate(logits: torch.Tensor, num_data: int) -> torch.Tensor:
    """log(mean(exp(s/T))·N) over all B·(K+1) entries, by log-sum-exp: RepDistiller's Z, in log space."""
    return logits.detach().logsumexp(dim=(0, 1)) - math.log(logits.numel()) + math.log(num_data)


def used_log_z(log_z: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """The log Z a step divides by: the stored one, or this batch's estimate on the first step."""
    return torch.where(z_known(log_z), log_z.to(estimate.dtype), estimate)


def updated_log_z(log_z: torch.Tensor, estimate: torch.Tensor, z_momentum: float = 0.0) -> torch.Tensor:
    """log Z after the step, in ``log_z``'s dtype: the estimate where Z was unknown; else Z kept, or with
    ``z_momentum`` m > 0 moved, Z ← m·Z + (1 − m)·estimate (a log-add-exp, no overflow); no host sync."""
    acc = log_z.to(estimate.dtype)
    if z_momentum > 0:
        acc = torch.logaddexp(acc + math.log(z_momentum), estimate + math.log1p(-z_momentum)) \
            if z_momentum < 1 else acc
    return torch.where(z_known(log_z), acc, estimate).to(log_z.dtype)


def nce_terms(log_p: torch.Tensor, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RepDistiller's NCE terms from log P, [B, K+1] with the positive in column 0, and their slopes.

    With c = K/N + ε and softplus(x) = log(1 + eˣ):
    positive log(P / (P + c)) = −softplus(log c − log P), slope d/d log P = c / (P + c);
    negative log((K/N) / (P + c)) = −log1p(ε·N/K) − softplus(log P − log c), slope −P / (P + c).
    Each is finite for any finite log P (no P is ever formed), and accurate: log1p, no cancellation.
    """
    log_c = math.log(noise + NCE_EPS)
    zero = log_p.new_zeros(())
    positive = -torch.logaddexp(log_c - log_p[:, :1], zero)
    negative = -torch.logaddexp(log_p[:, 1:] - log_c, zero) - math.log1p(NCE_EPS / noise)
    slopes = torch.cat([torch.sigmoid(log_c - log_p[:, :1]), -torch.sigmoid(log_p[:, 1:] - log_c)], dim=1)
    return torch.cat([positive, negative], dim=1), slopes


def nce_loss_reference(log_probs: torch.Tensor, num_data: int) -> torch.Tensor:
    """RepDistiller's ContrastLoss on log P = log(x / Z), [B, K+1] with the positive in column 0.

    −(1/B)[Σ_b log(P_b0 / (P_b0 + K/N + ε)) + Σ_b Σ_{k≥1} log((K/N) / (P_bk + K/N + ε))].
    """
    batch, cols = log_probs.shape
    terms, _ = nce_terms(log_probs, (cols - 1) / num_data)
    return -terms.sum() / batch


def nce_reference(v_s: torch.Tensor, v_t: torch.Tensor, memory_s: torch.Tensor, memory_t: torch.Tensor,
                  contrast_idx: torch.Tensor, log_z_s: torch.Tensor, log_z_t: torch.Tensor, temperature: float,
                  num_data: int, z_momentum: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both NCE sides of one CRD step; returns (loss, log Z_s, log Z_t), Z estimated where unknown.

    Student anchors score against the teacher bank and teacher anchors against the student bank.
    The step's scores are divided by Z as it was before this step (by the estimate on the first).
    """
    check_batch(v_s)
    loss, new = 0, []
    for anchor, bank, log_z in ((v_s, memory_t, log_z_s), (v_t, memory_s, log_z_t)):
        logits = logits_reference(anchor, bank, contrast_idx, temperature)
        estimate = log_z_estimate(logits, num_data)
        loss = loss + nce_loss_reference(logits - used_log_z(log_z, estimate), num_data)
        new.append(updated_log_z(log_z, estimate, z_momentum))
    return loss, new[0], new[1]


def bank_update_reference(bank: torch.Tensor, index: torch.Tensor, value: torch.Tensor, momentum: float) -> None:
    """bank[y] ← rownorm(m·bank[y] + (1 − m)·value), in place, from the rows before the call.

    When an index repeats inside the batch its last occurrence wins (deterministic, unlike
    ``index_copy_`` on CUDA). An empty ``index`` writes nothing.
    """
    old = bank.index_select(0, index).to(accumulation_dtype(bank))
    mixed = old * momentum + value.to(old.dtype) * (1.0 - momentum)
    fresh = mixed / mixed.pow(2).sum(1, keepdim=True).sqrt()
    position = torch.arange(index.numel(), device=index.device)
    last = torch.full((bank.shape[0],), -1, dtype=torch.long, device=index.device)
    last.scatter_reduce_(0, index, position, reduce="amax")
    # every occurrence of a repeated index writes the row of its last occurrence
    final = fresh.index_select(0, last.index_select(0, index))
    bank.index_copy_(0, index, final.to(bank.dtype))


def _side_with_grad(anchor: torch.Tensor, bank: torch.Tensor, cidx: torch.Tensor, log_z: torch.Tensor,
                    temperature: float, num_data: int, z_momentum: float):
    """One NCE side: (loss, new log Z, d loss / d anchor) for [B, D] anchors, the gradient formed with the loss."""
    acc = accumulation_dtype(anchor)
    batch, cols = cidx.shape
    rows = bank.index_select(0, cidx.reshape(-1)).to(acc).view(batch, cols, -1)
    logits = torch.bmm(rows, anchor.to(acc).unsqueeze(2)).squeeze(2) / temperature  # s / T
    estimate = log_z_estimate(logits, num_data)
    terms, slopes = nce_terms(logits - used_log_z(log_z, estimate), (cols - 1) / num_data)
    loss = -terms.sum() / batch
    d_scores = slopes * (-1.0 / (batch * temperature))  # d loss / d s
    grad = torch.bmm(d_scores.unsqueeze(1), rows).squeeze(1).to(anchor.dtype)
    return loss, updated_log_z(log_z, estimate, z_momentum), grad


def nce_with_grad_reference(v_s, v_t, memory_s, memory_t, idx, contrast_idx, log_z_s, log_z_t, rng_state,
                            num_negatives: int, temperature: float, z_momentum: float, shared_negatives: bool):
    """The contract of ``fastkd::crd_nce``: (loss, log Z_s, log Z_t, d loss/d v_s, d loss/d v_t).

    ``contrast_idx`` [B, K+1] or ``None``: then column 0 is ``idx`` and the K negatives come from
    :mod:`fastkd.ops.philox` with ``rng_state`` = (seed, offset) (the same K rows for every anchor
    when ``shared_negatives``). Z is estimated where log Z is −∞; with ``z_momentum`` > 0 a known Z
    moves towards each batch's estimate (Z ← m·Z + (1 − m)·mean(x)·N) after being used. B ≥ 1.
    """
    check_batch(v_s)
    num_data = memory_s.shape[0]
    cidx = contrast_idx if contrast_idx is not None else philox.contrast_indices(
        idx, rng_state, num_negatives, num_data, shared_negatives)
    loss_s, z_s_new, grad_s = _side_with_grad(v_s, memory_t, cidx, log_z_s, temperature, num_data, z_momentum)
    loss_t, z_t_new, grad_t = _side_with_grad(v_t, memory_s, cidx, log_z_t, temperature, num_data, z_momentum)
    return loss_s + loss_t, z_s_new, z_t_new, grad_s, grad_t


def check_pairs(v_s: torch.Tensor, memory_s: torch.Tensor, log_z_s: torch.Tensor) -> None:
    """``crd_nce_multi`` needs M >= 1 pairs of [B, D] anchors with B >= 1, banks [N, M, D] and log Z [M]."""
    if v_s.dim() != 3 or v_s.shape[0] < 1 or v_s.shape[1] < 1:
        raise ValueError(f"crd_nce_multi: v_s has shape {tuple(v_s.shape)}; the op needs [M, B, D] anchors with "
                         "M >= 1 pairs and B >= 1 rows")
    if memory_s.dim() != 3 or memory_s.shape[1] != v_s.shape[0] or memory_s.shape[2] != v_s.shape[2]:
        raise ValueError(f"crd_nce_multi: the banks have shape {tuple(memory_s.shape)}; they must be [N, M, D] with "
                         f"M, D those of v_s {tuple(v_s.shape)}")
    if tuple(log_z_s.shape) != (v_s.shape[0],):
        raise ValueError(f"crd_nce_multi: log Z has shape {tuple(log_z_s.shape)}; it must be [M] = [{v_s.shape[0]}]")


def nce_multi_with_grad_reference(v_s, v_t, memory_s, memory_t, idx, contrast_idx, log_z_s, log_z_t, rng_state,
                                  num_negatives: int, temperature: float, z_momentum: float, shared_negatives: bool):
    """The contract of ``fastkd::crd_nce_multi``: :func:`nce_with_grad_reference` for M (student, teacher) pairs
    at once, every pair scoring the same contrast rows (one draw for the batch).

    ``v_s``, ``v_t`` [M, B, D]: pair m's student and teacher anchors; ``memory_s``, ``memory_t`` [N, M, D]: the
    pairs' banks, sample by sample (pair m's bank is ``memory_s[:, m]``; the layout puts one sample's M rows side by
    side, which the fused kernel reads together); ``log_z_s``, ``log_z_t`` [M]: the pairs' log Z's. Returns (loss [M], log Z_s [M], log Z_t [M],
    d loss_m / d v_s[m] [M, B, D], d loss_m / d v_t[m] [M, B, D]): pair m's loss is exactly what ``crd_nce``
    gives for pair m alone with the same ``rng_state`` (or ``contrast_idx``).
    """
    check_pairs(v_s, memory_s, log_z_s)
    num_data = memory_s.shape[0]
    cidx = contrast_idx if contrast_idx is not None else philox.contrast_indices(
        idx, rng_state, num_negatives, num_data, shared_negatives)
    outs = [nce_with_grad_reference(v_s[m], v_t[m], memory_s[:, m], memory_t[:, m], idx, cidx, log_z_s[m], log_z_t[m],
                                    rng_state, num_negatives, temperature, z_momentum, shared_negatives)
            for m in range(v_s.shape[0])]
    return tuple(torch.stack(parts) for parts in zip(*outs))


# ---------------------------------------------------------------- the ops

def _nce_fake(v_s, v_t, memory_s, memory_t, idx, contrast_idx, log_z_s, log_z_t, rng_state, num_negatives,
              temperature, z_momentum, shared_negatives):
    check_batch(v_s)
    loss = v_s.new_empty((), dtype=accumulation_dtype(v_s))
    return loss, torch.empty_like(log_z_s), torch.empty_like(log_z_t), torch.empty_like(v_s), torch.empty_like(v_t)


def _nce_multi_fake(v_s, v_t, memory_s, memory_t, idx, contrast_idx, log_z_s, log_z_t, rng_state, num_negatives,
                    temperature, z_momentum, shared_negatives):
    check_pairs(v_s, memory_s, log_z_s)
    loss = v_s.new_empty((v_s.shape[0],), dtype=accumulation_dtype(v_s))
    return loss, torch.empty_like(log_z_s), torch.empty_like(log_z_t), torch.empty_like(v_s), torch.empty_like(v_t)


def _bank_update_fake(bank, index, value, momentum):
    return None


def _nce_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[3], output[4])


def _nce_backward(ctx, grad_loss, grad_z_s, grad_z_t, grad_g_s, grad_g_t):
    """The anchors' gradients were taken in the forward pass: scale them by the upstream gradient."""
    grad_s, grad_t = ctx.saved_tensors
    scale = grad_loss.to(grad_s.dtype)
    return (grad_s * scale, grad_t * scale) + (None,) * 11


def _nce_multi_backward(ctx, grad_loss, grad_z_s, grad_z_t, grad_g_s, grad_g_t):
    """Pair m's anchors' gradients scaled by the upstream gradient of its loss, ``grad_loss[m]``."""
    grad_s, grad_t = ctx.saved_tensors
    scale = grad_loss.to(grad_s.dtype).view(-1, 1, 1)
    return (grad_s * scale, grad_t * scale) + (None,) * 11


# Every backend's crd_nce (the reference, native C++ on CPU and CUDA, Triton) returns the anchors' gradients
# with the loss, so this one formula serves them all.
NCE_AUTOGRAD = Autograd(_nce_setup_context, _nce_backward)
CRD_NCE = define("crd_nce(Tensor v_s, Tensor v_t, Tensor memory_s, Tensor memory_t, Tensor idx, Tensor? contrast_idx, "
                 "Tensor log_z_s, Tensor log_z_t, Tensor rng_state, int num_negatives, float temperature, "
                 "float z_momentum, bool shared_negatives) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
                 nce_with_grad_reference, _nce_fake, NCE_AUTOGRAD)
CRD_NCE_MULTI = define("crd_nce_multi(Tensor v_s, Tensor v_t, Tensor memory_s, Tensor memory_t, Tensor idx, "
                       "Tensor? contrast_idx, Tensor log_z_s, Tensor log_z_t, Tensor rng_state, int num_negatives, "
                       "float temperature, float z_momentum, bool shared_negatives) "
                       "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
                       nce_multi_with_grad_reference, _nce_multi_fake,
                       Autograd(_nce_setup_context, _nce_multi_backward))
CRD_BANK_UPDATE = define("crd_bank_update_(Tensor(a!) bank, Tensor index, Tensor value, float momentum) -> ()",
                         bank_update_reference, _bank_update_fake)


def _fused(name: str, x: torch.Tensor, public: torch._ops.OpOverload):
    """The op :func:`fastkd.backends.kernel_for` picks for ``x`` (``None``: the torch backend), except that float64
    tensors off the CPU run ``public``, whose kernel there is its reference: the GPU kernels compute in fp32 (the
    CUDA C++ ones refuse float64). On CPU tensors the public op is the native C++ kernel, float64 included."""
    op = kernel_for(name, x)
    return public if op is not None and x.dtype == torch.float64 and not x.is_cpu else op


def nce(v_s: torch.Tensor, v_t: torch.Tensor, memory_s: torch.Tensor, memory_t: torch.Tensor, idx: torch.Tensor,
        contrast_idx: torch.Tensor | None, log_z_s: torch.Tensor, log_z_t: torch.Tensor, rng_state: torch.Tensor,
        num_negatives: int, temperature: float, z_momentum: float = 0.0,
        shared_negatives: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CRD step's loss and new log Z's on the chosen backend: (loss, log Z_s, log Z_t).

    The ``torch`` backend is the published computation (:func:`nce_reference`, gradients by
    autograd); every other backend runs the fused op ``fastkd::crd_nce``.
    """
    op = _fused("crd_nce", v_s, CRD_NCE)
    if op is None:
        if contrast_idx is None:
            contrast_idx = philox.contrast_indices(idx, rng_state, num_negatives, memory_s.shape[0], shared_negatives)
        return nce_reference(v_s, v_t, memory_s, memory_t, contrast_idx, log_z_s, log_z_t, temperature,
                             memory_s.shape[0], z_momentum)
    loss, log_z_s, log_z_t, _, _ = op(v_s, v_t, memory_s, memory_t, idx, contrast_idx, log_z_s, log_z_t, rng_state,
                                      num_negatives, temperature, z_momentum, shared_negatives)
    return loss, log_z_s, log_z_t


def bank_update_(bank: torch.Tensor, index: torch.Tensor, value: torch.Tensor, momentum: float) -> None:
    """The bank update on the backend :func:`fastkd.backends.kernel_for` picks for ``bank``'s device."""
    op = _fused("crd_bank_update", bank, CRD_BANK_UPDATE)
    with torch.no_grad():
        if op is None:
            bank_update_reference(bank, index, value.detach(), float(momentum))
        else:
            op(bank, index, value.detach(), float(momentum))


def nce_multi(v_s: torch.Tensor, v_t: torch.Tensor, memory_s: torch.Tensor, memory_t: torch.Tensor,
              idx: torch.Tensor, contrast_idx: torch.Tensor | None, log_z_s: torch.Tensor, log_z_t: torch.Tensor,
              rng_state: torch.Tensor, num_negatives: int, temperature: float, z_momentum: float = 0.0,
              shared_negatives: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M (student, teacher) pairs' CRD steps on one draw of contrast rows: (loss [M], log Z_s [M], log Z_t [M]).

    Shapes as :func:`nce_multi_with_grad_reference`. Where the chosen backend has the fused multi-pair op
    (``native`` on CPU tensors) it runs that; elsewhere each pair runs :func:`nce` in turn with the same
    ``rng_state`` (so the same rows) on its bank ``memory[:, m]``: the published computation on ``torch``, the
    single-pair fused kernel on CUDA (Triton reads the strided bank as it is; the CUDA C++ kernel, which needs
    contiguous rows, gets a copy of it: a multi-bank CUDA kernel is not written).
    """
    op = kernel_for("crd_nce_multi", v_s)
    if op is not None:
        loss, log_z_s, log_z_t, _, _ = op(v_s, v_t, memory_s, memory_t, idx, contrast_idx, log_z_s, log_z_t,
                                          rng_state, num_negatives, temperature, z_momentum, shared_negatives)
        return loss, log_z_s, log_z_t
    check_pairs(v_s, memory_s, log_z_s)
    single = kernel_for("crd_nce", v_s)
    copy = single is not None and not v_s.is_cpu and definition(single).backend == "native"

    def bank(memory: torch.Tensor, m: int) -> torch.Tensor:
        return memory[:, m].contiguous() if copy else memory[:, m]

    outs = [nce(v_s[m], v_t[m], bank(memory_s, m), bank(memory_t, m), idx, contrast_idx, log_z_s[m], log_z_t[m],
                rng_state, num_negatives, temperature, z_momentum, shared_negatives) for m in range(v_s.shape[0])]
    return tuple(torch.stack(parts) for parts in zip(*outs))


def bank_update_multi_(bank: torch.Tensor, index: torch.Tensor, value: torch.Tensor, momentum: float) -> None:
    """:func:`bank_update_` of M banks stored [N, M, D] (``crd_nce_multi``'s layout) from ``value`` [M, B, D]:
    bank[index[b], m] ← rownorm(momentum·bank[index[b], m] + (1 − momentum)·value[m, b]), one call of the bank
    update on the [N·M, D] view (row n·M + m; a repeated index's last occurrence wins, for each m)."""
    rows, count, dim = bank.shape
    flat = (index.reshape(1, -1) * count + torch.arange(count, device=index.device).reshape(-1, 1)).reshape(-1)
    bank_update_(bank.view(rows * count, dim), flat, value.reshape(-1, dim), momentum)

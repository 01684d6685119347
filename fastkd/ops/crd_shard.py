"""CRD's NCE step against memory banks sharded over the ranks of a distributed run.

Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020.

Rank r of W holds bank rows [lo_r, lo_r + S) (S = ceil(N / W)). The NCE loss is a sum of one
term per (anchor b, column k) entry that depends only on that entry's logit s_bk / T and on Z
(:func:`fastkd.ops.crd.nce_reference`):

    L = −(1/B) [Σ_b log(P_b0 / (P_b0 + c)) + Σ_b Σ_{k≥1} log((K/N) / (P_bk + c))],
    log P = s/T − log Z,  c = K/N + ε   (the terms: :func:`fastkd.ops.crd.nce_terms`),

so it splits over the shards with nothing but log Z to agree on. The exchange, per step:

1. all-gather the global batch's anchors (both sides) and indices, [G, 2D] + [G] (this is also
   the bank synchronisation: each rank updates the rows of its shard from it);
2. every rank computes, for all G anchors, the logits of the entries whose bank row lies in its
   shard (:func:`shard_logits`, in anchor chunks, never a [G, K+1, D] tensor) and their loss
   terms; on the first step (or with a Z moving average) the log-sum-exp of those logits is
   all-gathered ([W, 2] floats) to form the global Z estimate exactly as one process would;
3. the anchors' gradients are formed in the same pass (the banks are updated before backward
   runs) and the backward of step 1 reduce-scatters them to the ranks owning the anchors.

Steps 2-3 are the op ``fastkd::crd_nce_shard`` (:func:`nce_shard_reference`, its one kernel: the collectives
run inside it, so torch.compile keeps it whole), whose autograd formula scales the gradients it returned.

Each rank's returned loss is the part of the global loss on its shard scaled by W (so the
mean over ranks, as DDP averages gradients, is the global loss): the same loss and gradients as
the replicated bank up to float rounding.
"""
from __future__ import annotations

import math

import torch

from fastkd import _dist
from fastkd._precision import accumulation_dtype
from fastkd.ops._library import Autograd, define
from fastkd.ops.crd import nce_terms, updated_log_z, used_log_z

CHUNK_ELEMENTS = 1 << 24  # rows gathered at once: ≤ 16M floats (64 MB) per anchor chunk


def shard_logits(anchor: torch.Tensor, shard: torch.Tensor, local: torch.Tensor, inside: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """s/T of each entry [G, K+1] whose row is in this shard (``inside``); 0 elsewhere."""
    rows_per_anchor = local.shape[1] * shard.shape[1]
    step = max(1, CHUNK_ELEMENTS // max(rows_per_anchor, 1))
    acc, out = accumulation_dtype(anchor), []
    for start in range(0, local.shape[0], step):
        part = local[start:start + step]
        rows = shard.index_select(0, part.reshape(-1)).to(acc).view(*part.shape, -1)
        out.append(torch.bmm(rows, anchor[start:start + step].to(acc).unsqueeze(2)).squeeze(2))
    return torch.cat(out).div_(temperature).masked_fill_(~inside, 0.0)


def shard_anchor_grad(d_logits: torch.Tensor, shard: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Σ_k d_logits[g, k] · row[g, k]: [G, D] (``d_logits`` is 0 outside the shard)."""
    rows_per_anchor = local.shape[1] * shard.shape[1]
    step = max(1, CHUNK_ELEMENTS // max(rows_per_anchor, 1))
    out = []
    for start in range(0, local.shape[0], step):
        part = local[start:start + step]
        rows = shard.index_select(0, part.reshape(-1)).to(d_logits.dtype).view(*part.shape, -1)
        out.append(torch.bmm(d_logits[start:start + step].unsqueeze(1), rows).squeeze(1))
    return torch.cat(out)


def _global_log_estimate(logits: torch.Tensor, inside: torch.Tensor, entries: int, num_data: int) -> torch.Tensor:
    """log(mean(exp(s/T))·N) over the global batch's ``entries`` scores, of which this rank holds the
    ones ``inside``: the ranks' log-sum-exps are all-gathered ([W] floats) and combined in log space."""
    local_lse = logits.masked_fill(~inside, float("-inf")).logsumexp(dim=(0, 1))
    all_lse = _dist.gather_rows(local_lse.reshape(1))
    return all_lse.logsumexp(0) - math.log(entries) + math.log(num_data)


def _side(anchor, shard, local, inside, log_z, temperature, num_data, z_momentum, z_known):
    """One NCE side on this shard: (W·partial loss, new log Z, d(W·partial loss)/d anchor [G, D])."""
    cols = local.shape[1]
    logits = shard_logits(anchor, shard, local, inside, temperature)
    if z_momentum > 0 or not z_known:  # every rank takes the same branch: no host read of Z
        estimate = _global_log_estimate(logits, inside, anchor.shape[0] * cols, num_data)
    else:
        estimate = log_z.to(logits.dtype)
    terms, slopes = nce_terms(logits - used_log_z(log_z, estimate), (cols - 1) / num_data)
    world = _dist.world_size()
    scale = world / anchor.shape[0]  # −(1/B) with B = G / W the per-rank batch
    loss = -terms.masked_fill(~inside, 0.0).sum() * scale
    d_logits = slopes.masked_fill(~inside, 0.0) * (-scale / temperature)
    grad = shard_anchor_grad(d_logits, shard, local)
    return loss, updated_log_z(log_z, estimate, z_momentum), grad


def nce_shard_reference(anchors: torch.Tensor, memory_s: torch.Tensor, memory_t: torch.Tensor, local: torch.Tensor,
                        inside: torch.Tensor, log_z_s: torch.Tensor, log_z_t: torch.Tensor, temperature: float,
                        num_data: int, z_momentum: float, z_known: bool):
    """``fastkd::crd_nce_shard``: (W·partial loss, log Z_s, log Z_t, d(W·partial loss)/d anchors [G, 2D]) for the
    global batch's anchors [v_s | v_t] against this rank's shards (``local``: the rows' shard indices, valid where
    ``inside``)."""
    dim = anchors.shape[1] // 2
    v_s, v_t = anchors[:, :dim], anchors[:, dim:]
    loss_s, z_s_new, grad_s = _side(v_s, memory_t, local, inside, log_z_s, temperature, num_data, z_momentum, z_known)
    loss_t, z_t_new, grad_t = _side(v_t, memory_s, local, inside, log_z_t, temperature, num_data, z_momentum, z_known)
    return loss_s + loss_t, z_s_new, z_t_new, torch.cat([grad_s, grad_t], dim=1).to(anchors.dtype)


def _fake(anchors, memory_s, memory_t, local, inside, log_z_s, log_z_t, temperature, num_data, z_momentum, z_known):
    return (anchors.new_empty((), dtype=accumulation_dtype(anchors)), torch.empty_like(log_z_s),
            torch.empty_like(log_z_t), anchors.new_empty(anchors.shape))


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2], output[3])
    ctx.save_for_backward(output[3])


def _backward(ctx, grad_loss, grad_z_s, grad_z_t, grad_grad):
    """The anchors' gradients were formed in the forward pass: scale them by the upstream gradient."""
    (grad,) = ctx.saved_tensors
    return (grad * grad_loss.to(grad.dtype),) + (None,) * 10


CRD_NCE_SHARD = define("crd_nce_shard(Tensor anchors, Tensor memory_s, Tensor memory_t, Tensor local, Tensor inside, "
                       "Tensor log_z_s, Tensor log_z_t, float temperature, int num_data, float z_momentum, "
                       "bool z_known) -> (Tensor, Tensor, Tensor, Tensor)", nce_shard_reference, _fake,
                       Autograd(_setup_context, _backward))


def nce_sharded(v_s: torch.Tensor, v_t: torch.Tensor, memory_s: torch.Tensor, memory_t: torch.Tensor,
                contrast_idx: torch.Tensor, shard_start: int, shard_rows: int, log_z_s: torch.Tensor,
                log_z_t: torch.Tensor, temperature: float, num_data: int, z_momentum: float = 0.0,
                z_known: bool = False):
    """This rank's part of one sharded CRD step: (W·partial loss, log Z_s, log Z_t).

    ``v_s``, ``v_t`` [G, D] are the global batch's anchors (all-gathered, with autograd),
    ``contrast_idx`` [G, K+1] the global batch's rows, ``memory_*`` this rank's shard, whose
    row i is bank row ``shard_start + i`` for i < ``shard_rows``. ``z_known`` False (the first
    step after construction or a reload) makes every rank form the global estimate, used where
    log Z is still −∞ (not estimated); then Z is never read on the host.
    """
    local = contrast_idx - shard_start
    inside = (local >= 0) & (local < shard_rows)
    local = torch.where(inside, local, torch.zeros_like(local))  # one row, read from cache, masked out
    loss, log_z_s, log_z_t, _ = CRD_NCE_SHARD(torch.cat([v_s, v_t], dim=1), memory_s, memory_t, local, inside,
                                              log_z_s, log_z_t, float(temperature), int(num_data), float(z_momentum),
                                              bool(z_known))
    return loss, log_z_s, log_z_t


def global_log_z_estimate(anchor: torch.Tensor, bank: torch.Tensor, contrast_idx: torch.Tensor, temperature: float,
                          num_data: int) -> torch.Tensor:
    """log Z = log(mean(exp(s/T))·N) over the whole global batch, each rank holding its B anchors and
    a full (replicated) bank: every rank gets the value one process would compute for the global
    batch, in log space (nothing overflows)."""
    inside = torch.ones_like(contrast_idx, dtype=torch.bool)
    logits = shard_logits(anchor.detach(), bank, contrast_idx, inside, temperature)
    return _global_log_estimate(logits, inside, logits.numel() * _dist.world_size(), num_data)

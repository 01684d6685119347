"""Triton backend of CRD's fused ops, for CUDA tensors: ``fastkd::crd_nce_triton`` and ``crd_bank_update_triton``.

:func:`nce` has the semantics of :func:`fastkd.ops.crd.nce_with_grad_reference`; :func:`bank_update_` those
of :func:`fastkd.ops.crd.bank_update_reference`. The kernels are in :mod:`fastkd.kernels.crd`.

Both NCE sides (student anchors v_s against memory_t, teacher anchors v_t against memory_s) run in the same
programs, so each drawn index serves the two banks. With S splits of each anchor's K+1 columns:

1. ``crd_lse_kernel``, grid (B, S): for a side whose Z is unknown (log Z = −∞, read on the device), gather the
   rows and write log-sum-exp partials of s/T; where both Z are known the programs read nothing.
2. ``crd_log_z_kernel`` (one program): log Z per side, the batch estimate
   logsumexp(s/T) − log(B(K+1)) + log N where Z is unknown, else the given log Z.
3. ``crd_nce_kernel``, grid (B, S): gather the rows again (indices regenerated from Philox, never stored),
   NCE terms and the anchor-gradient partials Σ_k (d loss/d s)·row, in fp32; with a Z moving average
   also this batch's log-sum-exp partials.
4. ``crd_grad_reduce_kernel`` (grid B) and ``crd_finish_kernel`` (one program): the gradients in the
   anchors' dtype, the loss, the new log Z.

With shared negatives (and no explicit ``contrast_idx``) steps 1 and 3 are ``crd_shared_lse_kernel`` and
``crd_shared_nce_kernel``, one launch per side over (block of 16 anchors, split), scoring with ``tl.dot``.
Buffers, all fp32: loss partials 2·B·S, log-sum-exp partials 4·B·S, gradient partials B·S·(D_s + D_t);
nothing of size B×(K+1) (let alone B×(K+1)×D) exists. No host sync: Z and the RNG state are read by the
kernels, so a CUDA graph can capture the op.
"""
from __future__ import annotations

import math

import torch
import triton

from fastkd.kernels import crd as kernels
from fastkd.ops import crd as crd_ops
from fastkd.ops._library import TRITON_DTYPES, traceable, variant

_TILE = 4096           # elements of one side's [BLOCK_K, BLOCK_D] row tile
_SHARED_TILE = 2048    # the same with shared negatives, where products against BLOCK_B anchors follow
_PROGRAMS = 4096       # programs the gather kernels aim for (B × splits; both sides in each)
_SHARED_PROGRAMS = 256  # per-side programs of the shared-negatives kernels (anchor blocks × splits)
_REDUCE_BLOCK = 1024
_BLOCK_B = 16           # anchors per program with shared negatives (tl.dot needs >= 16)
_NUM_WARPS = 4
_SHARED_NUM_WARPS = 8  # the fp32 FMA products keep whole rows per thread: more threads, fewer registers each


def _check_nce(v_s, v_t, memory_s, memory_t, idx, contrast_idx, log_z_s, log_z_t, rng_state, num_negatives,
               z_momentum):
    for name, t in (("v_s", v_s), ("v_t", v_t), ("memory_s", memory_s), ("memory_t", memory_t)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"crd_nce: {name} must be a 2-D tensor, got {getattr(t, 'shape', type(t))}")
        if t.dtype not in TRITON_DTYPES + (torch.float64,):
            raise TypeError(f"crd_nce: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    crd_ops.check_batch(v_s)
    if not 0 <= z_momentum <= 1:
        raise ValueError(f"crd_nce: z_momentum must be in [0, 1], got {z_momentum}")
    batch, num_data = v_s.shape[0], memory_s.shape[0]
    if v_t.shape[0] != batch:
        raise ValueError(f"crd_nce: v_t must have {batch} rows like v_s, got {v_t.shape[0]}")
    if memory_t.shape[0] != num_data:
        raise ValueError(f"crd_nce: memory_t must have {num_data} rows like memory_s, got {memory_t.shape[0]}")
    if not 0 < num_data < 2**31:
        raise ValueError(f"crd_nce: the banks must have between 1 and 2**31 - 1 rows, got {num_data}")
    if v_s.shape[1] != memory_t.shape[1] or v_t.shape[1] != memory_s.shape[1]:
        raise ValueError(f"crd_nce: v_s {tuple(v_s.shape)} must match memory_t {tuple(memory_t.shape)} and "
                         f"v_t {tuple(v_t.shape)} memory_s {tuple(memory_s.shape)} in feature size")
    if idx.shape != (batch,) or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"crd_nce: idx must be an int64 tensor of shape ({batch},), got "
                         f"{idx.dtype} {tuple(idx.shape)}")
    if contrast_idx is None:
        if num_negatives < 1:
            raise ValueError(f"crd_nce: num_negatives must be at least 1, got {num_negatives}")
        if rng_state.shape != (2,) or rng_state.dtype != torch.int64:
            raise ValueError(f"crd_nce: rng_state must be an int64 tensor [seed, offset], got "
                             f"{rng_state.dtype} {tuple(rng_state.shape)}")
    elif contrast_idx.dim() != 2 or contrast_idx.shape[0] != batch or contrast_idx.shape[1] < 2 \
            or contrast_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"crd_nce: contrast_idx must be an int64 tensor [{batch}, K+1] with K >= 1, got "
                         f"{contrast_idx.dtype} {tuple(contrast_idx.shape)}")
    for name, z in (("log_z_s", log_z_s), ("log_z_t", log_z_t)):
        if z.numel() != 1:
            raise ValueError(f"crd_nce: {name} must hold one value, got shape {tuple(z.shape)}")
    devices = {t.device for t in (v_s, v_t, memory_s, memory_t, idx, log_z_s, log_z_t, rng_state)}
    if contrast_idx is not None:
        devices.add(contrast_idx.device)
    if len(devices) != 1:
        raise ValueError(f"crd_nce: all tensors must be on one device, got {sorted(map(str, devices))}")


def _blocks(dim: int, block_k: int | None, tile: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_K): D padded to a power of two, BLOCK_K columns so a row tile has ≈ ``tile`` elements."""
    block_d = max(16, triton.next_power_of_2(dim))
    return block_d, block_k or max(16, min(64, tile // block_d))


def _splits(units: int, blocks: int, target: int, splits: int | None) -> tuple[int, int]:
    """(splits, column blocks per split): ``units`` × splits ≈ ``target`` programs, no split left empty."""
    want = splits or max(1, triton.cdiv(target, units))
    per_split = triton.cdiv(blocks, max(1, min(want, blocks)))
    return triton.cdiv(blocks, per_split), per_split


def nce(v_s, v_t, memory_s, memory_t, idx, contrast_idx, log_z_s, log_z_t, rng_state, num_negatives, temperature,
        z_momentum, shared_negatives, *, block_k=None, splits=None):
    """``fastkd::crd_nce`` in Triton: (loss, log Z_s, log Z_t, d loss/d v_s, d loss/d v_t), no host sync.

    ``log_z_s`` / ``log_z_t``: log Z (−∞: estimate it from this batch).

    ``block_k`` (columns per tile) and ``splits`` (programs per anchor, or per anchor block with shared
    negatives) override the launch heuristics; for tests and tuning.
    """
    _check_nce(v_s, v_t, memory_s, memory_t, idx, contrast_idx, log_z_s, log_z_t, rng_state, num_negatives,
               z_momentum)
    if torch.float64 in (v_s.dtype, v_t.dtype, memory_s.dtype, memory_t.dtype):
        # the kernels compute in fp32; float64 keeps the exact reference
        return crd_ops.nce_with_grad_reference(v_s, v_t, memory_s, memory_t, idx, contrast_idx, log_z_s, log_z_t,
                                               rng_state, num_negatives, temperature, z_momentum, shared_negatives)
    device = v_s.device
    idx, rng_state = idx.contiguous(), rng_state.contiguous()  # read as flat arrays (no copy when contiguous)
    batch, num_data = v_s.shape[0], memory_s.shape[0]
    cols = contrast_idx.shape[1] if contrast_idx is not None else num_negatives + 1
    k = cols - 1
    noise = k / num_data
    shared = bool(shared_negatives) and contrast_idx is None
    d_s, d_t = v_s.shape[1], v_t.shape[1]
    if shared:
        block_d, block_k = _blocks(max(d_s, d_t), block_k, _SHARED_TILE)
        block_b = _BLOCK_B
        units = triton.cdiv(batch, block_b)
        n_split, per_split = _splits(units, triton.cdiv(k, block_k), _SHARED_PROGRAMS, splits)
        grid = (units, n_split)
    else:
        block_d, block_k = _blocks(max(d_s, d_t), block_k, _TILE)
        n_split, per_split = _splits(batch, triton.cdiv(cols, block_k), _PROGRAMS, splits)
        grid = (batch, n_split)
    count = batch * n_split
    z_momentum = float(z_momentum)
    moving = 0 < z_momentum < 1  # m = 1 keeps Z as it is

    f32 = dict(dtype=torch.float32, device=device)
    lse = torch.empty(2, count, 2, **f32)
    loss_part = torch.empty(2, count, **f32)
    grad_part = torch.empty(count * (d_s + d_t), **f32)
    log_z = torch.empty(2, **f32)
    loss = torch.empty((), **f32)
    z_s_new, z_t_new = torch.empty_like(log_z_s), torch.empty_like(log_z_t)
    grad_s, grad_t = torch.empty_like(v_s), torch.empty_like(v_t)

    part_s, part_t = grad_part[:count * d_s], grad_part[count * d_s:]
    inv_t = 1.0 / temperature
    log_scale = math.log(num_data) - math.log(batch * cols)
    nce_args = (inv_t, math.log(noise + crd_ops.NCE_EPS), math.log1p(crd_ops.NCE_EPS / noise),
                -1.0 / (batch * temperature), per_split)
    log_m, log_1m = (math.log(z_momentum), math.log1p(-z_momentum)) if moving else (0.0, 0.0)
    if shared:
        sides = ((v_s, memory_t, log_z_s, part_s, d_s), (v_t, memory_s, log_z_t, part_t, d_t))
        blocks = dict(BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=_SHARED_NUM_WARPS)
        for side, (anchor, bank, z, _, dim) in enumerate(sides):
            traceable(kernels.crd_shared_lse_kernel)[grid](
                anchor, bank, idx, rng_state, z, lse[side], *anchor.stride(), *bank.stride(),
                batch, k, num_data, dim, inv_t, per_split, **blocks)
        traceable(kernels.crd_log_z_kernel)[(1,)](log_z_s, log_z_t, lse, log_z, count, log_scale, BLOCK=_REDUCE_BLOCK)
        for side, (anchor, bank, z, part, dim) in enumerate(sides):
            traceable(kernels.crd_shared_nce_kernel)[grid](
                anchor, bank, idx, rng_state, z, log_z[side:], loss_part[side], part, lse[side],
                *anchor.stride(), *bank.stride(), batch, k, num_data, dim, *nce_args, ESTIMATE=moving, **blocks)
        loss_count = 2 * count
    else:
        has_cidx = contrast_idx is not None
        # with explicit contrast_idx the RNG state is never read, without it contrast_idx is not
        rng, cidx = (idx, contrast_idx) if has_cidx else (rng_state, idx)
        common = (v_s, v_t, memory_s, memory_t, idx, cidx, rng, log_z_s, log_z_t)
        strides = (*v_s.stride(), *v_t.stride(), *memory_s.stride(), *memory_t.stride(),
                   *(contrast_idx.stride() if has_cidx else (0, 0)), cols, k, num_data, d_s, d_t)
        blocks = dict(HAS_CIDX=has_cidx, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=_NUM_WARPS)
        traceable(kernels.crd_lse_kernel)[grid](*common, lse, *strides, inv_t, per_split, **blocks)
        traceable(kernels.crd_log_z_kernel)[(1,)](log_z_s, log_z_t, lse, log_z, count, log_scale, BLOCK=_REDUCE_BLOCK)
        traceable(kernels.crd_nce_kernel)[grid](*common, log_z, loss_part, part_s, part_t, lse, *strides, *nce_args,
                                     ESTIMATE=moving, **blocks)
        loss_count = count
    traceable(kernels.crd_grad_reduce_kernel)[(batch,)](
        part_s, part_t, grad_s, grad_t, n_split, d_s, d_t, *grad_s.stride(), *grad_t.stride(),
        BLOCK_S=16, BLOCK_D=block_d)
    traceable(kernels.crd_finish_kernel)[(1,)](
        log_z_s, log_z_t, lse, loss_part, loss, z_s_new, z_t_new, count, loss_count, log_scale, log_m, log_1m,
        -1.0 / batch, BLOCK=_REDUCE_BLOCK, MOVING=moving)
    return loss, z_s_new, z_t_new, grad_s, grad_t


def bank_update_(bank: torch.Tensor, index: torch.Tensor, value: torch.Tensor, momentum: float) -> None:
    """``fastkd::crd_bank_update_`` in Triton: bank[y] ← rownorm(m·bank[y] + (1 − m)·value), in place.

    One program per batch row; a row repeated in ``index`` is written once, by its last occurrence, from
    the bank before the call.
    """
    if bank.dim() != 2 or value.dim() != 2 or index.dim() != 1 or value.shape != (index.shape[0], bank.shape[1]):
        raise ValueError(f"crd_bank_update: expected bank [N, D], index [B], value [B, D]; got "
                         f"{tuple(bank.shape)}, {tuple(index.shape)}, {tuple(value.shape)}")
    if bank.dtype == torch.float64:
        crd_ops.bank_update_reference(bank, index, value, momentum)
        return
    if bank.dtype not in TRITON_DTYPES:
        raise TypeError(f"crd_bank_update: bank must be float32, float16 or bfloat16, got {bank.dtype}")
    if index.shape[0] == 0:
        return
    traceable(kernels.crd_bank_update_kernel)[(index.shape[0],)](
        bank, index.contiguous(), value, index.shape[0], bank.shape[0], bank.shape[1], *bank.stride(), *value.stride(),
        float(momentum), 1.0 - float(momentum),
        BLOCK_B=256, BLOCK_D=max(16, triton.next_power_of_2(bank.shape[1])), num_warps=_NUM_WARPS)


NCE = variant(crd_ops.CRD_NCE, "triton", "cuda", nce)
BANK_UPDATE = variant(crd_ops.CRD_BANK_UPDATE, "triton", "cuda", bank_update_)

"""Contrastive distillation with memory banks: :class:`CRDLoss`."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fastkd import _checks, _dist
from fastkd._precision import accumulation_dtype
from fastkd.functional.contrastive import l2_normalize
from fastkd.losses._registry import register, widths
from fastkd.ops import crd as _crd
from fastkd.ops import crd_shard, philox

__all__ = ["CRDLoss", "EnsembleCRDLoss"]


def _checked_options(s_dim, t_dim, num_data, feat_dim, num_negatives, temperature, momentum, z_momentum,
                     bank_dtype) -> tuple[float, float, float]:
    """CRD's constructor options checked (``ValueError`` / ``TypeError`` naming the option); returns
    (temperature, momentum, z_momentum) as floats."""
    for name, value in (("s_dim", s_dim), ("t_dim", t_dim), ("num_data", num_data), ("feat_dim", feat_dim),
                        ("num_negatives", num_negatives)):
        _checks.integer(name, value, 1)
    temperature = _checks.number("temperature", temperature, positive=True)
    if 1.0 / temperature > torch.finfo(torch.float32).max:
        raise ValueError(f"temperature must be at least {1 / torch.finfo(torch.float32).max:.1e} (s/T must be "
                         f"finite in fp32), got {temperature}")
    momentum = _checks.number("momentum", momentum, nonnegative=True)
    z_momentum = _checks.number("z_momentum", z_momentum, nonnegative=True)
    if num_data >= 2**31:
        raise ValueError(f"num_data must be below 2**31 (the samplers' index range), got {num_data}")
    if momentum > 1:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    if z_momentum >= 1:
        raise ValueError(f"z_momentum must be in [0, 1), got {z_momentum!r}")
    if bank_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"bank_dtype must be torch.float32, float16, bfloat16 or float64, got {bank_dtype}")
    return temperature, momentum, z_momentum


class _KeepsLogZ(nn.Module):
    """A module whose log Z buffers (:data:`_LOG_Z`) are never cast below fp32."""

    def _apply(self, fn, recurse=True):
        """As ``nn.Module._apply`` (``.to``, ``.half()``, ``.cuda()``, ...), except that log Z is never
        cast below fp32: a cast to fp16 / bf16 moves it (device) and keeps it in fp32, unrounded."""
        before = {name: self._buffers[name] for name in _LOG_Z}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype not in (torch.float32, torch.float64):
                self._buffers[name] = new.float() if old.is_meta else old.to(device=new.device, dtype=torch.float32)
        return self



def _check_log_z(state_dict: dict, prefix: str) -> None:
    """Refuse a checkpoint's log Z that is NaN or +inf (−inf is "not estimated yet")."""
    for name in _LOG_Z:
        key = prefix + name
        log_z = state_dict.get(key)
        if log_z is not None and _checks.has_values(log_z) and bool((log_z.isnan() | (log_z == math.inf)).any()):
            raise ValueError(f"{key} in the checkpoint is {log_z.tolist()}; log Z must be finite "
                             "(or -inf: not estimated yet)")


def _with_banks(cls, probe, **options) -> nn.Module:
    """CRD: embeds of the pooled features' widths, banks of the training set's size."""
    return widths()(cls, probe, num_data=probe["num_data"], **options)


def _with_banks_per_teacher(probes, **options) -> nn.Module:
    """CRD from M teachers (an ensemble run): one :class:`EnsembleCRDLoss` with each teacher's pooled width."""
    return EnsembleCRDLoss(s_dim=probes[0].width("pooled_s"), t_dims=[p.width("pooled_t") for p in probes],
                           num_data=probes[0]["num_data"], **options)


@register("crd", takes=("pooled_s", "pooled_t", "index", "contrast_idx"), build=_with_banks,
          derived=("s_dim", "t_dim", "num_data"), ensemble=_with_banks_per_teacher)
class CRDLoss(_KeepsLogZ):
    """Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020), as RepDistiller.

    Both features are embedded, v = rownorm(Linear(f)) (``embed_s``, ``embed_t``, trained with the
    student). Two memory banks of the whole dataset, ``memory_s`` and ``memory_t`` ([N, D],
    initialised uniform in ±1/sqrt(D/3)), hold past embeddings. Each sample b is scored against
    K+1 bank rows ``contrast_idx[b]`` (its positive in column 0, K negatives):
    x_s = exp(⟨memory_t[c], v_s⟩/T) and x_t = exp(⟨memory_s[c], v_t⟩/T), divided by Z (mean(x)·N
    on the first batch, then fixed), and the loss is the sum of the two NCE terms with noise
    probability 1/N (see :func:`fastkd.functional.crd_loss`). After the scores, the batch's rows
    are updated: memory[idx] ← rownorm(m·memory[idx] + (1−m)·v), so backward sees the banks as
    they were before the step.

    Z is kept as log Z, in the buffers ``log_z_s`` and ``log_z_t`` (−∞ until the first step
    estimates it): Z grows like e^(1/T) as scores approach 1 (past fp16 at T = 0.07 for N = 50,000,
    past fp32 below T ≈ 0.011, past fp64 below T ≈ 0.0014), log Z does not, and the loss is computed
    from log P = s/T − log Z, so it stays finite for any T and equals the published exp(s/T)/Z form
    wherever that is finite. The buffers stay in fp32 whatever dtype the module is cast to
    (``.half()``, ``.to(torch.bfloat16)``; fp64 for a float64 module): a half-precision log Z would
    round Z (by up to 0.4% in fp16 at log Z ≈ 14, by far more at small T). ``z_s`` / ``z_t`` read
    Z itself (float64, −1 before the first step). A checkpoint saved with the former buffers
    ``z_s`` / ``z_t`` (Z itself) loads: Z becomes log Z; a Z that overflowed (inf / NaN) is refused.

    Refused with ``ValueError`` before any bank row, Z or the RNG state changes: an empty batch
    (B = 0), features whose width (flattened per sample) is not ``s_dim`` / ``t_dim``, indices
    outside [0, N), NaN / Inf features (the last two while value checks are on).

    ``forward(f_s, f_t, idx, contrast_idx=None)``: ``idx`` [B] int64 holds the samples' dataset
    indices; when ``contrast_idx`` is ``None`` the loss draws K negatives per sample uniformly
    over [0, N) with replacement (RepDistiller's loss and ImageNet loader) from a counter-based
    generator (Philox, :mod:`fastkd.ops.philox`) whose seed and offset are the buffer
    ``rng_state``, so a reloaded loss draws the same negatives. Indices outside [0, N) raise
    ``ValueError`` before any bank row is written.

    Beyond the published code: ``bank_dtype`` stores the banks in bf16 / fp16 (half the bytes;
    the math stays fp32), ``z_momentum`` > 0 lets Z follow each batch's estimate as a moving
    average, and ``shared_negatives`` draws one set of K rows per batch for all anchors.
    On the ``native`` and ``triton`` backends the step runs as the fused op ``fastkd::crd_nce``
    (no [B, K+1, D] tensor, gradients taken in the same pass); on ``torch`` it is the published
    computation.

    Under ``torch.distributed`` (more than one rank, each with the same per-rank batch B; the
    samples of rank r are rows [r·B, (r+1)·B) of the global batch of G = W·B) the loss keeps the
    banks identical on every rank by itself: after the scores it all-gathers the global batch's
    indices and embeddings (one [G, 2D + 2] fp32 tensor, the int64 indices viewed as two fp32
    words: each rank receives (W−1)/W · 2·G·(D+1)·4 bytes) and every rank applies the same
    update, in rank order, as one process would for the global batch. The first step's Z is the
    global batch's estimate (the ranks' log-sum-exps of their scores all-gathered, [W] floats),
    a Z moving average is averaged over the ranks (2 floats), and rank r draws the Philox
    negatives of global anchors r·B … r·B+B−1 (handed to the fused op as an explicit
    ``contrast_idx`` [B, K+1]), so the loss, its gradients and the banks are those of one
    process on the global batch.

    ``shard_banks=True`` (with more than one rank at construction) keeps only rows
    [r·S, r·S + S) of each bank on rank r (S = ceil(N / W); the rows hold the values the full
    bank would have), for datasets whose banks do not fit one device: the step then runs
    :func:`fastkd.ops.crd_shard.nce_sharded` (same loss and gradients as the replicated bank up
    to rounding; its docstring describes the exchange) and each rank's ``state_dict`` holds its
    shard and one spare row (the engine writes one shard file per rank:
    :func:`fastkd.train.distributed.save`). Each rank's loss value is then its shard's part of the
    global loss ×W: the mean over ranks is the global loss.
    """

    def __init__(self, s_dim: int, t_dim: int, num_data: int, feat_dim: int = 128, num_negatives: int = 16384,
                 temperature: float = 0.07, momentum: float = 0.5, seed: int | None = None,
                 bank_dtype: torch.dtype = torch.float32, z_momentum: float = 0.0, shared_negatives: bool = False,
                 shard_banks: bool = False):
        super().__init__()
        temperature, momentum, z_momentum = _checked_options(s_dim, t_dim, num_data, feat_dim, num_negatives,
                                                             temperature, momentum, z_momentum, bank_dtype)
        self.num_data, self.feat_dim, self.num_negatives = num_data, feat_dim, num_negatives
        self.temperature, self.momentum, self.z_momentum = temperature, momentum, z_momentum
        self.shared_negatives = bool(shared_negatives)
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        bound = 1.0 / math.sqrt(feat_dim / 3)
        world = _dist.world_size()
        self.sharded = bool(shard_banks) and world > 1
        if self.sharded:
            rows = -(-num_data // world)
            self.shard_start = min(_dist.rank() * rows, num_data)
            self.shard_rows = min(rows, num_data - self.shard_start)
            for name in ("memory_s", "memory_t"):
                self.register_buffer(name, _bank_rows(num_data, feat_dim, bound, self.shard_start, rows)
                                     .to(bank_dtype))
        else:
            self.shard_start, self.shard_rows = 0, num_data
            self.register_buffer("memory_s", torch.rand(num_data, feat_dim).mul_(2 * bound).add_(-bound).to(bank_dtype))
            self.register_buffer("memory_t", torch.rand(num_data, feat_dim).mul_(2 * bound).add_(-bound).to(bank_dtype))
        self._z_known = False  # False until a step (after construction or a reload) has formed Z
        self.register_buffer("log_z_s", torch.tensor(_crd.NOT_ESTIMATED))
        self.register_buffer("log_z_t", torch.tensor(_crd.NOT_ESTIMATED))
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        self.register_buffer("rng_state", torch.tensor([int(seed), 0], dtype=torch.int64))

    def extra_repr(self) -> str:
        return (f"num_data={self.num_data}, feat_dim={self.feat_dim}, num_negatives={self.num_negatives}, "
                f"temperature={self.temperature}, momentum={self.momentum}, bank_dtype={self.memory_s.dtype}, "
                f"z_momentum={self.z_momentum}, shared_negatives={self.shared_negatives}"
                + (f", shard=[{self.shard_start}, {self.shard_start + self.shard_rows})" if self.sharded else ""))

    @property
    def z_s(self) -> torch.Tensor:
        """Z of the student-anchored scores, exp(``log_z_s``) in float64; −1 before it is estimated."""
        return _z_of(self.log_z_s)

    @property
    def z_t(self) -> torch.Tensor:
        """Z of the teacher-anchored scores, exp(``log_z_t``) in float64; −1 before it is estimated."""
        return _z_of(self.log_z_t)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for side in ("s", "t"):
            key, old_key = f"{prefix}log_z_{side}", f"{prefix}z_{side}"
            if old_key in state_dict and key not in state_dict:  # a checkpoint from before log Z: Z itself
                z = state_dict.pop(old_key).double()
                if _checks.has_values(z) and not bool(torch.isfinite(z).all()):
                    raise ValueError(f"{old_key} in the checkpoint is {z.item()} (a Z that overflowed its dtype); "
                                     f"set it to -1 to estimate Z again on the next step")
                state_dict[key] = _crd.log_z_of(z)
        _check_log_z(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._z_known = False

    def sample_contrast_idx(self, idx: torch.Tensor) -> torch.Tensor:
        """The [B, K+1] indices the next step would draw (``idx`` in column 0); draws nothing."""
        return philox.contrast_indices(idx, self.rng_state, self.num_negatives, self.num_data, self.shared_negatives)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, idx: torch.Tensor,
                contrast_idx: torch.Tensor | None = None) -> torch.Tensor:
        _checks.tensor("f_s", f_s, min_ndim=2)
        _checks.tensor("f_t", f_t, min_ndim=2)
        _checks.pair("f_s", f_s, "f_t", f_t, same_shape=False)
        _checks.module_device("f_s", f_s, self.embed_s)
        _checks.width("f_s", f_s, self.embed_s.in_features, "s_dim")
        _checks.width("f_t", f_t, self.embed_t.in_features, "t_dim")
        batch = f_s.shape[0]
        _checks.index("idx", idx, self.num_data, shape=(batch,), device=f_s.device)
        if contrast_idx is not None:
            _checks.index("contrast_idx", contrast_idx, self.num_data, shape=(batch, self.num_negatives + 1),
                          device=f_s.device)
        v_s = l2_normalize(self.embed_s(f_s.flatten(1)))
        v_t = l2_normalize(self.embed_t(f_t.flatten(1)))
        # a zero feature row gives a NaN embedding: refuse it before it reaches a bank
        _checks.finite("f_s (embedded)", v_s)
        _checks.finite("f_t (embedded)", v_t)
        if _dist.active():
            return self._forward_distributed(v_s, v_t, idx, contrast_idx)
        loss, log_z_s, log_z_t = _crd.nce(v_s, v_t, self.memory_s, self.memory_t, idx, contrast_idx, self.log_z_s,
                                          self.log_z_t, self.rng_state, self.num_negatives, self.temperature,
                                          self.z_momentum, self.shared_negatives)
        with torch.no_grad():
            self.log_z_s.copy_(log_z_s)
            self.log_z_t.copy_(log_z_t)
            if contrast_idx is None:
                self.rng_state[1] += 1  # on the device: the next step draws new negatives
            _crd.bank_update_(self.memory_s, idx, v_s, self.momentum)
            _crd.bank_update_(self.memory_t, idx, v_t, self.momentum)
        return loss

    def _forward_distributed(self, v_s, v_t, idx, contrast_idx):
        """One step with W > 1 ranks; see the class doc."""
        sampled, batch, dim = contrast_idx is None, idx.shape[0], self.feat_dim
        # one all-gather carries the global batch's embeddings and (bit for bit) indices
        dtype = accumulation_dtype(v_s)
        packed = torch.cat([v_s.to(dtype), v_t.to(dtype), idx.reshape(batch, 1).view(dtype)], dim=1)
        if self.sharded:
            gathered = _dist.all_gather_rows(packed)  # with autograd: the anchors' gradients come back
            all_idx = gathered[:, 2 * dim:].detach().contiguous().view(torch.int64).reshape(-1)
            all_cidx = philox.contrast_indices(all_idx, self.rng_state, self.num_negatives, self.num_data,
                                               self.shared_negatives) if sampled else _dist.gather_rows(contrast_idx)
            loss, log_z_s, log_z_t = crd_shard.nce_sharded(
                gathered[:, :dim], gathered[:, dim:2 * dim], self.memory_s, self.memory_t, all_cidx,
                self.shard_start, self.shard_rows, self.log_z_s, self.log_z_t, self.temperature, self.num_data,
                self.z_momentum, self._z_known)
        else:
            if sampled and not self.shared_negatives:  # this rank's rows of the global batch's draw
                contrast_idx = philox.contrast_indices(idx, self.rng_state, self.num_negatives, self.num_data,
                                                       first_anchor=_dist.rank() * batch)
            if not self._z_known:  # the first step after construction or a reload: Z of the global batch
                cidx = contrast_idx if contrast_idx is not None else self.sample_contrast_idx(idx)
                with torch.no_grad():
                    for log_z, anchor, bank in ((self.log_z_s, v_s, self.memory_t),
                                                (self.log_z_t, v_t, self.memory_s)):
                        estimate = crd_shard.global_log_z_estimate(anchor, bank, cidx, self.temperature,
                                                                   self.num_data)
                        log_z.copy_(_crd.used_log_z(log_z, estimate))
            loss, log_z_s, log_z_t = _crd.nce(v_s, v_t, self.memory_s, self.memory_t, idx, contrast_idx,
                                              self.log_z_s, self.log_z_t, self.rng_state, self.num_negatives,
                                              self.temperature, self.z_momentum, self.shared_negatives)
            if self.z_momentum > 0:  # mean over ranks of m·Z + (1 − m)·local estimate = the global update
                with torch.no_grad():  # log of the mean of the ranks' Z: a log-sum-exp of the [W, 2] log Z's
                    ranks = _dist.gather_rows(torch.stack([log_z_s, log_z_t]).float().reshape(1, 2))
                    mean = ranks.logsumexp(0) - math.log(ranks.shape[0])
                log_z_s, log_z_t = mean.to(log_z_s.dtype).unbind(0)
            with torch.no_grad():
                gathered = _dist.gather_rows(packed.detach())
                all_idx = gathered[:, 2 * dim:].contiguous().view(torch.int64).reshape(-1)
        self._z_known = True
        with torch.no_grad():
            self.log_z_s.copy_(log_z_s)
            self.log_z_t.copy_(log_z_t)
            if sampled:
                self.rng_state[1] += 1
            local = all_idx - self.shard_start
            if self.sharded:  # rows of other shards go to the spare last row, never read as a bank row
                local = torch.where((local >= 0) & (local < self.shard_rows), local,
                                    torch.full_like(local, self.memory_s.shape[0] - 1))
            values = gathered[:, :2 * dim].detach()
            _crd.bank_update_(self.memory_s, local, values[:, :dim], self.momentum)
            _crd.bank_update_(self.memory_t, local, values[:, dim:], self.momentum)
        return loss


class EnsembleCRDLoss(_KeepsLogZ):
    """CRD from an ensemble of M teachers: Σ_m L_crd(T_m; S), each teacher's loss that of :class:`CRDLoss`.

    What the paper does: the CRD paper (Tian, Krishnan & Isola, ICLR 2020, "distilling an ensemble") trains
    one student from several teachers and reports it against KD from the ensemble; its text gives no formula
    and RepDistiller ships no ensemble code; its first author's answer to how (RepDistiller issue #17) is to sum
    L_crd(T_i; S) over the teachers. What fastkd does: exactly that sum, with every term a full CRD loss of its
    own — teacher m has its embeds ``embed_s[m]`` (of the student's feature) and ``embed_t[m]`` (of its own),
    its banks ``memory_s[:, m]`` / ``memory_t[:, m]`` ([N, M, D] buffers: a sample's M rows side by side), its log Z's ``log_z_s[m]`` / ``log_z_t[m]``
    ([M] buffers, fp32 at least) — so with M = 1 this *is* :class:`CRDLoss` (same parameters, same draws, same
    value), and M identical teachers give M times the single-teacher loss. One choice is fastkd's: all M terms
    score the same K+1 bank rows per sample (one Philox draw of ``rng_state`` per step, or the loader's
    ``contrast_idx``), which is what lets one fused op, ``fastkd::crd_nce_multi`` (:func:`fastkd.ops.crd.nce_multi`),
    serve all M pairs instead of M launches (on the gather path it reads each anchor's rows of all 2M banks in one
    pass).
    Each term on its own is distributed exactly as in a single-teacher run.

    ``forward(f_s, f_t, idx, contrast_idx=None)``: ``f_s`` [B, s_dim] the student's feature, ``f_t`` a sequence
    of the M teachers' features ([B, t_dims[m]]); returns the sum. ``last_terms`` holds the M terms of the last
    step (detached), for logging. The options are :class:`CRDLoss`'s; the banks are not sharded
    (``shard_banks=True`` is refused). Under ``torch.distributed`` every rank keeps the whole banks and the
    step is :class:`CRDLoss`'s replicated-bank step for each pair (the global batch's Z, this rank's rows of
    the global draw, one all-gather of the M pairs' embeddings and the indices, the same update on every
    rank): the losses, gradients and banks of one process on the global batch.
    """

    def __init__(self, s_dim: int, t_dims: Sequence[int], num_data: int, feat_dim: int = 128,
                 num_negatives: int = 16384, temperature: float = 0.07, momentum: float = 0.5,
                 seed: int | None = None, bank_dtype: torch.dtype = torch.float32, z_momentum: float = 0.0,
                 shared_negatives: bool = False, shard_banks: bool = False):
        super().__init__()
        if isinstance(t_dims, (str, bytes)) or not isinstance(t_dims, Sequence) or not t_dims:
            raise ValueError(f"t_dims must list each teacher's feature width (at least one), got {t_dims!r}")
        for i, t_dim in enumerate(t_dims):
            _checks.integer(f"t_dims[{i}]", t_dim, 1)
        temperature, momentum, z_momentum = _checked_options(s_dim, t_dims[0], num_data, feat_dim, num_negatives,
                                                             temperature, momentum, z_momentum, bank_dtype)
        if shard_banks:
            raise ValueError("shard_banks=True: the banks of an ensemble's CRD are not sharded yet; leave it false")
        count = len(t_dims)
        self.num_data, self.feat_dim, self.num_negatives = num_data, feat_dim, num_negatives
        self.temperature, self.momentum, self.z_momentum = temperature, momentum, z_momentum
        self.shared_negatives = bool(shared_negatives)
        # drawn in CRDLoss's order (student embed, teacher embed, then the banks): M = 1 starts as CRDLoss does
        embeds = [(nn.Linear(s_dim, feat_dim), nn.Linear(int(t_dim), feat_dim)) for t_dim in t_dims]
        self.embed_s = nn.ModuleList(pair[0] for pair in embeds)
        self.embed_t = nn.ModuleList(pair[1] for pair in embeds)
        bound = 1.0 / math.sqrt(feat_dim / 3)
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, torch.rand(num_data, count, feat_dim).mul_(2 * bound).add_(-bound)
                                 .to(bank_dtype))
        for name in _LOG_Z:
            self.register_buffer(name, torch.full((count,), _crd.NOT_ESTIMATED))
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        self.register_buffer("rng_state", torch.tensor([int(seed), 0], dtype=torch.int64))
        self.last_terms: torch.Tensor | None = None
        self._z_known = False  # under torch.distributed: False until a step (after construction or a reload) forms Z

    @property
    def num_teachers(self) -> int:
        return len(self.embed_t)

    def extra_repr(self) -> str:
        return (f"teachers={self.num_teachers}, num_data={self.num_data}, feat_dim={self.feat_dim}, "
                f"num_negatives={self.num_negatives}, temperature={self.temperature}, momentum={self.momentum}, "
                f"bank_dtype={self.memory_s.dtype}, z_momentum={self.z_momentum}, "
                f"shared_negatives={self.shared_negatives}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _check_log_z(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._z_known = False

    def forward(self, f_s: torch.Tensor, f_t: Sequence[torch.Tensor], idx: torch.Tensor,
                contrast_idx: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(f_t, torch.Tensor) or len(f_t) != self.num_teachers:
            got = "one tensor" if isinstance(f_t, torch.Tensor) else f"{len(f_t)} features"
            raise ValueError(f"f_t must hold the {self.num_teachers} teachers' features (a list), got {got}")
        _checks.tensor("f_s", f_s, min_ndim=2)
        _checks.module_device("f_s", f_s, self.embed_s[0])
        _checks.width("f_s", f_s, self.embed_s[0].in_features, "s_dim")
        for m, feature in enumerate(f_t):
            _checks.tensor(f"f_t[{m}]", feature, min_ndim=2)
            _checks.pair("f_s", f_s, f"f_t[{m}]", feature, same_shape=False)
            _checks.width(f"f_t[{m}]", feature, self.embed_t[m].in_features, f"t_dims[{m}]")
        batch = f_s.shape[0]
        _checks.index("idx", idx, self.num_data, shape=(batch,), device=f_s.device)
        if contrast_idx is not None:
            _checks.index("contrast_idx", contrast_idx, self.num_data, shape=(batch, self.num_negatives + 1),
                          device=f_s.device)
        flat = f_s.flatten(1)
        v_s = torch.stack([l2_normalize(embed(flat)) for embed in self.embed_s])
        v_t = torch.stack([l2_normalize(embed(feature.flatten(1))) for embed, feature in zip(self.embed_t, f_t)])
        _checks.finite("f_s (embedded)", v_s)
        _checks.finite("f_t (embedded)", v_t)
        if _dist.active():  # the global batch's rows update the banks
            terms, log_z_s, log_z_t, rows, new_s, new_t = self._forward_distributed(v_s, v_t, idx, contrast_idx)
        else:
            terms, log_z_s, log_z_t = _crd.nce_multi(v_s, v_t, self.memory_s, self.memory_t, idx, contrast_idx,
                                                     self.log_z_s, self.log_z_t, self.rng_state, self.num_negatives,
                                                     self.temperature, self.z_momentum, self.shared_negatives)
            rows, new_s, new_t = idx, v_s, v_t
        with torch.no_grad():
            self.log_z_s.copy_(log_z_s)
            self.log_z_t.copy_(log_z_t)
            if contrast_idx is None:
                self.rng_state[1] += 1  # on the device: the next step draws new negatives
            _crd.bank_update_multi_(self.memory_s, rows, new_s, self.momentum)
            _crd.bank_update_multi_(self.memory_t, rows, new_t, self.momentum)
        self.last_terms = terms.detach()
        return terms.sum()

    def _forward_distributed(self, v_s, v_t, idx, contrast_idx):
        """One step with W > 1 ranks, as :class:`CRDLoss`'s replicated-bank step does it for each teacher: the
        global batch's Z on the first step, rank r's rows of the global draw, the Z moving average averaged
        over the ranks, and every rank applying the global batch's bank update (one all-gather of
        [B, 2·M·D + 2] fp32 per step: the M pairs' embeddings and the indices). Returns (loss terms [M],
        log Z_s, log Z_t, the global batch's indices and its [M, G, D] student and teacher embeddings)."""
        sampled, batch, count, dim = contrast_idx is None, idx.shape[0], self.num_teachers, self.feat_dim
        dtype = accumulation_dtype(v_s)
        packed = torch.cat([v_s.to(dtype).transpose(0, 1).reshape(batch, count * dim),
                            v_t.to(dtype).transpose(0, 1).reshape(batch, count * dim),
                            idx.reshape(batch, 1).view(dtype)], dim=1)
        if sampled and not self.shared_negatives:  # this rank's rows of the global batch's draw
            contrast_idx = philox.contrast_indices(idx, self.rng_state, self.num_negatives, self.num_data,
                                                   first_anchor=_dist.rank() * batch)
        if not self._z_known:  # the first step after construction or a reload: Z of the global batch, per pair
            cidx = contrast_idx if contrast_idx is not None else philox.contrast_indices(
                idx, self.rng_state, self.num_negatives, self.num_data, self.shared_negatives)
            with torch.no_grad():
                for m in range(count):
                    for log_z, anchor, bank in ((self.log_z_s[m], v_s[m], self.memory_t[:, m]),
                                                (self.log_z_t[m], v_t[m], self.memory_s[:, m])):
                        estimate = crd_shard.global_log_z_estimate(anchor, bank, cidx, self.temperature,
                                                                   self.num_data)
                        log_z.copy_(_crd.used_log_z(log_z, estimate))
        terms, log_z_s, log_z_t = _crd.nce_multi(v_s, v_t, self.memory_s, self.memory_t, idx, contrast_idx,
                                                 self.log_z_s, self.log_z_t, self.rng_state, self.num_negatives,
                                                 self.temperature, self.z_momentum, self.shared_negatives)
        with torch.no_grad():
            if self.z_momentum > 0:  # log of the mean over ranks of each pair's Z
                ranks = _dist.gather_rows(torch.cat([log_z_s, log_z_t]).float().reshape(1, 2 * count))
                mean = ranks.logsumexp(0) - math.log(ranks.shape[0])
                log_z_s, log_z_t = mean[:count].to(log_z_s.dtype), mean[count:].to(log_z_t.dtype)
            gathered = _dist.gather_rows(packed.detach())
        self._z_known = True
        everyone = gathered.shape[0]
        all_idx = gathered[:, 2 * count * dim:].contiguous().view(torch.int64).reshape(-1)
        values_s = gathered[:, :count * dim].reshape(everyone, count, dim).transpose(0, 1)
        values_t = gathered[:, count * dim:2 * count * dim].reshape(everyone, count, dim).transpose(0, 1)
        return terms, log_z_s, log_z_t, all_idx, values_s, values_t


_LOG_Z = ("log_z_s", "log_z_t")


def _z_of(log_z: torch.Tensor) -> torch.Tensor:
    """Z = exp(log Z) in float64 (inf where Z exceeds float64), −1 where Z is not estimated yet."""
    return torch.where(_crd.z_known(log_z), log_z.double().exp(), -1.0)


def _bank_rows(num_data: int, feat_dim: int, bound: float, start: int, rows: int) -> torch.Tensor:
    """Rows [start, start + rows) of the bank ``torch.rand(num_data, feat_dim)`` would initialise
    (drawn in chunks from the global generator, which advances as for the full bank), plus one
    spare row at the end; rows past ``num_data`` stay zero."""
    out = torch.zeros(rows + 1, feat_dim)
    chunk = max(1, (1 << 22) // feat_dim)
    for first in range(0, num_data, chunk):
        block = torch.rand(min(chunk, num_data - first), feat_dim)
        lo, hi = max(first, start), min(first + block.shape[0], start + rows)
        if lo < hi:
            out[lo - start:hi - start] = block[lo - first:hi - first]
    return out.mul_(2 * bound).add_(-bound)

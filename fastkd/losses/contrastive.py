"""Contrastive distillation with memory banks: :class:`CRDLoss`."""
from __future__ import annotations

import math

import torch
from torch import nn

from fastkd import _checks
from fastkd.functional.contrastive import l2_normalize
from fastkd.ops import crd as _crd
from fastkd.ops import philox

__all__ = ["CRDLoss"]

class CRDLoss(nn.Module):
    """Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020), as RepDistiller.

    Both features are embedded, v = rownorm(Linear(f)) (``embed_s``, ``embed_t``, trained with the
    student). Two memory banks of the whole dataset, ``memory_s`` and ``memory_t`` ([N, D],
    initialised uniform in ±1/sqrt(D/3)), hold past embeddings. Each sample b is scored against
    K+1 bank rows ``contrast_idx[b]`` (its positive in column 0, K negatives):
    x_s = exp(⟨memory_t[c], v_s⟩/T) and x_t = exp(⟨memory_s[c], v_t⟩/T), divided by Z (``z_s``,
    ``z_t``: mean(x)·N on the first batch, then fixed), and the loss is the sum of the two NCE
    terms with noise probability 1/N (see :func:`fastkd.functional.crd_loss`). After the scores,
    the batch's rows are updated: memory[idx] ← rownorm(m·memory[idx] + (1−m)·v), so backward
    sees the banks as they were before the step.

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
    """

    def __init__(self, s_dim: int, t_dim: int, num_data: int, feat_dim: int = 128, num_negatives: int = 16384,
                 temperature: float = 0.07, momentum: float = 0.5, seed: int | None = None,
                 bank_dtype: torch.dtype = torch.float32, z_momentum: float = 0.0, shared_negatives: bool = False):
        super().__init__()
        for name, value in (("s_dim", s_dim), ("t_dim", t_dim), ("num_data", num_data), ("feat_dim", feat_dim),
                            ("num_negatives", num_negatives)):
            _checks.integer(name, value, 1)
        temperature = _checks.number("temperature", temperature, positive=True)
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
        self.num_data, self.feat_dim, self.num_negatives = num_data, feat_dim, num_negatives
        self.temperature, self.momentum, self.z_momentum = temperature, momentum, z_momentum
        self.shared_negatives = bool(shared_negatives)
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(num_data, feat_dim).mul_(2 * bound).add_(-bound).to(bank_dtype))
        self.register_buffer("memory_t", torch.rand(num_data, feat_dim).mul_(2 * bound).add_(-bound).to(bank_dtype))
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        self.register_buffer("rng_state", torch.tensor([int(seed), 0], dtype=torch.int64))

    def extra_repr(self) -> str:
        return (f"num_data={self.num_data}, feat_dim={self.feat_dim}, num_negatives={self.num_negatives}, "
                f"temperature={self.temperature}, momentum={self.momentum}, bank_dtype={self.memory_s.dtype}, "
                f"z_momentum={self.z_momentum}, shared_negatives={self.shared_negatives}")

    def sample_contrast_idx(self, idx: torch.Tensor) -> torch.Tensor:
        """The [B, K+1] indices the next step would draw (``idx`` in column 0); draws nothing."""
        return philox.contrast_indices(idx, self.rng_state, self.num_negatives, self.num_data, self.shared_negatives)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, idx: torch.Tensor,
                contrast_idx: torch.Tensor | None = None) -> torch.Tensor:
        _checks.tensor("f_s", f_s, min_ndim=2)
        _checks.tensor("f_t", f_t, min_ndim=2)
        _checks.pair("f_s", f_s, "f_t", f_t, same_shape=False)
        _checks.module_device("f_s", f_s, self.embed_s)
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
        loss, z_s, z_t = _crd.nce(v_s, v_t, self.memory_s, self.memory_t, idx, contrast_idx, self.z_s, self.z_t,
                                  self.rng_state, self.num_negatives, self.temperature, self.z_momentum,
                                  self.shared_negatives)
        with torch.no_grad():
            self.z_s.copy_(z_s)
            self.z_t.copy_(z_t)
            if contrast_idx is None:
                self.rng_state[1] += 1  # on the device: the next step draws new negatives
            _crd.bank_update_(self.memory_s, idx, v_s, self.momentum)
            _crd.bank_update_(self.memory_t, idx, v_t, self.momentum)
        return loss

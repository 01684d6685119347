"""Contrastive distillation with memory banks: :class:`CRDLoss`."""
from __future__ import annotations

import math

import torch
from torch import nn

from fastkd import _checks
from fastkd.functional.contrastive import l2_normalize
from fastkd.ops import crd as _crd

__all__ = ["CRDLoss"]

_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, draw) pairs over seeds


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
    over [0, N) with replacement (RepDistiller's loss and ImageNet loader) from a seed and a draw
    counter kept in ``state_dict``, so a reloaded loss draws the same negatives. Indices outside
    [0, N) raise ``ValueError`` before any bank row is written.
    """

    def __init__(self, s_dim: int, t_dim: int, num_data: int, feat_dim: int = 128, num_negatives: int = 16384,
                 temperature: float = 0.07, momentum: float = 0.5, seed: int | None = None):
        super().__init__()
        for name, value in (("s_dim", s_dim), ("t_dim", t_dim), ("num_data", num_data), ("feat_dim", feat_dim),
                            ("num_negatives", num_negatives)):
            _checks.integer(name, value, 1)
        temperature = _checks.number("temperature", temperature, positive=True)
        momentum = _checks.number("momentum", momentum, nonnegative=True)
        if momentum > 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        self.num_data, self.feat_dim, self.num_negatives = num_data, feat_dim, num_negatives
        self.temperature, self.momentum = temperature, momentum
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(num_data, feat_dim).mul_(2 * bound).add_(-bound))
        self.register_buffer("memory_t", torch.rand(num_data, feat_dim).mul_(2 * bound).add_(-bound))
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
        self.draws = 0

    def get_extra_state(self) -> dict:
        return {"seed": self.seed, "draws": self.draws}

    def set_extra_state(self, state: dict) -> None:
        self.seed, self.draws = int(state["seed"]), int(state["draws"])

    def extra_repr(self) -> str:
        return (f"num_data={self.num_data}, feat_dim={self.feat_dim}, num_negatives={self.num_negatives}, "
                f"temperature={self.temperature}, momentum={self.momentum}")

    def sample_contrast_idx(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, K+1] indices: ``idx`` in column 0, K uniform draws over [0, N) after it."""
        generator = torch.Generator(device=idx.device)
        generator.manual_seed((self.seed + self.draws * _SEED_MIX) % 2**63)
        self.draws += 1
        drawn = torch.randint(0, self.num_data, (idx.shape[0], self.num_negatives + 1), generator=generator,
                              device=idx.device)
        drawn[:, 0] = idx
        return drawn

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, idx: torch.Tensor,
                contrast_idx: torch.Tensor | None = None) -> torch.Tensor:
        _checks.tensor("f_s", f_s, min_ndim=2)
        _checks.tensor("f_t", f_t, min_ndim=2)
        _checks.pair("f_s", f_s, "f_t", f_t, same_shape=False)
        _checks.module_device("f_s", f_s, self.embed_s)
        batch = f_s.shape[0]
        _checks.index("idx", idx, self.num_data, shape=(batch,), device=f_s.device)
        if contrast_idx is None:
            contrast_idx = self.sample_contrast_idx(idx)
        else:
            _checks.index("contrast_idx", contrast_idx, self.num_data, shape=(batch, self.num_negatives + 1),
                          device=f_s.device)
        v_s = l2_normalize(self.embed_s(f_s.flatten(1)))
        v_t = l2_normalize(self.embed_t(f_t.flatten(1)))
        loss, z_s, z_t = _crd.nce_reference(v_s, v_t, self.memory_s, self.memory_t, contrast_idx, self.z_s,
                                            self.z_t, self.temperature, self.num_data)
        # a zero feature row gives a NaN embedding: refuse it before it reaches a bank
        _checks.finite("f_s (embedded)", v_s)
        _checks.finite("f_t (embedded)", v_t)
        with torch.no_grad():
            self.z_s.copy_(z_s)
            self.z_t.copy_(z_t)
            _crd.bank_update_(self.memory_s, idx, v_s, self.momentum)
            _crd.bank_update_(self.memory_t, idx, v_t, self.momentum)
        return loss

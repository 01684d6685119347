"""Counter-based negative sampling for CRD: Philox4x32-10 (Salmon et al., SC 2011), in torch.

A draw is a pure function of (seed, offset, counter), so the native and Triton kernels regenerate
the same indices wherever they need them and no [B, K] index tensor has to exist. The reference
here is vectorised torch integer arithmetic (int64 tensors holding uint32 values, products split
into 16-bit halves so nothing overflows); it reads ``rng_state`` as a tensor, without a host sync.

Contract, shared by every backend (csrc/cpu/crd.cpp, fastkd/kernels/crd.py, csrc/cuda/crd.cu):

* key = (seed mod 2³², seed div 2³² mod 2³²); counter = (n mod 2³², n div 2³², offset mod 2³²,
  offset div 2³² mod 2³²) with n = b·K + (k − 1) for negative k ∈ [1, K] of anchor b
  (n = k − 1 in shared-negatives mode: every anchor gets the same K rows);
* ten rounds of (c0, c1, c2, c3) ← (hi(B·c2) ⊕ c1 ⊕ k0, lo(B·c2), hi(A·c0) ⊕ c3 ⊕ k1, lo(A·c0)),
  A = 0xD2511F53, B = 0xCD9E8D57, then k0 += 0x9E3779B9, k1 += 0xBB67AE85;
* the row index is (c0 · N) >> 32 of the final c0 (uniform over [0, N); N < 2³¹, so the product
  fits the int64 arithmetic of this reference).
"""
from __future__ import annotations

import torch

MUL_A, MUL_B = 0xD2511F53, 0xCD9E8D57
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
_LOW32, _LOW16 = 0xFFFFFFFF, 0xFFFF


def _mulhilo(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of const · x for uint32 values held in int64, without overflow."""
    c_hi, c_lo = const >> 16, const & _LOW16
    x_hi, x_lo = x >> 16, x & _LOW16
    middle = c_hi * x_lo + c_lo * x_hi  # < 2^33
    low_part = (middle << 16) + c_lo * x_lo  # < 2^50
    return c_hi * x_hi + (low_part >> 32), low_part & _LOW32


def philox_word0(seed: torch.Tensor, offset: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """The first output word of Philox4x32-10 for each entry of ``counter`` (int64, ≥ 0)."""
    k0, k1 = seed & _LOW32, (seed >> 32) & _LOW32
    c0, c1 = counter & _LOW32, (counter >> 32) & _LOW32
    c2 = (offset & _LOW32).expand_as(counter)
    c3 = ((offset >> 32) & _LOW32).expand_as(counter)
    for _ in range(ROUNDS):
        hi_b, lo_b = _mulhilo(MUL_B, c2)
        hi_a, lo_a = _mulhilo(MUL_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & _LOW32, (k1 + KEY_B) & _LOW32
    return c0


def negatives(rng_state: torch.Tensor, batch: int, num_negatives: int, num_data: int,
              shared: bool = False, first_anchor: int = 0) -> torch.Tensor:
    """[B, K] int64 row indices in [0, N) drawn from ``rng_state`` = (seed, offset), int64 [2].

    ``first_anchor`` numbers the rows from there (anchor b is ``first_anchor + b``): rank r of a
    distributed run holding rows [r·B, (r+1)·B) of the global batch draws what one process
    drawing for the whole global batch would give those rows.
    """
    device = rng_state.device
    k = torch.arange(num_negatives, device=device, dtype=torch.int64)
    counter = k.expand(batch, num_negatives) if shared else \
        torch.arange(first_anchor, first_anchor + batch, device=device, dtype=torch.int64).unsqueeze(1) \
        * num_negatives + k
    word = philox_word0(rng_state[0], rng_state[1], counter)
    return (word * num_data) >> 32


def contrast_indices(idx: torch.Tensor, rng_state: torch.Tensor, num_negatives: int, num_data: int,
                     shared: bool = False, first_anchor: int = 0) -> torch.Tensor:
    """[B, K+1]: the positives ``idx`` in column 0, the Philox negatives after them."""
    drawn = negatives(rng_state, idx.shape[0], num_negatives, num_data, shared, first_anchor)
    return torch.cat([idx.unsqueeze(1), drawn], dim=1)

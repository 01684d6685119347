"""Derive independent 63-bit seeds from a few integers (a base seed, an epoch, a worker seed).

SplitMix64 finalisation over the integers in turn: equal inputs give equal seeds on every
platform and Python version (no reliance on ``hash``), and neighbouring inputs give unrelated
streams.
"""
from __future__ import annotations

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """One seed in [0, 2**63) from the integers ``values`` (order matters)."""
    state = 0
    for value in values:
        state = _splitmix64(state ^ (int(value) & _MASK))
    return state >> 1

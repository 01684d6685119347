"""The card's device-to-device copy bandwidth: the ceiling that memory-bound kernels are measured against."""
from __future__ import annotations

import statistics

import torch


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10, trials: int = 5) -> float:
    """Bytes per second of ``dst.copy_(src)`` on the current CUDA device, bytes read plus bytes written.

    The median of ``trials`` timings (CUDA events) of ``repeats`` copies of ``nbytes``, after one warm-up copy.
    """
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    rates = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        rates.append(2 * nbytes * repeats / (start.elapsed_time(end) / 1000))
    return statistics.median(rates)

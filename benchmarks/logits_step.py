"""KD / DKD at a benchmark size, per provider and phase (forward, backward, full step).

Used by benchmarks/test_logits.py, and as a script to measure one provider's peak extra memory in a fresh
process (``python benchmarks/logits_step.py PROVIDER LOSS ROWS CLASSES`` prints bytes): the peak resident
memory of one full step beyond what the process held before it (Linux: VmHWM reset through clear_refs).
Providers: ``torch`` (the published computation: log_softmax, KL, autograd), ``native`` (the C++ kernels),
``triton``. The student's logits require a gradient, the teacher's do not (as in training).
"""
from __future__ import annotations

import sys

import torch

from _memory import peak_extra_bytes  # benchmarks/ is on sys.path (run as a script, or from the suites)
from _provider import selected

from fastkd import functional as F

CPU_SIZES = [(64, 100), (64, 1000), (64, 32768)]
GPU_SIZES = [(8192, 32768)]


def make_inputs(rows: int, classes: int, device: str = "cpu", dtype=torch.float32):
    """Student logits (requiring a gradient), teacher logits and targets, drawn on ``device`` (the GPU size's
    2 × 268M values take seconds to draw on a CPU)."""
    g = torch.Generator(device=device).manual_seed(0)
    s = (3 * torch.randn(rows, classes, generator=g, device=device)).to(dtype).requires_grad_(True)
    t = (3 * torch.randn(rows, classes, generator=g, device=device)).to(dtype)
    y = torch.randint(0, classes, (rows,), generator=g, device=device)
    return s, t, y


def make_forward(loss: str, s, t, y):
    """A zero-argument callable computing the loss (graph kept for backward) on the selected provider."""
    def forward():
        return F.kd_loss(s, t) if loss == "kd" else F.dkd_loss(s, t, y)

    return forward


def make_step(loss: str, rows: int, classes: int, device: str = "cpu"):
    """A zero-argument callable running forward + backward on the selected provider, after one warm-up step."""
    s, t, y = make_inputs(rows, classes, device)
    forward = make_forward(loss, s, t, y)

    def step():
        s.grad = None
        forward().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    return step


if __name__ == "__main__":
    with selected(sys.argv[1]):
        print(peak_extra_bytes(make_step(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))

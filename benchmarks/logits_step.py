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

import fastkd
from fastkd import functional as F

CPU_SIZES = [(64, 100), (64, 1000), (64, 32768)]
GPU_SIZES = [(8192, 32768)]


def make_inputs(rows: int, classes: int, device: str = "cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(rows, classes, generator=g)).to(device=device, dtype=dtype).requires_grad_(True)
    t = (3 * torch.randn(rows, classes, generator=g)).to(device=device, dtype=dtype)
    y = torch.randint(0, classes, (rows,), generator=g).to(device)
    return s, t, y


def make_forward(provider: str, loss: str, s, t, y):
    """A zero-argument callable computing the loss (graph kept for backward) on ``provider``."""
    def forward():
        with fastkd.use_backend(provider), fastkd.value_checks(False):
            return F.kd_loss(s, t) if loss == "kd" else F.dkd_loss(s, t, y)

    return forward


def make_step(provider: str, loss: str, rows: int, classes: int, device: str = "cpu"):
    """A zero-argument callable running forward + backward, after one warm-up step."""
    s, t, y = make_inputs(rows, classes, device)
    forward = make_forward(provider, loss, s, t, y)

    def step():
        s.grad = None
        forward().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    return step


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(provider: str, loss: str, rows: int, classes: int) -> int:
    """Peak resident memory of one full step beyond the process's memory before it (this process)."""
    step = make_step(provider, loss, rows, classes)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) * 1024


if __name__ == "__main__":
    print(peak_extra_bytes(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))

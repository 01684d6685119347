"""One CRD training step (forward + backward + bank update) at a benchmark size, per provider.

Used by benchmarks/test_crd.py, and as a script to measure one provider's peak extra memory in a
fresh process (``python benchmarks/crd_step.py PROVIDER SIZE`` prints bytes): the peak resident
memory of a step beyond what the process held before it (Linux: VmHWM reset through clear_refs).
Providers: ``published`` (the torch backend: RepDistiller's index_select → bmm → exp → NCE with
autograd and index_copy_ updates), ``native`` (the C++ kernels), ``triton``.
"""
from __future__ import annotations

import sys

import torch

from _memory import peak_extra_bytes  # benchmarks/ is on sys.path (run as a script, or from the suites)

import fastkd

SIZES = {
    "cpu": dict(batch=64, num_negatives=16384, num_data=50_000, feat_dim=128),
    "gpu": dict(batch=256, num_negatives=16384, num_data=1_281_167, feat_dim=128),
}
BACKEND = {"published": "torch", "native": "native", "triton": "triton"}
FEATURE_DIM = 256


def make_step(provider: str, size: str, device: str = "cpu"):
    """A zero-argument callable running one full step, after one warm-up step (Z estimated)."""
    shape = SIZES[size]
    torch.manual_seed(0)
    loss = fastkd.CRDLoss(FEATURE_DIM, FEATURE_DIM, shape["num_data"], feat_dim=shape["feat_dim"],
                          num_negatives=shape["num_negatives"], seed=1).to(device)
    f_s = torch.randn(shape["batch"], FEATURE_DIM, device=device, requires_grad=True)
    f_t = torch.randn(shape["batch"], FEATURE_DIM, device=device)
    idx = torch.randint(0, shape["num_data"], (shape["batch"],), device=device)
    backend = BACKEND[provider]

    def step():
        with fastkd.use_backend(backend), fastkd.value_checks(False):
            f_s.grad = None
            loss(f_s, f_t, idx).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    return step


if __name__ == "__main__":
    print(peak_extra_bytes(make_step(sys.argv[1], sys.argv[2])))

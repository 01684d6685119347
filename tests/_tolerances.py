"""The tolerances and the error measure of every kernel test (DESIGN.md: fp32 rel ≤ 1e-5, fp16 ≤ 1e-3,
bf16 ≤ 1e-2; float64 kernels against a float64 oracle ≤ 1e-10)."""
import torch

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel(got, want, floor=1e-300):
    """Max absolute error over max(largest |want|, floor), in float64 on the CPU (``floor`` sets the magnitude
    below which an error is measured absolutely, say a dtype's smallest normal number for gradients)."""
    got, want = torch.as_tensor(got).detach().double().cpu(), torch.as_tensor(want).detach().double().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(floor)).item()

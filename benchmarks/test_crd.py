"""CRD step benchmarks: the published computation vs fastkd's fused kernels, side by side.

    bash scripts/dev bench -k crd --benchmark-json benchmarks/results/crd-cpu.json

CPU size (B=64, K=16384, N=50,000, D=128) on any machine; the GPU size (B=256, K=16384,
N=1,281,167) only with a GPU. Each entry's extra_info holds the peak extra memory of one step,
measured in a fresh process so that no provider inherits another's freed memory.
"""
import os
import sys

import pytest
import torch

import fastkd
from fastkd.backends import implementations

sys.path.insert(0, os.path.dirname(__file__))
from _bandwidth import copy_bandwidth  # noqa: E402
from _memory import in_fresh_process  # noqa: E402
from _rounds import rounds  # noqa: E402
from crd_step import SIZES, make_step  # noqa: E402


@pytest.mark.parametrize("provider", ["published", "native"])
def test_crd_step_cpu(benchmark, provider):
    if provider != "published" and provider not in fastkd.backends():
        pytest.skip(f"backend {provider} is not available")
    step = make_step(provider, "cpu")
    benchmark.extra_info.update(SIZES["cpu"], device="cpu", torch=torch.__version__, threads=torch.get_num_threads(),
                                peak_extra_bytes=in_fresh_process("crd_step.py", provider, "cpu"))
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["published", "native", "triton"])
def test_crd_step_gpu(benchmark, provider):
    # native on CUDA tensors is the CUDA C++ kernel: a library built without it would run the reference instead
    if provider != "published" and provider not in implementations("crd_nce", "cuda"):
        pytest.skip(f"no {provider} CRD kernels for CUDA tensors here (backends: {fastkd.backends()})")
    step = make_step(provider, "gpu", device="cuda")
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    shape = SIZES["gpu"]
    benchmark.extra_info.update(shape, device=torch.cuda.get_device_name(), torch=torch.__version__,
                                peak_extra_bytes=torch.cuda.max_memory_allocated() - before,
                                copy_bytes_per_s=copy_bandwidth())
    benchmark.pedantic(step, rounds=rounds(10), warmup_rounds=2)
    # the rows a step must read at least once: (K+1) rows of D fp32 per anchor, per direction
    rows_bytes = 2 * shape["batch"] * (shape["num_negatives"] + 1) * shape["feat_dim"] * 4
    benchmark.extra_info["gather_bytes_per_s"] = rows_bytes / benchmark.stats.stats.median

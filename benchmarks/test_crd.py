"""CRD step benchmarks: the published computation vs fastkd's fused kernels, side by side.

    bash scripts/dev bench -k crd --benchmark-json benchmarks/results/crd-cpu.json

CPU size (B=64, K=16384, N=50,000, D=128) on any machine; the GPU size (B=256, K=16384,
N=1,281,167) only with a GPU. Each entry's extra_info holds the peak extra memory of one step,
measured in a fresh process so that no provider inherits another's freed memory.
"""
import os
import subprocess
import sys

import pytest
import torch

import fastkd

sys.path.insert(0, os.path.dirname(__file__))
from crd_step import SIZES, make_step  # noqa: E402


def measure_memory(provider: str, size: str) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # big buffers are mmapped and returned on free
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "crd_step.py"), provider, size],
                         capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip())


@pytest.mark.parametrize("provider", ["published", "native"])
def test_crd_step_cpu(benchmark, provider):
    if provider != "published" and provider not in fastkd.backends():
        pytest.skip(f"backend {provider} is not available")
    step = make_step(provider, "cpu")
    benchmark.extra_info.update(SIZES["cpu"], device="cpu", torch=torch.__version__, threads=torch.get_num_threads(),
                                peak_extra_bytes=measure_memory(provider, "cpu"))
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["published", "native", "triton"])
def test_crd_step_gpu(benchmark, provider):
    if provider != "published" and provider not in fastkd.backends():
        pytest.skip(f"backend {provider} is not available")
    step = make_step(provider, "gpu", device="cuda")
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    benchmark.extra_info.update(SIZES["gpu"], device=torch.cuda.get_device_name(), torch=torch.__version__,
                                peak_extra_bytes=torch.cuda.max_memory_allocated() - before)
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)

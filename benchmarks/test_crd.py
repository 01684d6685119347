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


TEACHERS = (1, 2, 4, 8)
# the CPU size (dense path: N <= B (K+1)), the digits recipes' size, and one on the gather path (N > B (K+1))
MULTI_SIZES = {"cpu": SIZES["cpu"], "digits": dict(batch=64, num_negatives=1024, num_data=1347, feat_dim=64),
               "gather": dict(batch=64, num_negatives=4096, num_data=300_000, feat_dim=128)}


def _multi_bank_step(teachers: int, provider: str, size: str):
    """Ensemble CRD's scoring of M (student, teacher) pairs at ``size``: ``one-op`` is the fused multi-bank op
    ``fastkd::crd_nce_multi`` (each anchor's K+1 rows drawn once, scored against all 2M banks in one pass),
    ``m-calls`` is M calls of the single-pair fused op ``fastkd::crd_nce`` with the same draws (both native, both
    with the anchors' gradients, as a training step runs them). Z known (a step after the first)."""
    shape = MULTI_SIZES[size]
    g = torch.Generator().manual_seed(0)
    batch, dim, num_data = shape["batch"], shape["feat_dim"], shape["num_data"]

    def unit(*size):
        return torch.nn.functional.normalize(torch.randn(*size, generator=g), dim=-1)

    v_s, v_t = unit(teachers, batch, dim), unit(teachers, batch, dim)
    m_s, m_t = unit(num_data, teachers, dim), unit(num_data, teachers, dim)
    idx = torch.randint(0, num_data, (batch,), generator=g)
    log_z = torch.full((teachers,), 11.0)
    rng = torch.tensor([1, 0])
    args = (idx, None, log_z, log_z.clone(), rng, shape["num_negatives"], 0.07, 0.0, False)
    if provider == "one-op":
        return lambda: fastkd.ops.crd.CRD_NCE_MULTI(v_s, v_t, m_s, m_t, *args)
    # each call on its own contiguous bank, as M single-teacher losses hold them
    singles = [(v_s[m], v_t[m], m_s[:, m].contiguous(), m_t[:, m].contiguous(), idx, None, log_z[m], log_z[m].clone(), rng, shape["num_negatives"],
                0.07, 0.0, False) for m in range(teachers)]
    return lambda: [fastkd.ops.crd.CRD_NCE(*one) for one in singles]


@pytest.mark.parametrize("provider", ["one-op", "m-calls"])
@pytest.mark.parametrize("teachers", TEACHERS)
@pytest.mark.parametrize("size", sorted(MULTI_SIZES))
def test_crd_multi_bank_cpu(benchmark, size, teachers, provider):
    if "native" not in fastkd.backends():
        pytest.skip("the native backend is not available")
    step = _multi_bank_step(teachers, provider, size)
    step()
    benchmark.extra_info.update(MULTI_SIZES[size], size=size, teachers=teachers, device="cpu",
                                torch=torch.__version__, threads=torch.get_num_threads())
    benchmark.pedantic(step, rounds=rounds(5), warmup_rounds=1)

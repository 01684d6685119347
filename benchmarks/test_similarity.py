"""Batch-relation loss benchmarks (SP, CCKD, PKT, RKD distance and angle, NST): the published computation (torch
backend) vs fastkd's fused ops, side by side, forward / backward / full step.

    OMP_NUM_THREADS=1 bash scripts/dev bench benchmarks/test_similarity.py \\
        --benchmark-json benchmarks/results/similarity-cpu.json

CPU sizes (b = 64) on any machine; GPU sizes (b = 256, C·H·W = 16,384; and IUSP's B = 64 sequences of T = 500
frames, C = 128 / 512, whose CPU cases are benchmarks/test_iusp.py's) only with a GPU. Each full-step
entry's extra_info holds the peak extra memory of one step: on CPU measured in a fresh process so that no
provider inherits another's freed memory; on GPU torch.cuda.max_memory_allocated.
"""
import os
import sys

import pytest
import torch

import fastkd

sys.path.insert(0, os.path.dirname(__file__))
from _memory import in_fresh_process  # noqa: E402
from _provider import selected  # noqa: E402
from _rounds import rounds  # noqa: E402
from similarity_step import SIZES, make_step  # noqa: E402

MODES = ["forward", "backward", "full"]
# CPU rounds per loss: the b = 64 embedding losses take a fraction of a millisecond, and over 30 rounds their
# medians moved by 1.5x between runs on a shared machine; the map losses (SP, NST) take 5-90 ms.
CPU_ROUNDS = {"sp": 30, "nst": 30}


def run(benchmark, loss, provider, mode, size, device, rounds, on_ready=lambda: None):
    """Times ``mode`` steps; ``on_ready`` runs once the inputs exist and the step is warm."""
    if provider != "torch" and provider not in fastkd.backends():
        pytest.skip(f"backend {provider} is not available")
    shapes = SIZES[size][loss]
    benchmark.group = f"{loss}-{mode}"
    benchmark.extra_info.update(student=list(shapes[0]), teacher=list(shapes[1]), torch=torch.__version__,
                                threads=torch.get_num_threads())
    with selected(provider):
        target, setup = make_step(loss, size, mode, device)
        on_ready()
        if setup is None:
            benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=max(2, rounds // 20))
        else:
            benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=max(2, rounds // 20))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["torch", "native"])
@pytest.mark.parametrize("loss", list(SIZES["cpu"]))
def test_similarity_cpu(benchmark, loss, provider, mode):
    run(benchmark, loss, provider, mode, "cpu", "cpu", rounds=CPU_ROUNDS.get(loss, 300))
    benchmark.extra_info["device"] = "cpu"
    if mode == "full":
        benchmark.extra_info["peak_extra_bytes"] = in_fresh_process("similarity_step.py", loss, provider, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["torch", "triton"])
@pytest.mark.parametrize("loss", list(SIZES["gpu"]))
def test_similarity_gpu(benchmark, loss, provider, mode):
    baseline = []

    def ready():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline.append(torch.cuda.memory_allocated())

    run(benchmark, loss, provider, mode, "gpu", "cuda", rounds=rounds(50), on_ready=ready)
    benchmark.extra_info.update(device=torch.cuda.get_device_name(),
                                peak_extra_bytes=torch.cuda.max_memory_allocated() - baseline[0])

"""IUSP benchmarks: the eager computation (torch backend: batched Grams, F.normalize, autograd) vs the fused op
``fastkd::iusp_loss`` (native C++ on CPU, Triton on GPU), forward / backward / full step, at B = 64 sequences of
T = 500 frames, C = 128 and 512 (the same C for student and teacher; the student's frames need a gradient).

    OMP_NUM_THREADS=1 bash scripts/dev bench benchmarks/test_iusp.py --benchmark-json benchmarks/results/iusp-cpu.json

Each full-step entry's extra_info holds the peak extra memory of one step (CPU: in a fresh process; GPU:
torch.cuda.max_memory_allocated). The harness (providers, steps, memory) is test_similarity.py's.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _memory import in_fresh_process  # noqa: E402
from _rounds import rounds  # noqa: E402
from similarity_step import SIZES  # noqa: E402
from test_similarity import MODES, run  # noqa: E402

CPU_ROUNDS = 5  # a full CPU step takes 0.1-1 s at these sizes


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["torch", "native"])
@pytest.mark.parametrize("loss", list(SIZES["iusp"]))
def test_iusp_cpu(benchmark, loss, provider, mode):
    run(benchmark, loss, provider, mode, "iusp", "cpu", rounds=CPU_ROUNDS)
    benchmark.extra_info["device"] = "cpu"
    if mode == "full":
        benchmark.extra_info["peak_extra_bytes"] = in_fresh_process("similarity_step.py", loss, provider, "iusp")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["torch", "triton"])
@pytest.mark.parametrize("loss", list(SIZES["iusp"]))
def test_iusp_gpu(benchmark, loss, provider, mode):
    baseline = []

    def ready():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline.append(torch.cuda.memory_allocated())

    run(benchmark, loss, provider, mode, "iusp", "cuda", rounds=rounds(50), on_ready=ready)
    benchmark.extra_info.update(device=torch.cuda.get_device_name(),
                                peak_extra_bytes=torch.cuda.max_memory_allocated() - baseline[0])

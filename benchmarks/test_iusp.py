"""IUSP benchmarks on CPU: the eager computation (torch backend: batched Grams, F.normalize, autograd) vs the
fused op ``fastkd::iusp_loss`` (native C++), forward / backward / full step, at B = 64 sequences of T = 500 frames,
C = 128 and 512 (the same C for student and teacher; the student's frames need a gradient). The same sizes on a GPU,
torch vs Triton, are cases of benchmarks/test_similarity.py's ``test_similarity_gpu`` (gpu-check runs them there).

    OMP_NUM_THREADS=1 bash scripts/dev bench benchmarks/test_iusp.py --benchmark-json benchmarks/results/iusp-cpu.json

Each full-step entry's extra_info holds the peak extra memory of one step, measured in a fresh process. The
harness (providers, steps, memory) is test_similarity.py's.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _memory import in_fresh_process  # noqa: E402
from similarity_step import SIZES  # noqa: E402
from test_similarity import MODES, run  # noqa: E402

CPU_ROUNDS = 5  # a CPU step takes 0.3-2.5 s at these sizes (1 thread, a shared machine)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["torch", "native"])
@pytest.mark.parametrize("loss", list(SIZES["iusp"]))
def test_iusp_cpu(benchmark, loss, provider, mode):
    run(benchmark, loss, provider, mode, "iusp", "cpu", rounds=CPU_ROUNDS)
    benchmark.extra_info["device"] = "cpu"
    if mode == "full":
        benchmark.extra_info["peak_extra_bytes"] = in_fresh_process("similarity_step.py", loss, provider, "iusp")

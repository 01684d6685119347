"""KD and DKD: the published computation (torch backend) vs fastkd's fused kernels, side by side.

    bash scripts/dev bench benchmarks/test_logits.py --benchmark-json benchmarks/results/logits-cpu.json

CPU: 64 rows × 100 (CIFAR-100), 1000 (ImageNet) and 32,768 classes, providers torch and native; phases
forward (the loss, graph kept), backward (from a fresh forward, untimed) and full (both). The GPU size
(8192 × 32k, torch vs triton) runs only with a GPU. The full-step entries' extra_info holds the peak extra
memory of one step (CPU: resident memory, measured in a fresh process so no provider inherits another's
freed memory; GPU: torch's allocator peak).
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
from logits_step import CPU_SIZES, GPU_SIZES, make_forward, make_inputs, make_step  # noqa: E402

ROUNDS = {100: 400, 1000: 300, 32768: 20}


def run_phase(benchmark, provider, loss, rows, classes, phase, rounds, device="cpu"):
    with selected(provider):
        timed_phase(benchmark, loss, rows, classes, phase, rounds, device)


def timed_phase(benchmark, loss, rows, classes, phase, rounds, device):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if phase == "full":
        step = make_step(loss, rows, classes, device)
        benchmark.pedantic(step, rounds=rounds, warmup_rounds=max(2, rounds // 20))
        return
    s, t, y = make_inputs(rows, classes, device)
    forward = make_forward(loss, s, t, y)
    forward().backward()
    if phase == "forward":
        def timed():
            forward()
            sync()

        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=max(2, rounds // 20))
    else:
        def setup():
            s.grad = None
            value = forward()
            sync()
            return (value,), {}

        def timed(value):
            value.backward()
            sync()

        benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=max(2, rounds // 20))


@pytest.mark.parametrize("phase", ["forward", "backward", "full"])
@pytest.mark.parametrize("rows,classes", CPU_SIZES, ids=[f"{r}x{c}" for r, c in CPU_SIZES])
@pytest.mark.parametrize("loss", ["kd", "dkd"])
@pytest.mark.parametrize("provider", ["torch", "native"])
def test_logits_cpu(benchmark, provider, loss, rows, classes, phase):
    if provider not in fastkd.backends():
        pytest.skip(f"backend {provider} is not available")
    benchmark.group = f"{loss} {rows}x{classes} {phase}"
    benchmark.extra_info.update(device="cpu", torch=torch.__version__, threads=torch.get_num_threads(), rows=rows,
                                classes=classes, dtype="float32")
    if phase == "full":
        benchmark.extra_info["peak_extra_bytes"] = in_fresh_process("logits_step.py", provider, loss, rows, classes)
    run_phase(benchmark, provider, loss, rows, classes, phase, ROUNDS[classes])


@pytest.mark.cuda
@pytest.mark.parametrize("phase", ["forward", "backward", "full"])
@pytest.mark.parametrize("rows,classes", GPU_SIZES, ids=[f"{r}x{c}" for r, c in GPU_SIZES])
@pytest.mark.parametrize("loss", ["kd", "dkd"])
@pytest.mark.parametrize("provider", ["torch", "triton"])
def test_logits_gpu(benchmark, provider, loss, rows, classes, phase):
    if provider not in fastkd.backends():
        pytest.skip(f"backend {provider} is not available")
    benchmark.group = f"{loss} {rows}x{classes} {phase} gpu"
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows,
                                classes=classes, dtype="float32")
    if phase == "full":
        with selected(provider):
            step = make_step(loss, rows, classes, "cuda")
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
        benchmark.extra_info["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
    run_phase(benchmark, provider, loss, rows, classes, phase, rounds(20), device="cuda")

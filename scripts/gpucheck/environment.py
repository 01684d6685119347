"""gpu-check's first stage: what the machine is, and its two ceilings, written as JSON.

``python -m gpucheck.environment PATH`` writes PATH twice: first the versions (Python, torch, its CUDA,
cuDNN, Triton, nvcc, the driver) and the GPU's properties, then the same with the device-to-device copy
bandwidth (bytes read + written per second; the gather targets are ratios of it) and a bf16 matrix
product's rate. Anything that cannot be read is left out, with its error under ``errors``.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tool(args: list[str], word: str = "") -> str:
    """The first line of the tool's output that holds ``word`` (else its last line)."""
    lines = subprocess.run(args, capture_output=True, text=True, timeout=30, check=True).stdout.strip().splitlines()
    return next((line.strip() for line in lines if word and word in line), lines[-1].strip())


def versions(info: dict, errors: dict) -> None:
    import torch

    info.update(python=platform.python_version(), cpus=os.cpu_count(), torch=torch.__version__,
                torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    readers = {
        "cudnn": lambda: torch.backends.cudnn.version(),
        "triton": lambda: __import__("triton").__version__,
        "nvcc": lambda: _tool(["nvcc", "--version"], "release"),
        "driver": lambda: _tool(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
    }
    for name, read in readers.items():
        try:
            info[name] = read()
        except Exception as exc:  # noqa: BLE001 (whatever a missing tool raises, the others are still read)
            errors[name] = f"{type(exc).__name__}: {exc}"[:200]
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 2),
                    capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    gpus=torch.cuda.device_count())
        if hasattr(props, "L2_cache_size"):
            info["l2_mib"] = round(props.L2_cache_size / 2**20, 1)


def bf16_matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """TFLOP/s of an n × n × n bf16 product on random data (mean of ``repeats`` after three warm-ups)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1000) / 1e12


def main(path: str) -> int:
    info: dict = {}
    errors: dict = {}
    versions(info, errors)
    target = Path(path)
    target.write_text(json.dumps(dict(info, errors=errors), indent=1))
    try:  # clocks, temperature, other processes: into the stage's log
        print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout, flush=True)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"nvidia-smi: {exc}", flush=True)
    if info["cuda_available"]:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from _bandwidth import copy_bandwidth

        for name, measure in (("copy_bytes_per_s", copy_bandwidth), ("bf16_matmul_tflops", bf16_matmul_tflops)):
            try:
                info[name] = round(measure(), 1 if name.endswith("tflops") else 0)
            except Exception as exc:  # noqa: BLE001
                errors[name] = f"{type(exc).__name__}: {exc}"[:200]
    target.write_text(json.dumps(dict(info, errors=errors), indent=1))
    print(json.dumps(dict(info, errors=errors), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

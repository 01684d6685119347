"""The dry run's stand-in for a stage: ``python -m gpucheck.fake KEY SECONDS OUT`` writes made-up records of
the shape the real stage writes (the real test ids and parameters, numbers chosen to exercise every kind of
row: a target met, one missed, a failure), then sleeps SECONDS. Nothing here is a measurement."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _test(nodeid: str, outcome: str = "passed", message: str = "") -> dict:
    return {"nodeid": nodeid, "outcome": outcome, "seconds": 0.1, **({"message": message} if message else {})}


def _bench(nodeid: str, median: float, **extra) -> dict:
    params = dict(p.split("=") for p in nodeid[nodeid.index("[") + 1:-1].split(","))
    params = {k: int(v) if v.isdigit() else v for k, v in params.items()}
    file_and_test = nodeid[:nodeid.index("[")]
    ids = "-".join(str(v) for v in params.values())
    return {"nodeid": f"{file_and_test}[{ids}]", "outcome": "passed", "seconds": 1.0, "params": params,
            "benchmark": {"median": median, "min": median * 0.97, "rounds": 10, "extra_info": extra}}


ENGINE = "benchmarks/test_engine_step.py::test_engine_step_gpu"
LOGITS = "benchmarks/test_logits.py::test_logits_gpu"
SIMILARITY = "benchmarks/test_similarity.py::test_similarity_gpu"
CANNED = {
    "tests-triton": [
        _test("tests/test_crd_triton.py::test_cuda_half_anchors[torch.float16]"),
        _test("tests/test_logits_triton.py::test_cuda_large[kd]"),
        _test("tests/test_similarity_triton.py::test_gpu_sizes[sp_loss-torch.bfloat16]", "failed",
              "AssertionError: relative error 2.1e-02 > 1e-02 (simulated)"),
    ],
    "tests-cuda": [
        _test("tests/test_crd_cuda.py::test_nce_at_the_cpu_benchmark_size_and_deterministic"),
        _test("tests/test_graph.py::test_cuda_graph_step_matches_the_eager_step[bf16]"),
        _test("tests/test_compile_cuda.py::test_crd_step_compiles[auto]"),
    ],
    "bench-crd": [
        _bench("benchmarks/test_crd.py::test_crd_step_gpu[provider=published]", 0.120, peak_extra_bytes=9.0e9),
        _bench("benchmarks/test_crd.py::test_crd_step_gpu[provider=triton]", 0.010, peak_extra_bytes=5.0e7,
               gather_bytes_per_s=1.7e12),
        _bench("benchmarks/test_crd.py::test_crd_step_gpu[provider=native]", 0.012, peak_extra_bytes=4.0e7,
               gather_bytes_per_s=1.4e12),
    ],
    "bench-engine": [
        _bench(f"{ENGINE}[losses={losses},mode={mode}]", seconds, images_per_s=3200 / seconds)
        for losses, mode, seconds in (("kd", "eager_fp32", 1.0), ("kd", "amp", 0.7), ("kd", "amp_graph", 0.4),
                                      ("crd_kd", "eager_fp32", 1.2), ("crd_kd", "amp", 0.8),
                                      ("crd_kd", "amp_graph", 0.44))
    ],
    "bench-logits": [
        _bench(f"{LOGITS}[provider={p},loss={loss},rows=8192,classes=32768,phase=full]", seconds, peak_extra_bytes=peak)
        for p, loss, seconds, peak in (("torch", "kd", 0.030, 4.0e9), ("triton", "kd", 0.012, 1.1e9),
                                       ("torch", "dkd", 0.060, 6.0e9), ("triton", "dkd", 0.015, 1.1e9))
    ],
    "bench-similarity": [  # written before the stage hangs: records of a cut stage survive
        _bench(f"{SIMILARITY}[loss=sp,provider={p},mode=full]", seconds, peak_extra_bytes=peak)
        for p, seconds, peak in (("torch", 0.004, 6.0e7), ("triton", 0.002, 1.0e6))
    ],
    "bench-imagenet": [
        _bench(f"benchmarks/test_imagenet_step.py::test_imagenet_step_gpu[setting={s}]", seconds)
        for s, seconds in (("kd", 0.20), ("crd_kd", 0.21))
    ],
}
ENV = {"gpu": "Simulated GPU (dry run)", "cuda_available": True, "memory_gib": 79.2, "capability": "9.0", "sms": 132,
       "torch": "simulated", "triton": "simulated", "copy_bytes_per_s": 3.0e12}


def main(key: str, seconds: float, out: str) -> int:
    if key == "env":
        Path(out, "env.json").write_text(json.dumps(ENV))
    records = os.environ.get("GPUCHECK_RECORDS")
    if records and key in CANNED:
        with open(records, "a") as f:
            for record in CANNED[key]:
                f.write(json.dumps(dict(record, stage=key)) + "\n")
    print(f"fake {key}: wrote {len(CANNED.get(key, []))} records, sleeping {seconds:.2f} s", flush=True)
    time.sleep(seconds)
    return 1 if any(r["outcome"] == "failed" for r in CANNED.get(key, [])) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2]), sys.argv[3]))

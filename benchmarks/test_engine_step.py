"""Training-step throughput of the engine: resnet32x4 → resnet8x4 at batch 64 (CIFAR-100 shapes).

    bash scripts/dev bench benchmarks/test_engine_step.py --benchmark-json benchmarks/results/engine-<device>.json

Side by side, in one run: the CRD+KD step (CE 1 + KD 1 + CRD 0.8, K = 16,384, N = 50,000) and
the KD-only step (CE 0.1 + KD 0.9), each as eager fp32, bf16 autocast (GPU) and bf16 autocast
+ CUDA graph (GPU). One round = one epoch of ``STEPS`` batches through :class:`Trainer`
(its metrics read back once at the end of the epoch, as in a real run); ``extra_info`` holds
images/s. Issue 4's targets (on a GPU): AMP + graph ≥ 2× eager fp32; CRD+KD ≤ 1.15× KD-only.
"""
import os
import sys

import pytest
import torch

from fastkd import models
from fastkd.train.distiller import Distiller
from fastkd.train.engine import Trainer
from fastkd.train.recipe import build

sys.path.insert(0, os.path.dirname(__file__))
from _rounds import rounds  # noqa: E402

BATCH, NUM_DATA = 64, 50_000
LOSSES = {
    "kd": {"ce": {"weight": 0.1}, "kd": {"weight": 0.9}},
    "crd_kd": {"ce": {"weight": 1.0}, "kd": {"weight": 1.0}, "crd": {"weight": 0.8}},
}
MODES = {  # name → recipe keys
    "eager_fp32": {"amp": "off"},
    "amp": {"amp": "bf16"},
    "amp_graph": {"amp": "bf16", "cuda_graph": True},
}


class Batches:
    """``steps`` random CIFAR-shaped batches with dataset indices, held on the device."""

    def __init__(self, steps: int, device: str):
        g = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(BATCH, 3, 32, 32, generator=g).to(device),
                         torch.randint(0, 100, (BATCH,), generator=g).to(device),
                         torch.randint(0, NUM_DATA, (BATCH,), generator=g).to(device)) for _ in range(steps)]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def make_trainer(losses: str, mode: str, device: str, steps: int) -> Trainer:
    torch.manual_seed(0)
    recipe = build({"losses": LOSSES[losses], "epochs": 1000, **MODES[mode], "output": "/tmp/fastkd-bench"})
    data = Batches(steps, device)
    student, teacher = models.create("resnet8x4", num_classes=100), models.create("resnet32x4", num_classes=100)
    distiller = Distiller(student, teacher, recipe.losses, data.batches[0][0][:8].cpu(), NUM_DATA)
    return Trainer(recipe, distiller, data, [], device=device)


def run(benchmark, losses: str, mode: str, device: str, steps: int, rounds: int) -> None:
    trainer = make_trainer(losses, mode, device, steps)
    trainer.train_epoch(0)  # warm-up: lazy state, Z, cuDNN choices, the graph's capture
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def epoch():
        trainer.train_epoch(0)
        sync()

    benchmark.pedantic(epoch, rounds=rounds, warmup_rounds=0)
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                torch=torch.__version__, batch=BATCH, steps=steps, losses=losses, mode=mode)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = BATCH * steps / benchmark.stats.stats.median
    if trainer.graph is not None and device == "cuda":
        benchmark.extra_info["graph_replays"] = trainer.graph.replays


@pytest.mark.parametrize("losses", sorted(LOSSES))
def test_engine_step_cpu(benchmark, losses):
    run(benchmark, losses, "eager_fp32", "cpu", steps=4, rounds=3)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("losses", sorted(LOSSES))
def test_engine_step_gpu(benchmark, losses, mode):
    run(benchmark, losses, mode, "cuda", steps=50, rounds=rounds(5))

"""The engine step with the teacher live vs read from a teacher cache, KD-only and CRD+KD (CPU).

    OMP_NUM_THREADS=1 FASTKD_BENCH_ROUNDS=1.67 python -m pytest benchmarks/test_teacher_cache.py --benchmark-only \
        --benchmark-timer time.process_time --benchmark-json benchmarks/results/teacher-cache-cpu.json

(process time, one torch thread: on a CPU shared with other jobs, wall-clock rounds of the same epoch varied by
1.7x, while the CPU time the process itself spends does not count the time it waits for a core.)

Pairs resnet32x4 → resnet8x4 and resnet56 → resnet20 at batch 64 with CIFAR-100 shapes (100 classes,
32 × 32; networks and batches channels-last, the recipes' default); KD-only = CE 0.1 + KD 0.9, CRD+KD = CE 1 + KD 1 + CRD 0.8 (K = 16,384, N = 50,000, the loss's own
Philox negatives, native op). One round = an epoch of ``STEPS`` batches through :class:`Trainer` (eager fp32).
The cached trainer reads a real cache (``fastkd.train.cache_teacher.write``: memory-mapped shard, exact
fp32 logits and, for CRD, the pooled feature) written for the same batches.

Interleaved: before each timed round of one provider, one untimed epoch of the other runs (pedantic's
``setup``), so live and cached rounds alternate under whatever load the machine has. ``test_cache_read``
times the read of one step's record (what the cached step adds: a slice of the mapped file copied into
fresh tensors). Targets (issue 19): cached KD step ≥ 2.5× faster than live for resnet32x4 → resnet8x4;
CRD+KD ≤ 1.05× KD-only; cache read ≤ 5% of the cached step.
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile

import pytest
import torch

from fastkd import models
from fastkd.train.cache_teacher import write
from fastkd.train.distiller import Distiller, feature_function
from fastkd.train.engine import Trainer
from fastkd.train.recipe import build
from fastkd.train.teacher_cache import TeacherCache, teacher_needs

sys.path.insert(0, os.path.dirname(__file__))
from _rounds import rounds  # noqa: E402

BATCH, NUM_DATA, CLASSES, STEPS = 64, 50_000, 100, 3
LOSSES = {
    "kd": {"ce": {"weight": 0.1}, "kd": {"weight": 0.9}},
    "crd_kd": {"ce": {"weight": 1.0}, "kd": {"weight": 1.0}, "crd": {"weight": 0.8}},
}
PAIRS = {"resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4"), "resnet56-resnet20": ("resnet56", "resnet20")}


class Batches:
    """``steps`` random CIFAR-shaped batches ``(images, labels, dataset indices)``, the same every epoch."""

    def __init__(self, steps: int):
        g = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(BATCH, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last),
                         torch.randint(0, CLASSES, (BATCH,), generator=g), torch.randperm(NUM_DATA, generator=g)[:BATCH])
                        for _ in range(steps)]

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


@functools.lru_cache(maxsize=None)
def cache_for(teacher_name: str, losses: str, steps: int) -> str:
    """A cache folder of ``teacher_name``'s outputs on :class:`Batches` (epoch 0), for ``losses``."""
    torch.manual_seed(1)
    teacher = models.create(teacher_name, num_classes=CLASSES).eval().to(memory_format=torch.channels_last)
    names = [n for needs in teacher_needs(LOSSES[losses]).values() for n in needs]
    root = tempfile.mkdtemp(prefix="fastkd-bench-cache-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    folder = os.path.join(root, losses)
    describes = {"teacher": {"name": teacher_name, "weights": None}, "batch_size": BATCH, "world_size": 1,
                 "compute_dtype": "float32", "channels_last": True}
    write(folder, Batches(steps), feature_function(teacher), lambda: torch.autocast("cpu", enabled=False), names,
          describes, 1, log=None)
    return folder


def make_trainer(teacher_name: str, student_name: str, losses: str, mode: str, steps: int = STEPS) -> Trainer:
    """The trainer of one configuration: the teacher ``live`` (built and run) or ``cached``."""
    torch.manual_seed(0)
    recipe = build({"losses": LOSSES[losses], "epochs": 1000, "amp": "off", "output": "/tmp/fastkd-bench"})
    data = Batches(steps)
    student = models.create(student_name, num_classes=CLASSES).to(memory_format=torch.channels_last)
    sample = data.batches[0][0][:8]
    if mode == "live":
        teacher = models.create(teacher_name, num_classes=CLASSES).to(memory_format=torch.channels_last)
        return Trainer(recipe, Distiller(student, teacher, recipe.losses, sample, NUM_DATA), data, [])
    cache = TeacherCache(cache_for(teacher_name, losses, steps))
    distiller = Distiller(student, None, recipe.losses, sample, NUM_DATA, teacher_cache=cache)
    return Trainer(recipe, distiller, cache.batches(data), [])


TRAINERS: dict = {}


def trainer_for(pair: str, losses: str, mode: str) -> Trainer:
    key = (pair, losses, mode)
    if key not in TRAINERS:
        TRAINERS[key] = make_trainer(*PAIRS[pair], losses, mode)
        TRAINERS[key].train_epoch(0)  # warm-up: lazy state, CRD's Z, the first read of the cache
    return TRAINERS[key]


@pytest.mark.parametrize("mode", ["live", "cached"])
@pytest.mark.parametrize("losses", sorted(LOSSES))
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_engine_step_teacher_cache_cpu(benchmark, pair, losses, mode):
    trainer = trainer_for(pair, losses, mode)
    other = trainer_for(pair, losses, "cached" if mode == "live" else "live")
    def other_epoch():  # untimed, between the timed rounds: the two providers alternate
        other.train_epoch(0)

    benchmark.pedantic(lambda: trainer.train_epoch(0), setup=other_epoch, rounds=rounds(3), warmup_rounds=0)
    benchmark.extra_info.update(pair=pair, losses=losses, mode=mode, batch=BATCH, steps=STEPS,
                                threads=torch.get_num_threads(), torch=torch.__version__)
    if benchmark.stats is not None:
        benchmark.extra_info["ms_per_step"] = 1000 * benchmark.stats.stats.median / STEPS


@pytest.mark.parametrize("losses", sorted(LOSSES))
def test_cache_read_cpu(benchmark, losses):
    """One step's record read: the mapped slice's views, copied into fresh tensors (logits; + pooled for CRD)."""
    cache = TeacherCache(cache_for("resnet32x4", losses, STEPS))
    shard = cache.shard(0)
    benchmark.pedantic(lambda: [cache.outputs(shard.raw(step)) for step in range(STEPS)], rounds=rounds(200),
                       warmup_rounds=5)
    benchmark.extra_info.update(losses=losses, steps=STEPS, record_bytes=cache.record_bytes)
    if benchmark.stats is not None:
        benchmark.extra_info["us_per_step"] = 1e6 * benchmark.stats.stats.median / STEPS

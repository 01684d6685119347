"""Where an engine step's time goes on the CPU: torch.profiler over a few training steps.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --pair resnet32x4:resnet8x4 --losses crd_kd --teacher live \
        --steps 3 [--output benchmarks/results/profile-cpu-crd_kd-live.txt]

Builds the trainer of ``benchmarks/test_teacher_cache.py`` (batch 64, CIFAR-100 shapes, CRD K = 16,384,
N = 50,000; the teacher live or read from a cache written for those batches), runs a warm-up epoch, then
profiles ``--steps`` steps and prints (and writes) the operators by self CPU time, and the time per step
spent in the top-level regions: the teacher's forward, the student's forward, the losses, backward, the
optimiser, and what is left (the engine's own Python, the data).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(__file__))
from test_teacher_cache import make_trainer  # noqa: E402


def instrument(trainer) -> None:
    """Label the regions of a step (teacher, student, losses, backward, optimiser) in the profile."""
    distiller = trainer.distiller
    teacher_fn, student_fn = distiller._teacher_outputs, distiller._features_s

    def teacher(*args, **kwargs):
        with record_function("## teacher"):
            return teacher_fn(*args, **kwargs)

    def student(*args, **kwargs):
        with record_function("## student forward"):
            return student_fn(*args, **kwargs)

    distiller._teacher_outputs, distiller._features_s = teacher, student
    for name, criterion in distiller.criteria.items():
        forward = criterion.forward

        def labelled(*args, _forward=forward, _name=name, **kwargs):
            with record_function(f"## loss {_name}"):
                return _forward(*args, **kwargs)

        criterion.forward = labelled
    step = trainer.optimizer.step

    def optimiser(*args, **kwargs):
        with record_function("## optimiser"):
            return step(*args, **kwargs)

    trainer.optimizer.step = optimiser
    backward = torch.Tensor.backward

    def labelled_backward(self, *args, **kwargs):
        with record_function("## backward"):
            return backward(self, *args, **kwargs)

    torch.Tensor.backward = labelled_backward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pair", default="resnet32x4:resnet8x4")
    parser.add_argument("--losses", default="crd_kd")
    parser.add_argument("--teacher", default="live", choices=("live", "cached"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output")
    args = parser.parse_args()
    teacher_name, student_name = args.pair.split(":")
    trainer = make_trainer(teacher_name, student_name, args.losses, args.teacher, args.steps)
    trainer.train_epoch(0)  # warm-up
    instrument(trainer)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("## epoch"):
            trainer.train_epoch(0)
    events = prof.key_averages()
    regions = sorted((e for e in events if e.key.startswith("## ")), key=lambda e: -e.cpu_time_total)
    lines = [f"# {args.pair} {args.losses}, teacher {args.teacher}, {args.steps} steps, batch 64, "
             f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)", "",
             "region                      ms per step (inclusive, wall clock; the machine was shared)"]
    epoch_ms = next(e.cpu_time_total for e in regions if e.key == "## epoch") / 1000 / args.steps
    for e in regions:
        lines.append(f"{e.key[3:]:<27} {e.cpu_time_total / 1000 / args.steps:9.1f}")
    named = sum(e.cpu_time_total for e in regions if e.key != "## epoch") / 1000 / args.steps
    lines.append(f"{'rest (engine, data, cache)':<27} {epoch_ms - named:9.1f}")
    lines += ["", events.table(sort_by="self_cpu_time_total", row_limit=30)]
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "w") as stream:
            stream.write(text + "\n")


if __name__ == "__main__":
    main()

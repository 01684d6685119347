"""Ensemble distillation on the embedded digits, measured: a student alone vs KD vs CRD from 1 and from 3 teachers.

Three resnet20 teachers are trained with the shipped digits recipe (``fastkd train digits student.name=resnet20``,
seeds 0, 1, 2); then, for every seed, resnet8 students on the same budget: alone (``fastkd train digits``), KD
(``digits_ensemble_kd``: CE 0.1 + KD 0.9 at T 4 against the ensemble's averaged prediction) and CRD
(``digits_ensemble_crd``: CE + 0.8 Σ_m CRD(T_m; S)), each from the first teacher alone (``teachers`` of one
entry: the single-teacher computation) and from all three. Everything goes through the CLI; each run folder's
``metrics.jsonl`` gives the last epoch's test top-1 (and its ``last.pt`` the teachers' evaluation), and
``fastkd probe`` the linear-probe top-1 of its frozen pooled feature (the representation, apart from the head).

    python benchmarks/ensemble_digits.py --seeds 0 1 2 --out benchmarks/results/ensemble-digits.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cli import fastkd  # noqa: E402

RUNS = {  # name: (recipe or None for the student alone, how many teachers, extra overrides)
    "alone": (None, 0, []),
    "KD, 1 teacher": ("digits_ensemble_kd", 1, []),
    "KD, 3 teachers": ("digits_ensemble_kd", 3, []),
    "CRD, 1 teacher": ("digits_ensemble_crd", 1, []),
    "CRD, 3 teachers": ("digits_ensemble_crd", 3, []),
    # the sum of three CRD terms weighs three times one against CE: the same total CRD weight as one teacher
    "CRD, 3 teachers, weight 0.8/3": ("digits_ensemble_crd", 3, ["losses.crd.weight=0.26667"]),
}



def last_record(folder: str) -> dict:
    return [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))][-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--runs", default="runs/bench-ensemble")
    parser.add_argument("--out", default="benchmarks/results/ensemble-digits.json")
    parser.add_argument("--reuse", action="store_true", help="read runs whose folder already holds last.pt")
    args = parser.parse_args()
    common = [f"epochs={args.epochs}", "--device", "cpu"]
    started = time.time()
    teachers = []
    for seed in range(3):
        folder = os.path.join(args.runs, f"teacher{seed}")
        if not (args.reuse and os.path.isfile(os.path.join(folder, "last.pt"))):
            fastkd("train", "digits", "student.name=resnet20", f"seed={seed}", *common, "--output", folder)
        teachers.append({"model": "resnet20", "seed": seed, "test_top1": last_record(folder)["test_top1"],
                         "checkpoint": os.path.join(folder, "last.pt")})
        print("teacher", teachers[-1], flush=True)
    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "machine": platform.machine(),
              "threads": torch.get_num_threads(), "device": "cpu", "epochs": args.epochs, "seeds": args.seeds,
              "teachers": teachers, "students": {}}
    for name, (recipe, count, extra) in RUNS.items():
        rows = []
        for seed in args.seeds:
            folder = os.path.join(args.runs, name.replace(", ", "-").replace(" ", "_").replace("/", "_"), f"seed{seed}")
            overrides = [f"seed={seed}", *extra, *common]
            if count:
                listed = ", ".join(f"{{name: resnet20, checkpoint: {t['checkpoint']}}}" for t in teachers[:count])
                overrides.append(f"teachers=[{listed}]")
            if not (args.reuse and os.path.isfile(os.path.join(folder, "last.pt"))):
                if recipe is None:
                    fastkd("train", "digits", *overrides, "--output", folder)
                else:
                    fastkd("distill", recipe, *overrides, "--output", folder)
            if not (args.reuse and os.path.isfile(os.path.join(folder, "probe.json"))):
                fastkd("probe", folder)  # the frozen student's pooled feature, read by a linear classifier
            last = last_record(folder)
            row = {"seed": seed, "test_top1": last["test_top1"],
                   "probe_top1": json.load(open(os.path.join(folder, "probe.json")))["top1"],
                   "images_per_s_last_epoch": round(last["images_per_s"], 1)}
            if count:
                evaluated = torch.load(os.path.join(folder, "last.pt"), weights_only=True)["teacher_eval"]
                row["teachers_top1"] = [m["top1"] for m in evaluated.get("members", [evaluated])]
                row["ensemble_top1"] = evaluated["top1"]
            rows.append(row)
            print(name, row, flush=True)
        tops, probes = [r["test_top1"] for r in rows], [r["probe_top1"] for r in rows]
        result["students"][name] = {"recipe": recipe or "digits (fastkd train)", "teachers": count, "overrides": extra,
                                    "model": "resnet8",
                                    "runs": rows, "top1_mean": statistics.mean(tops),
                                    "top1_std": statistics.stdev(tops) if len(tops) > 1 else 0.0,
                                    "top1_min": min(tops), "top1_max": max(tops),
                                    "probe_top1_mean": statistics.mean(probes),
                                    "probe_top1_std": statistics.stdev(probes) if len(probes) > 1 else 0.0}
    result["wall_seconds"] = round(time.time() - started, 1)
    with open(args.out, "w") as stream:
        json.dump(result, stream, indent=1)
    for name, summary in result["students"].items():
        print(f"{name:30s} top-1 {summary['top1_mean']:.2f} ± {summary['top1_std']:.2f} "
              f"(min {summary['top1_min']:.2f}, max {summary['top1_max']:.2f}); linear probe "
              f"{summary['probe_top1_mean']:.2f} ± {summary['probe_top1_std']:.2f}")


if __name__ == "__main__":
    main()

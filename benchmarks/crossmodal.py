"""Cross-modal transfer on the embedded data, measured: the student's linear-probe top-1 alone vs with CRD.

Luminance -> chrominance on the tinted digits (fastkd.data.tinted; 1,347 train / 450 test, shown at
``--size`` pixels): one teacher (resnet20) trained on CIELab L with the shipped recipe
``digits_crossmodal_teacher``, then, for every seed, resnet8 students on ab with the same budget: alone
(``digits_crossmodal_ab``, CE), with CRD (``digits_crossmodal_l2ab_crd``, CE + 0.8 CRD), and with CRD
alone (the paper's label-free transfer: ``losses.ce.weight=0``), and with FitNet's feature matching
(``digits_crossmodal_l2ab_hint``, CE + 100 hint); each student is then read by
``fastkd probe`` (linear classifier on its frozen pooled feature). Everything goes through the CLI.

    python benchmarks/crossmodal.py --seeds 0 1 2 --out benchmarks/results/crossmodal.json
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

RUNS = {  # name: (recipe, extra overrides)
    "alone (CE)": ("digits_crossmodal_ab", []),
    "CRD + CE": ("digits_crossmodal_l2ab_crd", []),
    "CRD only (no labels)": ("digits_crossmodal_l2ab_crd", ["losses.ce.weight=0"]),
    "hint + CE (feature matching)": ("digits_crossmodal_l2ab_hint", []),
}



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--runs", default="runs/bench-crossmodal")
    parser.add_argument("--out", default="benchmarks/results/crossmodal.json")
    parser.add_argument("--only", nargs="*", help="names of RUNS to measure (default: all)")
    parser.add_argument("--reuse", action="store_true",
                        help="read runs whose folder already holds probe.json instead of training them again")
    args = parser.parse_args()
    common = [f"data.image_size={args.size}", "--device", "cpu"]
    len_train = 1347 // 64 * 64  # images a training epoch sees (drop_last batches of 64)
    started = time.time()
    teacher_dir = os.path.join(args.runs, "teacher")
    if not (args.reuse and os.path.isfile(os.path.join(teacher_dir, "probe.json"))):
        fastkd("train", "digits_crossmodal_teacher", f"epochs={args.teacher_epochs}", "seed=0", *common,
               "--output", teacher_dir)
        fastkd("probe", teacher_dir)
    teacher_probe = json.load(open(os.path.join(teacher_dir, "probe.json")))
    metrics = [json.loads(line) for line in open(os.path.join(teacher_dir, "metrics.jsonl"))]
    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "machine": platform.machine(),
              "threads": torch.get_num_threads(), "device": "cpu", "image_size": args.size,
              "epochs": args.epochs, "seeds": args.seeds,
              "teacher": {"recipe": "digits_crossmodal_teacher", "model": "resnet20", "view": "L",
                          "epochs": args.teacher_epochs, "seed": 0, "test_top1": metrics[-1]["test_top1"],
                          "probe_top1": teacher_probe["top1"]},
              "students": {}}
    for name, (recipe, extra) in RUNS.items():
        if args.only and name not in args.only:
            continue
        rows = []
        for seed in args.seeds:
            folder = os.path.join(args.runs, recipe + ("-nolabels" if extra else ""), f"seed{seed}")
            overrides = [f"epochs={args.epochs}", f"seed={seed}", *extra, *common]
            if not recipe.endswith("_ab"):  # distilled from the L teacher
                overrides.append(f"teacher.checkpoint={os.path.join(teacher_dir, 'last.pt')}")
            if not (args.reuse and os.path.isfile(os.path.join(folder, "probe.json"))):
                fastkd("train" if recipe.endswith("_ab") else "distill", recipe, *overrides, "--output", folder)
                fastkd("probe", folder)
            probe = json.load(open(os.path.join(folder, "probe.json")))
            records = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
            last = records[-1]
            seconds = sum(len_train / r["images_per_s"] for r in records if r.get("images_per_s"))
            rows.append({"seed": seed, "probe_top1": probe["top1"], "probe_train_top1": probe["train_top1"],
                         "head_top1": last["test_top1"], "train_seconds": round(seconds, 1),
                         "images_per_s_last_epoch": round(last["images_per_s"], 1)})
            print(name, rows[-1], flush=True)
        probes = [r["probe_top1"] for r in rows]
        result["students"][name] = {
            "recipe": recipe, "overrides": extra, "model": "resnet8", "view": "ab", "runs": rows,
            "probe_top1_mean": statistics.mean(probes), "probe_top1_std": statistics.stdev(probes) if len(probes) > 1 else 0.0,
            "probe_top1_min": min(probes), "probe_top1_max": max(probes)}
    result["wall_seconds"] = round(time.time() - started, 1)
    with open(args.out, "w") as stream:
        json.dump(result, stream, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "students"}, indent=1))
    for name, summary in result["students"].items():
        print(f"{name:24s} probe top-1 {summary['probe_top1_mean']:.2f} ± {summary['probe_top1_std']:.2f} "
              f"(min {summary['probe_top1_min']:.2f}, max {summary['probe_top1_max']:.2f})")


if __name__ == "__main__":
    main()

"""IUSP end to end on the embedded digits (recipe ``digits_seq_iusp``): the GRU student alone against the same
student distilled with CE + w·IUSP from a 1-D conv teacher, each digit's 8 rows as 8 frames.

The teacher (rowconv) is trained once with the recipe's settings (CE alone, seed 0); then for each seed the
student (rowgru) alone (CE) and with IUSP at each weight, every run the recipe's 8 epochs, AdamW lr 0.01, cosine,
batch 64, through the engine (``make_trainer``, as ``fastkd train`` / ``fastkd distill`` do):

    OMP_NUM_THREADS=1 python benchmarks/iusp_digits.py --seeds 0,1,2 --weights 1,10,30,100 \\
        --output benchmarks/results/iusp-digits.json

Each line printed is one run (last-epoch test top-1 on the 450 test digits); the JSON holds every run and each
setting's mean over the seeds. There is no validation split: a weight picked from these numbers is picked on
the test set (the recipe's weight, 10, was).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

from fastkd.train.recipe import load_recipe
from fastkd.train.run import make_trainer


def run(overrides: list[str], output: str) -> dict:
    started = time.perf_counter()
    trainer = make_trainer(load_recipe("digits_seq_iusp", [*overrides, f"output={output}"]), device="cpu")
    last = trainer.fit(log=None)[-1]
    trainer.close()
    return {"top1": last["test_top1"], "top5": last["test_top5"], "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--weights", default="1,10,30,100")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    weights = [float(w) for w in args.weights.split(",")]
    results: dict = {"config": vars(args), "torch": torch.__version__, "machine": platform.machine(),
                     "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        teacher = run(["student.name=rowconv", "teacher=null", "losses={ce: 1.0}", "seed=0"],
                      os.path.join(folder, "teacher"))
        print(f"teacher rowconv: top-1 {teacher['top1']:.2f} ({teacher['seconds']:.1f} s)", flush=True)
        results["teacher"] = teacher
        checkpoint = os.path.join(folder, "teacher", "last.pt")
        settings = {"alone": ["teacher=null", "losses={ce: 1.0}"]}
        settings.update({f"iusp_w{w:g}": [f"teacher.checkpoint={checkpoint}", f"losses.iusp.weight={w}"]
                         for w in weights})
        for name, overrides in settings.items():
            runs = []
            for seed in seeds:
                result = run([*overrides, f"seed={seed}"], os.path.join(folder, f"{name}-{seed}"))
                print(f"{name} seed {seed}: top-1 {result['top1']:.2f} ({result['seconds']:.1f} s)", flush=True)
                runs.append(result)
            results["runs"][name] = {"runs": runs, "mean_top1": sum(r["top1"] for r in runs) / len(runs)}
            print(f"{name}: mean top-1 {results['runs'][name]['mean_top1']:.2f}", flush=True)
    if args.output:
        with open(args.output, "w") as stream:
            json.dump(results, stream, indent=1)


if __name__ == "__main__":
    main()

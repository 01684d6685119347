"""Online distillation on the embedded digits: ensemble and branch accuracies against branches
trained independently on the same budget.

Every run trains a multi-branch CIFAR ResNet of depth 6n+2 (default 20; ResNet-32 takes twice as
long) on scikit-learn's digits at their native 8×8 for the same epochs, batch and schedule: the
online recipes' SGD (lr 0.1, momentum 0.9, weight decay 5e-4) with ×0.1 at 1/2 and 3/4 of the
epochs, scaled down from 300 epochs (OKDDip's 80-epoch ramp scaled alike), batch 64:

- ``independent``: m separate single-branch networks (one branch = a plain CIFAR ResNet), each
  its own seed, cross entropy alone; their mean accuracy and the accuracy of their averaged logits;
- ``branches``: the multi-branch model (shared trunk) with Σ_i CE(z_i) only, mean ensemble;
- ``one``, ``mbde``, ``okddip``: the shipped cifar10_* recipes' losses on the same model.

    python benchmarks/online_accuracy.py --depth 20 --epochs 10 --batch-size 64 --seeds 0,1,2 \
        --output benchmarks/results/online-digits.json

Each line printed is one (method, seed); the JSON also holds each method's means over the seeds.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from fastkd.data.device import DeviceDataset, DeviceLoader
from fastkd.data.digits import Digits
from fastkd.models.multibranch import MultiBranchResNet
from fastkd.train.engine import Trainer, accuracy
from fastkd.train.objectives import build_objective
from fastkd.train.recipe import load_recipe

METHODS = {"branches": ("cifar10_online", "mean"), "one": ("cifar10_one", "gate"), "mbde": ("cifar10_mbde", "ffm"),
           "okddip": ("cifar10_okddip", "mean")}


def recipe_for(name: str, args, output: str):
    epochs = args.epochs
    overrides = [f"epochs={epochs}", f"data.batch_size={args.batch_size}", "data.name=digits",
                 f"schedule.milestones=[{epochs // 2},{3 * epochs // 4}]", f"seed={args.seed}", f"output={output}",
                 f"optim.lr={args.lr}"]
    if name == "cifar10_okddip":
        overrides.append(f"losses.okddip.ramp_epochs={80 * epochs / 300}")
    return load_recipe(name, overrides)


def train(recipe, model, loaders, seed: int) -> Trainer:
    torch.manual_seed(seed)
    objective = build_objective(recipe.losses, model, None, None, 0)
    trainer = Trainer(recipe, objective, *loaders, device="cpu", output=recipe.output)
    trainer.fit(log=None)
    return trainer


@torch.no_grad()
def ensemble_top1(models: list, test) -> float:
    hits = seen = 0
    for model in models:
        model.eval()
    for images, target, *_ in test:
        logits = torch.stack([m(images) for m in models]).mean(dim=0)
        hits += int(accuracy(logits, target, ks=(1,))[0])
        seen += len(target)
    return 100.0 * hits / seen


def run_method(method: str, args, m: int, loaders, output: str) -> dict:
    """One method at one seed: ensemble and branch top-1 (%) on the test split, and the seconds it took."""
    start = time.perf_counter()
    if method == "independent":
        recipe = recipe_for("cifar10_online", args, output)
        nets, tops = [], []
        for i in range(m):
            torch.manual_seed(args.seed * 100 + i)
            net = MultiBranchResNet(args.depth, num_branches=1, num_classes=10, aggregation="mean")
            tops.append(train(recipe, net, loaders, args.seed * 100 + i).evaluate()["top1"])
            nets.append(net)
        run = {"ensemble_top1": ensemble_top1(nets, loaders[1]), "branch_top1": tops}
    else:
        name, aggregation = METHODS[method]
        recipe = recipe_for(name, args, output)
        torch.manual_seed(args.seed)
        branches = m + 1 if method == "okddip" else m
        net = MultiBranchResNet(args.depth, num_branches=branches, num_classes=10, aggregation=aggregation)
        result = train(recipe, net, loaders, args.seed).evaluate()
        run = {"ensemble_top1": result["top1"], "branch_top1": [result[f"branch{i}_top1"] for i in range(branches)]}
    run["mean_branch_top1"] = sum(run["branch_top1"]) / len(run["branch_top1"])
    run["seconds"] = time.perf_counter() - start
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--branches", type=int, default=3, help="m (OKDDip uses m + 1: m peers and a leader)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=8, help="image side (digits are 8×8; 16, 32 repeat pixels)")
    parser.add_argument("--lr", type=float, default=0.1, help="the online recipes' 0.1 by default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each method runs once per seed")
    parser.add_argument("--methods", default="independent,branches,one,mbde,okddip")
    parser.add_argument("--output", help="a JSON file for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_set = DeviceDataset.from_dataset(Digits(train=True, size=args.size, channels=3), "cpu")
    test_set = DeviceDataset.from_dataset(Digits(train=False, size=args.size, channels=3), "cpu")
    padding = max(args.size // 8, 1)  # the CIFAR crop's padding 4 at 32×32, scaled to the image size
    results = {"config": dict(vars(args)), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
               "date": time.strftime("%Y-%m-%d"), "runs": {}, "means": {}}
    m = args.branches
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            args.seed = seed
            loaders = (DeviceLoader(train_set, args.batch_size, padding=padding, flip=False, seed=seed, drop_last=True),
                       DeviceLoader(test_set, 256, shuffle=False, augment=False))
            for method in args.methods.split(","):
                run = run_method(method, args, m, loaders, f"{tmp}/{method}-{seed}")
                results["runs"].setdefault(method, []).append(run)
                print(f"{method:<12} seed {seed}  ensemble {run['ensemble_top1']:6.2f}  branches "
                      f"{' '.join(f'{t:6.2f}' for t in run['branch_top1'])}  mean {run['mean_branch_top1']:6.2f}  "
                      f"{run['seconds']:5.0f}s", flush=True)
    for method, runs in results["runs"].items():
        results["means"][method] = {key: sum(r[key] for r in runs) / len(runs)
                                    for key in ("ensemble_top1", "mean_branch_top1")}
        print(f"{method:<12} mean over {len(runs)} seeds: ensemble {results['means'][method]['ensemble_top1']:6.2f}  "
              f"branch {results['means'][method]['mean_branch_top1']:6.2f}")
    if args.output:
        with open(args.output, "w") as stream:
            json.dump(results, stream, indent=1)


if __name__ == "__main__":
    main()

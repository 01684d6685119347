"""The ``fastkd`` command (also ``python -m fastkd``).

    fastkd distill                       the embedded default: digits, a teacher, then the student
                                         alone, with KD and with CRD+KD, accuracies side by side
    fastkd distill RECIPE [key=value..]  one distillation run (a shipped recipe name or a YAML file)
    fastkd train RECIPE [key=value..]    train a network alone (a teacher): losses = cross entropy
    fastkd eval MODEL CHECKPOINT [key=value..]   top-1 / top-5 of a checkpoint on the recipe's test set
    fastkd recipes                       list the shipped recipes
    fastkd build [--force]               compile the native kernels for the installed torch (else done on first use)
    fastkd doctor                        versions, backends, the native build, settings; exit 1 if something is missing

Many GPUs: ``torchrun --nproc_per_node=N -m fastkd distill RECIPE ...`` (see fastkd.train.distributed).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from fastkd.train.recipe import load_recipe, shipped

DEFAULT_RUNS = (
    ("student alone", {"losses": "{ce: 1.0}"}),
    ("student + KD", {"losses": "{ce: 0.1, kd: {weight: 0.9, temperature: 4.0}}"}),
    ("student + CRD + KD", {"losses": "{ce: 1.0, kd: {weight: 1.0, temperature: 4.0}, "
                                      "crd: {weight: 0.8, num_negatives: 1024, feat_dim: 64}}"}),
)


def _run(recipe_name: str, overrides: list[str], output: str, device: str | None) -> dict:
    from fastkd.train import distributed
    from fastkd.train.run import make_trainer

    recipe = load_recipe(recipe_name, overrides)
    trainer = make_trainer(recipe, device=device, output=output)
    last = os.path.join(output, "last.pt")
    if os.path.isfile(last):
        trainer.resume(last)
        if distributed.is_main():
            print(f"resumed from {last} at epoch {trainer.epoch}")
    start = time.perf_counter()
    try:
        history = trainer.fit()
    finally:
        trainer.close()
    final = history[-1] if history else {}
    return {"top1": final.get("test_top1"), "top5": final.get("test_top5"),
            "images_per_s": final.get("images_per_s"), "seconds": time.perf_counter() - start,
            "checkpoint": last}


def _table(rows: list[tuple[str, dict]]) -> str:
    lines = [f"{'run':<22} {'top-1':>7} {'top-5':>7} {'img/s':>8} {'time':>7}"]
    for name, r in rows:
        lines.append(f"{name:<22} {r['top1']:7.2f} {r['top5']:7.2f} {r['images_per_s'] or 0:8.0f} {r['seconds']:6.1f}s")
    return "\n".join(lines)


def distill_default(output: str, device: str | None, overrides: list[str]) -> list[tuple[str, dict]]:
    """The main job on the embedded digits: teacher, then three students on the same budget."""
    teacher = _run("digits", ["student.name=resnet20", "teacher=null", "losses={ce: 1.0}", *overrides],
                   os.path.join(output, "teacher"), device)
    rows = [("teacher (resnet20)", teacher)]
    for name, changes in DEFAULT_RUNS:
        tag = name.replace(" + ", "_").replace(" ", "_").lower()
        run_overrides = [f"{k}={v}" for k, v in changes.items()] + [f"teacher.checkpoint={teacher['checkpoint']}",
                                                                    *overrides]
        rows.append((name, _run("digits", run_overrides, os.path.join(output, tag), device)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastkd", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("distill", "train"):
        sub = commands.add_parser(name, help=f"{name} by a recipe")
        sub.add_argument("recipe", nargs="?", help="a shipped recipe name or a YAML file")
        sub.add_argument("overrides", nargs="*", help="key=value recipe overrides (e.g. optim.lr=0.1)")
        sub.add_argument("--output", help="run folder (default: the recipe's output)")
        sub.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    ev = commands.add_parser("eval", help="evaluate a checkpoint")
    ev.add_argument("model", help="a zoo model name (fastkd.models.names())")
    ev.add_argument("checkpoint")
    ev.add_argument("overrides", nargs="*", help="key=value recipe overrides (e.g. data.name=cifar100 data.root=...)")
    ev.add_argument("--recipe", default="digits")
    ev.add_argument("--device")
    commands.add_parser("recipes", help="list the shipped recipes")
    build = commands.add_parser("build", help="compile the native kernels for the installed torch")
    build.add_argument("--force", action="store_true", help="compile again even when a build is there")
    commands.add_parser("doctor", help="what fastkd can run here and what is missing")
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if "=" not in item or item.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:  # key=value overrides written after an option
        args.overrides = [*getattr(args, "overrides", []), *extra]

    if args.command == "recipes":
        print("\n".join(shipped()))
        return 0
    if args.command in ("build", "doctor"):
        from fastkd import _native, doctor

        return _native.build_command(args.force) if args.command == "build" else doctor.main()
    if args.command == "eval":
        from fastkd import models
        from fastkd.train.run import load_weights, loaders

        recipe = load_recipe(args.recipe, args.overrides)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        _, test, classes, _ = loaders(recipe, device, None)
        model = models.create(args.model, num_classes=classes).to(device)
        load_weights(model, args.checkpoint)
        from fastkd.train.engine import Trainer
        from fastkd.train.objectives import build_objective

        objective = build_objective({"ce": {"weight": 1.0}}, model, None, None, 0)  # multi-branch: per-branch too
        trainer = Trainer(recipe, objective, [], test, device=device)
        result = trainer.evaluate()
        print(f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}")
        for key in (k for k in result if k.endswith("_top1")):  # a multi-branch model's branches
            print(f"{key[:-5]}: top-1 {result[key]:.2f}  top-5 {result[key[:-1] + '5']:.2f}")
        return 0
    if args.recipe is not None and "=" in args.recipe:  # `fastkd distill epochs=3`: overrides only
        args.overrides, args.recipe = [args.recipe, *args.overrides], None
    if args.recipe is None:
        if args.command == "train":
            parser.error("train needs a recipe (fastkd recipes lists them)")
        rows = distill_default(args.output or "runs/digits", args.device, args.overrides)
        from fastkd.train import distributed

        main = distributed.is_main()
        distributed.teardown()
        if main:
            print()
            print(_table(rows))
        return 0
    overrides = list(args.overrides)
    if args.command == "train":  # alone, by cross entropy; online recipes keep their losses (they need no teacher)
        from fastkd.train.objectives import needs_teacher

        keep = not needs_teacher(load_recipe(args.recipe, overrides).losses)
        overrides += ["teacher=null"] + ([] if keep else ["losses={ce: 1.0}"])
    recipe_output = args.output or load_recipe(args.recipe, overrides).output
    from fastkd.train import distributed

    result = _run(args.recipe, overrides, recipe_output, args.device)
    main = distributed.is_main()
    distributed.teardown()  # no-op without torchrun
    if main:
        print(_table([(args.recipe, result)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

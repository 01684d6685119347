"""The ``fastkd`` command (also ``python -m fastkd``).

    fastkd distill                       the embedded default: digits, a teacher, then the student
                                         alone, with KD and with CRD+KD, accuracies side by side
    fastkd distill RECIPE [key=value..]  one distillation run (a shipped recipe name or a YAML file)
    fastkd train RECIPE [key=value..]    train a network alone (a teacher): losses = cross entropy
    fastkd show RECIPE [key=value..]     the resolved configuration and its run folder, without running
    fastkd cache-teacher RECIPE [key=value..] --epochs E --output DIR [--topk K] [--feature-dtype bf16]
                                         run the recipe's teacher once over the exact batches of epochs
                                         0..E-1 and store what its losses read (fastkd.train.teacher_cache)
    fastkd sweep RECIPE [RECIPE..] [key=value..] --cache DIR
                                         run each recipe with teacher.cache=DIR, results side by side
    fastkd eval RUN_DIR                  top-1 / top-5 of a run's student on its test set
    fastkd eval MODEL CHECKPOINT [key=value..]   the same for any checkpoint of a zoo model
    fastkd probe RUN_DIR [--epochs N] [--layer K]   linear probe of a run's frozen student (cross-modal runs)
    fastkd export RUN_DIR                the run's student as student.safetensors + student.json
    fastkd recipes                       list the shipped recipes
    fastkd models [PATTERN]              the model names recipes take: the zoo, tv:NAME, timm:NAME ('*vit*')
    fastkd stats DIR                     an image tree's mean / std, as data.mean= data.std= overrides
    fastkd build [--force]               compile the native kernels for the installed torch (else done on first use)
    fastkd doctor                        versions, backends, the native build, settings; exit 1 if something is missing

A run writes to its own folder, runs/<recipe>/<student>[-from-<teacher>]-<id> (<id>: a hash of
the resolved configuration), unless --output names one. Running the same command again resumes
it; another configuration pointed at an existing run's folder is refused, unless --fresh (the
old run moves aside) or --resume (continue it with the new configuration) says otherwise.

A mistake in a command prints what is wrong in a line or two (exit status 2); --debug (anywhere on
the line) shows the traceback instead.

Many GPUs: ``torchrun --nproc_per_node=N -m fastkd distill RECIPE ...`` (see fastkd.train.distributed).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from fastkd.train.recipe import Recipe, load_recipe, shipped

DEFAULT_RUNS = (
    ("student alone", {"losses": "{ce: 1.0}"}),
    ("student + KD", {"losses": "{ce: 0.1, kd: {weight: 0.9, temperature: 4.0}}"}),
    ("student + CRD + KD", {"losses": "{ce: 1.0, kd: {weight: 1.0, temperature: 4.0}, "
                                      "crd: {weight: 0.8, num_negatives: 1024, feat_dim: 64}}"}),
)


def resolve(command: str, recipe_name: str, overrides: list[str]) -> tuple[Recipe, list[str]]:
    """The recipe ``fastkd COMMAND RECIPE OVERRIDES`` runs, and the overrides that make it: ``train``
    trains the student alone (no teacher, cross entropy), except online recipes, which keep their losses."""
    overrides = list(overrides)
    if command == "train":
        from fastkd.train.objectives import needs_teacher

        recipe = load_recipe(recipe_name, overrides)
        told = [o for o in overrides if o.split("=", 1)[0].split(".")[0].strip() in ("teacher", "teachers")
                and o not in ("teacher=null", "teachers=null")]
        if told:
            raise ValueError(f"fastkd train trains {recipe_name}'s student ({recipe.student.name}) alone, so "
                             f"{', '.join(told)} would not be read. To train another model, name it as the student "
                             f"(student.name=...); to distil from a teacher, use fastkd distill")
        keep = not needs_teacher(recipe.losses)
        overrides += ["teacher=null"] + (["teachers=null"] if recipe.teachers else []) + \
            ([] if keep else ["losses={ce: 1.0}"])
    return load_recipe(recipe_name, overrides), overrides


def _say(message: str) -> None:
    from fastkd.train import distributed

    if distributed.is_main():
        print(message, flush=True)


def _run(command: str, recipe_name: str, overrides: list[str], output: str | None, device: str | None,
         mode: str = "auto") -> dict:
    """One run in its folder (see the module doc); its final accuracies, speed, time and checkpoint."""
    from fastkd.train import distributed
    from fastkd.train.run import make_trainer, training_device
    from fastkd.train.rundir import LAST, claim, default_folder, describe, reads_teacher

    recipe, overrides = resolve(command, recipe_name, overrides)
    if device is not None:
        training_device(device)  # a device this machine lacks is refused before anything is written
    distributed.setup(device)  # under torchrun: join the group first, so only rank 0 claims the folder
    description = describe(recipe)
    folder = output or recipe.output or default_folder(recipe_name, recipe, description)
    holding = (claim(folder, recipe, recipe_name, command, mode, description) if distributed.is_main()
               else contextlib.nullcontext())
    with holding as claimed:
        if claimed is not None and claimed.set_aside:
            _say(f"--fresh: the earlier run's files moved to {claimed.set_aside}")
        if claimed is not None and claimed.changed:
            _say("--resume: continuing with a changed configuration:\n  " + "\n  ".join(claimed.changed))
        models = f"student {recipe.student.name}"
        if reads_teacher(recipe) and recipe.teachers:
            models += f", an ensemble of {len(recipe.teachers)} teachers (" + ", ".join(
                f"{config.name} {config.checkpoint or config.weights}" for config in recipe.teachers) + ")"
        elif reads_teacher(recipe):
            models += f", teacher {recipe.teacher.name}" + (
                f" (cached in {recipe.teacher.cache})" if recipe.teacher.cache else
                f" ({recipe.teacher.checkpoint})" if recipe.teacher.checkpoint else "")
        _say(f"fastkd {command} {recipe_name}: {models} -> {folder}")
        trainer = make_trainer(recipe, device=device, output=folder)
        _say(f"data: {trainer.meta['data']}")
        cache = getattr(trainer.distiller, "teacher_cache", None)
        if cache is not None:  # what the run reads instead of its teacher, and (top-k) how far it is from it
            _say(cache.summary(recipe.epochs))
        distributed.barrier()  # every rank sees the folder as rank 0 left it
        last = os.path.join(folder, LAST)
        if os.path.isfile(last):
            try:
                trainer.resume(last)
            except ValueError as exc:  # a damaged file: say how to go on
                raise ValueError(f"{exc}\nThe run in {folder} cannot resume from it: restore the file, or start "
                                 "over there with --fresh (the damaged run's files move to a sibling folder)") from None
            done = " (complete: nothing left to train)" if trainer.epoch >= recipe.epochs else ""
            _say(f"resumed from {last} at epoch {trainer.epoch} of {recipe.epochs}{done}")
        start = time.perf_counter()
        try:
            history = trainer.fit()
        finally:
            trainer.close()
    final = history[-1] if history else {}
    return {"top1": final.get("test_top1"), "top5": final.get("test_top5"),
            "images_per_s": final.get("images_per_s"), "seconds": time.perf_counter() - start,
            "checkpoint": last, "folder": folder, "name": run_name(recipe)}


def run_name(recipe: Recipe) -> str:
    """What a run trains, by model and method: ``resnet8 + KD``, ``resnet8x4 + CRD + KD``, ``resnet20 alone``."""
    methods = [name.upper() for name in recipe.losses if name != "ce"]
    return recipe.student.name + (" + " + " + ".join(reversed(methods)) if methods else " alone")


def _table(rows: list[tuple[str, dict]]) -> str:
    width = max(22, *(len(name) for name, _ in rows))
    lines = [f"{'run':<{width}} {'top-1':>7} {'top-5':>7} {'img/s':>8} {'time':>7}"]
    for name, r in rows:
        lines.append(f"{name:<{width}} {r['top1']:7.2f} {r['top5']:7.2f} {r['images_per_s'] or 0:8.0f} "
                     f"{r['seconds']:6.1f}s")
    return "\n".join(lines)


def distill_default(output: str | None, device: str | None, overrides: list[str],
                    mode: str = "auto") -> list[tuple[str, dict]]:
    """The main job on the embedded digits: teacher, then three students on the same budget. Each run
    has its own folder: ``output/<run>`` when ``output`` is given, else the one derived from it."""
    def folder(tag: str) -> str | None:
        return os.path.join(output, tag) if output else None

    from fastkd.train.rundir import reads_teacher

    teacher = _run("train", "digits", ["student.name=resnet20", *overrides], folder("teacher"), device, mode)
    rows = [("teacher (resnet20)", teacher)]
    for name, changes in DEFAULT_RUNS:
        tag = name.replace(" + ", "_").replace(" ", "_").lower()
        run_overrides = [f"{k}={v}" for k, v in changes.items()]
        if reads_teacher(load_recipe("digits", run_overrides)):
            run_overrides.append(f"teacher.checkpoint={teacher['checkpoint']}")
        rows.append((name, _run("distill", "digits", [*run_overrides, *overrides], folder(tag), device, mode)))
    return rows


def show(command: str, recipe_name: str, overrides: list[str], output: str | None) -> str:
    """What ``fastkd COMMAND RECIPE OVERRIDES`` would run: its run folder, what it would do there, and
    the resolved recipe as YAML (a recipe file: ``fastkd distill`` takes it)."""
    import yaml

    from fastkd.train.rundir import default_folder, describe, differences, stored_description

    recipe, _ = resolve(command, recipe_name, overrides)
    description = describe(recipe)
    folder = output or recipe.output or default_folder(recipe_name, recipe, description)
    stored = stored_description(folder)
    if stored is None:
        state = "a new run"
    elif differences(stored, description):
        state = ("refused: the folder holds a run with another configuration:\n#   " +
                 "\n#   ".join(differences(stored, description)))
    else:
        state = "resumes the run there"
    tree = {**recipe.to_dict(), "output": folder}
    return f"# fastkd {command} {recipe_name}\n# run folder: {folder}\n# {state}\n" + \
        yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


def evaluate(target: str, checkpoint: str | None, overrides: list[str], recipe_name: str | None,
             device: str | None, which: str) -> dict:
    """Top-1 / top-5 of a run's student (``target`` a run folder) or of ``checkpoint`` for the zoo model
    ``target``, on the recipe's test set."""
    from fastkd import models
    from fastkd.train.engine import Trainer
    from fastkd.train.objectives import build_objective
    from fastkd.train.run import loaders, trained_student, training_device
    from fastkd.train.rundir import BEST, LAST

    if os.path.isdir(target):
        if checkpoint is not None:  # `fastkd eval RUN_DIR key=value`: the second word is an override
            overrides = [checkpoint, *overrides]
        recipe = load_recipe(target, overrides)
        model_name, weights = recipe.student.name, os.path.join(target, BEST if which == "best" else LAST)
    else:
        if checkpoint is None:
            raise ValueError(f"{target!r} is not a run folder; evaluate a checkpoint as: fastkd eval MODEL CHECKPOINT")
        recipe = load_recipe(recipe_name or "digits", overrides)
        model_name, weights = target, checkpoint  # student.kwargs.img_size=32 ... for a timm / torchvision model
    models.check(model_name)
    device = training_device(device)
    _, test, classes, _ = loaders(recipe, device, None)
    model = trained_student(recipe, model_name, weights, len(classes), test).to(device)
    objective = build_objective({"ce": {"weight": 1.0}}, model, None, None, 0)  # multi-branch: per-branch too
    trainer = Trainer(recipe, objective, [], test, device=device, output=os.path.dirname(os.path.abspath(weights)))
    return trainer.evaluate()


def image_stats(root: str, size: int | None = None, fit: str = "resize") -> str:
    """``fastkd stats``: the training images' per-channel mean and std in 0-1 units, as recipe overrides."""
    from fastkd.data.folder import ImageFolder

    train = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    images = ImageFolder(train, cache=True, size=size, fit=fit)
    mean, std = images.mean, images.std  # computed over the cached images when the folder was opened
    n, h, w, c = images.data.shape
    values = (lambda xs: "[" + ", ".join(f"{x / 255:.4f}" for x in xs) + "]")
    return (f"{train}: {n} images, {len(images.classes)} classes, {h}x{w}, {c} channel{'s' if c > 1 else ''}\n"
            f"data.mean={values(mean)} data.std={values(std)}")


FEATURE_DTYPES = {"fp16": "float16", "float16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}


def cache_teacher(recipe_name: str, overrides: list[str], epochs: int, output: str, topk: int | None,
                  feature_dtype: str | None, features: str | None, device: str | None):
    """``fastkd cache-teacher``: see :func:`fastkd.train.cache_teacher.cache_teacher`."""
    from fastkd.train import distributed
    from fastkd.train.cache_teacher import cache_teacher as write

    recipe = load_recipe(recipe_name, overrides)
    extra = [name.strip() for name in (features or "").split(",") if name.strip()]
    cache = write(recipe, output, epochs, topk=topk, feature_dtype=FEATURE_DTYPES.get(feature_dtype, feature_dtype),
                  features=extra, recipe_name=recipe_name, device=device, log=_say)
    _say(cache.summary())
    _say(f"{cache.epochs(distributed.rank())} epochs; serves {', '.join(cache.manifest['serves'])}. Use it with: "
         f"fastkd distill RECIPE teacher.cache={output}")
    distributed.teardown()
    return cache


def sweep(recipes: list[str], overrides: list[str], cache: str, device: str | None, mode: str = "auto"):
    """``fastkd sweep``: each recipe distilled from the teacher cache ``cache``, one after the other, each in
    its own run folder; their rows."""
    rows = []
    for name in recipes:
        result = _run("distill", name, [*overrides, f"teacher.cache={cache}"], None, device, mode)
        rows.append((f"{name}: {result['name']}", result))
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastkd", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("distill", "train", "show"):
        sub = commands.add_parser(name, help=f"{name} by a recipe" if name != "show" else
                                  "print the resolved configuration and run folder of distill (or --train)")
        sub.add_argument("recipe", nargs="?", help="a shipped recipe name, a YAML file or a run folder")
        sub.add_argument("overrides", nargs="*", help="key=value recipe overrides (e.g. optim.lr=0.1)")
        sub.add_argument("--output", help="run folder (default: derived from the recipe, the models and the "
                                          "configuration's hash)")
        if name == "show":
            sub.add_argument("--train", action="store_true", help="show what `fastkd train` would run")
            continue
        sub.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
        again = sub.add_mutually_exclusive_group()
        again.add_argument("--fresh", action="store_true",
                           help="start over in an existing run folder (its files move to a sibling folder)")
        again.add_argument("--resume", action="store_true",
                           help="continue the run in the folder even though the configuration changed")
    ct = commands.add_parser("cache-teacher", help="store a recipe's teacher outputs for the exact batches of its "
                                                   "first epochs (teacher.cache=DIR reads them)")
    ct.add_argument("recipe", help="a shipped recipe name, a YAML file or a run folder")
    ct.add_argument("overrides", nargs="*", help="key=value recipe overrides (teacher.checkpoint=..., seed=...)")
    ct.add_argument("--epochs", type=int, required=True, help="cache epochs 0..E-1 (a run of E epochs or fewer)")
    ct.add_argument("--output", required=True, help="the cache folder (resumed / extended when it holds this cache)")
    ct.add_argument("--topk", type=int, help="store the K largest logits and the remaining mass instead of all "
                                             "(approximate; see the README)")
    ct.add_argument("--feature-dtype", choices=sorted(FEATURE_DTYPES), help="store features in half precision "
                                                                           "(approximate; default: as computed)")
    ct.add_argument("--features", help="teacher views to store beyond the recipe's losses' (comma-separated: "
                                       "logits_t,pooled_t,last_block_t,blocks_t,hint_layer_t,maps_t)")
    ct.add_argument("--device")
    sw = commands.add_parser("sweep", help="distil several recipes from one teacher cache")
    sw.add_argument("recipes", nargs="+", help="recipes (names, files) and key=value overrides for all of them")
    sw.add_argument("--cache", required=True, help="the teacher cache folder (fastkd cache-teacher)")
    sw.add_argument("--device")
    ev = commands.add_parser("eval", help="evaluate a run folder or a checkpoint")
    ev.add_argument("target", help="a run folder, or a zoo model name (fastkd.models.names()) followed by a checkpoint")
    ev.add_argument("checkpoint", nargs="?", help="with a model name: its checkpoint (.pt, .pth or .safetensors)")
    ev.add_argument("overrides", nargs="*", help="key=value recipe overrides (e.g. data.name=cifar100 data.root=...)")
    ev.add_argument("--recipe", help="with a model name: the recipe whose test set to use (default: digits)")
    ev.add_argument("--from", dest="which", choices=("last", "best"), default="last",
                    help="with a run folder: its last.pt (default) or best.pt")
    ev.add_argument("--device")
    ex = commands.add_parser("export", help="write a run's student as safetensors + a JSON of its model and classes")
    ex.add_argument("run", help="a run folder")
    ex.add_argument("--output", help="folder to write to (default: the run folder)")
    ex.add_argument("--from", dest="which", choices=("last", "best"), default="last",
                    help="the run's last.pt (default) or best.pt")
    pr = commands.add_parser("probe", help="linear probe of a run's frozen student: top-1 of a linear classifier "
                                           "on its pooled features (written to RUN_DIR/probe.json)")
    pr.add_argument("run", help="a run folder")
    pr.add_argument("--epochs", type=int, default=300, help="full-batch Adam steps of the linear classifier (300)")
    pr.add_argument("--layer", type=int, default=-1,
                    help="which feature of the student's list: -1 the pooled penultimate (default), -2 the last stage ...")
    pr.add_argument("--from", dest="which", choices=("last", "best"), default="last",
                    help="the run's last.pt (default) or best.pt")
    pr.add_argument("--device")
    commands.add_parser("recipes", help="list the shipped recipes")
    listed = commands.add_parser("models", help="list the model names student.name / teacher.name take")
    listed.add_argument("pattern", nargs="?", help="a shell-style pattern: '*vit*', 'timm:deit*', 'tv:*' (default: all)")
    stats = commands.add_parser("stats", help="the per-channel mean / std of an image tree, as data.mean / data.std")
    stats.add_argument("root", help="an image tree: root/train/<class>/<image> (or root/<class>/<image>)")
    stats.add_argument("--image-size", type=int, help="bring the images to this size first, as data.image_size")
    stats.add_argument("--fit", choices=("resize", "pad", "crop"), default="resize", help="as data.fit")
    build = commands.add_parser("build", help="compile the native kernels for the installed torch")
    build.add_argument("--force", action="store_true", help="compile again even when a build is there")
    commands.add_parser("doctor", help="what fastkd can run here and what is missing")
    return parser


def _command(args, parser) -> int:
    if args.command == "recipes":
        print("\n".join(shipped()))
        return 0
    if args.command == "models":
        from fastkd.models.sources import listing

        found, problems = listing(args.pattern)
        if found:
            print("\n".join(found))
        for line in problems:
            print(f"fastkd: {line}", file=sys.stderr)
        if not found:
            print(f"fastkd: no model name matches {args.pattern!r}", file=sys.stderr)
        return 0 if found else 1
    if args.command == "stats":
        print(image_stats(args.root, args.image_size, args.fit))
        return 0
    if args.command in ("build", "doctor"):
        from fastkd import _native, doctor

        return _native.build_command(args.force) if args.command == "build" else doctor.main()
    if args.command == "export":
        from fastkd.train.export import export

        weights, info = export(args.run, args.output, args.which)
        print(f"wrote {weights} and {info}")
        return 0
    if args.command == "cache-teacher":
        cache_teacher(args.recipe, args.overrides, args.epochs, args.output, args.topk, args.feature_dtype,
                      args.features, args.device)
        return 0
    if args.command == "sweep":
        names = [r for r in args.recipes if "=" not in r]
        rows = sweep(names, [r for r in args.recipes if "=" in r] + getattr(args, "overrides", []), args.cache,
                     args.device)
        print()
        print(_table(rows))
        return 0
    if args.command == "probe":
        from fastkd.train.probe import probe_run

        result = probe_run(args.run, args.epochs, args.layer, args.which, args.device)
        print(f"linear probe of {result['student']} (feature {result['layer']}, {result['dim']}-d): "
              f"top-1 {result['top1']:.2f} (train {result['train_top1']:.2f}); written to "
              f"{os.path.join(args.run, 'probe.json')}")
        return 0
    if args.command == "eval":
        result = evaluate(args.target, args.checkpoint, args.overrides, args.recipe, args.device, args.which)
        print(f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}")
        for key in (k for k in result if k.endswith("_top1") and k != "top1"):  # a multi-branch model's branches
            print(f"{key[:-5]}: top-1 {result[key]:.2f}  top-5 {result[key[:-1] + '5']:.2f}")
        return 0
    if args.recipe is not None and "=" in args.recipe:  # `fastkd distill epochs=3`: overrides only
        args.overrides, args.recipe = [args.recipe, *args.overrides], None
    if args.command == "show":
        command = "train" if args.train else "distill"
        print(show(command, args.recipe or "digits", args.overrides, args.output), end="")
        return 0
    mode = "fresh" if args.fresh else "resume" if args.resume else "auto"
    from fastkd.train import distributed

    if args.recipe is None:
        if args.command == "train":
            parser.error("train needs a recipe (fastkd recipes lists them)")
        rows = distill_default(args.output, args.device, args.overrides, mode)
    else:
        result = _run(args.command, args.recipe, args.overrides, args.output, args.device, mode)
        rows = [(result["name"], result)]
    main = distributed.is_main()
    distributed.teardown()  # no-op without torchrun
    if main:
        print()
        print(_table(rows))
    return 0


def _warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, ``fastkd: warning: ...`` (the file and line only with --debug)."""
    print(f"fastkd: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command; a mistake in it (a recipe, key, value, path, checkpoint or device) or a run that
    cannot go on prints what is wrong in a line or two and returns 2 (1 for a diverged run), without a
    traceback unless ``--debug`` (anywhere on the line) or ``FASTKD_DEBUG=1`` asks for one."""
    import warnings

    from fastkd.train.engine import TrainingDiverged
    from fastkd.train.rundir import RunFolderError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FASTKD_DEBUG") == "1"
    argv = [item for item in argv if item != "--debug"]
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if "=" not in item or item.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:  # key=value overrides written after an option
        args.overrides = [*getattr(args, "overrides", []), *extra]
    if debug:
        return _command(args, parser)
    shown = warnings.showwarning
    warnings.showwarning = _warning
    try:
        return _command(args, parser)
    except TrainingDiverged as exc:
        print(f"fastkd: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError, ImportError, RunFolderError) as exc:
        print(f"fastkd: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - not a mistake in the command: fastkd's own, say so
        print(f"fastkd: internal error ({type(exc).__name__}): {exc}\nRun the command again with --debug for the "
              "traceback, and report it.", file=sys.stderr)
        return 3
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())

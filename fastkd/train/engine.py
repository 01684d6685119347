"""The training loop: optimiser, learning-rate schedule, AMP, evaluation, checkpoints and resume.

:class:`Trainer` runs a :class:`~fastkd.train.distiller.Distiller` over batches from any iterable
of ``(images, labels[, index[, contrast_idx]])`` tuples (a loader with ``set_epoch(epoch)`` gets
it called, so each epoch's order is a function of the seed and the epoch and a resumed run sees
the same batches). A batch of a run with a teacher cache ends with a dict, the teacher's outputs
(:class:`~fastkd.train.teacher_cache.CachedBatches`), handed to the distiller as ``teacher=``. Before the first epoch the teacher (when there is one) is evaluated on the test
set and its accuracy logged, so a wrong checkpoint or normalisation shows at once. Each epoch ends
with an evaluation and an atomic checkpoint ``last.pt`` holding everything a resumed run needs:
student, the losses' parameters and state (CRD's banks, Z and sampler offset), optimiser, gradient
scaler, RNG states, epoch and the metrics so far; ``best.pt`` holds the student of the epoch with
the best test top-1 so far.

``cuda_graph=true`` runs each step through :class:`~fastkd.train.graph.GraphedStep` (the whole
step captured in a CUDA graph, the learning rate a device tensor, a capturable optimiser); it
needs a CUDA device and bf16 or fp32 (fp16's gradient scaler checks for infinities on the host),
and falls back to eager steps with a warning otherwise. Losses with an initialisation stage (FT,
AB, FSP; see :meth:`~fastkd.train.distiller.Distiller.init_stage`) get it before the first epoch,
for the recipe's ``init_epochs``.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from typing import Iterable

import torch

from fastkd._checks import value_checks
from fastkd.models.ensemble import TeacherEnsemble
from fastkd.train import distributed, loggers, progress
from fastkd.train.checkpoint import rng_state, save_checkpoint, set_rng_state
from fastkd.train.distiller import Distiller
from fastkd.train.graph import GraphedStep
from fastkd.train.metrics import MetricsLog
from fastkd.train.optim import make_optimizer
from fastkd.train.recipe import Recipe
from fastkd.train.rundir import BEST, LAST, default_folder


class TrainingDiverged(RuntimeError):
    """The training loss stopped being a finite number; nothing of the epoch it happened in is saved."""


def learning_rate(recipe: Recipe, epoch: float) -> float:
    """The learning rate at a (fractional) epoch: linear warm-up, then multistep or cosine."""
    base, schedule = recipe.optim.lr, recipe.schedule
    if schedule.warmup_epochs and epoch < schedule.warmup_epochs:
        return base * (epoch + 1e-8) / schedule.warmup_epochs
    if schedule.name == "cosine":
        span = max(recipe.epochs - schedule.warmup_epochs, 1)
        return 0.5 * base * (1 + math.cos(math.pi * (epoch - schedule.warmup_epochs) / span))
    return base * schedule.gamma ** sum(epoch >= m for m in schedule.milestones)


def amp_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 where the GPU supports it, else fp16 (with a grad scaler); none on CPU."""
    if recipe.amp == "off" or (recipe.amp == "auto" and device.type != "cuda"):
        return None
    if recipe.amp == "fp16" or (recipe.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def accuracy(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is among the top-k logits, for each k."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == target.unsqueeze(1)
    return [hits[:, :k].any(dim=1).sum() for k in ks]


def plain_recipe(distiller: torch.nn.Module, optimizer: torch.optim.Optimizer, epochs) -> Recipe:
    """The :class:`Recipe` a trainer built without one records (run folder, checkpoints): ``epochs``, the
    models' class names, the losses' weights and the optimiser's kind and first learning rate."""
    from fastkd.train.recipe import ModelConfig, OptimConfig

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"Trainer without a recipe needs epochs= (an int >= 1), got {epochs!r}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("Trainer without a recipe needs optimizer= (a torch.optim.Optimizer over "
                        f"distiller.trainable_parameters()), got {type(optimizer).__name__}")
    group = optimizer.param_groups[0]
    optim = OptimConfig(name="adamw" if isinstance(optimizer, torch.optim.AdamW) else "sgd", lr=float(group["lr"]),
                        momentum=float(group.get("momentum", 0.0) or 0.0),
                        weight_decay=float(group.get("weight_decay", 0.0)))
    teacher = getattr(distiller, "teacher", None)
    weights = getattr(distiller, "weights", {}) or {}
    return Recipe(student=ModelConfig(type(distiller.student).__name__),
                  teacher=ModelConfig(type(teacher).__name__) if teacher is not None else None,
                  losses={name: {"weight": w} for name, w in weights.items()} or {"ce": {"weight": 1.0}},
                  optim=optim, epochs=epochs)


class Trainer:
    """Trains ``distiller``'s student (and its losses' parameters) by ``recipe``; see the module doc.

    ``output``: the run folder (the recipe's ``output``, else one derived from the recipe:
    :func:`fastkd.train.rundir.default_folder`). ``meta``: what an export of the student needs to know,
    saved in the checkpoints (``{"student": model name, "num_classes": ..., "classes": [names]}``).

    Without a recipe: ``Trainer(distiller, train_data, test_data, optimizer=..., epochs=...,
    schedule=...)``. The optimiser must hold ``distiller.trainable_parameters()`` (the student's and
    the losses' projectors, embeds, regressors). ``schedule``: a function of the (fractional) epoch
    giving a factor of each parameter group's initial learning rate, set at every step; or a
    ``torch.optim.lr_scheduler`` scheduler, stepped after each epoch; ``None`` keeps the learning
    rate. The rest (AMP on CUDA, evaluation and checkpoints every epoch) is a recipe's default.
    """

    def __init__(self, recipe: Recipe | torch.nn.Module, distiller: Distiller | Iterable | None = None,
                 train_data: Iterable | None = None, test_data: Iterable | None = None,
                 device: str | torch.device = "cpu", output: str | None = None, meta: dict | None = None, *,
                 optimizer: torch.optim.Optimizer | None = None, schedule=None, epochs: int | None = None):
        if not isinstance(recipe, Recipe) and isinstance(recipe, torch.nn.Module):  # Trainer(distiller, train, test)
            if test_data is not None:
                device = test_data
            recipe, distiller, train_data, test_data = None, recipe, distiller, train_data
        if recipe is None:
            recipe = plain_recipe(distiller, optimizer, epochs)
        elif optimizer is not None or schedule is not None or epochs is not None:
            raise ValueError("give either a recipe or optimizer= / schedule= / epochs=, not both (the recipe's optim, "
                             "schedule and epochs say the same)")
        if train_data is None or test_data is None:
            raise TypeError("Trainer needs train_data and test_data (iterables of (images, labels[, index]) batches)")
        self.recipe, self.distiller = recipe, distiller.to(device)
        self.train_data, self.test_data = train_data, test_data
        self.device = torch.device(device)
        self.output = output or recipe.output or default_folder(None, recipe)
        self.meta = {"student": recipe.student.name, **(meta or {})}
        # DDP(distiller) under torchrun (fastkd.train.distributed), else the distiller itself
        self.step_module = distributed.wrap(self.distiller, self.device, recipe.sync_bn)
        self.amp = amp_dtype(recipe, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.graph: GraphedStep | None = None
        self.lr: torch.Tensor | None = None
        if recipe.cuda_graph and distributed.active():
            warnings.warn("cuda_graph=true is not supported under torch.distributed yet (DDP's gradient "
                          "all-reduce would be captured): the run uses eager steps", RuntimeWarning, stacklevel=2)
        elif recipe.cuda_graph and self.amp == torch.float16:
            warnings.warn("cuda_graph=true does not work with fp16 autocast (its gradient scaler reads the "
                          "gradients on the host; use amp=bf16 or amp=off): the run uses eager steps",
                          RuntimeWarning, stacklevel=2)
        elif recipe.cuda_graph and self.device.type != "cuda":
            warnings.warn("cuda_graph=true needs a CUDA device: the run uses eager steps, the same run as "
                          "cuda_graph=false", RuntimeWarning, stacklevel=2)
        self.schedule = schedule
        if optimizer is not None:
            self.optimizer = optimizer
            self._check_optimizer()
            self._initial_lrs = [group["lr"] for group in optimizer.param_groups]
        else:
            self.optimizer = make_optimizer(recipe, distiller.trainable_parameters())
            self._initial_lrs = None
        if schedule is not None and not (callable(schedule) or hasattr(schedule, "step")):
            raise TypeError(f"schedule must be a function of the epoch or a torch lr scheduler, got {schedule!r}")
        if recipe.cuda_graph and self.device.type == "cuda" and self.amp != torch.float16 and not distributed.active():
            self.use_graph_step()
        stage = getattr(distiller, "init_stage", None)  # FT / AB / FSP: run before the first epoch
        self.init_stage = stage() if stage is not None else None
        self.init_done = self.init_stage is None or recipe.init_epochs == 0
        self.epoch = self._epoch = 0
        self._teacher_keys: tuple[str, ...] = ()
        self.history: list[dict] = []
        self.teacher_eval: dict | None = None  # the teacher's test accuracy, measured before the first epoch
        # a progress bar (or line) refreshed once a second, on rank 0 (fastkd.train.progress)
        self.progress = progress.wanted()

    def _check_optimizer(self) -> None:
        """A plain optimiser must train every trainable parameter of the distiller (a loss's projector too)."""
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        left = [p for p in self.distiller.trainable_parameters() if p.requires_grad and id(p) not in held]
        if left:
            raise ValueError(f"the optimizer leaves out {len(left)} trainable parameter tensors of the distiller (its "
                             "student's, or its losses' projectors / embeds / regressors): build it over "
                             "distiller.trainable_parameters()")

    def _set_lr(self, epoch: float) -> float:
        """Set the learning rate for a (fractional) epoch, by the recipe or the plain schedule; return it."""
        if self._initial_lrs is None:
            lr = learning_rate(self.recipe, epoch)
            if self.graph is None:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            return lr
        if callable(self.schedule) and not hasattr(self.schedule, "step"):
            factor = float(self.schedule(epoch))
            for group, initial in zip(self.optimizer.param_groups, self._initial_lrs):
                group["lr"] = initial * factor
        return float(self.optimizer.param_groups[0]["lr"])

    def use_graph_step(self) -> None:
        """Steps through :class:`GraphedStep`: the learning rate becomes a device tensor and the optimiser
        a capturable one that reads it. On CUDA the step is then captured and replayed; on another device
        the same machinery runs eagerly (the trainer sets this up by itself only on CUDA)."""
        self.lr = torch.tensor(self.recipe.optim.lr, dtype=torch.float32, device=self.device)
        self.optimizer = make_optimizer(self.recipe, self.distiller.trainable_parameters(), lr=self.lr)
        self.graph = GraphedStep(self._step, self.optimizer, self.device)

    # --- one epoch ----------------------------------------------------------------------------
    def _autocast(self, cache: bool = True):
        """The recipe's autocast (a no-op without AMP); ``cache=False`` inside a CUDA-graph capture."""
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None,
                              cache_enabled=cache)

    def _batches(self, data: Iterable, epoch: int):
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        for batch in data:
            yield tuple(t.to(self.device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch)

    def train_epoch(self, epoch: int) -> dict:
        self.distiller.train()
        sums: dict[str, torch.Tensor] = {}
        seen, start = 0, time.perf_counter()
        steps = len(self.train_data) if hasattr(self.train_data, "__len__") else None
        shown = progress.EpochProgress(epoch, steps, mode=self.progress) if self.progress else None
        # the epoch as the losses read it (DKD's warm-up, OKDDip's ramp): counted from 1, as the published
        # trainers count it (mdistiller's starts at 1); the loop's own `epoch` counts from 0
        self._epoch = epoch + 1
        # the loss sum is looked at after every step on the CPU (no cost), at most once a second on a GPU
        # (a host sync), and by every rank at the epoch's end under torch.distributed (then they stop together)
        watch = not distributed.active()
        finite_until, looked, done = 0, start, 0
        for step, batch in enumerate(self._batches(self.train_data, epoch)):
            images, target, *rest = self._flat(batch)
            lr = self._set_lr(epoch + (step / steps if steps else 0.0))
            # the first step of an epoch validates the batch's values (NaN, index ranges); the rest skip
            # those data-reading checks, which are host syncs on a GPU
            checks = contextlib.nullcontext() if step == 0 else value_checks(False)
            with checks:
                if self.graph is not None:
                    self.lr.fill_(lr)
                    total, parts = self.graph((images, target, *rest), key=epoch)
                else:
                    self.optimizer.zero_grad(set_to_none=True)
                    total, parts = self._step(images, target, *rest)
            for name, value in (("loss", total), *parts.items()):
                sums[name] = sums.get(name, 0) + value.float() * images.shape[0]
            seen, done = seen + images.shape[0], step + 1
            if watch and (self.device.type == "cpu" or time.perf_counter() - looked > progress.REFRESH_S):
                self._check_finite(sums["loss"], epoch, finite_until, step + 1)
                finite_until, looked = step + 1, time.perf_counter()
            if shown is not None:
                shown.update(step + 1, seen, sums["loss"])  # reads the loss sum once a second at most
        if shown is not None:
            shown.close()
        if hasattr(self.schedule, "step"):  # a torch lr scheduler: once per epoch
            self.schedule.step()
        elapsed = time.perf_counter() - start
        totals = distributed.reduce_sums({**sums, "seen": seen})  # over the ranks; one sync per epoch
        seen = int(totals.pop("seen"))
        self._check_finite(totals.get("loss", 0.0), epoch, finite_until, done)
        metrics = {f"train_{name}": (value / max(seen, 1)).item() for name, value in totals.items()}
        metrics.update(lr=lr if seen else None, images_per_s=seen / elapsed if elapsed else None)
        return metrics

    def _check_finite(self, loss_sum, epoch: int, first: int, last: int) -> None:
        """Raise :class:`TrainingDiverged` when ``loss_sum`` (the epoch's losses so far, steps up to ``first``
        known to be finite) is not finite: the first bad step is in ``first + 1 .. last``."""
        value = float(loss_sum)
        if math.isfinite(value):
            return
        where = f"step {last}" if last == first + 1 else f"a step between {first + 1} and {last}"
        kept = (f"{LAST} still holds epoch {self.epoch}, the last good one" if self.epoch else
                "no epoch of this run had finished")
        raise TrainingDiverged(
            f"training diverged: the loss is {value} at epoch {epoch + 1}, {where}; the run stops here and saves "
            f"nothing of this epoch ({kept}). Usual causes: a learning rate too high for the batch size "
            "(optim.lr), fp16 overflow (amp=bf16 or amp=off), a loss weight far from the recipe's, or inputs "
            "that are not finite.")

    def _flat(self, batch: tuple) -> tuple:
        """A batch as tensors only: the teacher outputs a cached run's batch ends with (a dict, see
        :mod:`fastkd.train.teacher_cache`) become trailing tensors (so :class:`GraphedStep` copies them into
        its static inputs like the images), their names kept in ``_teacher_keys`` for :meth:`_step`."""
        if batch and isinstance(batch[-1], dict):
            teacher = batch[-1]
            self._teacher_keys = tuple(teacher)
            return (*batch[:-1], *teacher.values())
        self._teacher_keys = ()
        return batch

    def _step(self, images: torch.Tensor, target: torch.Tensor, *rest) -> tuple[torch.Tensor, dict]:
        """Forward, backward and optimiser update of one batch (gradients already reset); no host
        sync, so :class:`GraphedStep` can capture it. Returns the detached total and terms."""
        extra = {}
        if self._teacher_keys:  # the batch's cached teacher outputs, flattened by _flat
            count = len(self._teacher_keys)
            extra["teacher"] = dict(zip(self._teacher_keys, rest[-count:]))
            rest = rest[:-count]
        with self._autocast(cache=self.graph is None):
            total, parts, _ = self.step_module(images, target, *rest, epoch=self._epoch, **extra)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total.detach(), {name: value.detach() for name, value in parts.items()}

    def run_init_stage(self, log=print) -> None:
        """The initialisation stage of FT / AB / FSP (RepDistiller's init()): ``init_epochs`` epochs
        of the recipe's optimiser at its base learning rate over the stage's modules."""
        modules, loss_fn = self.init_stage
        optimizer = make_optimizer(self.recipe, modules.parameters())
        for epoch in range(self.recipe.init_epochs):
            self.distiller.train(False)
            modules.train()
            total, seen = 0.0, 0
            for batch in self._batches(self.train_data, epoch):
                images, teacher = batch[0], batch[-1] if isinstance(batch[-1], dict) else None
                with self._autocast():
                    loss = loss_fn(images, teacher) if teacher is not None else loss_fn(images)
                optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                distributed.average_gradients(modules.parameters())  # the stage runs outside DDP
                self.scaler.step(optimizer)
                self.scaler.update()
                total, seen = total + loss.detach().float() * images.shape[0], seen + images.shape[0]
            if log is not None:
                log(f"init_epoch={epoch + 1}/{self.recipe.init_epochs} init_loss={float(total) / max(seen, 1):.4g}")
        self.distiller.train()
        self.init_done = True

    @torch.no_grad()
    def evaluate(self, data: Iterable | None = None, model: torch.nn.Module | None = None) -> dict:
        """Top-1 / top-5 accuracy (%) of the student (or of ``model``) on ``data`` (the test set by default);
        an objective with ``eval_outputs(images) → {name: logits}`` (a multi-branch student) also gets
        ``{name}_top1``…"""
        student = self.distiller.student if model is None else model
        outputs = (getattr(self.distiller, "eval_outputs", None) if model is None else None) or \
            (lambda images: {"": student(images)})
        was = student.training
        student.eval()
        hits: dict[str, list] = {}
        seen = 0
        for images, target, *_ in self._batches(data if data is not None else self.test_data, 0):
            with self._autocast():
                heads = outputs(images)
            for name, logits in heads.items():
                hit1, hit5 = accuracy(logits.float(), target)
                total = hits.setdefault(name, [0, 0])
                total[0], total[1] = total[0] + hit1, total[1] + hit5
            seen += images.shape[0]
        student.train(was)
        # the ranks saw slices: one all-reduce of every head's counts
        counts = {"seen": seen}
        for name, (hit1, hit5) in (hits or {"": (0, 0)}).items():
            prefix = f"{name}_" if name else ""
            counts[f"{prefix}top1"], counts[f"{prefix}top5"] = hit1, hit5
        counts = distributed.reduce_sums(counts)
        total = max(float(counts.pop("seen")), 1.0)
        result = {key: 100.0 * float(value) / total for key, value in counts.items()}
        return result

    # --- the run ------------------------------------------------------------------------------
    def close(self) -> None:
        """Releases the data loaders' workers (loaders that have any: ``close()``); the trainer can still
        evaluate or fit afterwards, the workers start again on the next epoch."""
        for data in (self.train_data, self.test_data):
            if hasattr(data, "close"):
                data.close()

    def fit(self, epochs: int | None = None, log=print) -> list[dict]:
        """Train from the current epoch to ``epochs`` (the recipe's by default); returns the history.

        Each epoch's metrics go to ``metrics.jsonl`` / ``metrics.csv`` (and TensorBoard when
        installed, and the recipe's ``logger``) under the output folder; ``curves.png`` is redrawn
        when matplotlib is there.
        """
        last = self.recipe.epochs if epochs is None else epochs
        main = distributed.is_main()  # under torchrun only rank 0 logs and writes files
        if main:
            os.makedirs(self.output, exist_ok=True)
        # a tracker (recipe key logger): every rank checks its package before training, rank 0 runs it
        logger = loggers.start(self.recipe, self.output, main) if self.epoch < last else None
        record = MetricsLog(self.output, self.history, logger) if main else None
        try:
            self._train_until(last, record, log if main else None)
            if record is not None:
                record.plot()
        finally:
            if record is not None:
                record.close()  # the tracker's run ends, also when training fails
        return self.history

    def _train_until(self, last: int, record: MetricsLog | None, log) -> None:
        """The teacher's evaluation and the initialisation stage (when not done yet), then the epochs up to
        ``last``, each recorded (``record``: rank 0's metrics files), checkpointed and logged."""
        if self.epoch == 0 and self.teacher_eval is None:
            self.evaluate_teacher(log)
        if not self.init_done:
            self.run_init_stage(log)
            self.save(os.path.join(self.output, LAST))
        while self.epoch < last:
            epoch = self.epoch
            metrics = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            if (epoch + 1) % self.recipe.eval_every == 0 or epoch + 1 == last:
                metrics.update({f"test_{k}": v for k, v in self.evaluate().items()})
                if record is not None:
                    self._keep_if_best(metrics)
            self.epoch = epoch + 1
            if record is not None:
                record.append(metrics)
                self.history = record.records
            else:
                self.history = [*self.history, metrics]
            if self.epoch % self.recipe.checkpoint_every == 0 or self.epoch == last:
                self.save(os.path.join(self.output, LAST))
            if log is not None:
                log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))

    def evaluate_teacher(self, log=print) -> dict | None:
        """The teacher's top-1 / top-5 on the test set (``None`` without a teacher), logged with a warning
        when it is near chance: a wrong checkpoint or normalisation would otherwise show only in the student."""
        teacher = getattr(self.distiller, "teacher", None)
        cache = getattr(self.distiller, "teacher_cache", None)
        if teacher is None and cache is not None:  # measured by cache-teacher, recorded in the cache's manifest
            self.teacher_eval = dict(cache.manifest.get("teacher_eval") or {})
            if log is not None and self.teacher_eval:
                log(f"teacher {cache.describes['teacher']['name']} (cached in {cache.folder}): top-1 "
                    f"{self.teacher_eval['top1']:.2f} top-5 {self.teacher_eval['top5']:.2f} on the test set, as "
                    "cache-teacher measured it")
            return self.teacher_eval
        if teacher is None:
            return None
        chance = 100.0 / self.meta["num_classes"] if self.meta.get("num_classes") else None
        members = []
        if isinstance(teacher, TeacherEnsemble):  # each member alone, then the ensemble's averaged prediction
            for i, (name, member) in enumerate(zip(teacher.names, teacher.members)):
                members.append(self.evaluate(model=member))
                self._report_teacher(f"teachers[{i}] {name}", members[-1], chance, f"teachers[{i}]", log)
        self.teacher_eval = self.evaluate(model=teacher)
        if members:
            self.teacher_eval["members"] = members
            what = f"the ensemble of {len(members)} ({teacher.average} averaged)"
        else:
            what = f"teacher {self.recipe.teacher.name if self.recipe.teacher else ''}"
        self._report_teacher(what, self.teacher_eval, chance, "teacher", log)
        return self.teacher_eval

    @staticmethod
    def _report_teacher(what: str, scores: dict, chance: float | None, key: str, log) -> None:
        top1 = scores.get("top1", 0.0)
        if log is not None:
            log(f"{what}: top-1 {top1:.2f} top-5 {scores.get('top5', 0.0):.2f} on the test set, before distillation")
        if chance is not None and top1 < 2 * chance:
            warnings.warn(f"{what}'s test top-1 is {top1:.2f}%, near chance ({chance:.2f}%): check "
                          f"{key}.name, {key}.checkpoint and the data's normalisation", RuntimeWarning, stacklevel=2)

    def best(self) -> dict | None:
        """The history's record with the highest test top-1 (the earliest of equals), or ``None``."""
        scored = [r for r in self.history if r.get("test_top1") is not None]
        return max(scored, key=lambda r: r["test_top1"]) if scored else None

    def _keep_if_best(self, metrics: dict) -> None:
        """Write ``best.pt`` (the student, its epoch and accuracy) when ``metrics`` beats every earlier epoch."""
        best = self.best()
        if best is not None and metrics["test_top1"] <= best["test_top1"]:
            return
        save_checkpoint(os.path.join(self.output, BEST),
                        {"student": self.distiller.student.state_dict(), "epoch": metrics["epoch"],
                         "test_top1": metrics["test_top1"], "test_top5": metrics.get("test_top5"),
                         "meta": self.meta, "recipe": self.recipe.to_dict()})

    def state_dict(self) -> dict:
        return {"student": self.distiller.student.state_dict(), "losses": self.distiller.criteria.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
                "init_done": self.init_done, "teacher_eval": self.teacher_eval, "meta": self.meta,
                "history": self.history, "rng": rng_state(), "recipe": self.recipe.to_dict(),
                **({"schedule": self.schedule.state_dict()} if hasattr(self.schedule, "state_dict") else {})}

    def save(self, path: str) -> None:
        """Write the checkpoint (from rank 0 under torchrun; see fastkd.train.distributed.save)."""
        distributed.save(path, self.state_dict, self.distiller, self.epoch)

    def resume(self, path: str) -> None:
        """Continue from a checkpoint written by :meth:`save`: the same run, step for step."""
        state = distributed.load(path, self.distiller, map_location=self.device)
        self.distiller.student.load_state_dict(state["student"])
        self.distiller.criteria.load_state_dict(state["losses"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr is not None:  # the graph reads this very tensor; the checkpoint's lr is a copy or a float
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
        self.scaler.load_state_dict(state["scaler"])
        if "schedule" in state and hasattr(self.schedule, "load_state_dict"):
            self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.history = state["epoch"], state["history"]
        self.init_done = state.get("init_done", True)
        self.teacher_eval = state.get("teacher_eval")
        set_rng_state(state["rng"])

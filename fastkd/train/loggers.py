"""Experiment trackers for a run's per-epoch metrics: the recipe key ``logger`` (``none`` | ``wandb`` | ``mlflow``).

A tracker starts a run with the resolved recipe as its configuration, gets one record per epoch
(the numbers of ``metrics.jsonl``, the epoch as the step) and finishes the run at the end of
:meth:`~fastkd.train.engine.Trainer.fit`. Both write beside the run's own files and need no server:

- ``wandb``: an offline run (``mode="offline"``) under ``<output>/wandb/``; ``wandb sync`` uploads it later;
- ``mlflow``: a file store at ``<output>/mlruns`` (``mlflow ui --backend-store-uri <output>/mlruns``).

``logger_project`` names the W&B project / MLflow experiment (``fastkd`` by default); the run is
named after the output folder. Only rank 0 logs under torchrun, but every rank checks that the
package is installed, so a missing one stops the run on all ranks before training starts. Neither
package is imported until a run asks for it.
"""
from __future__ import annotations

import importlib.util
import os
import time


def numbers(record: dict) -> dict[str, float]:
    """The numeric entries of a metrics record, less the epoch (the step)."""
    return {key: float(value) for key, value in record.items()
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class Logger:
    """The interface: :meth:`start` once, :meth:`log` per epoch, :meth:`finish` once."""

    package = ""  # the module it imports
    pip = ""      # the distribution that provides it

    def __init__(self, folder: str, project: str):
        self.folder, self.project = os.path.abspath(folder), project
        self.name = os.path.basename(self.folder)

    def start(self, config: dict) -> None:
        raise NotImplementedError

    def log(self, record: dict) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class WandbLogger(Logger):
    """Weights & Biases, offline: the run's files under ``<folder>/wandb/``."""

    package = pip = "wandb"

    def start(self, config: dict) -> None:
        import wandb

        self.run = wandb.init(project=self.project, name=self.name, dir=self.folder, mode="offline", config=config)

    def log(self, record: dict) -> None:
        self.run.log(numbers(record), step=record["epoch"])

    def finish(self) -> None:
        self.run.finish()


class MLflowLogger(Logger):
    """MLflow through a client of the file store ``file:<folder>/mlruns`` (the process-wide tracking
    URI and active run are left alone); the configuration as parameters. MLflow 3 keeps the file store
    in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is true: this sets it to
    true where it is unset."""

    package, pip = "mlflow", "mlflow-skinny"  # the client alone; the full mlflow (a server too) works as well

    def start(self, config: dict) -> None:
        import mlflow
        from mlflow.entities import Param

        from fastkd.train.recipe import dotted  # imported here: the recipe module imports this one

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(tracking_uri=f"file:{os.path.join(self.folder, 'mlruns')}")
        experiment = self.client.get_experiment_by_name(self.project)
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(
            self.project)
        self.run_id = self.client.create_run(experiment_id, run_name=self.name).info.run_id
        params = [Param(key, str(value)) for key, value in dotted(config).items()]
        for first in range(0, len(params), 100):  # log_batch takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[first:first + 100])

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, stamp, record["epoch"])
                                                    for key, value in numbers(record).items()])

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


LOGGERS: dict[str, type[Logger]] = {"wandb": WandbLogger, "mlflow": MLflowLogger}


def require(name: str) -> None:
    """Raise ``ImportError`` naming the pip command when the package of ``logger=name`` is missing."""
    if name == "none":
        return
    cls = LOGGERS[name]
    if importlib.util.find_spec(cls.package) is None:
        raise ImportError(f"logger={name} needs the {cls.package} package: pip install {cls.pip} "
                          f"(or pip install 'fastkd[{name}]'), or set logger=none")


def start(recipe, folder: str, main: bool = True) -> Logger | None:
    """The tracker of ``recipe.logger`` for the run in ``folder``, started with the resolved recipe; ``None``
    for ``logger=none`` and where ``main`` is false (ranks other than 0), which only check the package."""
    require(recipe.logger)
    if recipe.logger == "none" or not main:
        return None
    logger = LOGGERS[recipe.logger](folder, recipe.logger_project)
    logger.start(recipe.to_dict())
    return logger

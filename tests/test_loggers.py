"""The recipe key logger: W&B (offline) and MLflow (a file store) through fake modules, rank 0 only,
a clear error before training when the package is missing."""
import importlib.machinery
import os
import sys
import types
from collections import namedtuple

import pytest
import torch

from fastkd.train import loggers
from fastkd.train.recipe import build
from tests.test_engine import make

LOSSES = {"ce": {"weight": 1.0}, "kd": {"weight": 1.0}}


def _module(monkeypatch, name, **attributes):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec reads it for loaded modules
    vars(module).update(attributes)
    monkeypatch.setitem(sys.modules, name, module)
    return module


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []

    class Run:
        def log(self, data, step=None):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    _module(monkeypatch, "wandb", init=init)
    return calls


@pytest.fixture
def fake_mlflow(monkeypatch):
    calls = []
    Metric = namedtuple("Metric", "key value timestamp step")
    Param = namedtuple("Param", "key value")

    class MlflowClient:
        def __init__(self, tracking_uri=None):
            calls.append(("client", tracking_uri))

        def get_experiment_by_name(self, name):
            calls.append(("get_experiment_by_name", name))

        def create_experiment(self, name):
            calls.append(("create_experiment", name))
            return "7"

        def create_run(self, experiment_id, run_name=None):
            calls.append(("create_run", experiment_id, run_name))
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id="run-1"))

        def log_batch(self, run_id, metrics=(), params=()):
            calls.append(("log_batch", run_id, list(metrics), list(params)))

        def set_terminated(self, run_id):
            calls.append(("set_terminated", run_id))

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # unset now, and again after the test (the logger sets it)
    mlflow = _module(monkeypatch, "mlflow", MlflowClient=MlflowClient)
    mlflow.entities = _module(monkeypatch, "mlflow.entities", Metric=Metric, Param=Param)
    return calls


def test_wandb_runs_offline_in_the_run_folder(fake_wandb, tmp_path):
    trainer = make(LOSSES, tmp_path / "kd_run", epochs=2, logger="wandb", logger_project="digits-kd")
    history = trainer.fit(log=None)
    init, *logs, finish = fake_wandb
    assert init == ("init", {"project": "digits-kd", "name": "kd_run", "dir": str(tmp_path / "kd_run"),
                             "mode": "offline", "config": trainer.recipe.to_dict()})
    assert init[1]["config"]["optim"]["lr"] == 0.05 and init[1]["config"]["logger"] == "wandb"
    assert [step for _, _, step in logs] == [1, 2]
    for (_, data, _), record in zip(logs, history):
        assert set(data) == {"train_loss", "train_ce", "train_kd", "lr", "images_per_s", "test_top1", "test_top5"}
        assert data["train_loss"] == record["train_loss"] and data["test_top1"] == record["test_top1"]
    assert finish == ("finish",)


def test_mlflow_writes_a_file_store_in_the_run_folder(fake_mlflow, tmp_path):
    trainer = make(LOSSES, tmp_path, epochs=2, logger="mlflow")
    history = trainer.fit(log=None)
    client, get, create, run, params, *logs, end = fake_mlflow
    assert client == ("client", f"file:{tmp_path}/mlruns")
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"  # MLflow 3 refuses a file store without it
    assert (get, create, run) == (("get_experiment_by_name", "fastkd"), ("create_experiment", "fastkd"),
                                  ("create_run", "7", tmp_path.name))
    assert params[:3] == ("log_batch", "run-1", [])
    given = dict(params[3])
    assert given["optim.lr"] == "0.05" and given["losses.kd.weight"] == "1.0" and given["data.name"] == "digits"
    assert given["schedule.milestones"] == "[1]" and given["teacher.checkpoint"] == "None"
    assert len(logs) == 2 and end == ("set_terminated", "run-1")
    for epoch, ((_, run_id, metrics, none), record) in enumerate(zip(logs, history), 1):
        assert run_id == "run-1" and none == [] and {m.step for m in metrics} == {epoch}
        assert {m.key: m.value for m in metrics} == {k: v for k, v in record.items() if k != "epoch"}


def test_mlflow_parameters_go_in_batches_of_100(fake_mlflow, tmp_path):
    logger = loggers.MLflowLogger(str(tmp_path), "many")
    logger.start({"section": {f"key{i:03d}": i for i in range(250)}})
    batches = [call[3] for call in fake_mlflow if call[0] == "log_batch"]
    assert [len(b) for b in batches] == [100, 100, 50]
    assert batches[2][-1] == ("section.key249", "249")


@pytest.mark.parametrize("name,pip", [("wandb", "wandb"), ("mlflow", "mlflow-skinny")])
def test_missing_package_stops_the_run_before_training(name, pip, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    trainer = make(LOSSES, tmp_path, epochs=1, logger=name)
    before = {k: v.clone() for k, v in trainer.distiller.student.state_dict().items()}
    with pytest.raises(ImportError, match=rf"logger={name} needs the {name} package: pip install {pip} "
                                          rf"\(or pip install 'fastkd\[{name}\]'\), or set logger=none"):
        trainer.fit(log=None)
    assert trainer.epoch == 0 and not (tmp_path / "metrics.jsonl").exists()
    assert all(torch.equal(v, before[k]) for k, v in trainer.distiller.student.state_dict().items())
    # ranks other than 0 check too (so no rank waits for one that stopped), but never start a run
    with pytest.raises(ImportError, match="pip install"):
        loggers.start(trainer.recipe, str(tmp_path), main=False)


def test_only_rank_0_starts_a_run(fake_wandb, tmp_path):
    recipe = build({"logger": "wandb"})
    assert loggers.start(recipe, str(tmp_path), main=False) is None and fake_wandb == []
    assert loggers.start(build({}), str(tmp_path)) is None and fake_wandb == []
    assert isinstance(loggers.start(recipe, str(tmp_path)), loggers.WandbLogger) and fake_wandb[0][0] == "init"


def test_nothing_left_to_train_starts_no_run(fake_wandb, tmp_path):
    trainer = make(LOSSES, tmp_path, epochs=1, logger="wandb")
    trainer.fit(log=None)
    assert [c[0] for c in fake_wandb] == ["init", "log", "finish"]
    trainer.fit(log=None)  # a resumed run that is already complete
    assert len(fake_wandb) == 3


def test_logger_key_is_validated():
    with pytest.raises(ValueError, match=r"logger must be one of \('none', 'wandb', 'mlflow'\), got 'tensorboard'"):
        build({"logger": "tensorboard"})
    with pytest.raises(ValueError, match="logger_project must be str, got 3"):
        build({"logger_project": 3})
    assert build({}).logger == "none" and build({}).logger_project == "fastkd"

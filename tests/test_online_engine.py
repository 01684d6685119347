"""The online and transformed-input objectives in the engine: each shipped recipe's losses train a few
steps on CPU on tiny data; SSKD's two stages hand the teacher's head over through a checkpoint."""
import copy
import os

import pytest
import torch

from fastkd.models import MultiBranchResNet
from fastkd.train.engine import Trainer
from fastkd.train.objectives import build_objective, needs_teacher
from fastkd.train.online import OnlineDistiller
from fastkd.train.recipe import load_recipe
from fastkd.train.run import make_trainer
from fastkd.train.transformed import MixupDistiller, SSKDDistiller, SSKDTeacherStage

from test_engine import Loader, Tiny, data  # noqa: E402

ONLINE = {"cifar10_online": "mean", "cifar10_one": "gate", "cifar10_mbde": "ffm", "cifar100_okddip": "mean"}


def recipe(name, tmp_path, **extra):
    overrides = ["epochs=2", "schedule.milestones=[1]", "optim.lr=0.05", f"output={tmp_path}",
                 *(f"{k}={v}" for k, v in extra.items())]
    return load_recipe(name, overrides)


def trainer(rec, objective):
    images, labels = data()
    return Trainer(rec, objective, Loader(images, labels, 16), Loader(images, labels, 32, shuffle=False),
                   output=rec.output)


def changed(before, module):
    return any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("name", sorted(ONLINE))
def test_online_recipes_train_a_few_steps(name, tmp_path):
    rec = recipe(name, tmp_path)
    assert rec.teacher is None and not needs_teacher(rec.losses)
    assert rec.epochs == 2 and load_recipe(name).epochs == 300 and load_recipe(name).data.batch_size == 128
    torch.manual_seed(0)
    branches = 4 if "okddip" in name else 3
    model = MultiBranchResNet(8, widths=(4, 4, 8, 8), num_branches=branches, num_classes=5, aggregation=ONLINE[name])
    objective = build_objective(rec.losses, model, None, None, 0)
    assert isinstance(objective, OnlineDistiller)
    run = trainer(rec, objective)
    before = copy.deepcopy(model.state_dict())
    history = run.fit(log=None)
    last = history[-1]
    expected = sum(rec.losses[n]["weight"] * last[f"train_{n}"] for n in rec.losses)
    assert last["train_loss"] == pytest.approx(expected, rel=1e-4)
    assert all(torch.isfinite(torch.tensor(last[f"train_{n}"])) for n in rec.losses)
    assert changed(before, model)
    for i in range(branches):  # the ensemble and each branch are evaluated
        assert 0 <= last[f"test_branch{i}_top1"] <= 100
    assert "test_top1" in last
    if "okddip" in name:  # the epoch reaches the ramp: epoch 0 of 80 scales by exp(-5)
        assert float(objective.criteria["okddip"].ramp_epochs) == 80
        owned = {id(p) for p in run.optimizer.param_groups[0]["params"]}
        assert all(id(p) in owned for p in objective.criteria.parameters())


def test_online_objective_refuses_a_plain_student_and_offline_losses():
    with pytest.raises(TypeError, match="multi-branch"):
        OnlineDistiller(Tiny(), {"ce": {"weight": 1.0}, "online_kd": {"weight": 1.0}})
    model = MultiBranchResNet(8, widths=(4, 4, 8, 8), num_branches=3, num_classes=5)
    with pytest.raises(ValueError, match="kd"):
        OnlineDistiller(model, {"ce": {"weight": 1.0}, "kd": {"weight": 1.0}})
    with pytest.raises(ValueError, match="3 branches"):
        OnlineDistiller(MultiBranchResNet(8, widths=(4, 4, 8, 8), num_branches=2), {"okddip": {"weight": 1.0}})


def test_sskd_two_stages_and_stkd_train(tmp_path):
    torch.manual_seed(0)
    images, _ = data()
    teacher = Tiny(width=12)
    before_t = copy.deepcopy(teacher.state_dict())
    stage1 = recipe("cifar100_sskd_teacher", tmp_path / "s1")
    objective = build_objective(stage1.losses, Tiny(width=6), teacher, images[:8], 96)
    assert isinstance(objective, SSKDTeacherStage)
    history = trainer(stage1, objective).fit(log=None)
    assert torch.isfinite(torch.tensor(history[-1]["train_rotation"]))
    assert not changed(before_t, teacher)
    head = copy.deepcopy(objective.criteria["rotation"].head.state_dict())
    state = torch.load(os.path.join(tmp_path / "s1", "last.pt"), weights_only=False)

    stage2 = recipe("cifar100_sskd", tmp_path / "s2")
    student = Tiny(width=6)
    before_s = copy.deepcopy(student.state_dict())
    objective = build_objective(stage2.losses, student, teacher, images[:8], 96, teacher_state=state)
    assert isinstance(objective, SSKDDistiller)
    assert all(torch.equal(v, objective.criteria["sskd"].head_t.state_dict()[k]) for k, v in head.items())
    last = trainer(stage2, objective).fit(log=None)[-1]
    assert last["train_loss"] == pytest.approx(sum(stage2.losses[n]["weight"] * last[f"train_{n}"]
                                                   for n in stage2.losses), rel=1e-4)
    assert changed(before_s, student) and not changed(before_t, teacher)
    assert all(torch.equal(v, objective.criteria["sskd"].head_t.state_dict()[k]) for k, v in head.items())
    with pytest.raises(ValueError, match="first stage"):
        build_objective(stage2.losses, student, teacher, images[:8], 96, teacher_state={})

    stkd = recipe("cifar100_stkd", tmp_path / "stkd")
    student = Tiny(width=6)
    before_s = copy.deepcopy(student.state_dict())
    objective = build_objective(stkd.losses, student, teacher, images[:8], 96)
    assert isinstance(objective, MixupDistiller)
    last = trainer(stkd, objective).fit(log=None)[-1]
    assert torch.isfinite(torch.tensor(last["train_stkd"])) and changed(before_s, student)
    assert not changed(before_t, teacher)


def test_make_trainer_builds_the_online_objective_without_a_teacher(tmp_path):
    rec = load_recipe("cifar10_one", ["data.name=digits", "data.batch_size=8", "student.name=resnet8_one3",
                                      f"output={tmp_path}"])
    run = make_trainer(rec, device="cpu")
    assert isinstance(run.distiller, OnlineDistiller) and run.distiller.student.aggregation == "gate"
    images, labels, *_ = next(iter(run.train_data))
    total, parts, logits = run.distiller(images, labels, epoch=0)
    assert set(parts) == {"ce", "online_kd"} and logits.shape == (8, 10) and torch.isfinite(total)


def test_cli_eval_reports_each_branch(tmp_path, capsys):
    from fastkd.cli import main
    from fastkd.models import create
    from fastkd.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    path = str(tmp_path / "mb.pt")
    save_checkpoint(path, {"student": create("resnet8_mb3", num_classes=10).state_dict()})
    assert main(["eval", "resnet8_mb3", path, "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("top-1 ")
    assert [line.split(":")[0] for line in lines[1:]] == ["branch0", "branch1", "branch2"]


def test_make_trainer_runs_sskd_stage_one_then_two(tmp_path):
    from fastkd.models import create
    from fastkd.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    teacher_path = str(tmp_path / "teacher.pt")
    save_checkpoint(teacher_path, {"model": create("resnet8", num_classes=10).state_dict()})
    common = ["data.name=digits", "data.batch_size=4", "data.num_workers=0", "student.name=resnet8",
              "teacher.name=resnet8"]
    stage1 = make_trainer(load_recipe("cifar100_sskd_teacher", [*common, f"teacher.checkpoint={teacher_path}"]),
                          device="cpu", output=str(tmp_path / "s1"))
    assert isinstance(stage1.distiller, SSKDTeacherStage)
    stage1.save(str(tmp_path / "s1.pt"))
    stage2 = make_trainer(load_recipe("cifar100_sskd", [*common, f"teacher.checkpoint={tmp_path / 's1.pt'}"]),
                          device="cpu", output=str(tmp_path / "s2"))
    assert isinstance(stage2.distiller, SSKDDistiller)
    head = stage1.distiller.criteria["rotation"].head.state_dict()
    assert all(torch.equal(v, stage2.distiller.criteria["sskd"].head_t.state_dict()[k]) for k, v in head.items())
    images, labels, *_ = next(iter(stage2.train_data))
    total, parts, logits = stage2.distiller(images, labels)
    assert set(parts) == {"ce", "kd", "sskd_rot", "sskd"} and logits.shape == (4, 10) and torch.isfinite(total)
    with pytest.raises(ValueError, match="first stage"):
        make_trainer(load_recipe("cifar100_sskd", [*common, f"teacher.checkpoint={teacher_path}"]), device="cpu")

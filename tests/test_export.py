"""A run's outputs: best.pt by test top-1, export to safetensors + JSON, eval of a run folder or an export,
0644 run files, weights read without running code, the teacher evaluated before distillation."""
import json
import os
import stat
import warnings

import pytest
import torch
from safetensors.torch import load_file

from fastkd import models
from fastkd.cli import main
from fastkd.train.checkpoint import load_checkpoint, read_weights
from fastkd.train.run import load_weights

from tests._helpers import cli_error
from tests.test_engine import Tiny, make

TRAIN = ["train", "digits", "student.name=resnet8", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One finished 2-epoch digits run."""
    folder = str(tmp_path_factory.mktemp("export") / "run")
    assert main([*TRAIN, "epochs=2", "--output", folder]) == 0
    return folder


def test_run_files_and_exports_are_0644(run):
    main(["export", run])
    for name in ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", "metrics.csv", "student.safetensors",
                 "student.json"):
        assert stat.S_IMODE(os.stat(os.path.join(run, name)).st_mode) == 0o644, name


def test_export_loads_without_code_and_gives_the_students_logits(run, tmp_path, capsys):
    assert main(["export", run, "--output", str(tmp_path / "out")]) == 0
    assert "student.safetensors" in capsys.readouterr().out
    info = json.loads((tmp_path / "out" / "student.json").read_text())
    last = torch.load(os.path.join(run, "last.pt"), weights_only=True)
    assert info["model"] == "resnet8" and info["num_classes"] == 10 and info["classes"] == [str(c) for c in range(10)]
    assert info["epoch"] == 2 and info["test_top1"] == last["history"][-1]["test_top1"] and info["data"] == "digits"

    exported = models.create(info["model"], num_classes=info["num_classes"]).eval()
    exported.load_state_dict(load_file(tmp_path / "out" / "student.safetensors"))
    trained = models.create("resnet8", num_classes=10).eval()
    trained.load_state_dict(last["student"])
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(exported(x), trained(x))


def test_eval_takes_a_run_folder_or_an_export(run, capsys):
    last = load_checkpoint(os.path.join(run, "last.pt"))
    top1 = last["history"][-1]["test_top1"]
    assert main(["eval", run, "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(f"top-1 {top1:.2f}")
    main(["export", run])
    capsys.readouterr()
    assert main(["eval", "resnet8", os.path.join(run, "student.safetensors"), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(f"top-1 {top1:.2f}")
    best = load_checkpoint(os.path.join(run, "best.pt"))
    assert main(["eval", run, "--from", "best", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(f"top-1 {best['test_top1']:.2f}")
    assert "no run folder" in cli_error(capsys, ["export", os.path.join(run, "missing")])


def test_best_checkpoint_holds_the_epoch_with_the_best_test_top1(tmp_path):
    losses = {"ce": {"weight": 1.0}, "kd": {"weight": 1.0, "temperature": 4.0}}
    trainer = make(losses, tmp_path, epochs=4)
    scores = iter([50.0, 70.0, 70.0, 60.0])  # epoch 2 is the best; epoch 3 only equals it
    measured = trainer.evaluate
    trainer.evaluate = lambda data=None, model=None: (measured(data, model) if model is not None
                                                      else {"top1": next(scores), "top5": 100.0})
    students = {}

    def snapshot(line):
        if line.startswith("epoch="):
            students[len(students) + 1] = {k: v.clone() for k, v in trainer.distiller.student.state_dict().items()}

    trainer.fit(log=snapshot)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 2 and best["test_top1"] == 70.0 and best["meta"]["student"] == "resnet8x4"
    assert all(torch.equal(best["student"][k], v) for k, v in students[2].items())
    assert not all(torch.equal(best["student"][k], v) for k, v in students[4].items())
    assert trainer.best()["epoch"] == 2


def test_teacher_is_evaluated_before_distillation_and_a_chance_teacher_warns(tmp_path):
    trainer = make({"ce": {"weight": 1.0}, "kd": {"weight": 1.0}}, tmp_path, epochs=1)
    teacher = trainer.distiller.teacher
    expected = trainer.evaluate(model=teacher)
    lines = []
    trainer.fit(log=lines.append)
    assert lines[0] == (f"teacher resnet32x4: top-1 {expected['top1']:.2f} top-5 {expected['top5']:.2f} "
                        "on the test set, before distillation")
    assert load_checkpoint(tmp_path / "last.pt")["teacher_eval"] == expected

    blind = make({"ce": {"weight": 1.0}, "kd": {"weight": 1.0}}, tmp_path / "blind", epochs=1)
    blind.meta["num_classes"] = 4
    with torch.no_grad():
        blind.distiller.teacher.fc.weight.zero_()  # constant logits: always class 0, a quarter of the labels
        blind.distiller.teacher.fc.bias.zero_()
    with pytest.warns(RuntimeWarning, match="near chance"):
        blind.evaluate_teacher(log=None)
    trainer.meta["num_classes"] = 100  # chance 1%: the same teacher is far above it
    assert expected["top1"] > 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer.evaluate_teacher(log=None) == expected


def test_weights_from_repdistiller_bare_and_safetensors_files_load(tmp_path):
    from safetensors.torch import save_file

    model = Tiny()
    state = model.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save({"epoch": 240, "model": state, "accuracy": torch.tensor(79.42), "optimizer": optimizer.state_dict()},
               tmp_path / "repdistiller.pth")
    torch.save(state, tmp_path / "bare.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    for name in ("repdistiller.pth", "bare.pt", "w.safetensors"):
        other = Tiny()
        load_weights(other, str(tmp_path / name))
        assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items()), name


def test_a_teacher_file_with_pickled_code_is_refused_and_the_code_never_runs(tmp_path, capsys):
    marker = tmp_path / "the payload ran"

    class Payload:
        def __reduce__(self):
            return os.makedirs, (str(marker),)

    torch.save({"model": Payload()}, tmp_path / "teacher.pth")
    with pytest.raises(ValueError, match=r"pickled Python object \((posix|os)\.makedirs\).*refuses it"):
        read_weights(tmp_path / "teacher.pth")
    assert "refuses it" in cli_error(capsys, ["distill", "digits", "losses={ce: 0.1, kd: 0.9}",
                                              f"teacher.checkpoint={tmp_path / 'teacher.pth'}", "epochs=1",
                                              "--output", str(tmp_path / "run"), "--device", "cpu"])
    assert not marker.exists()

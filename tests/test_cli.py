"""The fastkd command: the embedded main job end to end (one epoch), recipes, train/eval, errors."""
import os
import re
import subprocess
import sys

import pytest

from fastkd.cli import main
from tests._helpers import cli_error


def test_default_distill_runs_teacher_and_three_students(tmp_path, capsys):
    assert main(["distill", "--output", str(tmp_path), "--device", "cpu", "epochs=1"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("run "):].splitlines()
    names = [line[:22].strip() for line in table[1:]]
    assert names == ["teacher (resnet20)", "student alone", "student + KD", "student + CRD + KD"]
    for line in table[1:]:
        top1, top5 = float(line[22:30]), float(line[30:38])
        assert 0.0 <= top1 <= top5 <= 100.0
    for run in ("teacher", "student_alone", "student_kd", "student_crd_kd"):
        assert os.path.isfile(tmp_path / run / "last.pt") and os.path.isfile(tmp_path / run / "metrics.jsonl")


def test_train_then_eval_and_resume(tmp_path, capsys):
    run = tmp_path / "teacher"
    assert main(["train", "digits", "--output", str(run), "--device", "cpu", "epochs=1", "student.name=resnet8"]) == 0
    assert main(["eval", "resnet8", str(run / "last.pt"), "--device", "cpu"]) == 0
    assert "top-1" in capsys.readouterr().out
    # a second call finds last.pt and resumes: with epochs=1 already done it trains nothing more
    assert main(["train", "digits", "--output", str(run), "--device", "cpu", "epochs=1", "student.name=resnet8"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_recipe_errors_reach_the_user(tmp_path, capsys):
    assert "unknown key 'lrr' in optim" in cli_error(capsys, ["distill", "cifar100_kd", "optim.lrr=1", "--output",
                                                              str(tmp_path)])
    assert "teacher.checkpoint must name" in cli_error(
        capsys, ["distill", "digits", "losses={ce: 0.1, kd: 0.9}", "--output", str(tmp_path), "--device", "cpu"])
    err = cli_error(capsys, ["distill", "cifar100_kd", f"data.root={tmp_path}", "--output", str(tmp_path),
                             "--device", "cpu"])
    assert re.search("cifar-100-python.*in a recipe: data.download=true", err)
    with pytest.raises(ValueError, match="unknown key 'lrr' in optim"):  # --debug: the exception itself
        main(["distill", "cifar100_kd", "optim.lrr=1", "--output", str(tmp_path), "--debug"])


def test_python_dash_m_lists_recipes():
    out = subprocess.run([sys.executable, "-m", "fastkd", "recipes"], capture_output=True, text=True, check=True)
    assert "cifar100_crd_kd" in out.stdout.split() and "digits" in out.stdout.split()


def test_compile_option_trains_the_same_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTKD_COMPILE_BACKEND", "aot_eager")  # traces through dynamo/AOT without a C++ build
    common = ["train", "digits", "epochs=1", "student.name=resnet8", "--device", "cpu"]
    assert main([*common, "compile=true", "--output", str(tmp_path / "compiled")]) == 0
    assert main([*common, "--output", str(tmp_path / "eager")]) == 0
    import torch

    compiled = torch.load(tmp_path / "compiled" / "last.pt", weights_only=False)
    eager = torch.load(tmp_path / "eager" / "last.pt", weights_only=False)
    assert list(compiled["student"]) == list(eager["student"])  # no _orig_mod. prefix
    assert compiled["history"][0]["train_loss"] == pytest.approx(eager["history"][0]["train_loss"], rel=1e-3)

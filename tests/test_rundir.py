"""Run folders: derived per configuration, the same command resumes, another one is refused, one live
process per folder, a killed run resumes exactly, `fastkd show`, the README's teacher-then-distill flow."""
import glob
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from fastkd import models
from fastkd.cli import main, resolve
from fastkd.train.checkpoint import load_checkpoint
from fastkd.train.recipe import build, load_recipe
from fastkd.train.rundir import default_folder, describe, run_id
from tests._helpers import cli_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["train", "digits", "student.name=resnet8", "epochs=1", "--device", "cpu"]


def _env():
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_default_folder_names_the_recipe_the_models_and_the_configuration():
    kd = load_recipe("cifar100_kd", ["teacher.checkpoint=/nowhere/t.pth"])
    folder = default_folder("cifar100_kd", kd)
    assert re.fullmatch(r"runs/cifar100_kd/resnet8x4-from-resnet32x4-[0-9a-f]{8}", folder)
    assert default_folder("cifar100_kd", load_recipe("cifar100_kd", ["teacher.checkpoint=/nowhere/t.pth"])) == folder
    # keys that do not change the numbers do not change the folder; any other key does
    same = load_recipe("cifar100_kd", ["teacher.checkpoint=/nowhere/t.pth", "data.num_workers=2", "output=x",
                                       "checkpoint_every=5"])
    assert default_folder("cifar100_kd", same) == folder
    for change in ("optim.lr=0.01", "losses.kd.temperature=2", "seed=1", "teacher.checkpoint=/nowhere/u.pth"):
        other = load_recipe("cifar100_kd", ["teacher.checkpoint=/nowhere/t.pth", change])
        assert default_folder("cifar100_kd", other) != folder, change
    alone, _ = resolve("train", "cifar100_kd", [])
    assert re.fullmatch(r"runs/cifar100_kd/resnet8x4-[0-9a-f]{8}", default_folder("cifar100_kd", alone))
    assert default_folder("/some/where/my_recipe.yaml", kd).startswith("runs/my_recipe/")


def test_the_teachers_weights_are_part_of_the_run(tmp_path):
    teacher = models.create("resnet8", num_classes=10)
    torch.save({"model": teacher.state_dict(), "epoch": 1}, tmp_path / "a.pt")
    torch.save({"model": teacher.state_dict(), "epoch": 240, "accuracy": torch.tensor(12.5)}, tmp_path / "b.pt")
    with torch.no_grad():
        next(teacher.parameters()).add_(1e-3)
    torch.save({"model": teacher.state_dict()}, tmp_path / "c.pt")

    def ident(name):
        return run_id(describe(load_recipe("cifar100_kd", [f"teacher.checkpoint={tmp_path / name}"])))

    assert ident("a.pt") != ident("c.pt")  # other weights: another run, whatever the file is called
    a_moved = describe(load_recipe("cifar100_kd", [f"teacher.checkpoint={tmp_path / 'a.pt'}"]))
    b_same = describe(load_recipe("cifar100_kd", [f"teacher.checkpoint={tmp_path / 'b.pt'}"]))
    digest = "weights[teacher.checkpoint]"
    assert a_moved[digest] == b_same[digest]  # same weights, other epoch and extras: the same digest
    assert describe(load_recipe("cifar100_kd", ["teacher.checkpoint=/nowhere/t.pth"]))[digest] == "missing"


def test_the_same_command_resumes_and_another_configuration_is_refused(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main([*TRAIN, "--output", run]) == 0
    first = capsys.readouterr().out
    assert f"student resnet8 -> {run}" in first
    saved = open(os.path.join(run, "last.pt"), "rb").read()
    assert main([*TRAIN, "--output", run]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert open(os.path.join(run, "last.pt"), "rb").read() == saved  # nothing trained again

    assert main([*TRAIN, "optim.lr=0.5", "--output", run]) == 2
    err = capsys.readouterr().err
    assert "holds a run with another configuration" in err and "optim.lr: 0.05 -> 0.5" in err
    assert "--fresh" in err and "--resume" in err
    assert open(os.path.join(run, "last.pt"), "rb").read() == saved  # the refused run touched nothing
    config = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    assert config["recipe"]["optim"]["lr"] == 0.05 and config["run"]["command"] == "train"


def test_fresh_moves_the_old_run_aside_and_resume_continues_with_the_new_configuration(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TRAIN, "--output", str(run)]) == 0
    old = load_checkpoint(run / "last.pt")
    assert main([*TRAIN, "optim.lr=0.5", "--fresh", "--output", str(run)]) == 0
    (aside,) = glob.glob(str(run) + ".replaced-*")
    assert f"moved to {aside}" in capsys.readouterr().out
    kept = load_checkpoint(os.path.join(aside, "last.pt"))
    assert all(torch.equal(kept["student"][k], v) for k, v in old["student"].items())  # nothing lost
    assert load_checkpoint(run / "last.pt")["recipe"]["optim"]["lr"] == 0.5

    assert main([*TRAIN, "optim.lr=0.5", "epochs=2", "--resume", "--output", str(run)]) == 0
    out = capsys.readouterr().out
    assert "continuing with a changed configuration" in out and "epochs: 1 -> 2" in out
    resumed = load_checkpoint(run / "last.pt")
    assert resumed["epoch"] == 2 and [r["epoch"] for r in resumed["history"]] == [1, 2]
    assert len(glob.glob(str(run / "config.before-*.yaml"))) == 1
    assert yaml.safe_load(open(run / "config.yaml"))["recipe"]["epochs"] == 2


def test_a_folder_from_before_config_files_is_compared_by_its_checkpoints_recipe(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TRAIN, "--output", str(run)]) == 0
    os.remove(run / "config.yaml")
    assert main([*TRAIN, "optim.lr=0.5", "--output", str(run)]) == 2
    assert "optim.lr: 0.05 -> 0.5" in capsys.readouterr().err
    assert main([*TRAIN, "--output", str(run)]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_a_start_that_failed_does_not_hold_the_folder(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert "teacher.checkpoint must name" in cli_error(
        capsys, ["distill", "digits", "losses={ce: 0.1, kd: 0.9}", "--output", run, "--device", "cpu"])
    assert main([*TRAIN, "--output", run]) == 0  # no checkpoint was there: another configuration may start


def test_a_second_process_is_refused_while_a_run_holds_the_folder(tmp_path, capsys):
    run = tmp_path / "run"
    holder = textwrap.dedent(f"""
        import sys
        from fastkd.train.recipe import load_recipe
        from fastkd.train.rundir import claim
        with claim({str(run)!r}, load_recipe("digits", ["student.name=resnet8", "epochs=1"]), "digits", "train"):
            print("holding", flush=True)
            sys.stdin.readline()
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=_env())
    try:
        assert proc.stdout.readline().strip() == "holding"
        assert main([*TRAIN, "--output", str(run)]) == 2
        assert f"is in use by another fastkd process (pid {proc.pid} on" in capsys.readouterr().err
        assert not (run / "last.pt").exists()
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # a killed holder leaves its lock file, not its lock
        proc.wait()
    assert main([*TRAIN, "--output", str(run)]) == 0
    assert (run / "last.pt").is_file()


def test_a_killed_run_resumes_exactly_by_the_same_command(tmp_path):
    command = ["train", "digits", "student.name=resnet8", "epochs=2", "--device", "cpu"]
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "fastkd", *command, "--output", str(cut)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=_env())
    try:
        for line in proc.stdout:  # the epoch's line comes after its checkpoint is written
            if line.startswith("epoch=1 "):
                break
    finally:
        proc.kill()
        proc.wait()
    assert load_checkpoint(cut / "last.pt")["epoch"] == 1
    # both runs in fresh processes like the killed one: this process's thread settings (other tests may
    # have changed them) would change the sums' order, and the bits
    for folder in (cut, tmp_path / "straight"):
        subprocess.run([sys.executable, "-m", "fastkd", *command, "--output", str(folder)], check=True,
                       capture_output=True, env=_env())
    resumed, straight = load_checkpoint(cut / "last.pt"), load_checkpoint(tmp_path / "straight" / "last.pt")
    assert resumed["epoch"] == straight["epoch"] == 2
    for name, value in straight["student"].items():
        assert torch.equal(resumed["student"][name], value), name
    assert [r["test_top1"] for r in resumed["history"]] == [r["test_top1"] for r in straight["history"]]
    lines = open(cut / "metrics.jsonl").read().splitlines()
    assert len(lines) == 2  # no epoch recorded twice


def test_show_prints_the_run_folder_and_a_recipe_that_runs_as_it_is(tmp_path, capsys):
    assert main(["show", "cifar100_kd", "optim.lr=0.01", "teacher.checkpoint=/nowhere/t.pth"]) == 0
    out = capsys.readouterr().out
    folder = re.search(r"^# run folder: (\S+)$", out, re.M).group(1)
    assert re.fullmatch(r"runs/cifar100_kd/resnet8x4-from-resnet32x4-[0-9a-f]{8}", folder)
    assert "# a new run" in out
    shown = build(yaml.safe_load(out))
    assert shown.optim.lr == 0.01 and shown.losses["kd"]["weight"] == 0.9 and shown.output == folder
    assert main(["show", "--train", "cifar100_kd"]) == 0
    assert re.search(r"^# run folder: runs/cifar100_kd/resnet8x4-[0-9a-f]{8}$", capsys.readouterr().out, re.M)

    run = str(tmp_path / "run")
    assert main([*TRAIN, "--output", run]) == 0
    capsys.readouterr()
    assert main(["show", "--train", "digits", "student.name=resnet8", "epochs=1", "--output", run]) == 0
    assert "# resumes the run there" in capsys.readouterr().out
    assert main(["show", "--train", "digits", "student.name=resnet8", "epochs=3", "--output", run]) == 0
    assert "refused" in (out := capsys.readouterr().out) and "epochs: 1 -> 3" in out


def test_readme_flow_a_teacher_then_a_distillation_in_their_own_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "digits", "student.name=resnet20", "epochs=1", "--device", "cpu"]) == 0
    (teacher_run,) = glob.glob("runs/digits/resnet20-*")
    capsys.readouterr()
    distill = ["distill", "digits", "losses={ce: 0.1, kd: {weight: 0.9, temperature: 4.0}}",
               f"teacher.checkpoint={teacher_run}/last.pt", "epochs=1", "--device", "cpu"]
    assert main(distill) == 0
    out = capsys.readouterr().out
    (student_run,) = glob.glob("runs/digits/resnet8-from-resnet20-*")
    teacher_top1 = load_checkpoint(os.path.join(teacher_run, "last.pt"))["history"][-1]["test_top1"]
    assert f"teacher resnet20: top-1 {teacher_top1:.2f}" in out  # evaluated before the student trains
    assert load_checkpoint(os.path.join(student_run, "last.pt"))["teacher_eval"]["top1"] == pytest.approx(teacher_top1)
    # the run folder is a recipe: the same run, and `fastkd eval` needs nothing else
    assert load_recipe(student_run).to_dict() == load_recipe("digits", distill[2:5]).to_dict()
    assert main(["eval", student_run, "--device", "cpu"]) == 0
    student_top1 = load_checkpoint(os.path.join(student_run, "last.pt"))["history"][-1]["test_top1"]
    assert f"top-1 {student_top1:.2f}" in capsys.readouterr().out
    assert main(distill) == 0  # the same command again: resumes its own run, reports its own numbers
    assert "resumed from" in capsys.readouterr().out

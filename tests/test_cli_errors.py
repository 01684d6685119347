"""Mistakes on the command line print one or two lines and exit non-zero, no traceback; a diverged run stops
at once and keeps its last good checkpoint; metrics files stay valid JSON."""
import json
import os

import pytest
import torch

from fastkd.cli import main
from fastkd.train.metrics import MetricsLog
from fastkd.train.recipe import load_recipe
from tests._helpers import cli_error

TRAIN = ["train", "digits", "student.name=resnet8", "epochs=1", "--device", "cpu"]
KD = ["distill", "digits", "losses={ce: 0.1, kd: 0.9}", "epochs=1", "--device", "cpu"]


def _strict(line):
    """json.loads that refuses NaN / Infinity (which Python writes and other JSON readers reject)."""
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in a metrics line"))


@pytest.mark.parametrize("override, message", [
    ("epochs=0", "epochs must be an integer >= 1, got 0"),
    ("optim.lr=-0.1", "optim.lr must be a finite number > 0, got -0.1"),
    ("optim.lr=.nan", "optim.lr must be a finite number > 0, got nan"),
    ("optim.lr=abc", "optim.lr must be float, got 'abc'"),
    ("data.batch_size=0", "data.batch_size must be an integer >= 1, got 0"),
    ("losses.ce.weight=-1", "losses.ce.weight must be a finite number >= 0, got -1.0"),
    ("schedule.milestones=[-1]", "schedule.milestones must be a list of epochs >= 0"),
    ("optim.lrr=1", "unknown key 'lrr' in optim"),
    ("amp=fp8", "amp must be one of"),
])
def test_a_bad_value_is_one_line_naming_the_key(override, message, tmp_path, capsys):
    err = cli_error(capsys, [*TRAIN, override, "--output", str(tmp_path)])
    assert err.startswith("fastkd: error: ") and message in err
    assert not (tmp_path / "last.pt").exists()


def test_numbers_with_an_exponent_are_numbers():
    recipe = load_recipe("digits", ["optim.lr=1e-3", "optim.weight_decay=5E-4", "losses.ce.weight=2e0"])
    assert recipe.optim.lr == 1e-3 and recipe.optim.weight_decay == 5e-4 and recipe.losses["ce"]["weight"] == 2.0


def test_bad_recipes_devices_and_paths_are_one_line(tmp_path, capsys):
    assert "recipe 'cifar1000' is neither a file nor a shipped recipe" in cli_error(capsys, ["distill", "cifar1000"])
    if not torch.cuda.is_available():
        err = cli_error(capsys, [*TRAIN[:-2], "--device", "cuda", "--output", str(tmp_path / "a")])
        assert "device 'cuda': this machine has no CUDA device" in err and "use device cpu" in err
        assert not (tmp_path / "a").exists()  # refused before the run folder is made
    assert "device 'gpu' is not a device name" in cli_error(capsys, [*TRAIN[:-2], "--device", "gpu"])
    assert "no checkpoint at /nowhere/t.pth" in cli_error(
        capsys, [*KD, "teacher.checkpoint=/nowhere/t.pth", "--output", str(tmp_path / "b")])
    assert "data.root must name" in cli_error(capsys, ["train", "cifar100", "--device", "cpu"])
    assert f"no run folder at {tmp_path / 'nope'}" in cli_error(capsys, ["export", str(tmp_path / "nope")])
    assert "is not a run folder" in cli_error(capsys, ["eval", str(tmp_path / "nope")])


def test_damaged_teacher_files_and_checkpoints_name_the_file_and_the_fix(tmp_path, capsys):
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    err = cli_error(capsys, [*KD, f"teacher.checkpoint={tmp_path / 'random.pth'}", "--output", str(tmp_path / "r")])
    assert f"{tmp_path / 'random.pth'} is not a readable checkpoint" in err and "download it again" in err

    run = tmp_path / "run"
    assert main([*TRAIN, "--output", str(run)]) == 0
    whole = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(whole[: len(whole) // 3])  # a disk that filled up, a copy cut short
    err = cli_error(capsys, [*TRAIN, "--output", str(run)])
    assert f"{run / 'last.pt'} is not a readable checkpoint" in err and "--fresh" in err
    assert main([*TRAIN, "--fresh", "--output", str(run)]) == 0  # the way out the message gives


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        main([*TRAIN, "epochs=0", "--debug"])


def test_a_teacher_checkpoint_no_loss_reads_is_warned_about(tmp_path, capsys):
    assert main([*TRAIN[:1], "digits", "student.name=resnet8", "epochs=1", "--device", "cpu", "teacher=null",
                 "--output", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main(["distill", "digits", "student.name=resnet8", "epochs=1", "--device", "cpu",
                 f"teacher.checkpoint={tmp_path / 'plain' / 'last.pt'}", "--output", str(tmp_path / "ce")]) == 0
    err = capsys.readouterr().err
    assert "fastkd: warning: teacher.checkpoint=" in err and "no loss of this run distils from a teacher" in err


def test_a_diverged_run_stops_at_once_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TRAIN, "--output", str(run)]) == 0
    good = (run / "last.pt").read_bytes()
    good_best = (run / "best.pt").read_bytes()
    capsys.readouterr()
    status = main([*TRAIN, "epochs=3", "optim.lr=1e30", "--resume", "--output", str(run)])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    assert "training diverged: the loss is nan at epoch 2, step 2;" in err  # the first step the update broke
    assert "last.pt still holds epoch 1" in err and "optim.lr" in err
    assert (run / "last.pt").read_bytes() == good and (run / "best.pt").read_bytes() == good_best
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [_strict(line)["epoch"] for line in lines] == [1]


def test_metrics_lines_are_json_whatever_the_numbers(tmp_path):
    log = MetricsLog(str(tmp_path))
    log.append({"epoch": 1, "train_loss": float("nan"), "test_top1": float("inf"), "lr": 0.1})
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert _strict(line) == {"epoch": 1, "train_loss": None, "test_top1": None, "lr": 0.1}

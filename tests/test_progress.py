"""The training progress display: tqdm bar or plain line, at most one refresh (and loss read) a second."""
import io
import re
import sys

import pytest

from fastkd.train import distributed, progress
from tests.test_engine import make


class LossSum:
    """Stands for the engine's on-device loss sum: counts the reads (host syncs on a GPU)."""

    def __init__(self):
        self.value, self.reads = 0.0, 0

    def __float__(self):
        self.reads += 1
        return self.value


def _run(stream, steps=30, batch=16, dt=0.25, loss=2.0):
    """An epoch of ``steps`` steps, ``dt`` seconds each by a fake clock, every batch at ``loss``."""
    now = [0.0]
    shown = progress.EpochProgress(2, steps, stream=stream, clock=lambda: now[0])
    loss_sum = LossSum()
    for step in range(1, steps + 1):
        now[0] += dt
        loss_sum.value += loss * batch
        shown.update(step, step * batch, loss_sum)
    shown.close()
    return loss_sum.reads


def test_plain_line_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    stream = io.StringIO()
    reads = _run(stream)
    # 30 steps of 0.25 s: redrawn at 1.25 s, 2.5 s, ... (more than a second apart), each time reading the loss once
    assert reads == 6
    frames = stream.getvalue().split("\r")[1:]
    assert frames[0] == "epoch 3 step 5/30 loss 2 64 img/s\033[K"
    assert [f.split()[3] for f in frames[:-1]] == ["5/30", "10/30", "15/30", "20/30", "25/30", "30/30"]
    assert frames[-1] == "\033[K"  # cleared at the end


def test_tqdm_bar_shows_eta_loss_and_rate():
    pytest.importorskip("tqdm")
    stream = io.StringIO()
    assert _run(stream, loss=0.123456) == 6
    frames = [f for f in stream.getvalue().split("\r") if f.strip()]
    last = [f for f in frames if "30/30" in f][-1]
    assert last.startswith("epoch 3:") and "loss 0.1235, 64 img/s" in last
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", frames[1])  # elapsed < ETA
    assert sum("/30 [" in f for f in frames) == 7  # drawn at 0/30, then at each of the 6 refreshes


def test_a_log_gets_a_whole_line_every_half_minute():
    stream = io.StringIO()
    now = [0.0]
    shown = progress.EpochProgress(0, 400, stream=stream, clock=lambda: now[0], mode=progress.LOG)
    loss_sum = LossSum()
    for step in range(1, 401):  # 0.25 s a step: 100 s
        now[0] += 0.25
        loss_sum.value += 1.5 * 32
        shown.update(step, step * 32, loss_sum)
    shown.close()
    lines = stream.getvalue().splitlines()
    assert lines == ["epoch 1 step 121/400 loss 1.5 128 img/s ETA 1m10s",
                     "epoch 1 step 242/400 loss 1.5 128 img/s ETA 40s",
                     "epoch 1 step 363/400 loss 1.5 128 img/s ETA 9s"]
    assert loss_sum.reads == 3 and "\r" not in stream.getvalue()


def test_refresh_cadence_bounds_the_loss_reads(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert _run(io.StringIO(), steps=1000, dt=0.01) == 9  # 10 s of steps: a read every 1.01 s
    monkeypatch.setattr(progress, "REFRESH_S", 0.0)
    assert _run(io.StringIO(), steps=40, dt=0.01) == 40


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_shown_on_rank_0_on_a_terminal_or_when_forced(monkeypatch):
    monkeypatch.delenv("FASTKD_PROGRESS", raising=False)
    assert progress.wanted(Terminal()) == "live" and progress.wanted(io.StringIO()) == "log"
    monkeypatch.setenv("FASTKD_PROGRESS", "1")
    assert progress.wanted(io.StringIO()) == "live"
    monkeypatch.setenv("FASTKD_PROGRESS", "0")
    assert not progress.wanted(Terminal())
    monkeypatch.setenv("FASTKD_PROGRESS", "1")
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    assert not progress.wanted(Terminal())
    monkeypatch.setenv("FASTKD_PROGRESS", "yes")
    with pytest.raises(ValueError, match="FASTKD_PROGRESS must be 1 .* got 'yes'"):
        progress.wanted()


@pytest.mark.parametrize("bar", [True, False], ids=["tqdm", "line"])
def test_trainer_shows_the_running_loss(bar, tmp_path, monkeypatch, capsys):
    if bar:
        pytest.importorskip("tqdm")
    else:
        monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setenv("FASTKD_PROGRESS", "1")
    monkeypatch.setattr(progress, "REFRESH_S", 0.0)  # redraw after every step
    trainer = make({"ce": {"weight": 1.0}, "kd": {"weight": 1.0}}, tmp_path, epochs=1)
    history = trainer.fit(log=None)
    err = capsys.readouterr().err
    # the last redraw, after the last of the epoch's 6 steps, shows the epoch's mean loss
    assert f"loss {history[0]['train_loss']:.4g}" in err
    assert ("6/6 [" if bar else "epoch 1 step 6/6 ") in err

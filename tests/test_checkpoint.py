"""Atomic checkpoints: a killed writer leaves the previous checkpoint loadable; RNG round trip."""
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fastkd.train import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def test_round_trip_and_no_leftovers(tmp_path):
    path = tmp_path / "ck" / "last.pt"
    save_checkpoint(path, {"epoch": 3, "weights": torch.arange(5.0)})
    save_checkpoint(path, {"epoch": 4, "weights": torch.arange(6.0)})
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 4 and torch.equal(loaded["weights"], torch.arange(6.0))
    assert sorted(os.listdir(path.parent)) == ["last.pt"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def broken_save(obj, stream):
        stream.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_process_killed_while_writing_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "weights": torch.zeros(4)})
    writer = textwrap.dedent(f"""
        import sys, torch
        from fastkd.train import save_checkpoint
        real_save = torch.save
        def slow_save(obj, stream):
            stream.write(b"x" * 1_000_000)  # some bytes of the new checkpoint are on disk ...
            stream.flush()
            print("writing", flush=True)
            sys.stdin.readline()  # ... when the parent kills this process
            real_save(obj, stream)
        torch.save = slow_save
        save_checkpoint({str(path)!r}, {{"epoch": 2, "weights": torch.ones(4)}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["weights"], torch.zeros(4))


def test_rng_state_round_trip():
    state = rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_bad_input_errors(tmp_path):
    with pytest.raises(TypeError, match="payload"):
        save_checkpoint(tmp_path / "x.pt", [1, 2])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="checkpoint dict"):
        load_checkpoint(tmp_path / "list.pt")

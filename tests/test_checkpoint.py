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


def test_checkpoints_load_with_weights_only_and_older_numpy_rng_states_still_resume(tmp_path):
    save_checkpoint(tmp_path / "new.pt", {"rng": rng_state(), "weights": torch.ones(2)})
    torch.load(tmp_path / "new.pt", weights_only=True)  # plain values and tensors only
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"rng": legacy}, tmp_path / "legacy.pt")  # fastkd before 0.2 pickled NumPy's state as an array
    expected = (random.random(), float(np.random.rand()), torch.rand(2))
    set_rng_state(load_checkpoint(tmp_path / "legacy.pt")["rng"])
    assert (random.random(), float(np.random.rand())) == expected[:2] and torch.equal(torch.rand(2), expected[2])


def test_unreadable_files_name_the_file_and_the_fix(tmp_path):
    save_checkpoint(tmp_path / "good.pt", {"weights": torch.arange(1000.0)})
    whole = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("truncated.pt", "random.pt", "empty.pt"):
        with pytest.raises(ValueError, match=f"{name} is not a readable checkpoint .*truncated or damaged"):
            load_checkpoint(tmp_path / name)
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="bad.safetensors is not a readable safetensors file"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_checkpoint_files_get_the_users_file_mode(tmp_path):
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "a.pt", {"epoch": 1})
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "a.pt").st_mode & 0o777) == 0o640  # not mkstemp's 0600


@pytest.mark.parametrize("seed", [0, 7, 44, 199])
def test_random_bytes_are_refused_whatever_the_unpickler_trips_on(tmp_path, seed):
    """Garbage read as a pickle fails in whatever way its opcodes lead to: UnpicklingError (seed 0), but also
    IndexError 'pop from empty list' (7), KeyError (44), UnicodeDecodeError (199): every one is the same
    refusal naming the file, not an internal error."""
    rng = random.Random(seed)
    body = bytes(rng.getrandbits(8) for _ in range(4096))
    path = tmp_path / "random.pth"
    path.write_bytes(b"\x80\x02" + body if seed % 3 == 0 else body)
    with pytest.raises(ValueError, match="random.pth is not a readable checkpoint"):
        load_checkpoint(path)

"""Small helpers shared by the loss tests."""
import pytest
import torch


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def arr(x):
    return x.detach().double().numpy()


def close(value, expected, rel=1e-10, abs_=1e-12):
    assert value.dim() == 0
    assert float(value.detach()) == pytest.approx(expected, rel=rel, abs=abs_)


def cli_error(capsys, argv, status=2):
    """Run ``fastkd ARGV``: it must fail with ``status`` and a short message, no traceback; the message."""
    from fastkd.cli import main

    capsys.readouterr()
    assert main(argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    return err

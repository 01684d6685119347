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

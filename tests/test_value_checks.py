"""The value checks of fastkd._checks (NaN / Inf, index ranges) skip tensors that hold no data:
``meta`` tensors and fake tensors (``FakeTensorMode``, as torch.compile's tracing and shape
propagation use), instead of reading them with ``.item()``; structural checks still run on them."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastkd
from fastkd import _checks
from fastkd import functional as fk


def test_meta_tensors_pass_the_value_checks():
    x = torch.empty(4, 3, device="meta")
    idx = torch.empty(4, dtype=torch.long, device="meta")
    _checks.finite("x", x)
    _checks.pair("x", x, "y", torch.empty(4, 3, device="meta"))
    assert _checks.index("idx", idx, 10, shape=(4,), device=x.device) is idx
    with pytest.raises(ValueError, match="^y has shape"):  # the structural checks still run
        _checks.pair("x", x, "y", torch.empty(4, 2, device="meta"))
    with pytest.raises(ValueError, match="^x has batch size 0"):
        _checks.pair("x", torch.empty(0, 3, device="meta"), "y", torch.empty(0, 3, device="meta"))


def test_fake_tensors_pass_the_value_checks():
    with FakeTensorMode():
        x = torch.randn(4, 3)
        idx = torch.randint(0, 10, (4,))
        _checks.finite("x", x)
        _checks.pair("x", x, "y", torch.randn(4, 3))
        _checks.index("idx", idx, 10, shape=(4,))
        with pytest.raises(TypeError, match="^idx must have dtype torch.int64"):
            _checks.index("idx", idx.int(), 10)


@pytest.mark.parametrize("backend", fastkd.backends())
def test_losses_run_on_meta_tensors(backend):
    s, t = torch.empty(4, 10, device="meta"), torch.empty(4, 10, device="meta")
    target = torch.empty(4, dtype=torch.long, device="meta")
    with fastkd.use_backend(backend):
        assert fk.kd_loss(s, t).device.type == "meta"
        assert fk.dkd_loss(s, t, target).device.type == "meta"
        assert fk.rkd_loss(s, t).shape == ()
    loss_fn = fastkd.CRDLoss(10, 10, 30, feat_dim=8, num_negatives=4, seed=0).to("meta")
    with fastkd.use_backend(backend):
        assert loss_fn(s, t, target).device.type == "meta"


def test_crd_step_runs_under_fake_tensor_mode():
    with FakeTensorMode(allow_non_fake_inputs=True):
        loss_fn = fastkd.CRDLoss(10, 10, 30, feat_dim=8, num_negatives=4, seed=0)
        out = loss_fn(torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 30, (4,)))
        assert out.shape == ()

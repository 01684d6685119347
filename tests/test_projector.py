"""SRD (functional and module) against an independent float64 numpy derivation and against the
authors' loss written out with torch's BatchNorm1d."""
import math

import numpy as np
import pytest
import torch

import fastkd
from fastkd import functional as fk

from _helpers import arr, close, rand  # noqa: E402




# --- independent reference --------------------------------------------------------------------

def standardize_ref(x, eps, mean=None, var=None):
    """(x − μ) / sqrt(σ² + eps) per column; batch statistics (biased σ²) unless given."""
    mean = x.mean(axis=0) if mean is None else mean
    var = ((x - x.mean(axis=0)) ** 2).mean(axis=0) if var is None else var
    return (x - mean) / np.sqrt(var + eps)


def distance_ref(s, t, alpha, mode):
    if mode == "feature":
        return math.log(sum(abs(a - b) ** alpha for a, b in zip(s.ravel(), t.ravel())))
    b, d = s.shape
    c = [sum(s[i, k] * t[i, k] for i in range(b)) / b for k in range(d)]
    return math.log(sum(abs(ck - 1) ** alpha for ck in c) + 1e-5)


def srd_ref(z_s, z_t, alpha=4.0, mode="feature", eps=1e-4):
    return distance_ref(standardize_ref(z_s, eps), standardize_ref(z_t, eps), alpha, mode)


def project_ref(loss, f_s):
    pooled = arr(f_s).mean(axis=(2, 3)) if f_s.dim() == 4 else arr(f_s)
    return pooled @ arr(loss.projector.weight).T + arr(loss.projector.bias)


def pooled_ref(f):
    return arr(f).mean(axis=(2, 3)) if f.dim() == 4 else arr(f)


class AuthorsSRD(torch.nn.Module):
    """The authors' ImageNet loss (feature form) written out: Linear, two BatchNorm1d(eps 1e-4,
    affine=False), log Σ |Δ|⁴ on the pooled last-stage maps, without the recipe's weight 2."""

    def __init__(self, s_dim, t_dim):
        super().__init__()
        self.embed = torch.nn.Linear(s_dim, t_dim)
        self.bn_s = torch.nn.BatchNorm1d(t_dim, eps=0.0001, affine=False)
        self.bn_t = torch.nn.BatchNorm1d(t_dim, eps=0.0001, affine=False)

    def forward(self, f_s, f_t):
        z_s, z_t = f_s.mean(-1).mean(-1), f_t.mean(-1).mean(-1)
        diff = self.bn_s(self.embed(z_s)) - self.bn_t(z_t)
        return torch.log(torch.abs(diff).pow(4.0).sum())


# --- functional -------------------------------------------------------------------------------

@pytest.mark.parametrize("b,d", [(2, 1), (3, 5), (5, 7)])
@pytest.mark.parametrize("mode", ["feature", "correlation"])
@pytest.mark.parametrize("alpha", [4.0, 2.5])
def test_functional_matches_reference(b, d, mode, alpha):
    z_s, z_t = rand(b, d, seed=1), rand(b, d, seed=2)
    close(fk.srd_loss(z_s, z_t, alpha=alpha, mode=mode), srd_ref(arr(z_s), arr(z_t), alpha, mode))


@pytest.mark.parametrize("mode", ["feature", "correlation"])
def test_functional_gradcheck(mode):
    z_s, z_t = rand(3, 4, seed=5).requires_grad_(), rand(3, 4, seed=6)
    assert torch.autograd.gradcheck(lambda s: fk.srd_loss(s, z_t, alpha=3.0, mode=mode), (z_s,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_functional_low_precision_accumulates_in_fp32(dtype):
    z_s, z_t = rand(6, 5, seed=7, dtype=torch.float32).to(dtype), rand(6, 5, seed=8, dtype=torch.float32).to(dtype)
    out = fk.srd_loss(z_s, z_t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fk.srd_loss(z_s.float(), z_t.float()), rtol=1e-6, atol=1e-7)


# --- module -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["feature", "correlation"])
@pytest.mark.parametrize("shape_s,shape_t", [((3, 5, 2, 3), (3, 4, 3, 3)), ((2, 5), (2, 4)), ((4, 5, 1, 1), (4, 4))])
def test_module_matches_reference(mode, shape_s, shape_t):
    loss = fastkd.SRDLoss(5, 4, mode=mode).double()
    f_s, f_t = rand(*shape_s, seed=9), rand(*shape_t, seed=10)
    expected = srd_ref(project_ref(loss, f_s), pooled_ref(f_t), mode=mode)
    close(loss(f_s, f_t), expected)


def test_module_attributes():
    loss = fastkd.SRDLoss(6, 3)
    assert isinstance(loss.projector, torch.nn.Linear) and loss.projector.bias is not None
    assert (loss.projector.in_features, loss.projector.out_features) == (6, 3)
    for bn in (loss.bn_s, loss.bn_t):
        assert isinstance(bn, torch.nn.BatchNorm1d)
        assert bn.eps == 1e-4 and not bn.affine and bn.track_running_stats and bn.num_features == 3
    assert sorted(name for name, _ in loss.named_parameters()) == ["projector.bias", "projector.weight"]


@pytest.mark.parametrize("mode", ["feature", "correlation"])
def test_module_equals_functional_in_training(mode):
    loss = fastkd.SRDLoss(5, 3, alpha=3.0, mode=mode).double()
    f_s, f_t = rand(4, 5, 2, 2, seed=11), rand(4, 3, 2, 1, seed=12)
    expected = fk.srd_loss(loss.projector(f_s.mean(dim=(2, 3))), f_t.mean(dim=(2, 3)), alpha=3.0, mode=mode)
    torch.testing.assert_close(loss(f_s, f_t), expected, rtol=1e-14, atol=0)


def test_module_matches_the_authors_loss_and_running_statistics():
    ours, theirs = fastkd.SRDLoss(5, 4).double(), AuthorsSRD(5, 4).double()
    theirs.embed.load_state_dict(ours.projector.state_dict())
    for step in range(3):
        f_s, f_t = rand(6, 5, 2, 2, seed=20 + step), rand(6, 4, 3, 3, seed=30 + step)
        torch.testing.assert_close(ours(f_s, f_t), theirs(f_s, f_t), rtol=1e-12, atol=0)
    for mine, authors in ((ours.bn_s, theirs.bn_s), (ours.bn_t, theirs.bn_t)):
        torch.testing.assert_close(mine.running_mean, authors.running_mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(mine.running_var, authors.running_var, rtol=1e-12, atol=0)
        assert int(mine.num_batches_tracked) == 3


def test_eval_mode_uses_running_statistics():
    loss = fastkd.SRDLoss(3, 2).double()
    for step in range(2):
        loss(rand(5, 3, seed=40 + step), rand(5, 2, seed=50 + step))
    loss.eval()
    f_s, f_t = rand(1, 3, seed=60), rand(1, 2, seed=61)       # B = 1 is fine with running statistics
    s = standardize_ref(project_ref(loss, f_s), 1e-4, arr(loss.bn_s.running_mean), arr(loss.bn_s.running_var))
    t = standardize_ref(arr(f_t), 1e-4, arr(loss.bn_t.running_mean), arr(loss.bn_t.running_var))
    before = loss.bn_s.running_mean.clone()
    close(loss(f_s, f_t), distance_ref(s, t, 4.0, "feature"))
    assert torch.equal(loss.bn_s.running_mean, before)


def test_module_gradcheck_inputs_and_projector():
    loss = fastkd.SRDLoss(4, 3).double()
    f_s, f_t = rand(3, 4, 2, 1, seed=70).requires_grad_(), rand(3, 3, 1, 2, seed=71)
    weight = loss.projector.weight.detach().clone().requires_grad_()
    bias = loss.projector.bias.detach().clone().requires_grad_()

    def run(s, w, b):
        params = {"projector.weight": w, "projector.bias": b}
        return torch.func.functional_call(loss, params, (s, f_t))

    assert torch.autograd.gradcheck(run, (f_s, weight, bias))
    loss.mode = "correlation"
    assert torch.autograd.gradcheck(run, (f_s, weight, bias))


def test_module_under_autocast_and_in_half():
    loss = fastkd.SRDLoss(5, 4)
    f_s, f_t = rand(8, 5, 2, 2, seed=80, dtype=torch.float32), rand(8, 4, seed=81, dtype=torch.float32)
    reference = float(loss(f_s, f_t).detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(f_s.bfloat16(), f_t.bfloat16())
    assert out.dtype == torch.float32 and float(out.detach()) == pytest.approx(reference, rel=1e-2)
    half = fastkd.SRDLoss(5, 4).half()
    half.projector.load_state_dict(loss.projector.state_dict())
    out = half(f_s.half(), f_t.half())
    assert out.dtype == torch.float32 and float(out.detach()) == pytest.approx(reference, rel=1e-2)


def test_math_reads_no_tensor_values():
    """On the meta device any host sync (.item(), a boolean-mask gather, a branch on a value) fails."""
    loss = fastkd.SRDLoss(5, 4, mode="correlation").to("meta")
    with fastkd.value_checks(False):
        assert loss(torch.empty(3, 5, 2, 2, device="meta"), torch.empty(3, 4, device="meta")).device.type == "meta"
        assert fk.srd_loss(torch.empty(3, 4, device="meta"), torch.empty(3, 4, device="meta")).dim() == 0


# --- errors -----------------------------------------------------------------------------------

def test_batch_of_one_is_rejected_where_batch_statistics_are_needed():
    with pytest.raises(ValueError, match="z_s has batch size 1"):
        fk.srd_loss(rand(1, 3), rand(1, 3))
    with pytest.raises(ValueError, match="f_s has batch size 1"):
        fastkd.SRDLoss(3, 3).double()(rand(1, 3), rand(1, 3))


def test_functional_bad_inputs_name_the_argument():
    z_s, z_t = rand(3, 4), rand(3, 4)
    nan = z_t.clone()
    nan[1, 2] = float("nan")
    cases = [
        (z_s.tolist(), z_t, TypeError, "z_s"),
        (z_s, z_t.int(), TypeError, "z_t"),
        (z_s, z_t.float(), TypeError, "z_t"),
        (z_s, rand(4, 4), ValueError, "z_t"),
        (z_s, rand(3, 5), ValueError, "z_t"),
        (z_s, nan, ValueError, "z_t"),
        (rand(3, 4, 1), z_t, ValueError, "z_s"),
        (z_s, z_t.to("meta"), ValueError, "z_t"),
    ]
    for s, t, exc, arg in cases:
        with pytest.raises(exc, match=arg):
            fk.srd_loss(s, t)


def test_module_bad_inputs_name_the_argument():
    loss = fastkd.SRDLoss(4, 3).double()
    f_s, f_t = rand(3, 4, 2, 2), rand(3, 3)
    nan = f_s.clone()
    nan[0, 0, 0, 0] = float("nan")
    cases = [
        (f_s, f_t.numpy(), TypeError, "f_t"),
        (f_s.float(), f_t.float(), TypeError, "f_s"),        # not the projector's dtype
        (f_s, f_t.float(), TypeError, "f_t"),
        (f_s, rand(2, 3), ValueError, "f_t"),
        (nan, f_t, ValueError, "f_s"),
        (rand(3, 5), f_t, ValueError, "f_s has 5 channels"),
        (f_s, rand(3, 4), ValueError, "f_t has 4 channels"),
        (rand(3, 4, 2), f_t, ValueError, "f_s"),
        (f_s.to("meta"), f_t, ValueError, "f_t"),
    ]
    for s, t, exc, arg in cases:
        with pytest.raises(exc, match=arg):
            loss(s, t)


def test_hyperparameter_errors():
    with pytest.raises(ValueError, match="mode"):
        fastkd.SRDLoss(3, 3, mode="mse")
    with pytest.raises(ValueError, match="mode"):
        fk.srd_loss(rand(2, 3), rand(2, 3), mode="Feature")
    with pytest.raises(ValueError, match="alpha"):
        fastkd.SRDLoss(3, 3, alpha=0)
    with pytest.raises(ValueError, match="alpha"):
        fk.srd_loss(rand(2, 3), rand(2, 3), alpha=-1.0)
    with pytest.raises(ValueError, match="s_dim"):
        fastkd.SRDLoss(0, 3)
    with pytest.raises(TypeError, match="t_dim"):
        fastkd.SRDLoss(3, 2.0)

"""The batch-relation custom ops (fastkd::sp_loss, cckd_loss, pkt_loss, rkd_distance_loss, rkd_angle_loss, nst_loss):
their torch contracts against the published computations' autograd in float64, gradcheck, opcheck,
precision, and the functionals' routing. Backend-specific kernels: test_similarity_native.py,
test_similarity_triton.py."""
import types

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import functional as fk
from fastkd.backends import _impls
from fastkd.ops import nst, similarity

from _helpers import rand


def published(name, extra):
    """The eager computation the loss had before the ops, on [B, D] (NST: [B, C, HW]) inputs, by autograd."""
    return {
        "sp_loss": similarity.sp_reference,
        "cckd_loss": lambda s, t: similarity.cckd_reference(s, t, *extra),
        "pkt_loss": lambda s, t: similarity.pkt_reference(s, t, *extra),
        "rkd_distance_loss": similarity.rkd_distance_reference,
        "rkd_angle_loss": similarity.rkd_angle_reference,
        "nst_loss": nst.nst_reference,
    }[name]


# name -> (extra arguments, student shape for batch b, teacher shape, whether the teacher gets a gradient)
OPS = {
    "sp_loss": ((), (5, 2, 3), (4, 3), True),
    "cckd_loss": ((0.4, 3), (6,), (9,), True),
    "pkt_loss": ((1e-7,), (6,), (9,), True),
    "rkd_distance_loss": ((), (6,), (9,), False),
    "rkd_angle_loss": ((), (6,), (9,), False),
    "nst_loss": ((), (5, 6), (3, 6), True),
}


def make(name, b, dtype=torch.float64, seed=0):
    extra, shape_s, shape_t, _ = OPS[name]
    return rand(b, *shape_s, seed=seed, dtype=dtype), rand(b, *shape_t, seed=seed + 1, dtype=dtype), extra


def flat(name, x):
    return x if name == "nst_loss" else x.reshape(x.shape[0], -1)


def contract_with_grads(name, f_s, f_t, extra, w):
    """(loss, grad_s, grad_t) of the op's torch contract for upstream gradient w, without autograd."""
    if name == "nst_loss":
        loss, g_s, g_t = nst.nst_with_grad_reference(f_s, f_t)
        return loss, g_s * w, g_t * w
    x_s, x_t = flat(name, f_s), flat(name, f_t)
    loss, *ms = similarity.REFERENCES[name](x_s, x_t, *extra)
    grads = [similarity.relation_grad_reference(x, m, w).view_as(f) for x, m, f in zip((x_s, x_t), ms, (f_s, f_t))]
    return loss, *grads, *([None] * (2 - len(grads)))


def published_with_grads(name, f_s, f_t, extra, w):
    s, t = f_s.clone().requires_grad_(), f_t.clone().requires_grad_(OPS[name][3])
    loss = published(name, extra)(flat(name, s), flat(name, t))
    (loss * w).backward()
    return loss.detach(), s.grad, t.grad


@pytest.mark.parametrize("b", [1, 3, 17])
@pytest.mark.parametrize("name", OPS)
def test_contract_matches_published_autograd(name, b):
    if name == "rkd_distance_loss" and b == 1:
        b = 2  # distances need two samples
    f_s, f_t, extra = make(name, b, seed=b)
    w = torch.tensor(-1.7, dtype=torch.float64)
    got = contract_with_grads(name, f_s, f_t, extra, w)
    want = published_with_grads(name, f_s, f_t, extra, w)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-13)
    for g, e in zip(got[1:], want[1:]):
        if e is None:
            assert g is None
        else:
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_nst_contract_is_the_spatial_gram_form():
    """Σ_ij (s_i·t_j)² = ⟨SᵀS, TᵀT⟩: the loss equals mean_b ‖SᵀS/C_s − TᵀT/C_t‖² (what the kernels use)."""
    f_s, f_t, _ = make("nst_loss", 4)
    s, t = F.normalize(f_s, dim=2), F.normalize(f_t, dim=2)
    a = s.transpose(1, 2) @ s / s.shape[1] - t.transpose(1, 2) @ t / t.shape[1]
    torch.testing.assert_close(nst.nst_with_grad_reference(f_s, f_t)[0], a.pow(2).sum() / 4, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", OPS)
def test_op_autograd_matches_contract(name):
    """The registered op (native on CPU when built) through autograd, both inputs, non-unit upstream gradient."""
    f_s, f_t, extra = make(name, 7, seed=3)
    s, t = flat(name, f_s).requires_grad_(), flat(name, f_t).requires_grad_()
    out = getattr(torch.ops.fastkd, name)(s, t, *extra)
    (out[0] * 2.5).backward()
    want = contract_with_grads(name, f_s, f_t, extra, torch.tensor(2.5, dtype=torch.float64))
    torch.testing.assert_close(out[0], want[0], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(s.grad.view_as(f_s), want[1], rtol=1e-9, atol=1e-12)
    if want[2] is None:
        assert t.grad is None
    else:
        torch.testing.assert_close(t.grad.view_as(f_t), want[2], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", OPS)
def test_gradcheck(name):
    f_s, f_t, extra = make(name, 4, seed=5)
    # NST's teacher gradient is not the derivative of the value: its teacher-teacher term is detached
    both = OPS[name][3] and name != "nst_loss"
    s, t = flat(name, f_s).requires_grad_(), flat(name, f_t).requires_grad_(both)
    op = getattr(torch.ops.fastkd, name)
    inputs = (s, t) if both else (s,)
    assert torch.autograd.gradcheck(lambda *x: op(*x, *((t,) if len(x) == 1 else ()), *extra)[0], inputs)


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    f_s, f_t, extra = make(name, 5, dtype=torch.float32, seed=6)
    s, t = flat(name, f_s).requires_grad_(), flat(name, f_t).requires_grad_()
    torch.library.opcheck(getattr(torch.ops.fastkd, name).default, (s, t, *extra))


@pytest.mark.parametrize("name", OPS)
def test_fake_shapes_and_dtypes(name):
    f_s, f_t, extra = make(name, 5, dtype=torch.float16)
    out = getattr(torch.ops.fastkd, name)(flat(name, f_s).to("meta"), flat(name, f_t).to("meta"), *extra)
    assert out[0].shape == () and out[0].dtype == torch.float32
    if name == "nst_loss":
        assert out[1].shape == f_s.shape and out[1].dtype == torch.float16 and out[2].shape == f_t.shape
    else:
        assert all(m.shape == (5, 5) and m.dtype == torch.float32 for m in out[1:])


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_fp32(name, dtype):
    f_s, f_t, extra = make(name, 6, dtype=torch.float32, seed=7)
    f_s, f_t = f_s.to(dtype), f_t.to(dtype)
    op = getattr(torch.ops.fastkd, name)
    got = op(flat(name, f_s), flat(name, f_t), *extra)
    want = op(flat(name, f_s.float()), flat(name, f_t.float()), *extra)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)


# functional -> (op it routes to, student, teacher)
ROUTES = {
    "sp_loss": (fk.sp_loss, rand(4, 3, 2, 2), rand(4, 5, 1, 2)),
    "cckd_loss": (fk.cckd_loss, rand(4, 6), rand(4, 3)),
    "pkt_loss": (fk.pkt_loss, rand(4, 6), rand(4, 3)),
    "rkd_distance_loss": (lambda s, t: fk.rkd_loss(s, t, w_angle=0.0), rand(4, 6), rand(4, 3)),
    "rkd_angle_loss": (lambda s, t: fk.rkd_loss(s, t, w_dist=0.0), rand(5, 6), rand(5, 3)),
    "nst_loss": (fk.nst_loss, rand(4, 3, 4, 4), rand(4, 5, 2, 2)),
}


@pytest.mark.parametrize("name", ROUTES)
def test_functional_runs_the_op_unless_torch_is_selected(name, monkeypatch):
    fn, f_s, f_t = ROUTES[name]
    calls = []
    op, available = _impls[name]["native"]["cpu"]  # the table's entry: the op the native backend runs on CPU
    monkeypatch.setitem(_impls[name]["native"], "cpu", (lambda *a: calls.append(1) or op(*a), available))
    fused = fn(f_s, f_t)
    routed = [1] if "native" in fastkd.backends() else []  # auto on CPU: native, else the eager torch path
    assert calls == routed
    with fastkd.use_backend("torch"):
        eager = fn(f_s, f_t)
    assert calls == routed
    torch.testing.assert_close(fused, eager, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["cckd_loss", "rkd_distance_loss", "rkd_angle_loss", "nst_loss"])
def test_python_autograd_formula(name):
    """The formula registered in Python (used where the native library's C++ autograd is not: CUDA, or no
    native build) gives the contract's gradients; needs_input_grad is honoured."""
    f_s, f_t, extra = make(name, 5, seed=9)
    x_s, x_t = flat(name, f_s), flat(name, f_t)
    w = torch.tensor(0.7, dtype=torch.float64)
    if name == "nst_loss":
        _, g_s, g_t = nst.nst_with_grad_reference(x_s, x_t)
        ctx = types.SimpleNamespace(saved_tensors=(g_s, g_t))
        got = nst.AUTOGRAD.backward(ctx, w, None, None)
    else:
        _, *ms = similarity.REFERENCES[name](x_s, x_t, *extra)
        needs = (True, False) + (False,) * len(extra)
        ctx = types.SimpleNamespace(saved_tensors=(x_s, x_t, *ms), needs_input_grad=needs)
        got = similarity.AUTOGRAD.backward(ctx, w, *([None] * len(ms)))
        assert len(got) == 2 + len(extra) and all(g is None for g in got[1:])
    want = contract_with_grads(name, f_s, f_t, extra, w)
    torch.testing.assert_close(got[0].view_as(f_s), want[1], rtol=1e-12, atol=1e-14)
    if name == "nst_loss":
        torch.testing.assert_close(got[1], want[2], rtol=1e-12, atol=1e-14)


# --- RKD's angle term: what its Gram form does where rows (nearly) coincide --------------------

def _rkd_angle_published(s, t):
    return published("rkd_angle_loss", ())(s, t)


@pytest.mark.parametrize("b", [2, 5])
def test_rkd_angle_contract_different_widths_and_upstream_gradient(b):
    """Student and teacher widths differ; B = 2 (every angle is 0 or 1 on both sides: loss 0) and odd B."""
    f_s, f_t = rand(b, 11, seed=40, dtype=torch.float64), rand(b, 4, seed=41, dtype=torch.float64)
    w = torch.tensor(3.25, dtype=torch.float64)
    got = contract_with_grads("rkd_angle_loss", f_s, f_t, (), w)
    want = published_with_grads("rkd_angle_loss", f_s, f_t, (), w)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-14)
    if b == 2:
        assert float(got[0]) < 1e-25 and float(got[1].abs().max()) < 1e-13
    else:
        assert float(got[0]) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rkd_angle_duplicated_rows_are_zero_differences(dtype):
    """An exact duplicate (or one within rounding of the Gram expansion) gives exactly the published value:
    its differences are zero vectors, their angles 0; no NaN or Inf in the loss or M."""
    base = rand(4, 7, seed=42, dtype=torch.float64)
    exact = torch.cat([base, base[:2]])
    near = exact.clone()
    near[4] += 1e-9 * rand(7, seed=43, dtype=torch.float64) * (1 if dtype == torch.float64 else 1e3)
    f_t = torch.cat([rand(5, 3, seed=44, dtype=torch.float64), rand(5, 3, seed=44, dtype=torch.float64)[:1]])
    want = _rkd_angle_published(exact, f_t)
    # the near duplicate moves the other angles at rows 4 by ~1e-9 (fp64) / 1e-6 (fp32) relative
    for f_s, rtol in ((exact, 1e-12), (near, 1e-8)):
        loss, m = similarity.rkd_angle_with_grad_reference(f_s.to(dtype), f_t.to(dtype))
        assert torch.isfinite(m).all()
        torch.testing.assert_close(loss, want.to(dtype), rtol=rtol if dtype == torch.float64 else 1e-5, atol=0)
    # published on the near duplicate: a unit difference vector of noise, far from 0 angles
    assert abs(float(_rkd_angle_published(near, f_t)) - float(want)) > 1e-3


def test_rkd_angle_close_rows_above_rounding_are_resolved():
    """Rows 1e-3 apart (relative to their norms, far above fp64's zero threshold) keep accurate angles."""
    f_s = rand(6, 9, seed=45, dtype=torch.float64) + 3.0
    f_s[5] = f_s[0] + 1e-3 * rand(9, seed=46, dtype=torch.float64)
    f_t = rand(6, 4, seed=47, dtype=torch.float64)
    w = torch.tensor(1.0, dtype=torch.float64)
    got = contract_with_grads("rkd_angle_loss", f_s, f_t, (), w)
    want = published_with_grads("rkd_angle_loss", f_s, f_t, (), w)
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-9)

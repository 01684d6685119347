"""The logit-loss ops fastkd::kd_loss / dkd_loss: their torch contract against the published computation,
autograd through the op (student and teacher), opcheck, and the routing of the functional losses.

The published computation (fastkd.ops.logits.kd_reference / dkd_reference) is itself checked against
independent float64 derivations in test_logits.py; here the op's forward statistics and its backward
formulas must reproduce it and its autograd gradients.
"""
import pytest
import torch

import fastkd
from fastkd import functional as F
from fastkd.backends import choose, implementations
from fastkd.ops import logits as ops

from _logits_cases import ALPHA, BETA, LOSSES, T, Contract, case, check_backend, published, rel


def op_loss(loss, s, t, y, temperature=T):
    if loss == "kd":
        return torch.ops.fastkd.kd_loss(s, t, temperature)[0]
    return torch.ops.fastkd.dkd_loss(s, t, y, ALPHA, BETA, temperature)[0]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape", [(1, 2), (3, 5), (7, 33), (16, 100)])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_contract_matches_published_values_and_gradients(loss, shape, temperature):
    s, t, y = case(*shape, dtype=torch.float64, seed=shape[1])
    s.requires_grad_(True)
    t.requires_grad_(True)
    want = published(loss, s, t, y, temperature)
    want_s, want_t = torch.autograd.grad(want * 1.7, (s, t))
    # the contract as a whole: the forward's stats feed the backward
    check_backend(loss, Contract, s.detach(), t.detach(), y, temperature=temperature)
    got = op_loss(loss, s, t, y, temperature)
    assert rel(got, want) <= 1e-12
    got_s, got_t = torch.autograd.grad(got * 1.7, (s, t))
    assert rel(got_s, want_s) <= 1e-12 and rel(got_t, want_t) <= 1e-12


@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck_through_the_op(loss):
    s, t, y = case(3, 6, dtype=torch.float64, seed=1)
    s.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: op_loss(loss, a, b, y, 2.0), (s, t))
    # the student alone: the teacher's pass is skipped and its gradient is None
    assert torch.autograd.gradcheck(lambda a: op_loss(loss, a, t.detach(), y, 2.0), (s,))


class _Ctx:
    """What torch.library hands the Python autograd formula (CPU tensors use the C++ one when native is built)."""

    def __init__(self, needs):
        self.needs_input_grad = needs

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("teacher", [True, False])
def test_python_autograd_formula(loss, teacher):
    s, t, y = case(5, 12, dtype=torch.float64, seed=6)
    s64, t64 = s.clone().requires_grad_(True), t.clone().requires_grad_(teacher)
    want = torch.autograd.grad(published(loss, s64, t64, y) * 0.7, (s64, t64) if teacher else (s64,))
    ctx = _Ctx((True, teacher) + (False,) * 4)
    if loss == "kd":
        inputs, formula = (s, t, T), ops.kd_autograd(ops.KD_LOSS_BACKWARD)
        formula.setup_context(ctx, inputs, Contract.kd_loss(*inputs))
    else:
        inputs, formula = (s, t, y, ALPHA, BETA, T), ops.dkd_autograd(ops.DKD_LOSS_BACKWARD)
        formula.setup_context(ctx, inputs, Contract.dkd_loss(*inputs))
    got = formula.backward(ctx, torch.tensor(0.7, dtype=torch.float64), None)
    assert len(got) == len(inputs) and all(g is None for g in got[2:])
    assert rel(got[0], want[0]) <= 1e-12
    assert (got[1] is None) != teacher and (not teacher or rel(got[1], want[1]) <= 1e-12)


def test_teacher_gradient_only_when_asked():
    s, t, y = case(4, 9, seed=2)
    s.requires_grad_(True)
    for loss in LOSSES:
        op_loss(loss, s, t, y).backward()
        assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("loss", LOSSES)
def test_opcheck(loss):
    s, t, y = case(4, 11, seed=3)
    s.requires_grad_(True)
    t.requires_grad_(True)
    if loss == "kd":
        torch.library.opcheck(torch.ops.fastkd.kd_loss.default, (s, t, 3.0))
        _, stats = torch.ops.fastkd.kd_loss(s.detach(), t.detach(), 3.0)
        torch.library.opcheck(torch.ops.fastkd.kd_loss_backward.default,
                              (torch.tensor(0.5), s.detach(), t.detach(), stats, 3.0, True))
    else:
        torch.library.opcheck(torch.ops.fastkd.dkd_loss.default, (s, t, y, ALPHA, BETA, 3.0))
        _, stats = torch.ops.fastkd.dkd_loss(s.detach(), t.detach(), y, ALPHA, BETA, 3.0)
        torch.library.opcheck(torch.ops.fastkd.dkd_loss_backward.default,
                              (torch.tensor(0.5), s.detach(), t.detach(), y, stats, ALPHA, BETA, 3.0, False))


def test_fake_shapes_on_meta():
    s, t = torch.empty(5, 10, device="meta", dtype=torch.float16), torch.empty(5, 10, device="meta",
                                                                                dtype=torch.float16)
    y = torch.empty(5, dtype=torch.int64, device="meta")
    loss, stats = torch.ops.fastkd.kd_loss(s, t, 4.0)
    assert loss.shape == () and loss.dtype == torch.float32 and stats.shape == (5, 5)
    loss, stats = torch.ops.fastkd.dkd_loss(s, t, y, ALPHA, BETA, 4.0)
    assert loss.shape == () and loss.dtype == torch.float32 and stats.shape == (5, 7)
    g_s, g_t = torch.ops.fastkd.dkd_loss_backward(loss, s, t, y, stats, ALPHA, BETA, 4.0, False)
    assert g_s.shape == (5, 10) and g_s.dtype == torch.float16 and g_t.shape == (0,)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_functional_losses_route_through_the_backend(backend):
    s, t, y = case(6, 21, seed=4)
    s.requires_grad_(True)
    with fastkd.use_backend(backend):
        kd, dkd = F.kd_loss(s, t, 3.0), F.dkd_loss(s, t, y, 0.5, 2.0, 3.0)
        (kd + dkd).backward()
        chosen = choose("kd_loss", "cpu")
    assert chosen == ("torch" if backend == "torch" or "native" not in fastkd.backends() else "native")
    s64 = s.detach().double().requires_grad_(True)
    want = ops.kd_reference(s64, t.double(), 3.0) + ops.dkd_reference(s64, t.double(), y, 0.5, 2.0, 3.0)
    want.backward()
    assert rel(kd + dkd, want) <= 1e-5 and rel(s.grad, s64.grad) <= 1e-5


def test_backends_registered():
    for op in ("kd_loss", "kd_loss_backward", "dkd_loss", "dkd_loss_backward"):
        assert "torch" in implementations(op, "cpu")
        assert "triton" not in implementations(op, "cpu")  # Triton serves CUDA tensors only


def test_compile_traces_the_op_without_graph_breaks():
    s, t, y = case(4, 13, seed=5)
    s.requires_grad_(True)
    with fastkd.use_backend("auto"):
        fn = torch.compile(lambda a, b, c: torch.ops.fastkd.dkd_loss(a, b, c, ALPHA, BETA, T)[0], fullgraph=True,
                           backend="aot_eager")
        got = fn(s, t, y)
        got.backward()
    s64 = s.detach().double().requires_grad_(True)
    want = ops.dkd_reference(s64, t.double(), y, ALPHA, BETA, T)
    want.backward()
    assert rel(got, want) <= 1e-5 and rel(s.grad, s64.grad) <= 1e-5


@pytest.mark.parametrize("upstream", [1.0, 0.9])
def test_compile_traces_kd_with_the_students_gradient(upstream):
    """On CPU with only the student needing a gradient, kd_loss's autograd takes kd_loss_with_grad (native) and
    backward scales the saved gradient: both trace under AOT autograd (fake tensors, no value to compare with 1)."""
    s, t, _ = case(5, 21, seed=6)
    s.requires_grad_(True)
    with fastkd.use_backend("auto"):
        fn = torch.compile(lambda a, b: torch.ops.fastkd.kd_loss(a, b, T)[0] * upstream, fullgraph=True,
                           backend="aot_eager")
        got = fn(s, t)
        got.backward()
    s64 = s.detach().double().requires_grad_(True)
    want = ops.kd_reference(s64, t.double(), T) * upstream
    want.backward()
    assert rel(got, want) <= 1e-5 and rel(s.grad, s64.grad) <= 1e-5

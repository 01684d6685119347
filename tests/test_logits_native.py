"""The native CPU kernels of fastkd::kd_loss / dkd_loss (and their backward ops) against the torch contract.

The oracle is the contract of fastkd.ops.logits run in float64 on the same (rounded) logits; the kernels
compute in fp32 (fp64 for double logits).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _logits_cases import ALPHA, BETA, LOSSES, TOL, case, check_backend, forward, rel
from fastkd.ops import logits as ops

pytestmark = pytest.mark.native


class Native:
    """The ops as registered: CPU tensors run the kernels of fastkd._C."""
    kd_loss = staticmethod(torch.ops.fastkd.kd_loss)
    kd_loss_backward = staticmethod(torch.ops.fastkd.kd_loss_backward)
    dkd_loss = staticmethod(torch.ops.fastkd.dkd_loss)
    dkd_loss_backward = staticmethod(torch.ops.fastkd.dkd_loss_backward)


def test_the_cpu_kernel_is_the_native_one():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastkd::kd_loss", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastkd::dkd_loss_backward", "CPU")


# class counts around the 16-wide lane loops and the row split over threads
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape", [(1, 2), (1, 17), (3, 5), (5, 33), (64, 100), (2, 1000), (3, 5003)])
def test_fp32_matches_contract(loss, shape):
    check_backend(loss, Native, *case(*shape, seed=shape[1]))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(loss, dtype):
    check_backend(loss, Native, *case(9, 77, dtype=dtype, seed=7), grad=-0.3)


@pytest.mark.parametrize("loss", LOSSES)
def test_fp16_logits_whose_exponentials_overflow(loss):
    """|x| up to ~3e4 in fp16 at T = 1: exp(x) overflows fp16 and fp32 unless shifted by the row max."""
    s, t, y = case(4, 50, dtype=torch.float16, scale=8000.0, seed=8)
    assert s.abs().max() > 1e4
    check_backend(loss, Native, s, t, y, temperature=1.0)
    got, _ = forward(loss, Native, s, t, y, 1.0)
    assert torch.isfinite(got)


@pytest.mark.parametrize("loss", LOSSES)
def test_extreme_rows(loss):
    """A row whose softmax is one-hot (exp of the others underflows) and a constant row."""
    s, t, y = case(3, 40, seed=9)
    s[0] = -200.0
    s[0, y[0]] = 200.0
    t[1] = 1.0
    check_backend(loss, Native, s, t, y, temperature=1.0)


def test_non_contiguous_logits():
    s, t, y = case(6, 31, seed=10)
    wide_s, wide_t = torch.zeros(6, 62), torch.zeros(6, 62)
    wide_s[:, ::2], wide_t[:, ::2] = s, t
    for loss in LOSSES:
        got = forward(loss, Native, wide_s[:, ::2], wide_t[:, ::2], y)[0]
        want = forward(loss, Native, s, t, y)[0]
        assert rel(got, want) <= 1e-6


def test_same_input_same_result():
    s, t, y = case(64, 1000, seed=11)
    for loss in LOSSES:
        first, again = forward(loss, Native, s, t, y), forward(loss, Native, s, t, y)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_gradcheck_float64():
    s, t, y = case(3, 7, dtype=torch.float64, seed=12)
    s.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.fastkd.kd_loss(a, b, 2.0)[0], (s, t))
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.fastkd.dkd_loss(a, b, y, ALPHA, BETA, 2.0)[0], (s, t))


def test_opcheck_native():
    s, t, y = case(5, 40, seed=13)
    s.requires_grad_(True)
    torch.library.opcheck(torch.ops.fastkd.kd_loss.default, (s, t, 4.0))
    torch.library.opcheck(torch.ops.fastkd.dkd_loss.default, (s, t, y, ALPHA, BETA, 4.0))


def test_errors():
    s, t, y = case(3, 5, seed=14)
    with pytest.raises(RuntimeError, match="target holds index 5"):
        torch.ops.fastkd.dkd_loss(s, t, torch.tensor([0, 5, 1]), ALPHA, BETA, 4.0)
    with pytest.raises(RuntimeError, match="at least 2 classes"):
        torch.ops.fastkd.dkd_loss(s[:, :1], t[:, :1], torch.zeros(3, dtype=torch.int64), ALPHA, BETA, 4.0)
    with pytest.raises(RuntimeError, match="one shape"):
        torch.ops.fastkd.kd_loss(s, t[:, :4], 4.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.fastkd.kd_loss(s, t.double(), 4.0)
    with pytest.raises(RuntimeError, match="stats must be"):
        torch.ops.fastkd.kd_loss_backward(torch.tensor(1.0), s, t, torch.zeros(3, 4), 4.0, False)


# ---------------------------------------------------------------- KD's forward pass with the student's gradient


@pytest.mark.parametrize("shape", [(1, 2), (3, 5), (5, 33), (64, 100), (2, 1000), (3, 5003), (2, 131072)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_kd_with_grad_matches_contract(shape, dtype):
    s, t, _ = case(*shape, dtype=dtype, seed=shape[1])
    want = ops.kd_with_grad_reference(s.double(), t.double(), 3.0)
    got = torch.ops.fastkd.kd_loss_with_grad(s, t, 3.0)
    tol = TOL[dtype]
    assert got[0].dtype == got[1].dtype == torch.promote_types(dtype, torch.float32)
    assert got[2].dtype == dtype and got[2].shape == s.shape
    for g, w in zip(got, want):
        assert rel(g, w, floor=torch.finfo(dtype).tiny) <= tol
    # the gradient is the backward op's for a unit upstream gradient
    backward_op = torch.ops.fastkd.kd_loss_backward(torch.tensor(1.0, dtype=got[0].dtype), s, t, got[1], 3.0, False)
    assert rel(got[2], backward_op[0], floor=torch.finfo(dtype).tiny) <= tol


class OpsSeen(TorchDispatchMode):
    """Records the ops that reach the kernels (below autograd)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def kd_ops_run(s, t):
    with OpsSeen() as seen:
        loss = torch.ops.fastkd.kd_loss(s, t, 4.0)[0]
    return loss, [n for n in seen.names if n.startswith("fastkd.")]


def test_kd_autograd_takes_the_fused_pass_only_for_a_student_gradient():
    s, t, _ = case(7, 45, seed=21)
    assert kd_ops_run(s.clone().requires_grad_(True), t)[1] == ["fastkd.kd_loss_with_grad.default"]
    assert kd_ops_run(s, t)[1] == ["fastkd.kd_loss.default"]  # no gradient wanted
    with torch.no_grad():
        assert kd_ops_run(s.clone().requires_grad_(True), t)[1] == ["fastkd.kd_loss.default"]
    both = kd_ops_run(s.clone().requires_grad_(True), t.clone().requires_grad_(True))[1]
    assert both == ["fastkd.kd_loss.default"]  # the teacher's gradient needs the backward op
    half = kd_ops_run(s.half().requires_grad_(True), t.half())[1]
    assert half == ["fastkd.kd_loss.default"]  # a rounded fp16 gradient would be rounded again when scaled


@pytest.mark.parametrize("upstream", [1.0, 1.7, -0.25])
def test_kd_fused_gradient_against_the_published_autograd(upstream):
    s, t, _ = case(6, 37, seed=22)
    leaf = s.clone().requires_grad_(True)
    (torch.ops.fastkd.kd_loss(leaf, t, 2.0)[0] * upstream).backward()
    ref = s.double().requires_grad_(True)
    (ops.kd_reference(ref, t.double(), 2.0) * upstream).backward()
    assert rel(leaf.grad, ref.grad) <= 1e-5


def test_kd_fused_gradient_kept_for_a_second_backward_and_accumulated():
    s, t, _ = case(4, 19, seed=23)
    leaf = s.clone().requires_grad_(True)
    loss = torch.ops.fastkd.kd_loss(leaf, t, 4.0)[0]
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    loss.backward()  # the saved gradient was handed on, not consumed: the same again, accumulated
    assert torch.allclose(leaf.grad, 2 * first, rtol=1e-6, atol=0)
    ref = s.double().requires_grad_(True)
    ops.kd_reference(ref, t.double(), 4.0).backward()
    assert rel(first, ref.grad) <= 1e-5


def test_kd_fused_gradient_gradcheck_and_opcheck():
    s, t, _ = case(3, 7, dtype=torch.float64, seed=24)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: torch.ops.fastkd.kd_loss(a, t, 2.0)[0], (s,))
    torch.library.opcheck(torch.ops.fastkd.kd_loss_with_grad.default, (s.float().detach().requires_grad_(True),
                                                                       t.float(), 4.0))


def test_kd_fused_gradient_summed_with_another_loss_on_the_same_logits():
    """The training case: logits from a layer feed CE and KD; the engine adds KD's handed-on gradient to CE's
    (possibly in place, once nothing else holds it) before the layer's backward."""
    g = torch.Generator().manual_seed(25)
    x, w = torch.randn(8, 12, generator=g), torch.randn(12, 30, generator=g)
    t, y = torch.randn(8, 30, generator=g), torch.randint(0, 30, (8,), generator=g)
    grads = []
    for dtype, kd in ((torch.float32, lambda s: torch.ops.fastkd.kd_loss(s, t, 4.0)[0]),
                      (torch.float64, lambda s: ops.kd_reference(s, t.double(), 4.0))):
        weight = w.to(dtype).detach().requires_grad_(True)
        logits = x.to(dtype) @ weight
        (torch.nn.functional.cross_entropy(logits, y) + kd(logits)).backward()
        grads.append(weight.grad)
    assert rel(grads[0], grads[1]) <= 1e-5

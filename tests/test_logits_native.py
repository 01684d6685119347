"""The native CPU kernels of fastkd::kd_loss / dkd_loss (and their backward ops) against the torch contract.

The oracle is the contract of fastkd.ops.logits run in float64 on the same (rounded) logits; the kernels
compute in fp32 (fp64 for double logits).
"""
import pytest
import torch

from _logits_cases import ALPHA, BETA, LOSSES, case, check_backend, forward, rel

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

"""Cases and comparisons shared by the tests of the logit-loss ops (KD, DKD) and their backends."""
import torch

from fastkd.ops import logits as ops

from _tolerances import TOL, rel  # noqa: F401  (the logit tests import them from here)

LOSSES = ("kd", "dkd")
ALPHA, BETA, T = 1.0, 8.0, 4.0


def case(batch, classes, dtype=torch.float32, scale=3.0, seed=0, device="cpu"):
    """(logits_s, logits_t, target): random logits; the teacher sure of the target in every other row."""
    g = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(batch, classes, generator=g, dtype=torch.float64)
    t = scale * torch.randn(batch, classes, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g)
    t[::2].scatter_add_(1, y[::2, None], torch.full((len(range(0, batch, 2)), 1), 2 * scale, dtype=torch.float64))
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype), y.to(device)


def forward(loss, impl, s, t, y, temperature=T):
    """``impl`` is a module (or namespace) with kd_loss / dkd_loss of the ops' signature."""
    if loss == "kd":
        return impl.kd_loss(s, t, temperature)
    return impl.dkd_loss(s, t, y, ALPHA, BETA, temperature)


def backward(loss, impl, grad, s, t, y, stats, teacher_grad, temperature=T):
    if loss == "kd":
        return impl.kd_loss_backward(grad, s, t, stats, temperature, teacher_grad)
    return impl.dkd_loss_backward(grad, s, t, y, stats, ALPHA, BETA, temperature, teacher_grad)


class Contract:
    """The torch contract of the ops under the names of the op functions."""
    kd_loss = staticmethod(ops.kd_forward_reference)
    kd_loss_backward = staticmethod(ops.kd_backward_reference)
    dkd_loss = staticmethod(ops.dkd_forward_reference)
    dkd_loss_backward = staticmethod(ops.dkd_backward_reference)


def published(loss, s, t, y, temperature=T):
    """The published computation (autograd reference) of the loss."""
    if loss == "kd":
        return ops.kd_reference(s, t, temperature)
    return ops.dkd_reference(s, t, y, ALPHA, BETA, temperature)


def check_backend(loss, impl, s, t, y, grad=1.7, rtol=None, temperature=T):
    """``impl``'s forward and backward against the contract run in float64 on the same (rounded) logits."""
    rtol = rtol or TOL[s.dtype]
    s64, t64 = s.double().cpu(), t.double().cpu()
    want_loss, want_stats = forward(loss, Contract, s64, t64, y.cpu(), temperature)
    got_loss, got_stats = forward(loss, impl, s, t, y, temperature)
    assert got_loss.dim() == 0 and got_loss.dtype == torch.promote_types(s.dtype, torch.float32)
    assert rel(got_loss, want_loss) <= rtol, (rel(got_loss, want_loss), rtol)
    assert rel(got_stats, want_stats) <= rtol
    upstream = torch.tensor(grad, dtype=got_loss.dtype, device=s.device)
    want = backward(loss, Contract, torch.tensor(grad, dtype=torch.float64), s64, t64, y.cpu(), want_stats, True,
                    temperature)
    got = backward(loss, impl, upstream, s, t, y, got_stats, True, temperature)
    for name, g, w in zip(("student", "teacher"), got, want):
        assert g.dtype == s.dtype and g.shape == s.shape
        # a gradient below the dtype's smallest normal number rounds to 0 or a subnormal: measure from there
        err = rel(g, w, floor=torch.finfo(s.dtype).tiny)
        assert err <= rtol, (name, err, rtol)
    student_only = backward(loss, impl, upstream, s, t, y, got_stats, False, temperature)
    assert rel(student_only[0], got[0]) <= rtol and student_only[1].numel() == 0

"""The logit losses as fused ops: ``fastkd::kd_loss`` and ``fastkd::dkd_loss``.

KD: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015 (RepDistiller's
``DistillKL``). DKD: Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022
(mdistiller's ``dkd_loss``).

Two kinds of torch code live here:

* :func:`kd_reference` and :func:`dkd_reference` are the published computations (log-softmax of
  z/T, the KL summed over classes, the mean over the batch), differentiated by autograd: the
  oracle of the tests and the ``torch`` backend.
* :func:`kd_forward_reference`, :func:`kd_backward_reference` and their DKD twins are the
  contract that the native and Triton kernels implement: the forward pass returns the loss and a
  few fp32 statistics per row (log-sum-exps and the row's KL terms); the backward pass recomputes
  the gradient of the logits from the logits and those statistics, so no B×C softmax is kept
  between the passes. :func:`kd_with_grad_reference` (``fastkd::kd_loss_with_grad``) is KD's forward
  pass that also returns the student's gradient: on CPU, where a step is bound by the exponentials,
  kd_loss's autograd runs it when only the student needs a gradient (one B×C gradient kept, half the
  exponentials).

With z = x / T (fp32 at least), lse(z) = log Σ_c exp z_c and the target class g of a row:

KD   loss = T²/B Σ_b KL_b,  KL_b = Σ_c p_t (log p_t − log p_s),  log p = z − lse(z);
     stats [B, 3] = (lse(z_s), lse(z_t), KL_b);
     d loss/d x_s = u·T/B·(p_s − p_t),  d loss/d x_t = u·T/B·p_t (log p_t − log p_s − KL_b)
     (u: the upstream gradient).

DKD  O = lse(z over c ≠ g) (the non-target classes), L = logaddexp(O, z_g), L̂ = logaddexp(O, z_g − 1000)
     (mdistiller masks the target by subtracting 1000 from it), log b = (z_g − L, O − L),
     q_c = exp(z_c − O) for c ≠ g, r = exp(O − L̂), ĝ = exp(z_g − 1000 − L̂);
     TCKD_b = Σ_i b_t,i (log b_t,i − log b_s,i),
     NCKD_b = r_t (Σ_{c≠g} q_t,c (log q_t,c − log q_s,c) + log r_t − log r_s) + ĝ_t (log ĝ_t − log ĝ_s),
     loss = T²/B Σ_b (α TCKD_b + β NCKD_b);  stats [B, 4] = (O_s, O_t, TCKD_b, NCKD_b).
     With k = u·T/B, for c ≠ g:
       d loss/d x_s,c = k [q_s,c (α (b_s,o − b_t,o) + β r_s) − β r_t q_t,c],
       d loss/d x_t,c = k q_t,c [α b_t,o (D_o − TCKD_b)
                                 + β r_t (log q_t,c − log q_s,c + log r_t − log r_s − NCKD_b)],
     and at c = g:
       d loss/d x_s,g = k [α (b_s,gt − b_t,gt) + β (ĝ_s − ĝ_t)],
       d loss/d x_t,g = k [α b_t,gt (D_gt − TCKD_b) + β ĝ_t (log ĝ_t − log ĝ_s − NCKD_b)],
     where D_i = log b_t,i − log b_s,i. Every exponential has a non-positive argument.

The loss is float32 for fp16 / bf16 logits (the policy of :mod:`fastkd.functional.logits`), the
gradients have the logits' dtype. Gradients reach both the student and the teacher logits (the
teacher's only when it requires them: its pass is skipped otherwise).

The autograd formula is registered here for every device; the native library registers the same one
in C++ for CPU tensors (dispatch key AutogradCPU), which spares a CPU step torch.library's Python
wrapper (most of the time of a 64 × 100 step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd import _native
from fastkd.backends import choose_for, dispatch, register
from fastkd.functional._precision import upcast

# mdistiller removes the target class from the NCKD softmax by subtracting 1000 from its z/T.
TARGET_SHIFT = 1000.0


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """z / T, in float32 at least."""
    return upcast(logits) / temperature


# ---------------------------------------------------------------- the published computations


def _kl_sum(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) over every entry, with p = exp(log p): KL(p ‖ q) summed over the batch."""
    return (log_p.exp() * (log_p - log_q)).sum()


def kd_reference(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · (1/B) Σ_b Σ_c p_t (log p_t − log p_s), p = softmax(x / T): RepDistiller's ``DistillKL``."""
    log_p_s = F.log_softmax(_scaled(logits_s, temperature), dim=1)
    log_p_t = F.log_softmax(_scaled(logits_t, temperature), dim=1)
    return _kl_sum(log_p_t, log_p_s) * temperature**2 / logits_s.shape[0]


def _binary_log_probs(z: torch.Tensor, target: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """[log p_gt, log(1 − p_gt)] per row, [B, 2], through log-sum-exp (never log of a rounded 1 − p).

    log p_gt = z_gt − lse(z);  log(1 − p_gt) = lse(z over the non-target classes) − lse(z).
    """
    lse_all = z.logsumexp(dim=1)
    lse_other = z.masked_fill(is_target, float("-inf")).logsumexp(dim=1)
    z_gt = z.gather(1, target.unsqueeze(1)).squeeze(1)
    return torch.stack([z_gt - lse_all, lse_other - lse_all], dim=1)


def _non_target_log_probs(z: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """log softmax(z − 1000·onehot(gt)): mdistiller's distribution over the non-target classes."""
    return F.log_softmax(z - TARGET_SHIFT * is_target, dim=1)


def dkd_reference(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, alpha: float, beta: float,
                  temperature: float) -> torch.Tensor:
    """α·T²/B Σ_b KL(b_t ‖ b_s) + β·T²/B Σ_b KL(p̂_t ‖ p̂_s): mdistiller's ``dkd_loss``, log b through
    log-sum-exp (b = [p_gt, 1 − p_gt], p̂ = softmax(z/T − 1000·onehot(gt)))."""
    z_s, z_t = _scaled(logits_s, temperature), _scaled(logits_t, temperature)
    is_target = torch.zeros_like(z_s, dtype=torch.bool).scatter(1, target.unsqueeze(1), True)
    tckd = _kl_sum(_binary_log_probs(z_t, target, is_target), _binary_log_probs(z_s, target, is_target))
    nckd = _kl_sum(_non_target_log_probs(z_t, is_target), _non_target_log_probs(z_s, is_target))
    scale = temperature**2 / logits_s.shape[0]
    return alpha * tckd * scale + beta * nckd * scale


# ---------------------------------------------------------------- the contract of the fused ops


def kd_forward_reference(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float):
    """``fastkd::kd_loss``: (loss, stats [B, 3] = (lse_s, lse_t, KL_b)) in the accumulation dtype."""
    z_s, z_t = _scaled(logits_s, temperature), _scaled(logits_t, temperature)
    lse_s, lse_t = z_s.logsumexp(dim=1), z_t.logsumexp(dim=1)
    log_p_s, log_p_t = z_s - lse_s.unsqueeze(1), z_t - lse_t.unsqueeze(1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    loss = kl.sum() * (temperature**2 / logits_s.shape[0])
    return loss, torch.stack([lse_s, lse_t, kl], dim=1)


def kd_backward_reference(grad: torch.Tensor, logits_s: torch.Tensor, logits_t: torch.Tensor, stats: torch.Tensor,
                          temperature: float, teacher_grad: bool):
    """``fastkd::kd_loss_backward``: (d/d logits_s, d/d logits_t) times ``grad``; the second is
    empty ([0]) unless ``teacher_grad``."""
    z_s, z_t = _scaled(logits_s, temperature), _scaled(logits_t, temperature)
    scale = grad.to(stats.dtype) * (temperature / logits_s.shape[0])
    log_p_s, log_p_t = z_s - stats[:, :1], z_t - stats[:, 1:2]
    p_t = log_p_t.exp()
    grad_s = (scale * (log_p_s.exp() - p_t)).to(logits_s.dtype)
    if not teacher_grad:
        return grad_s, logits_t.new_empty(0)
    grad_t = scale * p_t * (log_p_t - log_p_s - stats[:, 2:3])
    return grad_s, grad_t.to(logits_t.dtype)


def kd_with_grad_reference(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float):
    """``fastkd::kd_loss_with_grad``: ``fastkd::kd_loss``'s (loss, stats) and the student's gradient for an
    upstream gradient of 1, d loss/d x_s = T/B·(p_s − p_t), in the logits' dtype. The CPU autograd of
    ``kd_loss`` runs it when only the student's gradient is wanted: a row's exponentials then serve the loss
    and the gradient, and backward only scales the gradient."""
    loss, stats = kd_forward_reference(logits_s, logits_t, temperature)
    one = torch.ones((), dtype=stats.dtype, device=stats.device)
    return loss, stats, kd_backward_reference(one, logits_s, logits_t, stats, temperature, False)[0]


def _dkd_row_terms(z: torch.Tensor, target: torch.Tensor, other: torch.Tensor):
    """Per row: (z_g, log b_gt, log b_o, log r, log ĝ) from the logits and O = lse(non-target)."""
    z_g = z.gather(1, target.unsqueeze(1)).squeeze(1)
    lse_all = torch.logaddexp(other, z_g)
    lse_masked = torch.logaddexp(other, z_g - TARGET_SHIFT)
    return z_g, z_g - lse_all, other - lse_all, other - lse_masked, z_g - TARGET_SHIFT - lse_masked


def dkd_forward_reference(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, alpha: float,
                          beta: float, temperature: float):
    """``fastkd::dkd_loss``: (loss, stats [B, 4] = (O_s, O_t, TCKD_b, NCKD_b)) in the accumulation dtype."""
    z_s, z_t = _scaled(logits_s, temperature), _scaled(logits_t, temperature)
    is_target = torch.zeros_like(z_s, dtype=torch.bool).scatter(1, target.unsqueeze(1), True)
    other_s = z_s.masked_fill(is_target, float("-inf")).logsumexp(dim=1)
    other_t = z_t.masked_fill(is_target, float("-inf")).logsumexp(dim=1)
    _, lb_gt_s, lb_o_s, log_r_s, log_g_s = _dkd_row_terms(z_s, target, other_s)
    _, lb_gt_t, lb_o_t, log_r_t, log_g_t = _dkd_row_terms(z_t, target, other_t)
    tckd = lb_gt_t.exp() * (lb_gt_t - lb_gt_s) + lb_o_t.exp() * (lb_o_t - lb_o_s)
    log_q_s, log_q_t = z_s - other_s.unsqueeze(1), z_t - other_t.unsqueeze(1)
    inner = (log_q_t.exp() * (log_q_t - log_q_s)).masked_fill(is_target, 0.0).sum(dim=1)
    nckd = log_r_t.exp() * (inner + log_r_t - log_r_s) + log_g_t.exp() * (log_g_t - log_g_s)
    loss = (alpha * tckd + beta * nckd).sum() * (temperature**2 / logits_s.shape[0])
    return loss, torch.stack([other_s, other_t, tckd, nckd], dim=1)


def dkd_backward_reference(grad: torch.Tensor, logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor,
                           stats: torch.Tensor, alpha: float, beta: float, temperature: float, teacher_grad: bool):
    """``fastkd::dkd_loss_backward``: (d/d logits_s, d/d logits_t) times ``grad`` (formulas in the module
    docstring); the second is empty ([0]) unless ``teacher_grad``."""
    z_s, z_t = _scaled(logits_s, temperature), _scaled(logits_t, temperature)
    other_s, other_t, tckd, nckd = stats.unbind(1)
    _, lb_gt_s, lb_o_s, log_r_s, log_g_s = _dkd_row_terms(z_s, target, other_s)
    _, lb_gt_t, lb_o_t, log_r_t, log_g_t = _dkd_row_terms(z_t, target, other_t)
    k = grad.to(stats.dtype) * (temperature / logits_s.shape[0])
    is_target = torch.zeros_like(z_s, dtype=torch.bool).scatter(1, target.unsqueeze(1), True)
    col = lambda v: v.unsqueeze(1)  # noqa: E731  a per-row value against the row's columns
    log_q_s, log_q_t = z_s - col(other_s), z_t - col(other_t)
    q_s, q_t = log_q_s.exp(), log_q_t.exp()
    r_s, r_t = log_r_s.exp(), log_r_t.exp()
    g_s, g_t = log_g_s.exp(), log_g_t.exp()
    b_gt_t, b_o_t = lb_gt_t.exp(), lb_o_t.exp()
    non_target = q_s * col(alpha * (lb_o_s.exp() - b_o_t) + beta * r_s) - beta * col(r_t) * q_t
    at_target = alpha * (lb_gt_s.exp() - b_gt_t) + beta * (g_s - g_t)
    grad_s = (k * torch.where(is_target, col(at_target), non_target)).to(logits_s.dtype)
    if not teacher_grad:
        return grad_s, logits_t.new_empty(0)
    d_o, d_gt = lb_o_t - lb_o_s, lb_gt_t - lb_gt_s
    non_target = q_t * (col(alpha * b_o_t * (d_o - tckd))
                        + beta * col(r_t) * (log_q_t - log_q_s + col(log_r_t - log_r_s - nckd)))
    at_target = alpha * b_gt_t * (d_gt - tckd) + beta * g_t * (log_g_t - log_g_s - nckd)
    grad_t = k * torch.where(is_target, col(at_target), non_target)
    return grad_s, grad_t.to(logits_t.dtype)


# ---------------------------------------------------------------- registration

_KD_ARGS = "Tensor logits_s, Tensor logits_t, float temperature"
_DKD_ARGS = "Tensor logits_s, Tensor logits_t, Tensor target, float alpha, float beta, float temperature"

_lib = torch.library.Library("fastkd", "FRAGMENT")
_lib.define(f"kd_loss({_KD_ARGS}) -> (Tensor, Tensor)")
_lib.define("kd_loss_backward(Tensor grad, Tensor logits_s, Tensor logits_t, Tensor stats, float temperature, "
            "bool teacher_grad) -> (Tensor, Tensor)")
_lib.define(f"kd_loss_with_grad({_KD_ARGS}) -> (Tensor, Tensor, Tensor)")
_lib.define(f"dkd_loss({_DKD_ARGS}) -> (Tensor, Tensor)")
_lib.define("dkd_loss_backward(Tensor grad, Tensor logits_s, Tensor logits_t, Tensor target, Tensor stats, "
            "float alpha, float beta, float temperature, bool teacher_grad) -> (Tensor, Tensor)")
_OPS = {"kd_loss": kd_forward_reference, "kd_loss_backward": kd_backward_reference,
        "dkd_loss": dkd_forward_reference, "dkd_loss_backward": dkd_backward_reference}
for _name, _reference in _OPS.items():
    # the references are the default kernels; the native library registers CPU kernels over them,
    # and CUDA tensors run the backend chosen at call time
    _lib.impl(_name, _reference, "CompositeExplicitAutograd")
    _lib.impl(_name, (lambda op: lambda *args: dispatch(op, "cuda")(*args))(_name), "CUDA")
# kd_loss_with_grad serves the CPU autograd of kd_loss: a native CPU kernel, the reference elsewhere
_lib.impl("kd_loss_with_grad", kd_with_grad_reference, "CompositeExplicitAutograd")


def _accumulation(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


@torch.library.register_fake("fastkd::kd_loss")
def _kd_fake(logits_s, logits_t, temperature):
    acc = _accumulation(logits_s)
    return logits_s.new_empty((), dtype=acc), logits_s.new_empty((logits_s.shape[0], 3), dtype=acc)


@torch.library.register_fake("fastkd::kd_loss_with_grad")
def _kd_with_grad_fake(logits_s, logits_t, temperature):
    return _kd_fake(logits_s, logits_t, temperature) + (torch.empty_like(logits_s),)


@torch.library.register_fake("fastkd::dkd_loss")
def _dkd_fake(logits_s, logits_t, target, alpha, beta, temperature):
    acc = _accumulation(logits_s)
    return logits_s.new_empty((), dtype=acc), logits_s.new_empty((logits_s.shape[0], 4), dtype=acc)


def _grads_fake(logits_s, logits_t, teacher_grad):
    return torch.empty_like(logits_s), torch.empty_like(logits_t) if teacher_grad else logits_t.new_empty(0)


@torch.library.register_fake("fastkd::kd_loss_backward")
def _kd_backward_fake(grad, logits_s, logits_t, stats, temperature, teacher_grad):
    return _grads_fake(logits_s, logits_t, teacher_grad)


@torch.library.register_fake("fastkd::dkd_loss_backward")
def _dkd_backward_fake(grad, logits_s, logits_t, target, stats, alpha, beta, temperature, teacher_grad):
    return _grads_fake(logits_s, logits_t, teacher_grad)


def _kd_setup_context(ctx, inputs, output):
    logits_s, logits_t, temperature = inputs
    ctx.temperature = temperature
    ctx.save_for_backward(logits_s, logits_t, output[1])


def _kd_backward(ctx, grad_loss, grad_stats):
    """Recomputes the softmaxes from the logits and the saved per-row statistics."""
    logits_s, logits_t, stats = ctx.saved_tensors
    grad_s, grad_t = torch.ops.fastkd.kd_loss_backward(grad_loss, logits_s, logits_t, stats, ctx.temperature,
                                                       ctx.needs_input_grad[1])
    return grad_s, grad_t if ctx.needs_input_grad[1] else None, None


def _kd_with_grad_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2])


def _kd_with_grad_backward(ctx, grad_loss, grad_stats, grad_grad):
    """The student's gradient was taken in the forward pass: scale it by the upstream gradient."""
    (grad_s,) = ctx.saved_tensors
    return grad_s * grad_loss.to(grad_s.dtype), None, None


def _dkd_setup_context(ctx, inputs, output):
    logits_s, logits_t, target, ctx.alpha, ctx.beta, ctx.temperature = inputs
    ctx.save_for_backward(logits_s, logits_t, target, output[1])


def _dkd_backward(ctx, grad_loss, grad_stats):
    logits_s, logits_t, target, stats = ctx.saved_tensors
    grad_s, grad_t = torch.ops.fastkd.dkd_loss_backward(grad_loss, logits_s, logits_t, target, stats, ctx.alpha,
                                                        ctx.beta, ctx.temperature, ctx.needs_input_grad[1])
    return (grad_s, grad_t if ctx.needs_input_grad[1] else None) + (None,) * 4


torch.library.register_autograd("fastkd::kd_loss", _kd_backward, setup_context=_kd_setup_context)
torch.library.register_autograd("fastkd::dkd_loss", _dkd_backward, setup_context=_dkd_setup_context)
torch.library.register_autograd("fastkd::kd_loss_with_grad", _kd_with_grad_backward,
                                setup_context=_kd_with_grad_setup_context)


def _triton(name: str):
    def run(*args):
        from fastkd.ops import logits_triton

        return getattr(logits_triton, name)(*args)

    return run


for _name, _reference in _OPS.items():
    register(_name, "torch", _reference)
    register(_name, "triton", _triton(_name), devices=("cuda",))
    # native: the CPU kernels of fastkd._C (registered for the CPU dispatch key); no CUDA C++ kernels
    register(_name, "native", (lambda op: lambda *args: getattr(torch.ops.fastkd, op)(*args))(_name),
             devices=("cpu",))
_native.load()


def kd(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """The KD loss on the chosen backend: the published computation for ``torch``, else the fused op."""
    if choose_for("kd_loss", logits_s) == "torch":
        return kd_reference(logits_s, logits_t, temperature)
    return torch.ops.fastkd.kd_loss.default(logits_s, logits_t, temperature)[0]


def dkd(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, alpha: float, beta: float,
        temperature: float) -> torch.Tensor:
    """The DKD loss on the chosen backend: the published computation for ``torch``, else the fused op."""
    if choose_for("dkd_loss", logits_s) == "torch":
        return dkd_reference(logits_s, logits_t, target, alpha, beta, temperature)
    return torch.ops.fastkd.dkd_loss.default(logits_s, logits_t, target, alpha, beta, temperature)[0]

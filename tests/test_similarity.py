"""SP, CC, CCKD, RKD and PKT against independent float64 derivations (numpy, explicit loops) and
against the published RepDistiller formulas written out here."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

import fastkd
from fastkd import functional as fk

from _helpers import arr, close, rand  # noqa: E402




# --- independent references (float64 numpy / loops) ------------------------------------------

def sp_ref(f_s, f_t):
    b = f_s.shape[0]

    def rownormed_gram(f):
        q = f.reshape(b, -1)
        g = q @ q.T
        return g / np.maximum(np.sqrt((g * g).sum(axis=1, keepdims=True)), 1e-12)

    return float(((rownormed_gram(f_t) - rownormed_gram(f_s)) ** 2).sum() / b**2)


def cc_ref(e_s, e_t):
    b, d = e_s.shape
    total = 0.0
    for i in range(b - 1):
        total += sum(abs(e_s[i, k] - e_t[i, k]) * abs(e_s[i + 1, k] - e_t[i + 1, k]) for k in range(d))
    return total / (b - 1)


def cckd_kernel_ref(e, gamma, order):
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    b = len(unit)
    k = np.empty((b, b))
    for i, j in itertools.product(range(b), repeat=2):
        c = float(unit[i] @ unit[j])
        k[i, j] = sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * c**p for p in range(order + 1))
    return k


def cckd_ref(e_s, e_t, gamma=0.4, order=2):
    return float(((cckd_kernel_ref(e_s, gamma, order) - cckd_kernel_ref(e_t, gamma, order)) ** 2).mean())


def rbf_ref(e, gamma):
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    sq = ((unit[:, None, :] - unit[None, :, :]) ** 2).sum(-1)
    return np.exp(-gamma * sq)


def smooth_l1_ref(a, b):
    x = abs(a - b)
    return 0.5 * x * x if x < 1 else x - 0.5


def rkd_ref(f_s, f_t, w_dist=25.0, w_angle=50.0):
    """Distinct rows: every off-diagonal distance is > 0, so the mean over d > 0 is over B(B-1)."""
    def distances(e):
        b = len(e)
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(b)] for i in range(b)])
        return d / (d.sum() / (b * (b - 1)))

    def angles(e):
        b = len(e)
        out = np.empty((b, b, b))
        for i, j, k in itertools.product(range(b), repeat=3):
            u, v = e[j] - e[i], e[k] - e[i]
            nu, nv = np.linalg.norm(u), np.linalg.norm(v)
            out[i, j, k] = 0.0 if nu == 0 or nv == 0 else float(u @ v) / (nu * nv)
        return out

    b = f_s.shape[0]
    s, t = f_s.reshape(b, -1), f_t.reshape(b, -1)
    d_s, d_t, a_s, a_t = distances(s), distances(t), angles(s), angles(t)
    loss_d = np.mean([smooth_l1_ref(x, y) for x, y in zip(d_s.ravel(), d_t.ravel())])
    loss_a = np.mean([smooth_l1_ref(x, y) for x, y in zip(a_s.ravel(), a_t.ravel())])
    return w_dist * loss_d + w_angle * loss_a


def pkt_ref(f_s, f_t, eps=1e-7):
    def probabilities(x):
        unit = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        s = (unit @ unit.T + 1) / 2
        return s / s.sum(axis=1, keepdims=True)

    p_s, p_t = probabilities(f_s), probabilities(f_t)
    return float((p_t * np.log((p_t + eps) / (p_s + eps))).mean())


# --- the published RepDistiller formulas, written out (boolean masks, NaN replacement) --------

def rkd_published(f_s, f_t, w_d=25.0, w_a=50.0):
    def pdist(e):
        sq = (e * e).sum(1)
        res = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp(min=1e-12).sqrt().clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    def angle(e):
        diff = nnf.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(diff, diff.transpose(1, 2)).view(-1)

    s, t = f_s.view(f_s.shape[0], -1), f_t.view(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = pdist(t)
        t_d = t_d / t_d[t_d > 0].mean()
        t_a = angle(t)
    d = pdist(s)
    d = d / d[d > 0].mean()
    return w_d * nnf.smooth_l1_loss(d, t_d) + w_a * nnf.smooth_l1_loss(angle(s), t_a)


def pkt_published(f_s, f_t, eps=1e-7):
    def probabilities(x):
        x = x / (torch.sqrt((x**2).sum(1, keepdim=True)) + eps)
        x = torch.where(x != x, torch.zeros_like(x), x)
        s = (x @ x.T + 1.0) / 2.0
        return s / s.sum(1, keepdim=True)

    p_s, p_t = probabilities(f_s), probabilities(f_t)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


# --- values -----------------------------------------------------------------------------------

@pytest.mark.parametrize("b", [1, 2, 3, 5])
def test_sp_matches_reference(b):
    f_s, f_t = rand(b, 3, 2, 3, seed=1), rand(b, 5, 1, 3, seed=2)
    close(fk.sp_loss(f_s, f_t), sp_ref(arr(f_s), arr(f_t)))
    close(fastkd.SPLoss()(f_s, f_t), sp_ref(arr(f_s), arr(f_t)))


def test_sp_sums_sequences_of_pairs():
    pairs = [(rand(3, 2, 3, 3, seed=i), rand(3, 4, 2, 2, seed=10 + i)) for i in range(3)]
    expected = sum(sp_ref(arr(s), arr(t)) for s, t in pairs)
    close(fk.sp_loss([s for s, _ in pairs], tuple(t for _, t in pairs)), expected)
    close(fastkd.SPLoss()([s for s, _ in pairs], [t for _, t in pairs]), expected)


def test_sp_is_not_trivially_zero():
    f_s, f_t = rand(4, 7, seed=3), rand(4, 7, seed=4)
    assert float(fk.sp_loss(f_s, f_t)) > 1e-3
    close(fk.sp_loss(f_s, f_s.clone()), 0.0)


@pytest.mark.parametrize("b,d", [(2, 1), (3, 5), (6, 7)])
def test_cc_matches_loop_reference(b, d):
    e_s, e_t = rand(b, d, seed=5), rand(b, d, seed=6)
    close(fk.cc_loss(e_s, e_t), cc_ref(arr(e_s), arr(e_t)))
    close(fastkd.CCLoss()(e_s, e_t), cc_ref(arr(e_s), arr(e_t)))


def test_cc_embeds_flatten_and_project_like_linear_embed():
    loss = fastkd.CCLoss(s_dim=12, t_dim=10, feat_dim=5).double()
    assert isinstance(loss.embed_s, torch.nn.Linear) and loss.embed_s.out_features == 5
    f_s, f_t = rand(3, 3, 2, 2, seed=7), rand(3, 10, seed=8)
    w_s, b_s = arr(loss.embed_s.weight), arr(loss.embed_s.bias)
    w_t, b_t = arr(loss.embed_t.weight), arr(loss.embed_t.bias)
    e_s = arr(f_s).reshape(3, -1) @ w_s.T + b_s
    e_t = arr(f_t) @ w_t.T + b_t
    out = loss(f_s, f_t)
    close(out, cc_ref(e_s, e_t))
    out.backward()
    assert loss.embed_s.weight.grad is not None and float(loss.embed_s.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("b,d_s,d_t", [(1, 3, 4), (2, 5, 5), (3, 4, 7), (5, 9, 2)])
@pytest.mark.parametrize("gamma,order", [(0.4, 2), (0.7, 0), (1.3, 3)])
def test_cckd_matches_loop_reference(b, d_s, d_t, gamma, order):
    e_s, e_t = rand(b, d_s, seed=9), rand(b, d_t, seed=10)
    expected = cckd_ref(arr(e_s), arr(e_t), gamma, order)
    close(fk.cckd_loss(e_s, e_t, gamma=gamma, order=order), expected)
    close(fastkd.CCKDLoss(gamma=gamma, order=order)(e_s, e_t), expected)


def test_cckd_high_order_is_the_gaussian_rbf():
    e_s, e_t = rand(6, 5, seed=11), rand(6, 8, seed=12)
    closed = float(((rbf_ref(arr(e_s), 0.4) - rbf_ref(arr(e_t), 0.4)) ** 2).mean())
    assert abs(float(fk.cckd_loss(e_s, e_t, order=12)) - closed) < 1e-6
    # the default order 2 is a truncation: visibly different from the closed form
    assert abs(float(fk.cckd_loss(e_s, e_t)) - closed) > 1e-5


def test_cckd_embeds():
    loss = fastkd.CCKDLoss(gamma=0.5, order=3, s_dim=4, t_dim=6, feat_dim=3).double()
    f_s, f_t = rand(4, 4, seed=13), rand(4, 6, seed=14)
    e_s = arr(f_s) @ arr(loss.embed_s.weight).T + arr(loss.embed_s.bias)
    e_t = arr(f_t) @ arr(loss.embed_t.weight).T + arr(loss.embed_t.bias)
    close(loss(f_s, f_t), cckd_ref(e_s, e_t, 0.5, 3))


@pytest.fixture(params=["torch", "auto"])
def backend(request):
    """The eager published computation, and the fused ops (native on CPU when built)."""
    with fastkd.use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("b,shape_s,shape_t", [(2, (3,), (4,)), (3, (2, 2, 1), (5,)), (5, (7,), (3, 3))])
def test_rkd_matches_loop_reference_and_published(b, shape_s, shape_t, backend):
    f_s, f_t = rand(b, *shape_s, seed=15), rand(b, *shape_t, seed=16)
    expected = rkd_ref(arr(f_s), arr(f_t))
    close(fk.rkd_loss(f_s, f_t), expected, rel=1e-9)
    close(fastkd.RKDLoss()(f_s, f_t), expected, rel=1e-9)
    close(fk.rkd_loss(f_s, f_t), float(rkd_published(f_s, f_t)), rel=1e-12)
    close(fk.rkd_loss(f_s, f_t, w_dist=2.0, w_angle=0.5), rkd_ref(arr(f_s), arr(f_t), 2.0, 0.5), rel=1e-9)


def test_rkd_teacher_side_has_no_gradient(backend):
    f_s, f_t = rand(4, 5, seed=17).requires_grad_(), rand(4, 6, seed=18).requires_grad_()
    fk.rkd_loss(f_s, f_t).backward()
    assert f_t.grad is None and float(f_s.grad.abs().sum()) > 0


def test_rkd_with_duplicated_rows_is_finite_and_matches_published(backend):
    base = rand(3, 4, seed=19)
    f_s = torch.cat([base, base[:2]]).requires_grad_()       # rows 3, 4 repeat rows 0, 1
    f_t = torch.cat([rand(4, 5, seed=20), rand(4, 5, seed=20)[:1]])
    loss = fk.rkd_loss(f_s, f_t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f_s.grad).all()
    close(loss, float(rkd_published(f_s.detach(), f_t)), rel=1e-12)
    for dtype in (torch.float32, torch.float16):
        assert torch.isfinite(fk.rkd_loss(f_s.detach().to(dtype), f_t.to(dtype)))


@pytest.mark.parametrize("b,d_s,d_t", [(1, 4, 3), (2, 3, 3), (3, 5, 8), (6, 7, 2)])
def test_pkt_matches_reference_and_published(b, d_s, d_t):
    f_s, f_t = rand(b, d_s, seed=21), rand(b, d_t, seed=22)
    expected = pkt_ref(arr(f_s), arr(f_t))
    close(fk.pkt_loss(f_s, f_t), expected)
    close(fastkd.PKTLoss()(f_s, f_t), expected)
    close(fk.pkt_loss(f_s, f_t), float(pkt_published(f_s, f_t)), rel=1e-12)
    close(fk.pkt_loss(f_s, f_t, eps=1e-3), pkt_ref(arr(f_s), arr(f_t), eps=1e-3))


def test_pkt_zero_row_keeps_a_finite_gradient():
    f_s = rand(4, 5, seed=23)
    f_s[2] = 0
    f_s.requires_grad_()
    f_t = rand(4, 6, seed=24)
    loss = fk.pkt_loss(f_s, f_t)
    loss.backward()
    close(loss, float(pkt_published(f_s.detach(), f_t)), rel=1e-12)
    assert torch.isfinite(f_s.grad).all()


@pytest.mark.parametrize("name", ["cc", "rkd"])
def test_batch_of_one_is_rejected(name):
    fn = {"cc": fk.cc_loss, "rkd": fk.rkd_loss}[name]
    arg = {"cc": "e_s", "rkd": "f_s"}[name]
    with pytest.raises(ValueError, match=f"{arg} has batch size 1"):
        fn(rand(1, 4), rand(1, 4))


# --- every loss: module == functional, gradients, dtypes, no host sync, errors -----------------

# name -> (functional, module, student shape, teacher shape, argument names)
LOSSES = {
    "sp": (fk.sp_loss, fastkd.SPLoss, (3, 2, 2, 1), (3, 3, 1, 2), ("f_s", "f_t")),
    "cc": (fk.cc_loss, fastkd.CCLoss, (3, 5), (3, 5), ("e_s", "e_t")),
    "cckd": (fk.cckd_loss, fastkd.CCKDLoss, (3, 4), (3, 5), ("e_s", "e_t")),
    "rkd": (fk.rkd_loss, fastkd.RKDLoss, (4, 3), (4, 2, 1), ("f_s", "f_t")),
    "pkt": (fk.pkt_loss, fastkd.PKTLoss, (3, 4), (3, 6), ("f_s", "f_t")),
}


def inputs(name, dtype=torch.float64):
    _, _, shape_s, shape_t, _ = LOSSES[name]
    return rand(*shape_s, seed=30, dtype=dtype), rand(*shape_t, seed=31, dtype=dtype)


@pytest.mark.parametrize("name", LOSSES)
def test_module_equals_functional(name):
    fn, module, *_ = LOSSES[name]
    f_s, f_t = inputs(name)
    out = module()(f_s, f_t)
    assert out.dim() == 0
    assert torch.equal(out, fn(f_s, f_t))


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck(name):
    fn = LOSSES[name][0]
    f_s, f_t = inputs(name)
    assert torch.autograd.gradcheck(lambda s: fn(s, f_t), (f_s.requires_grad_(),))


def test_gradcheck_cckd_higher_order_and_embedded_cc():
    e_s, e_t = rand(3, 4, seed=32).requires_grad_(), rand(3, 2, seed=33)
    assert torch.autograd.gradcheck(lambda s: fk.cckd_loss(s, e_t, gamma=1.1, order=5), (e_s,))
    loss = fastkd.CCLoss(s_dim=4, t_dim=2, feat_dim=3).double()
    assert torch.autograd.gradcheck(lambda s: loss(s, e_t), (e_s,))


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_fp32(name, dtype):
    fn = LOSSES[name][0]
    f_s, f_t = inputs(name, torch.float32)
    f_s, f_t = f_s.to(dtype), f_t.to(dtype)
    out = fn(f_s, f_t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fn(f_s.float(), f_t.float()), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", LOSSES)
def test_math_reads_no_tensor_values(name):
    """On the meta device any host sync (.item(), a boolean-mask gather, a branch on a value) fails."""
    fn = LOSSES[name][0]
    f_s, f_t = (x.to("meta") for x in inputs(name))
    with fastkd.value_checks(False):
        out = fn(f_s, f_t)
    assert out.device.type == "meta" and out.dim() == 0


def _bad_inputs(name):
    """(description, student, teacher, exception, name the message must hold)."""
    f_s, f_t = inputs(name)
    s_name, t_name = LOSSES[name][4]
    nan_s, inf_t = f_s.clone(), f_t.clone()
    nan_s.view(-1)[1] = float("nan")
    inf_t.view(-1)[0] = float("inf")
    return [
        ("numpy student", f_s.numpy(), f_t, TypeError, s_name),
        ("integer teacher", f_s, f_t.long(), TypeError, t_name),
        ("dtype mismatch", f_s, f_t.float(), TypeError, t_name),
        ("batch mismatch", f_s, torch.cat([f_t, f_t]), ValueError, t_name),
        ("NaN student", nan_s, f_t, ValueError, s_name),
        ("Inf teacher", f_s, inf_t, ValueError, t_name),
        ("rank 1 teacher", f_s, f_t.reshape(-1), ValueError, t_name),
        ("device mismatch", f_s, f_t.to("meta"), ValueError, t_name),
    ]


@pytest.mark.parametrize("name", LOSSES)
def test_bad_inputs_name_the_argument(name):
    fn, module, *_ = LOSSES[name]
    for what, f_s, f_t, exc, arg in _bad_inputs(name):
        for call in (fn, module()):
            with pytest.raises(exc, match=arg):
                call(f_s, f_t)


def test_shape_mismatch_where_shapes_must_match():
    with pytest.raises(ValueError, match="e_t"):
        fk.cc_loss(rand(3, 4), rand(3, 5))
    with pytest.raises(ValueError, match="f_t"):
        fk.pkt_loss(rand(3, 4), rand(3, 2, 2))


def test_sequence_errors():
    a = rand(2, 3)
    with pytest.raises(ValueError, match="f_t holds 1"):
        fk.sp_loss([a, a], [a])
    with pytest.raises(ValueError, match="empty"):
        fk.sp_loss([], [])
    with pytest.raises(TypeError, match="f_t"):
        fk.sp_loss(a, [a])
    with pytest.raises(ValueError, match=r"f_t\[1\]"):
        fk.sp_loss([a, a], [a, rand(3, 3)])


def test_hyperparameter_errors():
    e = rand(3, 4)
    with pytest.raises(ValueError, match="gamma"):
        fk.cckd_loss(e, e, gamma=0.0)
    with pytest.raises(TypeError, match="order"):
        fk.cckd_loss(e, e, order=1.5)
    with pytest.raises(ValueError, match="order"):
        fastkd.CCKDLoss(order=-1)
    with pytest.raises(TypeError, match="gamma"):
        fastkd.CCKDLoss(gamma=True)
    with pytest.raises(ValueError, match="eps"):
        fk.pkt_loss(e, e, eps=-1e-7)
    with pytest.raises(ValueError, match="s_dim and t_dim"):
        fastkd.CCLoss(s_dim=4)
    with pytest.raises(ValueError, match="feat_dim"):
        fastkd.CCKDLoss(s_dim=4, t_dim=4, feat_dim=0)


def test_embed_errors_name_the_argument():
    loss = fastkd.CCLoss(s_dim=4, t_dim=6, feat_dim=3)
    with pytest.raises(ValueError, match="e_s has 5 features"):
        loss(torch.randn(3, 5), torch.randn(3, 6))
    with pytest.raises(ValueError, match="e_t has 4 features"):
        loss(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(TypeError, match="e_s"):
        loss(torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="e_t"):
        loss(torch.randn(3, 4), torch.full((3, 6), float("nan")))

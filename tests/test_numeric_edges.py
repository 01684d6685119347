"""Numerical edges of the fused ops and the options of every loss (issue 14).

The oracle of the logit losses is an independent evaluation in 60-digit arithmetic (mpmath): the published
formulas, KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s), and gradients by central differences of step 1e-25 on
the same rounded inputs. Each fused backend must be accurate to its dtype's rounding where the published
computation at that dtype (``fastkd.ops.logits.kd_reference`` / ``dkd_reference``, log_softmax and autograd)
loses it: T ≥ 1e3 (where it turns negative), a student within 1e-3 of its teacher, logits of 1e4. The
``torch`` backend is the published computation, its rounding included (its bits are the anchors').
"""

import pytest
import torch

import fastkd
from fastkd import functional as F
from fastkd.ops import logits as ops
from fastkd.ops import logits_triton

from _tolerances import rel

mpmath = pytest.importorskip("mpmath")

BACKENDS = ["torch"] + (["native"] if "native" in fastkd.backends() else [])
FUSED = [b for b in BACKENDS if b != "torch"] + ["triton"]  # the ops' kernels: accurate where the published form is not
ALPHA, BETA = 1.0, 8.0


# ---------------------------------------------------------------- the 60-digit oracle


def _log_softmax(z):
    top = max(z)
    lse = top + mpmath.log(mpmath.fsum(mpmath.exp(v - top) for v in z))
    return [v - lse for v in z]


def _kl(log_p, log_q):
    return mpmath.fsum(mpmath.exp(a) * (a - b) for a, b in zip(log_p, log_q))


def _row(loss, zs, zt, g):
    if loss == "kd":
        return _kl(_log_softmax(zt), _log_softmax(zs))

    def binary(z):  # [log p_g, log(1 − p_g)]
        log_p = _log_softmax(z)
        return [log_p[g], mpmath.log(mpmath.fsum(mpmath.exp(v) for c, v in enumerate(log_p) if c != g))]

    # NCKD = KL(p̂_t ‖ p̂_s), p̂ = softmax(z − 1000·onehot(g))
    hat = lambda z: _log_softmax([v - (1000 if c == g else 0) for c, v in enumerate(z)])  # noqa: E731
    return ALPHA * _kl(binary(zt), binary(zs)) + BETA * _kl(hat(zt), hat(zs))


def _loss(loss, s, t, y, temperature):
    T = mpmath.mpf(temperature)
    total = mpmath.fsum(_row(loss, [v / T for v in rs], [v / T for v in rt], int(g)) for rs, rt, g in zip(s, t, y))
    return total * T * T / len(s)


_EXACT = {}


def exact(loss, logits_s, logits_t, target, temperature):
    """(loss, d/d logits_s, d/d logits_t) of the logits as given (their rounded values), to ~1e-30 (cached:
    the backends of a test share their inputs)."""
    key = (loss, logits_s.double().numpy().tobytes(), logits_t.double().numpy().tobytes(),
           tuple(int(v) for v in target), temperature)
    if key not in _EXACT:
        _EXACT[key] = _exact(loss, logits_s, logits_t, target, temperature)
    return _EXACT[key]


def _exact(loss, logits_s, logits_t, target, temperature):
    mpmath.mp.dps = 60
    s = [[mpmath.mpf(float(v)) for v in row] for row in logits_s.double()]
    t = [[mpmath.mpf(float(v)) for v in row] for row in logits_t.double()]
    value = _loss(loss, s, t, target, temperature)
    h = mpmath.mpf("1e-25")
    grads = []
    for x in (s, t):
        g = torch.zeros(logits_s.shape, dtype=torch.float64)
        for i, row in enumerate(x):
            for j, v in enumerate(row):
                row[j] = v + h
                up = _loss(loss, s, t, target, temperature)
                row[j] = v - h
                down = _loss(loss, s, t, target, temperature)
                row[j] = v
                g[i, j] = float((up - down) / (2 * h))
        grads.append(g)
    return float(value), *grads


def through(loss, backend, s, t, y, temperature):
    """(loss, d/d s, d/d t) on a backend, through the functional loss and autograd."""
    a, b = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    with fastkd.use_backend(backend):
        value = F.kd_loss(a, b, temperature) if loss == "kd" else F.dkd_loss(a, b, y, ALPHA, BETA, temperature)
    return (value, *torch.autograd.grad(value, (a, b)))


def published(loss, s, t, y, temperature):
    a, b = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    if loss == "kd":
        value = ops.kd_reference(a, b, temperature)
    else:
        value = ops.dkd_reference(a, b, y, ALPHA, BETA, temperature)
    return (value, *torch.autograd.grad(value, (a, b)))


def through_triton(loss, s, t, y, temperature):
    """The Triton kernels (interpreted on CPU tensors), student and teacher gradients for a unit upstream."""
    one = torch.tensor(1.0)
    if loss == "kd":
        value, stats = logits_triton.kd_loss(s, t, temperature, block=16)
        return (value, *logits_triton.kd_loss_backward(one, s, t, stats, temperature, True, block=16))
    value, stats = logits_triton.dkd_loss(s, t, y, ALPHA, BETA, temperature, block=16)
    return (value, *logits_triton.dkd_loss_backward(one, s, t, y, stats, ALPHA, BETA, temperature, True, block=16))


def logits(batch, classes, scale=3.0, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    s = offset + scale * torch.randn(batch, classes, generator=g, dtype=torch.float64)
    t = offset + scale * torch.randn(batch, classes, generator=g, dtype=torch.float64)
    return s.float(), t.float(), torch.randint(0, classes, (batch,), generator=g)


def assert_accurate(got, want, tol):
    """Each of (value, grad_s, grad_t) finite and within ``tol`` (relative to its largest entry) of the oracle."""
    for name, g, w in zip(("value", "student", "teacher"), got, want):
        assert torch.isfinite(torch.as_tensor(g)).all(), name
        assert rel(g, w) <= tol, (name, rel(g, w), tol)


# ---------------------------------------------------------------- KD at large T


@pytest.mark.parametrize("temperature", [1e3, 1e4, 1e6])
@pytest.mark.parametrize("backend", FUSED)
def test_kd_at_large_temperature_is_accurate_and_never_negative(backend, temperature):
    """T²·KL at large T is a difference of nearly equal log-sum-exps in the published form (negative at 1e6)."""
    s, t, y = logits(2, 9, seed=1)
    want = exact("kd", s, t, y, temperature)
    got = through_triton("kd", s, t, y, temperature) if backend == "triton" else \
        through("kd", backend, s, t, y, temperature)
    assert got[0].item() > 0
    assert_accurate(got, want, 2e-6)
    # what the published computation gives here (the reason for the contract): far from it
    assert rel(published("kd", s, t, y, temperature)[0], want[0]) > 1e-3


@pytest.mark.parametrize("loss", ["kd", "dkd"])
def test_the_torch_backend_is_the_published_computation_to_the_bit(loss):
    """Even where that is inaccurate (T = 1e6, a student within 1e-3 of its teacher): the anchors' numbers."""
    s, t, y = logits(2, 9, seed=1)
    near = s + 1e-3 * logits(2, 9, scale=1.0, seed=4)[0]
    for teacher, temperature in ((t, 1e6), (near, 4.0)):
        got, want = through(loss, "torch", s, teacher, y, temperature), published(loss, s, teacher, y, temperature)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_kd_at_large_temperature_tends_to_its_limit():
    """As T → ∞, T²·KL → (1/2B) Σ_b Var_uniform(x_t − x_s): the fp32 loss follows it to 1e-6."""
    s, t, _ = logits(3, 50, seed=2)
    d = (t - s).double()
    limit = (d - d.mean(1, keepdim=True)).pow(2).mean(1).sum().item() / (2 * 3)
    for backend in FUSED[:-1]:
        with fastkd.use_backend(backend):
            got = F.kd_loss(s, t, 1e6).item()
        assert got == pytest.approx(limit, rel=1e-5)


# ---------------------------------------------------------------- student close to teacher


@pytest.mark.parametrize("loss", ["kd", "dkd"])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 1e3])
@pytest.mark.parametrize("backend", FUSED)
def test_student_within_1e3_of_its_teacher(loss, backend, temperature):
    """KL ~ |s − t|²: the published form's first-order rounding is most of its value (30-50% at T = 4)."""
    s, _, y = logits(2, 9, seed=3)
    t = s + 1e-3 * logits(2, 9, scale=1.0, seed=4)[0]
    want = exact(loss, s, t, y, temperature)
    got = through_triton(loss, s, t, y, temperature) if backend == "triton" else \
        through(loss, backend, s, t, y, temperature)
    assert_accurate(got, want, 2e-6)


# ---------------------------------------------------------------- large logits


LARGE = [(loss, backend) for loss in ("kd", "dkd") for backend in FUSED]


@pytest.mark.parametrize("loss,backend", LARGE)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_logits_of_1e4(loss, backend, temperature):
    """Logits 1e4 ± a few: values and both gradients (the teacher's included) to 2e-6 of the exact ones (they
    were 1e-5 to 1e-3 off, the exponentials shifted by a rounded log-sum-exp of 1e4). Rows of spread 1e4: one-hot
    softmaxes, finite values and gradients as accurate as the published computation's at least (the teacher's
    gradient is ~1e-80 there: finite and below 1e-12)."""
    s, t, y = logits(2, 7, scale=2.0, seed=5, offset=1e4)
    want = exact(loss, s, t, y, temperature)
    got = through_triton(loss, s, t, y, temperature) if backend == "triton" else \
        through(loss, backend, s, t, y, temperature)
    assert_accurate(got, want, 2e-6)
    s, t, y = logits(2, 7, scale=1e4, seed=6)
    want = exact(loss, s, t, y, temperature)
    got = through_triton(loss, s, t, y, temperature) if backend == "triton" else \
        through(loss, backend, s, t, y, temperature)
    plain = published(loss, s, t, y, temperature)
    for name, g, p, w in zip(("value", "student"), got, plain, want):
        assert torch.isfinite(g).all() and rel(g, w) <= max(2e-6, 2 * rel(p, w)), (name, rel(g, w), rel(p, w))
    assert torch.isfinite(got[2]).all() and got[2].abs().max() <= max(1e-12, 2 * want[2].abs().max().item())


@pytest.mark.skipif("native" not in fastkd.backends(), reason="the native extension fastkd._C was not built")
def test_kd_ignores_a_common_offset():
    """KD is invariant to adding a constant to a row: 1e4 more on every student logit (the native kernel
    formed its exponentials against a rounded 1e4 and was 2e-4 off)."""
    s, t, _ = logits(3, 11, seed=8)
    with fastkd.use_backend("native"):
        base = F.kd_loss(s, t, 2.0)
        shifted = F.kd_loss(s + 1e4, t, 2.0)
    # s + 1e4 rounds s to fp32's spacing at 1e4 (1e-3): compare with the exact value on those inputs
    assert rel(shifted, exact("kd", s + 1e4, t, [0] * 3, 2.0)[0]) <= 1e-6
    assert shifted.item() == pytest.approx(base.item(), rel=1e-3)


# ---------------------------------------------------------------- degenerate shapes and options


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_kd_with_zero_classes_is_refused_on_every_backend(backend):
    s = torch.empty(3, 0)
    with fastkd.use_backend(backend), pytest.raises(ValueError, match="0 classes"):
        F.kd_loss(s, s.clone())
    with fastkd.use_backend(backend), pytest.raises(ValueError, match="0 classes"):
        fastkd.KDLoss()(s, s.clone())


def test_cckd_order_zero_is_zero_with_a_graph_on_every_backend():
    """k = e^{−2γ} is a constant at order 0: the loss is 0 on every backend, with a graph and zero gradients
    (the torch backend's had no graph: backward() raised)."""
    for backend in BACKENDS:
        e_s = torch.randn(4, 6, requires_grad=True)
        e_t = torch.randn(4, 3, requires_grad=True)
        with fastkd.use_backend(backend):
            loss = F.cckd_loss(e_s, e_t, gamma=0.4, order=0)
        assert loss.item() == 0.0 and loss.requires_grad, backend
        loss.backward()
        assert torch.equal(e_s.grad, torch.zeros_like(e_s)) and torch.equal(e_t.grad, torch.zeros_like(e_t))


@pytest.mark.parametrize("name", ["rkd", "pkt"])
@pytest.mark.parametrize("width", [1, 2])
def test_one_or_two_features_per_sample_match_the_published_computation(name, width):
    """With one feature RKD's angles are ±1 and PKT's antiparallel pairs (1 + cos)/2 ~ eps: every backend gives
    the published computation's value and gradients (the fused ops' Gram route rounded them, by 1e-1 for
    RKD's angle gradients at 33 samples)."""
    g = torch.Generator().manual_seed(10 + width)
    f_s, f_t = torch.randn(33, width, generator=g), torch.randn(33, 5, generator=g)
    fn = F.rkd_loss if name == "rkd" else F.pkt_loss
    results = []
    for backend in BACKENDS:
        a = f_s.clone().requires_grad_(True)
        with fastkd.use_backend(backend):
            value = fn(a, f_t)
        results.append((value.detach(), *torch.autograd.grad(value, a)))
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(results[0], other))
    # and the value is the float64 one to fp32's rounding
    with fastkd.use_backend("torch"):
        want = fn(f_s.double(), f_t.double())
    assert rel(results[0][0], want) <= (1e-5 if name == "rkd" else 1e-2)


OPTIONS = [
    # (call with the option, option name): NaN, inf and out-of-range values
    (lambda v: fastkd.RKDLoss(w_dist=v), "w_dist", [float("nan"), float("inf"), -1.0]),
    (lambda v: fastkd.RKDLoss(w_angle=v), "w_angle", [float("nan"), -0.5]),
    (lambda v: F.rkd_loss(torch.randn(4, 5), torch.randn(4, 5), w_dist=v), "w_dist", [float("nan"), -1.0]),
    (lambda v: F.rkd_loss(torch.randn(4, 5), torch.randn(4, 5), w_angle=v), "w_angle", [float("inf")]),
    (lambda v: fastkd.ATLoss(p=v), "p", [0.0, -2.0, float("nan")]),
    (lambda v: F.at_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), p=v), "p", [0, -1.0]),
    (lambda v: fastkd.FTLoss(p1=v), "p1", [0.0, float("nan")]),
    (lambda v: fastkd.FTLoss(p2=v), "p2", [-1.0]),
    (lambda v: F.ft_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), p2=v), "p2", [0.0]),
    (lambda v: fastkd.ABLoss(margin=v), "margin", [-1.0, float("nan")]),
    (lambda v: F.ab_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), margin=v), "margin", [-0.1]),
    (lambda v: fastkd.VIDLoss(3, 4, 5, eps=v), "eps", [0.0, float("nan")]),
    (lambda v: fastkd.VIDLoss(3, 4, 5, init_pred_var=v), "init_pred_var", [float("nan")]),
    (lambda v: F.vid_loss(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), torch.zeros(3), eps=v), "eps", [-1e-5]),
    (lambda v: fastkd.Paraphraser((2, 8, 4, 4), k=v), "k", [float("nan"), -0.5]),
    (lambda v: fastkd.DKDLoss(alpha=v), "alpha", [-1.0, float("nan")]),
    (lambda v: fastkd.DKDLoss(beta=v), "beta", [-8.0]),
    (lambda v: F.dkd_loss(torch.randn(2, 5), torch.randn(2, 5), torch.tensor([0, 1]), beta=v), "beta", [-1.0]),
]  # (temperatures, CCKD's γ and order, PKT's eps were validated before: test_logits.py, test_similarity.py)


@pytest.mark.parametrize("make,name,bad", OPTIONS, ids=[f"{o[1]}-{i}" for i, o in enumerate(OPTIONS)])
def test_options_are_validated_with_their_name(make, name, bad):
    for value in bad:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            make(value)
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        make("2")

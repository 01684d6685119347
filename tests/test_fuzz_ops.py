"""Property tests of the fused ops against float64 references, and of the losses' refusals (hypothesis).

Every fused op (KD, DKD, SP, CCKD, PKT, RKD's distance and angle terms, NST, the cosine matrix; CRD's NCE
through its torch reference, its kernels being CRD's own suite's) is run on drawn shapes (B = 1 where the loss
allows it, widths 1 and around the kernels' thresholds: vector width 8, the Gram kernel's K = 256 and n = 32,
relation_product's K = 1,024, Triton's 16-column chunks), dtypes, temperatures, logit scales and offsets,
students close to their teachers, and non-contiguous inputs (transposed, sliced). Values and gradients are
compared with the float64 evaluation of the same inputs under flash-attention's rule:

    error(kernel) ≤ 4·error(plain torch at the same dtype) + 64·ε(dtype)·scale,

``scale`` the magnitude of the quantity (for gradients, of the terms they are sums of). The state property:
a call that is refused (a bad option, a bad shape, a NaN with value checks on) raises ValueError / TypeError
and leaves every tensor it was given, and the module's state, bit-identical.

Bounded for CI (max_examples per property, small tensors; the file runs in well under a minute on two cores)
and deterministic (derandomize=True, no example database).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import functional as fk
from fastkd.ops import crd, logits_triton
from fastkd.ops import logits as logit_ops

from _tolerances import rel

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def bounded(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


NATIVE = "native" in fastkd.backends()
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}
FLOATS = st.sampled_from([torch.float32, torch.float64])
LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced"])


def laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of x (2-D) in another memory layout: column-major, or every other column of a wider tensor."""
    if layout == "transposed":
        return x.T.contiguous().T
    if layout == "sliced":
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x


def log_uniform(low: float, high: float):
    return st.floats(math.log(low), math.log(high)).map(math.exp)


def err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.detach().double() - want.detach().double()).abs().max().item() if want.numel() else 0.0


def assert_within(name: str, got, plain, want, dtype, scale: float) -> None:
    """flash-attention's rule: the kernel's error at most 4× plain torch's at the same dtype, plus rounding."""
    bound = 4 * err(plain, want) + 64 * EPS[dtype] * scale
    assert err(got, want) <= bound, (name, err(got, want), err(plain, want), scale)


def grads(fn, *inputs):
    """(value, gradients of the inputs that require one) of fn(*inputs)."""
    inputs = [x.detach().clone().requires_grad_(r) for x, r in inputs]
    value = fn(*inputs)
    wanted = [x for x in inputs if x.requires_grad]
    return value.detach(), torch.autograd.grad(value, wanted) if wanted else ()


# ---------------------------------------------------------------- logits: KD and DKD


@st.composite
def logit_cases(draw, min_classes=1, max_batch=8, classes=(1, 2, 7, 8, 9, 15, 16, 17, 100, 1000)):
    batch = draw(st.integers(1, max_batch))
    num = draw(st.sampled_from([c for c in classes if c >= min_classes]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(log_uniform(0.01, 30.0))
    s = scale * torch.randn(batch, num, generator=g, dtype=torch.float64)
    if draw(st.booleans()):  # a student close to its teacher
        t = s + draw(log_uniform(1e-4, 1.0)) * scale * torch.randn(batch, num, generator=g, dtype=torch.float64)
    else:
        t = scale * torch.randn(batch, num, generator=g, dtype=torch.float64)
    offset = draw(st.sampled_from([0.0, 0.0, 1e3, -3e3]))
    target = torch.randint(0, num, (batch,), generator=g)
    return s + offset, t - offset / 2, target, draw(log_uniform(0.3, 1e6))


def kd_scale(s64, t64, temperature, weight=1.0):
    """T/B·max over the classes of (p_s + p_t)(1 + |w| + KL_b): the size of the terms the gradients sum."""
    log_p_s, log_p_t = F.log_softmax(s64 / temperature, 1), F.log_softmax(t64 / temperature, 1)
    w = log_p_t - log_p_s
    kl = (log_p_t.exp() * w).sum(1, keepdim=True).abs()
    terms = (log_p_s.exp() + log_p_t.exp()) * (1 + w.abs() + kl)
    return weight * temperature / s64.shape[0] * terms.max().item()


def value_scale(want, s64, t64, temperature, dtype):
    """|loss| and, for a loss that is (nearly) 0, the second-order rounding of the log-ratios themselves:
    T²·ε·max|x/T|² (the one-class KD, a student equal to its teacher)."""
    z = max(s64.abs().max().item(), t64.abs().max().item()) / temperature
    return abs(want.item()) + temperature**2 * EPS[dtype] * z * z


def logit_loss(loss, y, temperature):
    if loss == "kd":
        return lambda a, b: fk.kd_loss(a, b, temperature)
    return lambda a, b: fk.dkd_loss(a, b, y, 1.0, 8.0, temperature)


def plain_loss(loss, y, temperature):
    """The published computation: log_softmax and Σ p_t (log p_t − log p_s), by autograd."""
    if loss == "kd":
        return lambda a, b: logit_ops.kd_reference(a, b, temperature)
    return lambda a, b: logit_ops.dkd_reference(a, b, y, 1.0, 8.0, temperature)


def contract_loss(loss, y, temperature):
    """The ops' contract (sums of non-negative terms, no cancellation), evaluated in torch: the float64 oracle."""
    if loss == "kd":
        return lambda a, b: logit_ops.kd_forward_reference(a, b, temperature)[0]
    return lambda a, b: logit_ops.dkd_forward_reference(a, b, y, 1.0, 8.0, temperature)[0]


def check_logit_backend(loss, backend, s, t, y, temperature, dtype, layout, teacher_grad):
    xs, xt = laid_out(s.to(dtype), layout), laid_out(t.to(dtype), layout)
    s64, t64 = xs.double(), xt.double()
    want, want_g = grads(contract_loss(loss, y, temperature), (s64, True), (t64, teacher_grad))
    plain, plain_g = grads(plain_loss(loss, y, temperature), (xs, True), (xt, teacher_grad))
    with fastkd.use_backend(backend):
        got, got_g = grads(logit_loss(loss, y, temperature), (xs, True), (xt, teacher_grad))
    assert got.dtype == dtype and torch.isfinite(got) and got.item() >= 0
    assert_within("value", got, plain, want, dtype, value_scale(want, s64, t64, temperature, dtype))
    scale = kd_scale(s64, t64, temperature, 1.0 if loss == "kd" else 9.0)
    for name, g, p, w in zip(("student", "teacher"), got_g, plain_g, want_g):
        assert_within(name, g, p, w, dtype, scale)


@pytest.mark.native
@pytest.mark.parametrize("loss", ["kd", "dkd"])
@bounded(150)
@given(case=logit_cases(), dtype=FLOATS, layout=LAYOUTS, teacher_grad=st.booleans())
def test_logit_ops_native(loss, case, dtype, layout, teacher_grad):
    s, t, y, temperature = case
    if loss == "dkd" and s.shape[1] < 2:
        s, t = torch.cat([s, t], 1), torch.cat([t, s], 1)
    check_logit_backend(loss, "native", s, t, y, temperature, dtype, layout, teacher_grad)


@pytest.mark.parametrize("loss", ["kd", "dkd"])
@bounded(40)
@given(case=logit_cases(classes=(2, 9, 100)), dtype=FLOATS, teacher_grad=st.booleans())
def test_logit_ops_torch_backend_is_the_published_computation(loss, case, dtype, teacher_grad):
    s, t, y, temperature = case
    xs, xt = s.to(dtype), t.to(dtype)
    with fastkd.use_backend("torch"):
        got, got_g = grads(logit_loss(loss, y, temperature), (xs, True), (xt, teacher_grad))
    want, want_g = grads(plain_loss(loss, y, temperature), (xs, True), (xt, teacher_grad))
    assert torch.equal(got, want) and all(torch.equal(g, w) for g, w in zip(got_g, want_g) if w is not None)


@pytest.mark.parametrize("loss", ["kd", "dkd"])
@bounded(10)
@given(case=logit_cases(min_classes=2, max_batch=3, classes=(2, 15, 16, 17, 40)), layout=LAYOUTS)
def test_logit_ops_triton_interpreted(loss, case, layout):
    """The Triton kernels (the interpreter on CPU: tiny, fp32, 16-column chunks so that rows loop)."""
    s, t, y, temperature = case
    xs, xt = laid_out(s.float(), layout), laid_out(t.float(), layout)
    one = torch.tensor(1.0)
    if loss == "kd":
        value, stats = logits_triton.kd_loss(xs, xt, temperature, block=16)
        got_g = logits_triton.kd_loss_backward(one, xs, xt, stats, temperature, True, block=16)
    else:
        value, stats = logits_triton.dkd_loss(xs, xt, y, 1.0, 8.0, temperature, block=16)
        got_g = logits_triton.dkd_loss_backward(one, xs, xt, y, stats, 1.0, 8.0, temperature, True, block=16)
    want, want_g = grads(contract_loss(loss, y, temperature), (xs.double(), True), (xt.double(), True))
    plain, plain_g = grads(plain_loss(loss, y, temperature), (xs, True), (xt, True))
    assert_within("value", value, plain, want, torch.float32,
                  value_scale(want, xs.double(), xt.double(), temperature, torch.float32))
    scale = kd_scale(xs.double(), xt.double(), temperature, 1.0 if loss == "kd" else 9.0)
    for name, g, p, w in zip(("student", "teacher"), got_g, plain_g, want_g):
        assert_within(name, g, p, w, torch.float32, scale)


@bounded(30)
@given(case=logit_cases(classes=(7, 100)), half=st.sampled_from([torch.float16, torch.bfloat16]))
def test_logit_losses_half_precision_through_the_torch_reference(case, half):
    """fp16 / bf16 logits on the torch backend: the loss in fp32, as accurate as fp32 on the rounded logits."""
    s, t, y, temperature = case
    xs, xt = s.clamp(-6e4, 6e4).to(half), t.clamp(-6e4, 6e4).to(half)
    for loss in ("kd", "dkd"):
        if loss == "dkd" and xs.shape[1] < 2:
            continue
        with fastkd.use_backend("torch"):
            got = logit_loss(loss, y, temperature)(xs, xt)
            want = logit_loss(loss, y, temperature)(xs.double(), xt.double())
        assert got.dtype == torch.float32
        plain = plain_loss(loss, y, temperature)(xs, xt)
        assert_within(loss, got, plain, want, torch.float32,
                      value_scale(want, xs.double(), xt.double(), temperature, torch.float32))


# ---------------------------------------------------------------- batch relations

RELATIONS = {
    # name: (functional on [B, D] inputs, the least batch, whether the teacher gets a gradient, the rounding
    # of a loss of (nearly) 0 relative to ε: squared differences of O(1) entries (ε), PKT's P·log(P_t/P_s)
    # with P ~ 1/B (1/B))
    "sp": (fk.sp_loss, 1, True, lambda b, eps: eps),
    "cckd": (lambda a, b: fk.cckd_loss(a, b, gamma=0.4, order=3), 1, True, lambda b, eps: eps),
    "pkt": (fk.pkt_loss, 1, True, lambda b, eps: 1.0 / b),
    "rkd_distance": (lambda a, b: fk.rkd_loss(a, b, w_dist=1.0, w_angle=0.0), 2, False, lambda b, eps: eps),
    "rkd_angle": (lambda a, b: fk.rkd_loss(a, b, w_dist=0.0, w_angle=1.0), 2, False, lambda b, eps: eps),
}
WIDTHS = (1, 2, 7, 8, 9, 255, 256, 257, 1023, 1024, 1025)


@st.composite
def relation_cases(draw, least_batch):
    batch = draw(st.sampled_from([b for b in (1, 2, 3, 8, 31, 32, 33) if b >= least_batch]))
    d_s, d_t = draw(st.sampled_from(WIDTHS)), draw(st.sampled_from(WIDTHS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(log_uniform(1e-2, 1e2))
    s = scale * torch.randn(batch, d_s, generator=g, dtype=torch.float64)
    t = scale * torch.randn(batch, d_t, generator=g, dtype=torch.float64)
    return s, t


def relation_grad_scale(want_grad, x):
    """max |gradient|, and the gradient of O(1) relation entries rounded at ε: 1/(B·min_i ‖x_i‖) (∂cos/∂x ~ 1/‖x‖)."""
    norms = x.double().reshape(x.shape[0], -1).norm(dim=1)
    return want_grad.abs().max().item() + 1.0 / (x.shape[0] * norms.min().clamp_min(1e-30).item())


@pytest.mark.native
@pytest.mark.parametrize("name", RELATIONS)
@bounded(50)
@given(data=st.data(), dtype=FLOATS, layout=LAYOUTS)
def test_relation_ops_native(name, data, dtype, layout):
    fn, least, teacher_grad, floor = RELATIONS[name]
    s, t = data.draw(relation_cases(least))
    xs, xt = laid_out(s.to(dtype), layout), laid_out(t.to(dtype), layout)
    with fastkd.use_backend("torch"):
        want, want_g = grads(fn, (xs.double(), True), (xt.double(), teacher_grad))
        plain, plain_g = grads(fn, (xs, True), (xt, teacher_grad))
    with fastkd.use_backend("native"):
        got, got_g = grads(fn, (xs, True), (xt, teacher_grad))
    assert got.dtype == dtype
    assert_within("value", got, plain, want, dtype, abs(want.item()) + floor(xs.shape[0], EPS[dtype]))
    for side, g, p, w, x in zip(("student", "teacher"), got_g, plain_g, want_g, (xs, xt)):
        assert_within(side, g, p, w, dtype, relation_grad_scale(w, x))


@pytest.mark.native
@bounded(40)
@given(data=st.data(), dtype=FLOATS, c_s=st.sampled_from([1, 3, 8, 9]), c_t=st.sampled_from([1, 4, 16]),
       side=st.sampled_from([1, 2, 3, 5]), batch=st.sampled_from([1, 2, 5]))
def test_nst_native(data, dtype, c_s, c_t, side, batch):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    f_s = torch.randn(batch, c_s, side, side, generator=g, dtype=torch.float64).to(dtype)
    f_t = torch.randn(batch, c_t, side, side, generator=g, dtype=torch.float64).to(dtype)
    if data.draw(st.booleans()):  # channels-last strides
        f_s, f_t = f_s.contiguous(memory_format=torch.channels_last), f_t.contiguous(memory_format=torch.channels_last)
    with fastkd.use_backend("torch"):
        want, want_g = grads(fk.nst_loss, (f_s.double(), True), (f_t.double(), True))
        plain, plain_g = grads(fk.nst_loss, (f_s, True), (f_t, True))
    with fastkd.use_backend("native"):
        got, got_g = grads(fk.nst_loss, (f_s, True), (f_t, True))
    assert_within("value", got, plain, want, dtype, abs(want.item()) + EPS[dtype])
    for side_name, g_, p, w, x in zip(("student", "teacher"), got_g, plain_g, want_g, (f_s, f_t)):
        assert_within(side_name, g_, p, w, dtype, relation_grad_scale(w, x.flatten(2).flatten(0, 1)))


@bounded(30)
@given(data=st.data(), dtype=FLOATS, n=st.sampled_from([1, 3, 12]), m=st.sampled_from([1, 4]),
       width=st.sampled_from([1, 7, 8, 9, 64]), layout=LAYOUTS)
def test_cosine_matrix(data, dtype, n, m, width, layout):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    a = laid_out(torch.randn(n, width, generator=g, dtype=torch.float64).to(dtype), layout)
    b = laid_out(torch.randn(m, width, generator=g, dtype=torch.float64).to(dtype), layout)
    fn = lambda x, y: fk.cosine_similarity_matrix(x, y).sum()  # noqa: E731
    with fastkd.use_backend("torch"):
        want, want_g = grads(fn, (a.double(), True), (b.double(), True))
        plain, plain_g = grads(fn, (a, True), (b, True))
    got, got_g = grads(fn, (a, True), (b, True))  # the op fastkd::cosine_matrix (its reference kernel on CPU)
    assert_within("value", got, plain, want, dtype, float(n * m))
    for side, g_, p, w in zip("ab", got_g, plain_g, want_g):
        assert_within(side, g_, p, w, dtype, w.abs().max().item() + 1.0)


@bounded(30)
@given(data=st.data(), batch=st.sampled_from([1, 2, 5]), negatives=st.sampled_from([1, 4, 16]),
       temperature=st.sampled_from([0.07, 0.5]), estimated=st.booleans())
def test_crd_nce_reference(data, batch, negatives, temperature, estimated):
    """CRD's NCE through its torch contract (fp32 against fp64), the published form as the yardstick."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    num_data, dim = 40, 8
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    v_s, v_t, mem_s, mem_t = unit(batch, dim), unit(batch, dim), unit(num_data, dim), unit(num_data, dim)
    cidx = torch.randint(0, num_data, (batch, negatives + 1), generator=g)
    z = torch.tensor(-1.0 if estimated else 3.0, dtype=torch.float64)
    rng = torch.zeros(2, dtype=torch.int64)

    def contract(dtype):
        cast = [x.to(dtype) for x in (v_s, v_t, mem_s, mem_t)]
        out = crd.nce_with_grad_reference(*cast, cidx[:, 0], cidx, z.to(dtype), z.to(dtype), rng, negatives,
                                          temperature, 0.0, False)
        return out[0], out[3], out[4]

    def published(dtype):
        a, b = v_s.to(dtype).requires_grad_(), v_t.to(dtype).requires_grad_()
        loss = crd.nce_reference(a, b, mem_s.to(dtype), mem_t.to(dtype), cidx, z.to(dtype), z.to(dtype),
                                 temperature, num_data)[0]
        return (loss.detach(), *torch.autograd.grad(loss, (a, b)))

    want, got, plain = contract(torch.float64), contract(torch.float32), published(torch.float32)
    for name, x, p, w in zip(("value", "grad_s", "grad_t"), got, plain, want):
        assert_within(name, x, p, w, torch.float32, w.abs().max().item())


@bounded(30)
@given(data=st.data(), pairs=st.sampled_from([1, 2, 3]), batch=st.sampled_from([1, 2, 5]),
       negatives=st.sampled_from([1, 4, 16]), num_data=st.sampled_from([3, 40, 400]),
       temperature=st.sampled_from([0.07, 0.5]), estimated=st.booleans(), z_momentum=st.sampled_from([0.0, 0.5]))
def test_crd_nce_multi(data, pairs, batch, negatives, num_data, temperature, estimated, z_momentum):
    """The multi-bank op (the native kernel on CPU, dense or gather by the sizes) in fp32 against its contract in
    fp64, and every pair equal to the single-pair op on its own bank."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    dim = 8
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    v_s, v_t, mem_s, mem_t = unit(pairs, batch, dim), unit(pairs, batch, dim), unit(num_data, pairs, dim), unit(
        num_data, pairs, dim)
    idx = torch.randint(0, num_data, (batch,), generator=g)
    log_z = torch.full((pairs,), float("-inf") if estimated else 3.0, dtype=torch.float64)
    rng = torch.tensor([data.draw(st.integers(0, 2**40)), 5])
    args = (idx, None, log_z, log_z.clone(), rng, negatives, temperature, z_momentum, False)
    want = crd.nce_multi_with_grad_reference(v_s, v_t, mem_s, mem_t, *args)
    f32 = [x.float() for x in (v_s, v_t, mem_s, mem_t)]
    got = crd.CRD_NCE_MULTI(*f32, idx, None, log_z.float(), log_z.float(), rng, negatives, temperature, z_momentum,
                            False)
    for name, x, w in zip(("loss", "log_z_s", "log_z_t", "grad_s", "grad_t"), got, want):
        assert rel(x, w) <= 1e-4, name
    for m in range(pairs):
        one = crd.CRD_NCE(f32[0][m], f32[1][m], f32[2][:, m].contiguous(), f32[3][:, m].contiguous(), idx, None,
                          log_z[m].float(), log_z[m].float(), rng, negatives, temperature, z_momentum, False)
        assert rel(got[0][m], one[0]) <= 1e-5 and rel(got[3][m], one[3]) <= 1e-5


# ---------------------------------------------------------------- refused calls leave their inputs alone


def _maps(g, *shape):
    return torch.randn(*shape, generator=g)


# (name, the call, its good tensors, [(badness, a function of those tensors that makes the call bad)])
def _refusal_cases():
    y3 = torch.tensor([0, 2, 1])
    return {
        "kd": (lambda s, t, T=4.0: fastkd.KDLoss(T)(s, t), ((3, 5), (3, 5)),
               {"option": dict(T=float("nan")), "shape": "narrow_t"}),
        "dkd": (lambda s, t, alpha=1.0: fastkd.DKDLoss(alpha=alpha)(s, t, y3), ((3, 5), (3, 5)),
                {"option": dict(alpha=-1.0), "shape": "narrow_t"}),
        "rkd": (lambda s, t, w_dist=25.0: fastkd.RKDLoss(w_dist=w_dist)(s, t), ((4, 6), (4, 3)),
                {"option": dict(w_dist=float("nan")), "shape": "short_t"}),
        "pkt": (lambda s, t, eps=1e-7: fastkd.PKTLoss(eps)(s, t), ((4, 6), (4, 3)),
                {"option": dict(eps=-1.0), "shape": "short_t"}),
        "cckd": (lambda s, t, order=2: fastkd.CCKDLoss(order=order)(s, t), ((4, 6), (4, 3)),
                 {"option": dict(order=-1), "shape": "short_t"}),
        "sp": (lambda s, t: fastkd.SPLoss()(s, t), ((4, 6), (4, 3)), {"shape": "short_t"}),
        "at": (lambda s, t, p=2.0: fastkd.ATLoss(p)(s, t), ((2, 3, 4, 4), (2, 5, 4, 4)),
               {"option": dict(p=0.0), "shape": "short_t"}),
        "ft": (lambda s, t, p2=1.0: fastkd.FTLoss(p2=p2)(s, t), ((2, 3, 4, 4), (2, 5, 4, 4)),
               {"option": dict(p2=float("inf")), "shape": "short_t"}),
        "ab": (lambda s, t, margin=1.0: fastkd.ABLoss(margin)(s, t), ((2, 3, 4, 4), (2, 3, 4, 4)),
               {"option": dict(margin=-0.5), "shape": "narrow_t"}),
        "nst": (lambda s, t: fastkd.NSTLoss()(s, t), ((2, 3, 4, 4), (2, 5, 4, 4)), {"shape": "short_t"}),
    }


REFUSALS = _refusal_cases()


@bounded(100)
@given(name=st.sampled_from(sorted(REFUSALS)), badness=st.sampled_from(["option", "shape", "nan_s", "nan_t"]),
       seed=st.integers(0, 1000), backend=st.sampled_from(["torch", "auto"]))
def test_refused_calls_leave_every_tensor_bit_identical(name, badness, seed, backend):
    call, shapes, bad = REFUSALS[name]
    if badness in ("option", "shape") and badness not in bad:
        badness = "shape"
    g = torch.Generator().manual_seed(seed)
    s, t = _maps(g, *shapes[0]), _maps(g, *shapes[1])
    kwargs = {}
    if badness == "option":
        kwargs = bad["option"]
    elif badness == "shape":
        t = t[:, :-1] if bad["shape"] == "narrow_t" else t[:-1]
    else:
        spoilt = s if badness == "nan_s" else t
        spoilt.view(-1)[seed % spoilt.numel()] = float("nan")
    before = [x.clone() for x in (s, t)]
    with fastkd.use_backend(backend), pytest.raises((ValueError, TypeError)):
        call(s, t, **kwargs)
    for x, b in zip((s, t), before):
        assert torch.equal(x.view(torch.int32), b.view(torch.int32))  # bit for bit, NaN included


@bounded(20)
@given(seed=st.integers(0, 1000), badness=st.sampled_from(["shape", "nan", "dtype"]))
def test_refused_calls_leave_module_state_alone(seed, badness):
    """Modules with parameters and buffers (SRD's BatchNorm statistics, CCKD's embeds): a refused forward
    changes neither their inputs nor their state."""
    g = torch.Generator().manual_seed(seed)
    for module, shapes in ((fastkd.SRDLoss(4, 6), ((3, 4), (3, 6))),
                           (fastkd.CCKDLoss(s_dim=4, t_dim=6, feat_dim=3), ((3, 4), (3, 6)))):
        s, t = _maps(g, *shapes[0]), _maps(g, *shapes[1])
        if badness == "shape":
            s = s[:, :-1]
        elif badness == "nan":
            t[seed % t.shape[0], 0] = float("nan")
        else:
            t = t.double()
        before = [x.clone() for x in (s, t)]
        state = {k: v.clone() for k, v in module.state_dict().items()}
        with pytest.raises((ValueError, TypeError)):
            module(s, t)
        for x, b in zip((s, t), before):
            assert x.dtype == b.dtype and torch.equal(x.view(torch.uint8), b.view(torch.uint8))
        assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())

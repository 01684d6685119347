"""torch.compile with its default backend (inductor) over fastkd's losses on CUDA tensors: one graph
(``fullgraph=True``: a graph break is an error) and the eager run's numbers.

Inductor generates CUDA code around the custom ops (the embeds and normalisation of CRD, the sums of several
losses, the backward's glue), so it is only exercised on a GPU; the CPU twins trace under ``aot_eager``
(tests/test_crd.py, tests/test_logits_ops.py). gpu-check runs these in its CUDA test stage.
"""
import copy

import pytest
import torch
from torch.testing import assert_close

import fastkd
from fastkd import functional as F
from fastkd.backends import implementations
from fastkd.ops import logits as logit_ops

pytestmark = pytest.mark.cuda
DEVICE = "cuda"


def generator(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


@pytest.mark.parametrize("backend", ["auto", "native"])
def test_crd_step_compiles(backend):
    """Two steps (Z estimated, then used) of a compiled CRDLoss: loss, gradients, banks, Z and sampler as eager."""
    if backend not in ("auto", *implementations("crd_nce", DEVICE)):
        pytest.skip(f"no {backend} CRD kernels for {DEVICE} tensors here")
    torch.manual_seed(0)
    eager = fastkd.CRDLoss(64, 48, 4000, feat_dim=32, num_negatives=300, seed=2).to(DEVICE)
    twin = copy.deepcopy(eager)
    step = torch.compile(twin, fullgraph=True)
    g = generator(1)
    with fastkd.use_backend(backend), fastkd.value_checks(False):
        for _ in range(2):
            f_s = torch.randn(16, 64, device=DEVICE, generator=g)
            f_t = torch.randn(16, 48, device=DEVICE, generator=g)
            idx = torch.randint(0, 4000, (16,), device=DEVICE, generator=g)
            a, b = f_s.clone().requires_grad_(), f_s.clone().requires_grad_()
            got = step(a, f_t, idx)
            got.backward()
            want = eager(b, f_t, idx)
            want.backward()
            assert_close(got, want, rtol=1e-5, atol=0)
            assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    for name, value in eager.state_dict().items():
        assert_close(twin.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(twin.rng_state, eager.rng_state)
    assert twin.embed_s.weight.grad is not None
    assert_close(twin.embed_s.weight.grad, eager.embed_s.weight.grad, rtol=1e-4, atol=1e-7)


def test_logit_losses_compile_in_bf16():
    """KD + DKD on bf16 logits, compiled: the float64 contract's value and gradient (fp32 accumulation inside)."""
    g = generator(3)
    s = torch.randn(64, 1000, device=DEVICE, generator=g).mul(3).bfloat16().requires_grad_()
    t = torch.randn(64, 1000, device=DEVICE, generator=g).mul(3).bfloat16()
    y = torch.randint(0, 1000, (64,), device=DEVICE, generator=g)
    fn = torch.compile(lambda a, b, c: F.kd_loss(a, b) + F.dkd_loss(a, b, c), fullgraph=True)
    with fastkd.value_checks(False):
        got = fn(s, t, y)
        got.backward()
    s64 = s.detach().double().requires_grad_()
    want = logit_ops.kd_reference(s64, t.double(), 4.0) + logit_ops.dkd_reference(s64, t.double(), y, 1.0, 8.0, 4.0)
    want.backward()
    assert got.dtype == torch.float32
    assert_close(got.double(), want, rtol=1e-4, atol=0)
    assert_close(s.grad.double(), s64.grad, rtol=2e-2, atol=1e-2 * s64.grad.abs().max().item())


def test_relation_losses_compile():
    """SP + CCKD + PKT in one compiled graph: the eager run's value and gradients."""
    g = generator(4)
    maps = torch.randn(32, 16, 4, 4, device=DEVICE, generator=g), torch.randn(32, 24, 4, 4, device=DEVICE, generator=g)
    emb = torch.randn(32, 64, device=DEVICE, generator=g), torch.randn(32, 96, device=DEVICE, generator=g)

    def losses(m_s, m_t, e_s, e_t):
        return F.sp_loss(m_s, m_t) + F.cckd_loss(e_s, e_t) + F.pkt_loss(e_s, e_t)

    compiled = torch.compile(losses, fullgraph=True)
    results = []
    with fastkd.value_checks(False):
        for fn in (compiled, losses):
            m_s, e_s = maps[0].clone().requires_grad_(), emb[0].clone().requires_grad_()
            value = fn(m_s, maps[1], e_s, emb[1])
            (1.5 * value).backward()
            results.append((value.detach(), m_s.grad, e_s.grad))
    for got, want in zip(*results):
        assert_close(got, want, rtol=1e-5, atol=1e-7)
